"""Content scanners before the 250: rspamd (spam) and clamd (viruses) at the end of DATA.

Why a package of its own: the scanners are external daemons spoken to over a socket, with
their own failure modes (down, slow, garbage), while ``pyqmail.checks`` computes verdicts
itself. ``smtpd/intake.py`` calls ``stage.run`` after the inbound authentication checks and
before the commit; the answer is one ``Verdict`` (accept, defer, refuse), whether the
message goes to the Junk folder (the same queue meta ``junk`` a DMARC quarantine sets), and
the header fields to add and remove.

``settings``: the control files (which scanners, where, the time bound, what a failure
gets, who is scanned). ``rspamd``: its HTTP ``/checkv2`` protocol. ``clamd``: ``INSTREAM``.
``stage``: both within one time bound, and what their answers mean for the message.
"""

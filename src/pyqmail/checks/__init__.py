"""Checks on inbound mail, between the session's envelope events and the queue.

Each check answers with a ``verdict.Verdict`` (accept, defer or refuse) and the key=value
pairs its log line gets. ``smtpd/session.py`` calls them with the envelope, ``smtpd/intake.py``
with the message; the checks themselves know no sockets.

Modules: ``recipients`` (unknown local recipients at RCPT), ``greet`` (the greeting pause on
port 25), ``dnsbl`` and ``greylist`` (blocklists, greylisting; ``screen`` ties them to a
session).
"""

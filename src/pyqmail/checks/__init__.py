"""Checks on inbound mail, between the session's envelope events and the queue.

Each check answers with a ``verdict.Verdict`` (accept, defer or refuse) and the key=value
pairs its log line gets. ``smtpd/session.py`` calls them with the envelope, ``smtpd/intake.py``
with the message; the checks themselves know no sockets.
"""

"""Checks on inbound mail: verdicts between the session's envelope events and the queue.

Each module owns one check and answers with a ``Verdict`` (``verdict.py``): accept, defer
(4xx) or refuse (5xx), with the reply and the key=value pairs for the log line. The message
authentication checks (``spf``, ``dkimverify``, ``dmarc``) only compute results; what they
mean for the message (refuse, quarantine, a header) is decided by ``authresults``.

The other modules: ``recipients`` (unknown local recipients at RCPT), ``greet`` (the
greeting pause on port 25), ``dnsbl`` and ``greylist`` (blocklists, greylisting; ``screen``
ties them to a session).
"""

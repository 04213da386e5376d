"""DKIM signing (RFC 6376, RFC 8463) for pyqmail-send.

``keys``: ``control/dkimkeys`` (which key signs for which domain) and loading the key files;
``sign``: canonicalization and the DKIM-Signature header fields; ``policy``: which queued
messages are signed (the envelope's ``origin`` and the header From domain).

Where signing happens and why: ``src/pyqmail/README.md`` ("Signing") and
``src/pyqmail/queue/README.md`` (the ``dkim`` record of ``state/``).
"""

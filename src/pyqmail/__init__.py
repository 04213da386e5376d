"""pyqmail: a qmail-style TLS mail server (receiver, durable queue, delivery) in Python."""

__version__ = "0.1.0"

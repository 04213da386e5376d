"""Checks on inbound mail: between the session's envelope events and the queue.

Each module answers for one check (``recipients``: unknown local recipients at RCPT;
``greet``: the greeting pause on port 25); ``pyqmail.smtpd`` calls them and turns their
answers into replies and log lines.
"""

"""pyqmail-smtpd: the listener daemon (CLI, supervisor, sessions, limits, policy)."""

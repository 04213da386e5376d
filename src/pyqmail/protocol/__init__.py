"""The sans-I/O SMTP core: states, events, addresses, HELO rules."""

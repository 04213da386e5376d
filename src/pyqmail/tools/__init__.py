"""Command-line tools: sendmail, the queue tool, the users tool, checkpassword, the DNS
check, and the restart of services still running code an upgrade deleted."""

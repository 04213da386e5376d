"""Command-line tools: sendmail, the queue tool, the users tool, checkpassword."""

"""Command-line tools: sendmail, the queue tool, checkpassword."""

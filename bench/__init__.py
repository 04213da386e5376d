"""Load benchmarks of pyqmail-smtpd against its peers (Postfix, aiosmtpd); see README.md."""

"""pyqmail: a qmail-style TLS mail server (receiver, durable queue, delivery) in Python."""

# The version of the daemon and of the collection pyqmail.mail: galaxy.yml's version must be the
# same (scripts/version, tests/roles/test_collection.py); pyproject.toml reads it from here.
__version__ = "1.0.0"

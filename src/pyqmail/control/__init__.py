"""Control files: how each daemon reads ``<root>/control``."""

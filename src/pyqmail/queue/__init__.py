"""The mail queue: on-disk format, writer, the one group-commit path, state records."""

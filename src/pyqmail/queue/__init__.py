"""The mail queue: on-disk format, writers, the one group-commit path, the directory, and
the delivery state records. How a message moves through it: ``README.md`` in this package."""

"""pyqmail-smtpd's entry point: the program's two halves, chosen before either is imported.

``pyqmail-smtpd ARGS`` runs ``cli`` (parse the command line, bind the sockets, then serve or
check). With more than one worker ``cli`` then replaces itself, by ``exec``, with the same
program as ``pyqmail-smtpd --supervise=FD,FD ARGS``: the supervisor (``prefork``), which
imports nothing of the daemon, so that its few megabytes are all it costs (``prefork``
says why that matters). This module imports only ``sys`` and ``importlib`` for the same
reason: it is the supervisor's ``__main__`` too.
"""

from __future__ import annotations

import importlib
import sys

SUPERVISE = "--supervise="


def main(argv: list[str] | None = None) -> int:
    """The supervisor for ``--supervise=FDS ARGS`` (only ``cli`` passes it), else ``cli``."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0].startswith(SUPERVISE):
        prefork = importlib.import_module("pyqmail.smtpd.prefork")
        return int(prefork.supervise(args[0].removeprefix(SUPERVISE), args[1:]))
    cli = importlib.import_module("pyqmail.smtpd.cli")
    return int(cli.main(args))


if __name__ == "__main__":
    sys.exit(main())

"""What pyqmail-smtpd loads: every module it imports is in each of its processes' memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_receiver_does_not_load_the_signing_stack() -> None:
    """DKIM signing (pyqmail.dkim.keys, pyqmail.dkim.sign) is pyqmail-send's; their
    cryptography import cost pyqmail-smtpd 5 MiB of PSS over its three processes in
    make bench, through pyqmail.control.check's pyqmail-send check."""
    code = (
        "import sys, pyqmail.smtpd.cli, pyqmail.smtpd.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography' "
        "or m == 'pyqmail.dkim' or m.startswith('pyqmail.dkim.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout == "[]\n"


def test_the_send_check_still_loads_the_keys(tmp_path: Path) -> None:
    """pyqmail-send --check imports the key loader when it runs (not at import)."""
    code = (
        "import sys, pathlib, contextlib, io, pyqmail.control.check as c; "
        "before = 'pyqmail.dkim.keys' in sys.modules\n"
        "with contextlib.redirect_stderr(io.StringIO()): c.check_send(pathlib.Path(sys.argv[1]))\n"
        "print(before, 'pyqmail.dkim.keys' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout == "False True\n"

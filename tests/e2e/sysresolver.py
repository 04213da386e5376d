"""Run inside a private mount and network namespace by test_dns_check_sysresolver.py.

``python -m tests.e2e.sysresolver SPEC`` (SPEC a JSON file) expects to be where the test's
``unshare`` put it: a network namespace with nothing but ``lo`` (so port 53 on loopback is
free and nothing can leave it) and the test's own resolv.conf bind-mounted over
/etc/resolv.conf. It starts knot on 127.0.0.53 port 53 serving ``SPEC["system"]``: the
system resolver that resolv.conf names (it cannot name a port); with ``SPEC["nameserver"]``
a second knot on 127.0.0.1 and a free port for ``--nameserver``; the tests' HTTPS policy
server on 127.0.0.1 with a certificate of a throw-away CA. Then ``pyqmail-dns check
SPEC["zonefile"] --fetch-policy`` runs without ``--resolver``, and one JSON object is
printed: the command's exit code, output and error, the paths the web server was asked,
the --nameserver port, and /etc/resolv.conf as the command saw it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.dnsserver import DnsServer
from tests.e2e.test_dns_check import BIN
from tests.e2e.test_dns_check_policy import PolicyServer
from tests.pki import CA

SYSTEM = "127.0.0.53"  # the address the test's resolv.conf names


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ca = CA()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sysresolver-")))
        stack.enter_context(DnsServer(spec["system"], host=SYSTEM, port=53))
        argv = [str(BIN / "pyqmail-dns"), "check", spec["zonefile"], "--fetch-policy"]
        port = None
        if spec.get("nameserver"):
            own = stack.enter_context(DnsServer(spec["nameserver"]))
            argv += ["--nameserver", own.host, "--port", str(own.port)]
            port = own.port
        web = PolicyServer(ca, tmp)
        stack.callback(web.close)
        cafile = tmp / "ca.pem"
        cafile.write_bytes(ca.cert_pem)
        argv += ["--timeout", "3", "--https-port", str(web.port), "--cafile", str(cafile)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        result = {
            "returncode": done.returncode,
            "stdout": done.stdout,
            "stderr": done.stderr,
            "paths": list(web.paths),
            "port": port,
            "resolv_conf": Path("/etc/resolv.conf").read_text(),
        }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])

"""The daemon on the Python a host runs it with: Debian 12's /usr/bin/python3 and its
packages (python3-dnspython 2.3, python3-cryptography 38, ...), not this virtualenv's newer
pip releases.

Why: the tests import pyqmail from the virtualenv, so a call that only a newer library has
passes every other test and still stops the daemon on every host (``dns.nameserver``, new in
dnspython 2.4, did exactly that in the molecule hosts). Here every module is imported, and
the DNS lookups of the inbound checks run, under Debian's interpreter.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.dnsserver import DnsServer

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
DEBIAN_PYTHON = "/usr/bin/python3"

IMPORT_ALL = """
import importlib, pkgutil, pyqmail
bad = []
for info in pkgutil.walk_packages(pyqmail.__path__, "pyqmail."):
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        bad.append(f"{info.name}: {exc!r}")
print("\\n".join(bad))
"""

LOOKUPS = """
import asyncio, sys
import dns.version
from pyqmail.checks import dnsbl, listlookup
from pyqmail.checks.resolver import make_resolver, txt
from pyqmail.dnslistspec import Entry
host, port = sys.argv[1], int(sys.argv[2])
settings = dnsbl.Settings(lists=(Entry("bl.example"),), nameservers=((host, port),), timeout=3)
result = asyncio.run(listlookup.Lookup(settings).check("127.0.0.9", settings))
print(dns.version.version)
print(result.log())
res = make_resolver([(host, port)], timeout=3)
print(txt(res, "sender.example"))
from pyqmail.checks import spf
from pyqmail.checks.dmarc import org_domain
helo, mail = spf.check(res, "127.0.0.7", "a@sender.example", "client.example", budget=3)
print(mail.result, org_domain("mx.sender.example.co.uk"))
"""

ZONES = {
    "bl.example.": "9.0.0.127 300 A 127.0.0.2\n",
    "sender.example.": '@ 300 TXT "v=spf1 -all"\n',
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


def debian_python(script: str, *args: str) -> str:
    """``script`` run by Debian's interpreter, isolated from this virtualenv, with pyqmail
    from the checkout."""
    proc = subprocess.run(
        [DEBIAN_PYTHON, "-c", f"import sys; sys.path.insert(0, {str(SRC)!r})\n{script}", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_every_module_imports_with_debians_packages() -> None:
    assert debian_python(IMPORT_ALL).strip() == ""


def test_the_inbound_checks_ask_the_named_server_with_debians_dnspython(dns: DnsServer) -> None:
    version, log, records, spf = debian_python(LOOKUPS, dns.host, str(dns.port)).splitlines()
    assert version.startswith("2.3."), version  # Debian 12's, not the virtualenv's
    assert log == "dnsbl=bl.example:127.0.0.2 dnsbl_score=1"
    assert records == "[b'v=spf1 -all']"
    assert spf == "fail example.co.uk"  # pyspf and the public suffix list, Debian's


# Each dependency of the wheel (pyproject.toml) and the Debian package that supplies it on a
# host, where the wheel is installed with --no-deps into a venv that sees Debian's packages.
DEBIAN_PACKAGE = {
    "dnspython": "python3-dnspython",
    "cryptography": "python3-cryptography",
    "pyspf": "python3-spf",
    "dkimpy": "python3-dkim",
    "pynacl": "python3-nacl",
    "authres": "python3-authres",
    "publicsuffix2": "python3-publicsuffix2",
}


def test_the_install_role_brings_every_dependency_from_debian() -> None:
    """A dependency the role does not install stops pyqmail-smtpd on every host at import
    (the inbound checks' python3-authres did, in the molecule hosts)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]
    unknown = [n for n in names if n not in DEBIAN_PACKAGE]
    assert not unknown, f"add the Debian package of {unknown} here and to pyqmail_install__packages"
    defaults = yaml.safe_load((REPO / "roles/pyqmail_install/defaults/main.yml").read_text())
    missing = {DEBIAN_PACKAGE[n] for n in names} - set(defaults["pyqmail_install__packages"])
    assert not missing, f"pyqmail_install__packages lacks {sorted(missing)}"

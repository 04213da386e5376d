"""``pyqmail-dns check --fetch-policy`` with the system resolver: /etc/resolv.conf, for real.

Without ``--resolver``, a name ``--nameserver`` does not serve (a hosting provider's, in the
CNAME chain of ``mta-sts.<domain>``) is asked of the system resolver; without
``--nameserver`` too, every name is. The other tests never use it: it would ask whatever
the machine's /etc/resolv.conf names, beyond loopback. Here the command runs in a private
mount and network namespace (``unshare --mount --net``, root only) with nothing but ``lo``,
where the test's own resolv.conf is bind-mounted over /etc/resolv.conf and names knot on
127.0.0.53 port 53, started inside with the policy's HTTPS server (tests/e2e/sysresolver.py
does that and runs the command). The real /etc/resolv.conf is neither changed nor mounted
over outside the namespace: each test checks it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.dnszone import zone
from tests.e2e.test_dns_check import served
from tests.e2e.test_dns_check_policy import A_RECORDS, HOSTED, HOSTING

ROOT = Path(__file__).resolve().parents[2]
RESOLV_CONF = "# pyqmail's test: the system resolver is knot inside the namespace\n"
RESOLV_CONF += "nameserver 127.0.0.53\n"
# Inside: lo up, the test's resolv.conf over /etc/resolv.conf, then the helper.
SCRIPT = 'ip link set lo up && mount --bind -- "$1" /etc/resolv.conf && shift && exec "$@"'


def _host_view() -> tuple[bytes, tuple[int, int, int], list[str]]:
    """/etc/resolv.conf as this namespace sees it: its bytes, inode, mtime, and the mounts
    on it (a bind mount leaking out of the test's namespace would show there)."""
    path = Path("/etc/resolv.conf")
    stat = path.stat()
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return (
        path.read_bytes(),
        (stat.st_dev, stat.st_ino, stat.st_mtime_ns),
        [m for m in mounts if " /etc/resolv.conf " in m],
    )


def run_with_system_resolver(
    tmp_path: Path,
    system: dict[str, str],
    nameserver: dict[str, str] | None,
    resolv_conf: str = RESOLV_CONF,
) -> dict[str, Any]:
    """The command in its namespace: knot serving ``system`` is the system resolver,
    ``nameserver`` (when given) a second knot asked with ``--nameserver``."""
    if os.geteuid() != 0:
        pytest.skip("a private mount and network namespace (unshare) needs root")
    missing = [tool for tool in ("unshare", "ip", "mount") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"a private namespace needs {', '.join(missing)} (not installed)")
    path = tmp_path / "dns.zone"
    path.write_text(zone())
    conf = tmp_path / "resolv.conf"
    conf.write_text(resolv_conf)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"zonefile": str(path), "system": system, "nameserver": nameserver}))
    before = _host_view()
    argv = ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", SCRIPT, "sh"]
    argv += [str(conf), sys.executable, "-m", "tests.e2e.sysresolver", str(spec)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env
    )
    assert _host_view() == before, "/etc/resolv.conf changed outside the namespace"
    assert done.returncode == 0 and done.stdout, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert result["resolv_conf"] == resolv_conf  # the command saw the test's, not the real one
    return result


def test_a_cname_chain_is_followed_through_the_system_resolver(tmp_path: Path) -> None:
    """--nameserver serves the domain (REFUSED for hosting.test, a referral for
    hosted.example.org); the system resolver serves both, and its answer for
    sts.hosted.example.org leads back to --nameserver's zone: both policies are fetched
    and judged the file's."""
    result = run_with_system_resolver(tmp_path, HOSTING, served(zone(), add=HOSTED))
    assert result["returncode"] == 0, result["stdout"] + result["stderr"]
    assert result["stdout"].endswith(" records published and 2 MTA-STS policies served\n")
    assert result["paths"] == ["/.well-known/mta-sts.txt"] * 2


def test_a_name_the_system_resolver_cannot_resolve_is_named(tmp_path: Path) -> None:
    """The system resolver has hosting.test without sts (NXDOMAIN) and does not serve
    hosted.example.org (REFUSED): each policy is MISSING with the hop, why --nameserver was
    not asked for it, that the system resolver was, and the address resolv.conf named."""
    system = {"hosting.test.": "web A 127.0.0.1\n"}
    result = run_with_system_resolver(tmp_path, system, served(zone(), add=HOSTED))
    assert result["returncode"] == 1, result["stdout"] + result["stderr"]
    lines = result["stdout"].splitlines()
    assert lines[-1].startswith("2 problem(s) in "), result["stdout"]
    port = result["port"]
    asked = "so the system resolver (/etc/resolv.conf) was asked"
    assert (
        "MISSING https://mta-sts.example.org/.well-known/mta-sts.txt: expected the policy, "
        f"found sts.hosting.test does not exist in DNS (--nameserver 127.0.0.1 port {port} "
        f"answered REFUSED, {asked}) (CNAME chain mta-sts.example.org -> sts.hosting.test)"
    ) in lines, result["stdout"]
    assert (
        "MISSING https://mta-sts.mx1.example.org/.well-known/mta-sts.txt: expected the policy, "
        "found sts.hosted.example.org: no answer from DNS: All nameservers failed to answer "
        "the query sts.hosted.example.org. IN CNAME: Server Do53:127.0.0.53@53 answered "
        f"REFUSED (--nameserver 127.0.0.1 port {port} gave no authoritative answer (a "
        f"referral), {asked}) (CNAME chain mta-sts.mx1.example.org -> sts.hosted.example.org)"
    ) in lines, result["stdout"]
    assert result["paths"] == []


def test_without_nameserver_the_system_resolver_answers_every_name(tmp_path: Path) -> None:
    """No --nameserver: the records and the policies' names (a chain through two zones)
    are all asked of the system resolver."""
    system = {**served(zone(), add=HOSTED), **HOSTING}
    result = run_with_system_resolver(tmp_path, system, None)
    assert result["returncode"] == 0, result["stdout"] + result["stderr"]
    assert re.fullmatch(
        r"all \d+ records published and 2 MTA-STS policies served\n", result["stdout"]
    )
    assert result["paths"] == ["/.well-known/mta-sts.txt"] * 2
    # The same without the A record of one policy's name: MISSING, the rest as before.
    system = served(zone(), add=A_RECORDS.splitlines()[0] + "\n")
    result = run_with_system_resolver(tmp_path, system, None)
    assert result["returncode"] == 1, result["stdout"] + result["stderr"]
    assert result["stdout"].splitlines()[-2:][0] == (
        "MISSING https://mta-sts.mx1.example.org/.well-known/mta-sts.txt: expected the "
        "policy, found mta-sts.mx1.example.org does not exist in DNS"
    ), result["stdout"]


def test_a_resolv_conf_without_a_nameserver_is_a_usage_error(tmp_path: Path) -> None:
    """No --nameserver and a resolv.conf naming no nameserver: exit 2 before any lookup,
    naming the file and what is wrong (it was dnspython's traceback)."""
    system = served(zone(), add=A_RECORDS)
    result = run_with_system_resolver(tmp_path, system, None, resolv_conf="# no server\n")
    assert (result["returncode"], result["stdout"], result["paths"]) == (2, "", [])
    assert result["stderr"] == (
        "pyqmail-dns: the system resolver cannot be used (no --nameserver): /etc/resolv.conf: "
        "no nameserver line\n"
    )


def test_a_nameserver_line_that_is_no_address_fails_the_names_that_needed_it(
    tmp_path: Path,
) -> None:
    """--nameserver serves the domain, and resolv.conf says ``nameserver localhost``
    (dnspython wants an address): the hops the system resolver was needed for are MISSING
    with the file's error, every other line as before (it was a traceback that lost them)."""
    conf = "nameserver localhost\n"
    result = run_with_system_resolver(
        tmp_path, HOSTING, served(zone(), add=HOSTED), resolv_conf=conf
    )
    assert result["returncode"] == 1, result["stdout"] + result["stderr"]
    assert result["stderr"] == ""
    lines = result["stdout"].splitlines()
    assert lines[-1].startswith("2 problem(s) in "), result["stdout"]
    # dnspython's own words for the bad line sit between the file's name and the note.
    line = re.escape(
        "MISSING https://mta-sts.example.org/.well-known/mta-sts.txt: expected the policy, "
        "found sts.hosting.test: no answer from DNS: /etc/resolv.conf: nameserver localhost "
    )
    line += r"[^()]+" + re.escape(
        f"(--nameserver 127.0.0.1 port {result['port']} answered REFUSED, so the system "
        "resolver (/etc/resolv.conf) was asked) (CNAME chain mta-sts.example.org -> "
        "sts.hosting.test)"
    )
    assert any(re.fullmatch(line, found) for found in lines), result["stdout"]
    assert result["paths"] == []

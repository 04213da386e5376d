"""Smoke test of the "port 25 with rspamd" bench row's parts (bench/scan_load.py): counts and
verdicts, not timings. Both servers really ask the one rspamd: pyqmail-smtpd over HTTP, Postfix
through rspamd's proxy in milter mode (a GTUBE message is refused by each), and the load
generator's messages are all accepted and stored by both."""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.certs import CertFiles, make_certs
from bench.scan_load import SCAN_WORKLOADS, PostfixScanned, PyqmailScanned
from bench.servers import Server
from bench.smtpd_load import run_load
from tests.scanners import GTUBE, Rspamd


@pytest.fixture
def base() -> Iterator[Path]:
    """Not under pytest's 0700 temp root: Postfix's daemons and the dropped pyqmail-smtpd
    must reach their queues."""
    path = Path(tempfile.mkdtemp(prefix="pyqmail-scanbench-test."))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def certs(base: Path) -> CertFiles:
    return make_certs(base / "tls")


def started(server: Server) -> Server:
    server.start()
    return server


@pytest.mark.parametrize("side", ["pyqmail", "postfix"])
def test_both_sides_ask_rspamd(
    base: Path, certs: CertFiles, rspamd_server: Rspamd, side: str
) -> None:
    server: Server = (
        PyqmailScanned(base, certs, rspamd_server.address)
        if side == "pyqmail"
        else PostfixScanned(base, certs, rspamd_server.proxy_port)
    )
    started(server)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as s:
            s.ehlo("client.test")
            s.mail("a@client.test")
            s.rcpt("u@bench.test")
            code, _ = s.data(b"From: <a@client.test>\r\nSubject: x\r\n\r\n" + GTUBE + b"\r\n")
        assert code == 554, (side, code)
        run = run_load(server, certs, SCAN_WORKLOADS[0], sessions=2, processes=1, messages=6)
        assert (run.messages, run.errors) == (6, 0), run.samples
        assert server.stored() == 6
        if isinstance(server, PyqmailScanned):
            assert len(server.scan_secs()) == 6
    finally:
        server.stop()

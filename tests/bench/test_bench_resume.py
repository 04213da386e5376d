"""The resumed STARTTLS workload (bench/resume.py): clients resume, against every server.

Counts, not timings: every message of a resumed run arrives, and every handshake but the
first of each concurrent session resumes (each generator process keeps its latest
session; its sessions start together, before any has one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.certs import CertFiles, make_certs
from bench.servers import AiosmtpdServer, PostfixServer, PyqmailServer, Server
from bench.smtpd_load import WORKLOADS, run_load
from tests.bench.test_bench_smoke import HAVE_POSTFIX, NO_POSTFIX, _loadgen, _world_reachable

RESUMED = next(w for w in WORKLOADS if w.resume)
FULL = next(w for w in WORKLOADS if w.starttls and not w.resume and w.per_session == 1)
SESSIONS = 4


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("bench-tls"))


@pytest.fixture(scope="module", params=["pyqmail", "postfix", "aiosmtpd"])
def server(request: pytest.FixtureRequest, certs: CertFiles) -> Iterator[Server]:
    if request.param == "postfix" and not HAVE_POSTFIX:
        pytest.skip(NO_POSTFIX)
    cls = {"pyqmail": PyqmailServer, "postfix": PostfixServer, "aiosmtpd": AiosmtpdServer}
    yield from _world_reachable(cls[request.param], certs)


def test_resumed_workload_resumes(server: Server, certs: CertFiles) -> None:
    before = server.stored()
    run = run_load(server, certs, RESUMED, sessions=SESSIONS, processes=2, messages=30)
    assert run.errors == 0, run.samples
    assert run.messages == 30
    assert server.stored() - before == 30
    assert run.handshakes == 30
    # aiosmtpd too: Python's default server context issues tickets (one process, one key)
    assert run.resumed >= run.handshakes - SESSIONS, (run.resumed, run.handshakes)


def test_full_handshake_workload_does_not_resume(server: Server, certs: CertFiles) -> None:
    run = run_load(server, certs, FULL, sessions=SESSIONS, processes=2, messages=10)
    assert run.errors == 0, run.samples
    assert (run.handshakes, run.resumed) == (10, 0)


def test_loadgen_resume_needs_starttls() -> None:
    proc = _loadgen("--port", "25", "--messages", "1", "--resume")
    assert proc.returncode == 2
    assert "--resume needs --starttls" in proc.stderr

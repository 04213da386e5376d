"""TLS session tickets (pyqmail.tickets): real OpenSSL handshakes over memory BIOs.

Two server contexts stand for two workers (or one worker before and after a HUP): each is
built on its own, so they share nothing but the ``TicketKeys`` object's keys. The clock is
the keys' own (``clock=``), so rotations happen without waiting hours; OpenSSL's own
session timeout still runs on the real clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import ssl
import time
from pathlib import Path

import pytest

from pyqmail import tickets, tls
from pyqmail.smtpd import server as servermod
from pyqmail.smtpd import start
from tests.conftest import PKI


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    servers: list[ssl.SSLObject] | None = None,
) -> tuple[bool, ssl.SSLSession | None]:
    """One connection: handshake, one byte each way (TLS 1.3 tickets come after the
    handshake), close. Returns (resumed, the session to resume next time); the server's
    end is appended to ``servers``."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    if servers is not None:
        servers.append(server)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)

    def pump() -> None:
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())

    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            pump()
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not finish"
    server.write(b"x")
    pump()
    assert client.read(1) == b"x"
    client.write(b"y")
    pump()
    assert server.read(1) == b"y"
    return client.session_reused, client.session


@pytest.fixture
def servercert(pki: PKI, tmp_path: Path) -> Path:
    return pki.ca.write_servercert(tmp_path / "servercert.pem", pki.server)


def worker(servercert: Path, keys: tickets.TicketKeys) -> ssl.SSLContext:
    """A server context as a worker builds it, tickets on."""
    ctx = tls.server_context(servercert)
    tickets.enable(ctx, keys, tickets.session_context(None))
    return ctx


def client(pki: PKI, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca_file)
    ctx.maximum_version = version
    return ctx


VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
def test_a_ticket_from_one_worker_resumes_on_another(
    servercert: Path, pki: PKI, version: ssl.TLSVersion
) -> None:
    keys = tickets.TicketKeys()
    one, two = worker(servercert, keys), worker(servercert, keys)
    cli = client(pki, version)
    resumed, session = handshake(one, cli)
    assert not resumed
    assert session is not None and session.has_ticket
    resumed, _ = handshake(two, cli, session)
    assert resumed
    assert two.session_stats()["hits"] == 1


def test_without_shared_keys_no_resumption(servercert: Path, pki: PKI) -> None:
    """The control: two workers with keys of their own (two starts) do not resume."""
    one = worker(servercert, tickets.TicketKeys())
    two = worker(servercert, tickets.TicketKeys())
    cli = client(pki, ssl.TLSVersion.TLSv1_3)
    _, session = handshake(one, cli)
    resumed, _ = handshake(two, cli, session)
    assert not resumed


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
def test_previous_key_resumes_older_falls_back(
    servercert: Path, pki: PKI, version: ssl.TLSVersion
) -> None:
    clock = Clock()
    keys = tickets.TicketKeys(lifetime=3600, clock=clock)
    ctx = worker(servercert, keys)
    cli = client(pki, version)
    _, session = handshake(ctx, cli)
    clock.now += 3600  # one rotation: the previous key still opens the ticket
    resumed, renewed = handshake(ctx, cli, session)
    assert resumed
    clock.now += 3600  # the first ticket's key is now two periods old
    resumed, _ = handshake(ctx, cli, session)
    assert not resumed
    if version == ssl.TLSVersion.TLSv1_3:
        # the ticket re-issued under the newer key still resumes
        resumed, _ = handshake(ctx, cli, renewed)
        assert resumed


def test_a_worker_forked_later_derives_the_same_keys(servercert: Path, pki: PKI) -> None:
    """Keys are a function of the secret and the period: a copy that ratchets later (a
    worker forked hours after the supervisor started) agrees with one that ratcheted early."""
    import copy

    clock = Clock()
    keys = tickets.TicketKeys(lifetime=60, clock=clock)
    later = copy.copy(keys)  # what fork gives a worker: the same state, the same clock
    early = worker(servercert, keys)
    clock.now += 60
    keys.advance()  # ratchets one period now
    clock.now += 60 * 5
    cli = client(pki, ssl.TLSVersion.TLSv1_3)
    _, session = handshake(early, cli)  # issued at period +6
    resumed, _ = handshake(worker(servercert, later), cli, session)  # ratchets 6 at once
    assert resumed


def test_no_server_side_session_cache(servercert: Path, pki: PKI) -> None:
    """Memory: many full and resumed handshakes leave the server's cache empty."""
    ctx = worker(servercert, tickets.TicketKeys())
    cli = client(pki, ssl.TLSVersion.TLSv1_2)
    cli13 = client(pki, ssl.TLSVersion.TLSv1_3)
    for _ in range(20):
        _, session = handshake(ctx, cli)
        handshake(ctx, cli, session)
        _, session = handshake(ctx, cli13)
        handshake(ctx, cli13, session)
    assert tickets.cached_sessions(ctx) == 0
    assert ctx.session_stats()["hits"] == 40


def test_changed_clientca_means_full_handshake(servercert: Path, pki: PKI) -> None:
    """A session carries the client certificate verified at its full handshake: under
    another clientca.pem (a HUP) it must not resume."""
    keys = tickets.TicketKeys()
    before = tls.server_context(servercert, pki.ca_file)
    tickets.enable(before, keys, tickets.session_context(pki.ca_file.read_bytes()))
    after = tls.server_context(servercert, pki.ca_file)
    tickets.enable(after, keys, tickets.session_context(pki.ca_file.read_bytes() + b"\n"))
    cli = client(pki, ssl.TLSVersion.TLSv1_3)
    _, session = handshake(before, cli)
    assert handshake(before, cli, session)[0]
    assert not handshake(after, cli, session)[0]


def test_relay_by_certificate_ends_with_the_certificate_across_resumptions(
    servercert: Path, pki: PKI, tmp_path: Path
) -> None:
    """A TLS 1.3 ticket re-issued on resumption (each rotation) is a copy of the session,
    client certificate included, with its time reset: chained resumptions would carry the
    identity past the certificate's notAfter. A resumed session whose certificate has
    expired has no identity (pyqmail.tls.describe)."""
    leaf = pki.ca.issue(["relay.test"], client=True, days=3 / 86400)  # 3 seconds
    clientcert = tmp_path / "clientcert.pem"
    clientcert.write_bytes(leaf.key_pem + leaf.cert_pem)
    clock = Clock()
    keys = tickets.TicketKeys(lifetime=3600, clock=clock)
    ctx = tls.server_context(servercert, pki.ca_file)
    tickets.enable(ctx, keys, tickets.session_context(pki.ca_file.read_bytes()))
    cli = client(pki, ssl.TLSVersion.TLSv1_3)
    cli.load_cert_chain(clientcert)
    servers: list[ssl.SSLObject] = []

    def relay() -> str | None:
        return tls.client_cert_relay(tls.describe(servers[-1]), {"relay.test"})

    resumed, session = handshake(ctx, cli, servers=servers)
    assert not resumed and relay() == "relay.test"
    clock.now += 3600  # the ticket is under the previous key now: re-issued on resumption
    resumed, session = handshake(ctx, cli, session, servers)
    assert resumed and relay() == "relay.test", "valid certificate: relay after resumption"
    assert session is not None and session.time >= int(time.time()) - 1  # a fresh copy
    expired = leaf.cert.not_valid_after_utc.timestamp() + 1.5
    time.sleep(max(0.0, expired - time.time()))
    assert dt.datetime.now(dt.UTC) > leaf.cert.not_valid_after_utc
    clock.now += 3600
    resumed, _ = handshake(ctx, cli, session, servers)
    assert resumed, "the ticket still resumes (OpenSSL does not check the certificate)"
    assert relay() is None
    assert tls.describe(servers[-1]).peer_identities == ()


def test_certificate_dates_as_getpeercert_gives_them() -> None:
    """tls.valid_now reads the dates itself (ssl.cert_time_to_seconds imports modules a
    worker that dropped privileges may not read): the same seconds, and no date no trust."""
    cert = {"notBefore": "Jan  5 09:34:43 2026 GMT", "notAfter": "Dec 31 23:59:59 2026 GMT"}
    start = ssl.cert_time_to_seconds(cert["notBefore"])
    end = ssl.cert_time_to_seconds(cert["notAfter"])
    assert tls.valid_now(cert, start) and tls.valid_now(cert, end)
    assert not tls.valid_now(cert, start - 1) and not tls.valid_now(cert, end + 1)
    assert not tls.valid_now({"notAfter": cert["notAfter"]}, start)
    assert not tls.valid_now({**cert, "notAfter": "Foo 31 23:59:59 2026 GMT"}, start)


def test_an_idle_worker_keeps_no_secret_older_than_the_previous_period() -> None:
    """The worker's once-a-second tick ratchets its keys and drops the keys derived from
    older secrets: a worker that sees no handshake for days must not hold the secret of
    the last period it used (from which every later key follows)."""
    clock = Clock()
    keys = tickets.TicketKeys(lifetime=60, clock=clock)
    used = tickets.for_issue(keys)  # the last handshake this worker sees
    old_secret, _ = keys.secrets()
    srv = servermod.Server.__new__(servermod.Server)
    srv.keys, srv._ended, srv.parents = keys, False, frozenset()
    clock.now += 60 * 3  # three periods without a handshake

    async def tick() -> None:
        srv._tick()
        await asyncio.sleep(0)

    asyncio.run(tick())
    held = (keys._secret, keys._previous)
    assert old_secret not in held, "the idle worker still holds an old secret"
    assert held[1] is not None
    derived = [k.aes_key for k in tickets._derived_keys.values()]
    assert used.aes_key not in derived, "its derived key is still cached"


def test_a_wall_clock_stepped_back_does_not_stop_the_rotation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ratchet's default clock: after the wall clock steps back 8 hours (NTP), the key
    still changes within two lifetimes. A fresh copy of pyqmail.ticketkeys is loaded
    while the time module's clocks are the test's, so its default clock is one of them."""
    elapsed, wall_offset = [0.0], [0.0]
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0 + elapsed[0] + wall_offset[0])
    monkeypatch.setattr(time, "monotonic", lambda: 5_000.0 + elapsed[0])
    monkeypatch.setattr(time, "clock_gettime", lambda _clock: 5_000.0 + elapsed[0])
    spec = importlib.util.find_spec("pyqmail.ticketkeys")
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    keys = copy.TicketKeys(lifetime=3600)
    first, _ = keys.secrets()
    wall_offset[0] = -8 * 3600
    while keys.secrets()[0] == first:
        elapsed[0] += 15 * 60
        assert elapsed[0] <= 2 * 3600, "the key did not change within two lifetimes"


def test_the_session_context_comes_from_the_clientca_bytes_trusted(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clientca.pem replaced between the load of its CAs and the digest of the session id
    context: the digest is still that of the CAs the worker trusts (one read), so its
    tickets do not resume on workers that loaded the new file."""
    control = tmp_path / "control"
    control.mkdir()
    (control / "me").write_text("mx.test\n")
    pki.ca.write_servercert(control / "servercert.pem", pki.server)
    trusted = pki.ca.cert_pem
    (control / "clientca.pem").write_bytes(trusted)
    real_context = tls.server_context

    def then_replaced(certfile: Path, clientca: Path | None = None) -> ssl.SSLContext:
        ctx = real_context(certfile, clientca)
        (control / "clientca.pem").write_bytes(trusted + pki.other_ca.cert_pem)
        return ctx

    contexts: list[bytes] = []
    monkeypatch.setattr(tls, "server_context", then_replaced)
    monkeypatch.setattr(tickets, "enable", lambda _ctx, _keys, sid: contexts.append(sid))
    start.load_config(tmp_path, tickets.TicketKeys())
    assert contexts == [tickets.session_context(trusted)]


def test_clientca_comments_outside_ascii_are_no_error(
    servercert: Path, pki: PKI, tmp_path: Path
) -> None:
    """clientca.pem is loaded from its bytes (``cadata``, ASCII only): a comment in
    UTF-8 does not stop it, and the CAs in it are trusted."""
    clientca = tmp_path / "clientca.pem"
    clientca.write_bytes("# CA de l'équipe\n".encode() + pki.ca.cert_pem)
    ctx = tls.server_context(servercert, clientca)
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert tls.loaded_clientca(ctx) == clientca.read_bytes()


def test_ticket_lifetime_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1 second"):
        tickets.TicketKeys(lifetime=0)


def test_the_ratchet_is_sha256_of_the_secret_before() -> None:
    """pyqmail.ticketkeys ratchets with CPython's own SHA-256 (not OpenSSL's, which would
    cost the supervisor 1.7 MiB): the same function, checked against hashlib's."""
    import hashlib

    clock = Clock()
    keys = tickets.TicketKeys(lifetime=60, clock=clock)
    first, previous = keys.secrets()
    assert previous is None and len(first) == 32
    clock.now += 60 * 3
    current, previous = keys.secrets()
    expected = first
    for _ in range(3):
        expected, before = hashlib.sha256(b"pyqmail ticket ratchet" + expected).digest(), expected
    assert (current, previous) == (expected, before)

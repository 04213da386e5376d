"""Delivery-side units: control files, .qmail addressing, routes/MX, wire format, state, DSN,
the injector. No sockets, no DNS (a fake resolver plays it)."""

from __future__ import annotations

import email
import email.policy
import io
import os
import stat
from pathlib import Path

import pytest

from pyqmail.control.send import Control, ControlError, Route
from pyqmail.headers import header_values
from pyqmail.queue.format import Envelope
from pyqmail.queue.state import Attempt, append_state, read_state
from pyqmail.send import local
from pyqmail.send.bounce import BounceTarget, Failure, bounce_target, make_dsn
from pyqmail.send.delivery import Result, one_line
from pyqmail.send.dotqmail import (
    Instruction,
    MailboxesError,
    Plan,
    check_file,
    parse_line,
    parse_mailboxes,
    resolve,
)
from pyqmail.send.local import maildir_deliver
from pyqmail.send.manager import load_msg, nextretry
from pyqmail.send.mx import DnsError, destinations
from pyqmail.send.remote import needs_smtputf8, wire_data
from pyqmail.tools import sendmail as inject


def make_root(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "control").mkdir(exist_ok=True)
    base = {"me": "mx.test\n"} | files
    for name, text in base.items():
        path = tmp_path / "control" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


# -- control files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"me": ""}, "control/me: missing or empty"),
        # one reader for both daemons (pyqmail.control.table): pyqmail-smtpd's wording
        ({"concurrencyremote": "lots\n"}, "concurrencyremote:1: not a non-negative integer"),
        ({"concurrencylocal": "0\n"}, "concurrencylocal:1: 0 is out of range"),
        ({"smtproutes": "example.com\n"}, "smtproutes:1: expected domain:relay[:port]"),
        ({"smtproutes": "# c\nexample.com:relay:99999\n"}, "smtproutes:2: port 99999 out of range"),
        ({"smtproutes": "x:relay:http\n"}, "port must be a number, got 'http'"),
        ({"smtproutes": "x:[::1\n"}, "unterminated '['"),
        ({"smtproutes-auth": "relay:user\n"}, "smtproutes-auth:1: expected relay:user:password"),
        # the name the relay's certificate is checked against: OpenSSL fails a trailing dot
        (
            {"smtproutes": ":smarthost.example.net.:587\n"},
            "smtproutes:1: relay 'smarthost.example.net.' ends with a dot: write the host name "
            "without it",
        ),
        ({"smtproutes-auth": "relay.example.:u:p\n"}, "smtproutes-auth:1: relay 'relay.example.'"),
        ({"virtualdomains": "nocolon\n"}, "virtualdomains:1: expected domain:prefix"),
    ],
)
def test_control_errors_name_file_and_line(
    tmp_path: Path, files: dict[str, str], error: str
) -> None:
    root = make_root(tmp_path, files)
    with pytest.raises(ControlError, match=error.replace("[", r"\[").replace("]", r"\]")):
        Control.load(root)


def test_control_defaults(tmp_path: Path) -> None:
    c = Control.load(make_root(tmp_path, {}))
    assert (c.concurrencylocal, c.concurrencyremote, c.queuelifetime) == (10, 20, 604800)
    assert c.locals == {"mx.test"}
    assert (c.doublebounceto, c.bouncehost, c.helohost) == ("postmaster", "mx.test", "mx.test")


def test_doublebounceto_empty_line_means_drop(tmp_path: Path) -> None:
    assert Control.load(make_root(tmp_path, {"doublebounceto": "\n"})).doublebounceto == ""


ROUTES = (
    "example.com:relay.example.net:2525\n"
    ".example.org:[2001:db8::1]:587\n"
    "mx.example.org:\n"
    ":smarthost.test\n"
)


@pytest.mark.parametrize(
    ("domain", "route"),
    [
        ("example.com", Route("relay.example.net", 2525, "u", "p:w")),
        ("EXAMPLE.COM", Route("relay.example.net", 2525, "u", "p:w")),
        ("a.b.example.org", Route("2001:db8::1", 587)),
        ("mx.example.org", Route("", 25)),  # empty relay: use MX
        ("other.test", Route("smarthost.test", 25)),
    ],
)
def test_smtproutes_matching(tmp_path: Path, domain: str, route: Route) -> None:
    root = make_root(
        tmp_path, {"smtproutes": ROUTES, "smtproutes-auth": "relay.example.net:u:p:w\n"}
    )
    assert Control.load(root).route(domain) == route


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("joe@mx.test", "joe"),
        ("joe@EXAMPLE.test", "joe"),
        ("postmaster", "postmaster"),
        ("joe@virt.test", "v-joe"),
        ("joe@deep.sub.virt.test", "s-joe"),
        ("special@virt.test", "x-special"),
        ("joe@excluded.sub.virt.test", None),
        ("joe@remote.test", None),
    ],
)
def test_is_local_with_virtualdomains(tmp_path: Path, address: str, local: str | None) -> None:
    root = make_root(
        tmp_path,
        {
            "locals": "mx.test\nexample.test\n",
            "virtualdomains": "virt.test:v\n.sub.virt.test:s\nexcluded.sub.virt.test:\n"
            "special@virt.test:x\n",
        },
    )
    assert Control.load(root).is_local(address) == local


# -- mailboxes and .qmail ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alice\n", "mailboxes:1: expected name:homedir"),
        ("al ice:/home/a\n", "forbidden character"),
        ("alice:home/a\n", "homedir must be an absolute path"),
        ("alice:/a\nALICE:/b\n", "mailboxes:2: mailbox 'ALICE' is listed twice"),
    ],
)
def test_mailboxes_errors(text: str, error: str) -> None:
    with pytest.raises(MailboxesError, match=error):
        parse_mailboxes(text, "mailboxes")


def test_mailboxes_parse() -> None:
    assert parse_mailboxes("# c\n\nAlice:/h/a\n", "m") == {"alice": Path("/h/a")}


HOME = Path("/home/x")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("# comment", None),
        ("   ", None),
        ("./Maildir/", Instruction("maildir", "/home/x/Maildir/")),
        ("/srv/box/Maildir/", Instruction("maildir", "/srv/box/Maildir/")),
        ("&joe@example.com", Instruction("forward", "joe@example.com")),
        ("joe@example.com", Instruction("forward", "joe@example.com")),
        ("&joe", Instruction("forward", "joe@mx.test")),
    ],
)
def test_dotqmail_lines(line: str, expected: Instruction | None) -> None:
    assert parse_line(line, HOME, "f:1", "mx.test") == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("|/usr/bin/procmail", "does not run programs"),
        ("./mbox", "mbox delivery"),
        ("&joe @x", "not a valid forwarding address"),
    ],
)
def test_dotqmail_refused_lines(line: str, reason: str) -> None:
    ins = parse_line(line, HOME, "f:1", "mx.test")
    assert ins is not None and ins.kind == "refused" and reason in ins.target


def test_check_file_finds_programs_and_bad_modes(tmp_path: Path) -> None:
    path = tmp_path / ".qmail"
    path.write_text("./Maildir/\n|prog\n")
    path.chmod(0o666)
    problems = check_file(path)
    assert len(problems) == 2 and "does not run programs" in problems[0]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    alias = tmp_path / "alias"
    alias.mkdir()
    (alias / ".qmail-root").write_text("&admin@example.com\n")
    (alias / ".qmail-lists-default").write_text("./Lists/\n")
    (alias / ".qmail-j:doe").write_text("./JDoe/\n")
    alice = tmp_path / "alice"
    alice.mkdir()
    (alice / ".qmail-news").write_text("./News/\n")
    (alice / ".qmail-tag-default").write_text("./Tagged/\n")
    bob = tmp_path / "bob"
    bob.mkdir()
    (bob / ".qmail").write_text("")  # empty file: default delivery
    return {"alice": alice, "bob": bob, "bob-smith": tmp_path / "bs"}, alias


@pytest.mark.parametrize(
    ("local", "target"),
    [
        ("alice", "alice/Maildir/"),  # no .qmail: ./Maildir/
        ("ALICE", "alice/Maildir/"),
        ("alice-news", "alice/News/"),
        ("alice-tag-x-y", "alice/Tagged/"),
        ("bob", "bob/Maildir/"),
        ("bob-smith", "bs/Maildir/"),  # the longest mailbox name wins
        ("root", "forward:admin@example.com"),
        ("lists-python", "alias/Lists/"),
        ("j.doe", "alias/JDoe/"),
        ("alice-nothing", "5.1.1"),
        ("nobody", "5.1.1"),
        ("../etc/passwd", "5.1.1"),
    ],
)
def test_resolve(tree: tuple[dict[str, Path], Path], local: str, target: str) -> None:
    boxes, alias = tree
    plan = resolve(local, f"{local}@mx.test", boxes, alias, "mx.test")
    if isinstance(plan, Result):
        assert (plan.kind, plan.status) == ("perm", target)
        return
    assert isinstance(plan, Plan)
    (ins,) = plan.instructions
    if ins.kind == "forward":
        assert f"forward:{ins.target}" == target
    else:
        assert ins.target.endswith(target) and ins.target.startswith(str(alias.parent))


def test_resolve_defers_on_writable_dotqmail(tree: tuple[dict[str, Path], Path]) -> None:
    boxes, alias = tree
    (alias / ".qmail-root").chmod(0o646)
    plan = resolve("root", "root@mx.test", boxes, alias, "mx.test")
    assert isinstance(plan, Result) and plan.kind == "temp"


@pytest.mark.parametrize("local", ["alice", "alice-x", "alice-x-y"])
def test_resolve_defers_when_the_home_is_missing(tmp_path: Path, local: str) -> None:
    """Like qmail-local, which cannot chdir there: a home not yet made bounces nothing."""
    boxes = {"alice": Path("/nonexistent")}
    plan = resolve(local, f"{local}@mx.test", boxes, tmp_path, "mx.test")
    if isinstance(plan, Plan):  # no extension: the default Maildir, whose delivery defers
        with pytest.raises(FileNotFoundError, match="home directory does not exist"):
            maildir_deliver(plan.instructions[0].target, b"x")
        return
    assert (plan.kind, plan.status) == ("temp", "4.3.0")
    assert "/nonexistent" in plan.detail


# -- Maildir and headers ----------------------------------------------------------------


def test_maildir_deliver(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    name = maildir_deliver(maildir, b"Subject: x\n\nbody\n")
    assert (maildir / "new" / name).read_bytes() == b"Subject: x\n\nbody\n"
    assert stat.S_IMODE(os.stat(maildir / "new" / name).st_mode) == 0o600
    assert not list((maildir / "tmp").iterdir())
    assert (maildir / "cur").is_dir()
    assert maildir_deliver(maildir, b"x") != name


def _synced_after(events: list[tuple[str, str]], made: str, synced: str) -> bool:
    """``synced`` was fsynced after ``made`` was created, in ``events``."""
    made_at = events.index(("mkdir", made))
    return ("fsync", synced) in events[made_at + 1 :]


@pytest.mark.parametrize("step", range(4))
def test_a_delivery_during_the_maildirs_creation_finds_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """The first jobs for a new mailbox run at once in the child's threads. One that comes
    between two steps of another's creation of the Maildir (after its ``step``-th mkdir)
    must deliver, with ``new/`` and the Maildir durable first: with ``tmp/`` made before
    ``new/`` it wrote its file and found nowhere to link it (a deferral, 100 s)."""
    maildir = tmp_path / "Maildir"
    events: list[tuple[str, str]] = []
    real_mkdir, real_fsync_dir = os.mkdir, local.fsync_dir
    calls, nested = 0, False
    seen: list[list[tuple[str, str]]] = []

    def fsync_dir(path: str | os.PathLike[str]) -> None:
        events.append(("fsync", os.fspath(path)))
        real_fsync_dir(path)

    def mkdir(path: str | os.PathLike[str], mode: int = 0o777) -> None:
        nonlocal calls, nested
        real_mkdir(path, mode)
        events.append(("mkdir", os.fspath(path)))
        if nested:
            return
        calls += 1
        if calls == step + 1:  # another thread's delivery, between this step and the next
            nested = True
            name = local.maildir_deliver(maildir, b"the other thread")
            seen.append(list(events))
            assert (maildir / "new" / name).read_bytes() == b"the other thread"
            nested = False

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(local, "fsync_dir", fsync_dir)
    name = local.maildir_deliver(maildir, b"the first")
    assert (maildir / "new" / name).read_bytes() == b"the first"
    assert len(seen) == 1, "the other delivery ran"
    md, new = os.fspath(maildir), os.fspath(maildir / "new")
    assert _synced_after(seen[0], new, md), "new/ not durable when the other delivered"
    assert _synced_after(seen[0], md, os.fspath(tmp_path)), "the Maildir not durable"
    assert sorted(p.name for p in maildir.iterdir()) == ["cur", "new", "tmp"]


def test_a_maildir_with_tmp_but_no_new_is_made_whole(tmp_path: Path) -> None:
    """tmp/ alone (made by hand, or half made by an older version): the file written there
    must not be deferred on every retry for want of new/."""
    maildir = tmp_path / "Maildir"
    (maildir / "tmp").mkdir(parents=True)
    name = maildir_deliver(maildir, b"x")
    assert (maildir / "new" / name).read_bytes() == b"x"
    assert (maildir / "cur").is_dir()
    assert not list((maildir / "tmp").iterdir())


def test_a_file_in_place_of_new_is_named(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    (maildir / "new").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        maildir_deliver(maildir, b"x")
    assert not (maildir / "tmp").exists() or not list((maildir / "tmp").iterdir())


def test_maildir_deliver_refuses_missing_home(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        maildir_deliver(tmp_path / "nohome" / "Maildir", b"x")


def test_header_values_unfolds_and_stops_at_body() -> None:
    msg = b"Delivered-To: a@x\r\ndelivered-to:\r\n  b@x\r\nSubject: s\r\n\r\nDelivered-To: c@x\r\n"
    assert header_values(msg, "Delivered-To") == ["a@x", "b@x"]


# -- remote: routes, MX, wire format -----------------------------------------------------


class FakeResolver:
    def __init__(self, mx: dict[str, list[tuple[int, str]] | None], hosts: dict[str, list[str]]):
        self._mx, self._hosts = mx, hosts

    def mx(self, domain: str) -> list[tuple[int, str]] | None:
        if domain not in self._mx:
            raise DnsError(f"{domain}: no such domain (NXDOMAIN)", permanent=True)
        return self._mx[domain]

    def addresses(self, host: str) -> list[str]:
        if host == "broken.test":
            raise DnsError("timeout", permanent=False)
        return self._hosts.get(host, [])


RESOLVER = FakeResolver(
    {
        "multi.test": [(20, "backup.test"), (10, "primary.test")],
        "implicit.test": None,
        "nullmx.test": [(0, "")],
        "noaddr.test": [(10, "nowhere.test")],
        "halfbroken.test": [(10, "nowhere.test"), (20, "broken.test")],
        "flaky.test": None,
        "hostless.test": None,  # no MX, and no A/AAAA either
    },
    {
        "primary.test": ["192.0.2.1", "2001:db8::1"],
        "backup.test": ["192.0.2.2"],
        "implicit.test": ["192.0.2.3"],
        "relay.test": ["192.0.2.9"],
    },
)


@pytest.mark.parametrize(
    ("domain", "route", "expected"),
    [
        ("multi.test", Route(), ["192.0.2.1", "2001:db8::1", "192.0.2.2"]),
        ("implicit.test", Route(), ["192.0.2.3"]),  # RFC 5321 5.1 implicit MX
        ("anything", Route("relay.test", 587), ["192.0.2.9"]),
        ("anything", Route("127.0.0.1", 2525), ["127.0.0.1"]),
        ("[192.0.2.7]", Route(), ["192.0.2.7"]),
        ("[IPv6:2001:db8::7]", Route(), ["2001:db8::7"]),
    ],
)
def test_destinations(domain: str, route: Route, expected: list[str]) -> None:
    assert [d.address for d in destinations(domain, route, RESOLVER)] == expected


@pytest.mark.parametrize(
    ("domain", "permanent", "text"),
    [
        ("nullmx.test", True, "null MX"),
        ("missing.test", True, "NXDOMAIN"),
        ("noaddr.test", True, "none of the mail hosts of noaddr.test has an address"),
        ("halfbroken.test", False, "no address found for the mail hosts.*timeout"),
        ("hostless.test", True, "no MX and no A/AAAA records"),  # qmail's perm_nomx
        ("[999.1.1.1]", True, "bad address literal"),
    ],
)
def test_destination_errors(domain: str, permanent: bool, text: str) -> None:
    with pytest.raises(DnsError, match=text) as info:
        destinations(domain, Route(), RESOLVER)
    assert info.value.permanent is permanent
    # 5.4.4: no mail host (RFC 3463); 5.1.10: null MX (RFC 7505 section 4.2)
    status = {"hostless.test": "5.4.4", "noaddr.test": "5.4.4", "nullmx.test": "5.1.10"}
    assert info.value.status == status.get(domain, "")


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".x\r\n..y\r\n.\r\n", b"..x\r\n...y\r\n..\r\n.\r\n"),
        (b"bare\nlf\rcr\r\n", b"bare\r\nlf\r\ncr\r\n.\r\n"),
        (b"no final newline", b"no final newline\r\n.\r\n"),
        (b"x\r\n.\r\n.\r\n", b"x\r\n..\r\n..\r\n.\r\n"),  # smuggling attempt stays data
    ],
)
def test_wire_data(message: bytes, wire: bytes) -> None:
    assert wire_data(message) == wire


def test_needs_smtputf8() -> None:
    env = Envelope("id", "a@x", ("b@x",), 1, 0.0)
    ascii_msg = b"Subject: x\r\n\r\nbody\r\n"
    assert not needs_smtputf8(env, ["b@x"], ascii_msg)
    assert needs_smtputf8(env, ["jürgen@x"], ascii_msg)
    assert needs_smtputf8(Envelope("id", "ä@x", ("b@x",), 1, 0.0), ["b@x"], ascii_msg)


def test_a_message_received_with_smtputf8_needs_it_only_for_a_utf8_header() -> None:
    """MAIL's SMTPUTF8 marks the message ``client`` (pyqmail.smtpd.intake): its header may
    hold UTF-8, which a server without SMTPUTF8 must not get unannounced (RFC 6531 3.2); one
    whose envelope and header are ASCII still goes there, as Postfix sends it (clients may ask
    for SMTPUTF8 on every message). A bounce's ``1`` holds whatever the header (RFC 6533)."""
    client = Envelope("id", "a@x", ("b@x",), 1, 0.0, {"smtputf8": "client"})
    assert needs_smtputf8(client, ["b@x"], "Subject: Grüße\r\n\r\nbody\r\n".encode())
    assert not needs_smtputf8(client, ["b@x"], "Subject: x\r\n\r\nGrüße\r\n".encode())
    bounce = Envelope("id", "", ("b@x",), 1, 0.0, {"smtputf8": "1"})
    assert needs_smtputf8(bounce, ["b@x"], b"Subject: x\r\n\r\nbody\r\n")


# -- scheduling and state --------------------------------------------------------------


def test_nextretry_is_qmails_schedule() -> None:
    birth = 1000.0
    assert nextretry(birth, birth, "remote") == birth + 400
    assert nextretry(birth, birth + 400, "remote") == birth + 1600
    assert nextretry(birth, birth + 1600, "remote") == birth + 3600
    assert nextretry(birth, birth, "local") == birth + 100
    assert nextretry(birth, birth + 100, "local") == birth + 400


def test_state_file_roundtrip_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "state" / "id"
    path.parent.mkdir()
    append_state(path, Attempt("done", 0, 5.0, "ok"))
    append_state(path, Attempt("deferred", 1, 5.0, "451"), durable=False)
    with path.open("ab") as f:
        f.write(b'{"ev":"done","rcpt":1')  # torn by a crash: ignored
    records = read_state(path)
    assert [r.event for r in records if isinstance(r, Attempt)] == ["done", "deferred"]
    assert len(records) == 2
    control = Control(tmp_path, "mx.test", frozenset({"mx.test"}), {})
    env = Envelope("id", "s@x", ("a@mx.test", "b@remote.test", "c@remote.test"), 1, 0.0)
    msg = load_msg(env, records, control, now=10.0)
    assert [r.status for r in msg.rcpts] == ["done", "pending", "pending"]
    assert [r.channel for r in msg.rcpts] == ["local", "remote", "remote"]
    assert msg.rcpts[1].next_try == nextretry(0.0, 5.0, "remote")
    assert msg.rcpts[2].next_try == 10.0
    assert not msg.finished
    assert read_state(tmp_path / "missing") == []


# -- bounces ----------------------------------------------------------------------------


def _control(tmp_path: Path, **files: str) -> Control:
    return Control.load(make_root(tmp_path, files))


@pytest.mark.parametrize(
    ("sender", "files", "target"),
    [
        ("joe@x.test", {}, BounceTarget("", "joe@x.test", False)),
        ("", {}, BounceTarget("#@[]", "postmaster@mx.test", True)),
        ("", {"doublebounceto": "admin@y.test\n"}, BounceTarget("#@[]", "admin@y.test", True)),
        ("", {"doublebounceto": "\n"}, None),
        ("#@[]", {}, None),
    ],
)
def test_bounce_target(
    tmp_path: Path, sender: str, files: dict[str, str], target: BounceTarget | None
) -> None:
    env = Envelope("id", sender, ("r@z.test",), 1, 0.0)
    assert bounce_target(env, _control(tmp_path, **files)) == target


def test_dsn_is_rfc3464(tmp_path: Path) -> None:
    env = Envelope("qid", "joe@x.test", ("a@r.test", "b@r.test"), 10, 1700000000.0)
    failures = [
        Failure(
            "a@r.test",
            Result.perm("r said 550", "5.1.1", remote="mx.r.test", diagnostic="smtp; 550 5.1.1 no"),
            1700000100.0,
        ),
        Failure("b@r.test", Result.temp("timeout\r\nInjected: x", "4.4.1"), 1700000200.0, True),
    ]
    raw = make_dsn(
        env,
        b"Subject: hi\r\nFrom: joe@x.test\r\n\r\nSECRET BODY\r\n",
        failures,
        target=BounceTarget("", "joe@x.test", False),
        control=_control(tmp_path),
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    text, status, headers = msg.iter_parts()  # type: ignore[attr-defined]
    assert status.get_content_type() == "message/delivery-status"
    groups = [dict(b.items()) for b in status.get_payload()]
    assert groups[0]["Reporting-MTA"] == "dns; mx.test"
    assert groups[1]["Final-Recipient"] == "rfc822; a@r.test" and groups[1]["Status"] == "5.1.1"
    assert groups[1]["Remote-MTA"] == "dns; mx.r.test"
    assert groups[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no"
    assert groups[2]["Status"] == "4.4.7" and groups[2]["Action"] == "failed"
    assert "Injected" not in msg  # CR/LF in a diagnostic never makes a header
    assert "Subject: hi" in headers.get_content()
    assert "SECRET BODY" not in raw.decode()
    assert "queue lifetime" in text.get_content()


def test_one_line_strips_controls() -> None:
    assert one_line("a\r\nb\x00c\td") == "a b c d"


# -- the injector ------------------------------------------------------------------------


def opts(*argv: str) -> inject.Options:
    return inject.parse_args(list(argv))


def test_inject_adds_missing_headers_and_crlf() -> None:
    sender, rcpts, msg = inject.build(
        opts("-f", "me@x.test", "-F", "Me Myself", "you"), b"Subject: s\n\nhi\n", "mx.test"
    )
    assert (sender, rcpts) == ("me@x.test", ["you@mx.test"])
    head, _, body = msg.partition(b"\r\n\r\n")
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if not line.startswith(b" ")]
    assert names == [b"Received", b"Date", b"Message-ID", b"From", b"Subject"]
    assert b'From: "Me Myself" <me@x.test>' in head
    assert body == b"hi\r\n"


def test_inject_keeps_existing_headers_and_message_without_headers() -> None:
    raw = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <a@b>\nFrom: x@y\n\nbody\n"
    _, _, msg = inject.build(opts("-f", "a@b", "c@d"), raw, "mx.test")
    assert msg.count(b"Date:") == 1 and msg.count(b"Message-ID:") == 1
    _, _, msg = inject.build(opts("-f", "a@b", "c@d"), b"just a body line\n", "mx.test")
    assert msg.endswith(b"\r\n\r\njust a body line\r\n")


def test_inject_t_extracts_and_removes_bcc() -> None:
    raw = b"To: A <a@x.test>, b@x.test\nCc: c\nBcc: secret@x.test\nSubject: s\n\nbody\n"
    _, rcpts, msg = inject.build(opts("-t", "-f", "me@x.test", "extra@x.test"), raw, "mx.test")
    assert rcpts == ["extra@x.test", "a@x.test", "b@x.test", "c@mx.test", "secret@x.test"]
    assert b"Bcc" not in msg and b"secret" not in msg


@pytest.mark.parametrize(
    ("argv", "raw", "ending"),
    [
        ((), b"Subject: s\n\nbefore\n.\nafter\n", b"before\r\n"),
        (("-i",), b"Subject: s\n\nbefore\n.\nafter\n", b"before\r\n.\r\nafter\r\n"),
        (("-oi",), b"Subject: s\n\nbefore\n.\nafter\n", b"before\r\n.\r\nafter\r\n"),
    ],
)
def test_inject_lone_dot(argv: tuple[str, ...], raw: bytes, ending: bytes) -> None:
    _, _, msg = inject.build(opts(*argv, "-f", "a@b", "c@d"), raw, "mx.test")
    assert msg.endswith(b"\r\n\r\n" + ending)


@pytest.mark.parametrize(
    ("argv", "raw", "code", "text"),
    [
        (("-f", "a@b"), b"Subject: s\n\nx\n", 65, "no recipients"),
        (("c@d",), b"", 65, "empty message"),
        (("c@d",), b"Subject: s\n\nx\x00\n", 65, "NUL"),
        (("bad address@d",), b"Subject: s\n\nx\n", 65, "invalid recipient address"),
        (("-f", "a\r\nb@c", "c@d"), b"Subject: s\n\nx\n", 65, "invalid sender address"),
        (("c@d",), b"Subject: s\nnot a header\n\nx\n", 65, "malformed header line"),
    ],
)
def test_inject_errors(argv: tuple[str, ...], raw: bytes, code: int, text: str) -> None:
    with pytest.raises(inject.InjectError, match=text) as info:
        inject.build(opts(*argv), raw, "mx.test")
    assert info.value.code == code


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (("-X",), "unsupported option"),
        (("-f",), "needs a value"),
        (("-bs",), "mode '-bs' is not supported"),
        (("-B",), "needs a value"),
    ],
)
def test_inject_usage_errors(argv: tuple[str, ...], text: str) -> None:
    with pytest.raises(inject.InjectError, match=text) as info:
        inject.parse_args(list(argv))
    assert info.value.code == 64


def test_inject_accepts_crons_command_line() -> None:
    o = opts("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root")
    assert (o.fullname, o.dots, o.recipients) == ("CronDaemon", False, ["root"])
    assert opts("-N", "never", "-R", "hdrs", "x@y").recipients == ["x@y"]


def test_inject_null_sender_and_ignored_options() -> None:
    o = opts("-odi", "-oem", "-f", "<>", "c@d")
    assert inject.build(o, b"x\n", "mx.test")[0] == ""


def test_inject_end_to_end_into_a_queue(tmp_path: Path) -> None:
    from pyqmail.queue.store import Queue

    root = make_root(tmp_path, {})
    Queue(root / "queue").create()
    queue_id = inject.inject(
        ["--root", str(root), "-f", "a@b", "c@d"], io.BytesIO(b"Subject: q\n\nx\n")
    )
    stored = Queue(root / "queue").read_stored("new", queue_id, None)
    env, body = stored.env, stored.body
    assert env.recipients == ("c@d",) and b"Subject: q\r\n" in body
    with pytest.raises(inject.InjectError) as info:
        inject.inject(["--root", str(tmp_path / "nothing"), "c@d"], io.BytesIO(b"x\n"))
    assert info.value.code == 78


# -- the queue tool ------------------------------------------------------------------------


def test_queue_list_and_show(tmp_path: Path) -> None:
    from pyqmail.queue.store import Queue
    from pyqmail.tools import queue as queuetool

    q = Queue(tmp_path / "queue")
    q.create()
    env = q.enqueue(
        "s@x.test", ["a@r.test", "b@r.test", "c@r.test", "d@r.test"], b"Subject: s\r\n\r\nb\r\n"
    )
    os.rename(q.path("new", env.queue_id), q.path("mess", env.queue_id))
    state = q.path("state", env.queue_id)
    append_state(state, Attempt("deferred", 0, 1.0, "451 later"))
    append_state(state, Attempt("done", 0, 2.0, "250 ok"))
    append_state(state, Attempt("failed", 1, 2.0, "550 no such user"))
    append_state(state, Attempt("deferred", 2, 2.0, "connection refused"))
    waiting = q.enqueue("", ["e@r.test"], b"x\r\n")
    out = io.StringIO()
    # +0.5 s: the queue file keeps the time to the microsecond, so exactly +90 may read 89.99.
    assert queuetool.list_queue(q, out, now=env.received + 90.5) == 0
    text = out.getvalue()
    assert "age 1m30s" in text and "in delivery" in text and "waiting for pickup" in text
    for line in (
        "done     <a@r.test>",
        "failed   <b@r.test>",
        "deferred <c@r.test>",
        "pending  <d@r.test>",
        "from <>",
    ):
        assert line in text, line
    assert "connection refused" in text and "2 message(s) in the queue" in text
    shown = io.StringIO()
    assert queuetool.show(q, env.queue_id, False, shown) == 0
    assert "to 3 <d@r.test>" in shown.getvalue() and "Subject: s" in shown.getvalue()
    assert "b\n" not in shown.getvalue().split("Subject: s", 1)[1]  # headers only
    assert queuetool.show(q, "../etc", False, io.StringIO()) == 2
    assert queuetool.show(q, "nope", False, io.StringIO()) == 1
    assert queuetool.sender_pid(q) is None
    assert waiting.queue_id in text


def test_queue_show_finds_a_message_set_aside_for_its_name(tmp_path: Path) -> None:
    """A file not named by its id fails verification and goes to bad/ under that name:
    ``show <id>`` still finds its message there (it said "no message")."""
    from pyqmail.queue.store import Queue
    from pyqmail.tools import queue as queuetool

    q = Queue(tmp_path / "queue")
    q.create()
    env = q.enqueue("s@x.test", ["a@r.test"], b"Subject: misnamed\r\n\r\nb\r\n")
    os.rename(q.path("new", env.queue_id), q.path("bad", "18ee4a00000000a0.7.copy"))
    shown = io.StringIO()
    assert queuetool.show(q, env.queue_id, False, shown) == 0
    assert "bad, file 18ee4a00000000a0.7.copy" in shown.getvalue()
    assert "Subject: misnamed" in shown.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_queue_show_makes_control_characters_visible_on_a_terminal_only(
    tmp_path: Path,
) -> None:
    """An OSC 52 sequence in a Subject (it writes the clipboard of the terminal that prints
    it) reaches a terminal as ^[ text, as less shows it; a C1 control (U+009B, CSI) and a
    bare CR too. Into a pipe the text is unchanged."""
    from pyqmail.queue.store import Queue
    from pyqmail.tools import queue as queuetool

    q = Queue(tmp_path / "queue")
    q.create()
    subject = b"Subject: \x1b]52;c;cm0gLXJmIH4=\x07 \xc2\x9b2J\tend\r\n"
    env = q.enqueue("s@x.test", ["a@r.test"], subject + b"\r\nbare\rcr\x7f\r\n")
    terminal = _Terminal()
    assert queuetool.show(q, env.queue_id, True, terminal) == 0
    shown = terminal.getvalue()
    assert "Subject: ^[]52;c;cm0gLXJmIH4=^G <U+009B>2J\tend\n\nbare^Mcr^?\n" in shown
    assert not any(ch in shown for ch in "\x1b\x07\x9b\r\x7f")
    piped = io.StringIO()
    assert queuetool.show(q, env.queue_id, True, piped) == 0
    assert "Subject: \x1b]52;c;cm0gLXJmIH4=\x07 \x9b2J\tend\n\nbare\rcr\x7f\n" in piped.getvalue()

"""DMARC quarantine at delivery: pyqmail-send's local delivery puts a message whose queue
meta says ``junk=1`` (set by pyqmail-smtpd's checks) into the Maildir++ folder ``.Junk`` of
the mailbox, and every other message into the Maildir itself; a forward (an alias) keeps
``junk`` in the copy it queues."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.queue.store import Queue
from pyqmail.send import local as local_module
from pyqmail.send.local import FORWARDED_META, LocalDelivery

MESSAGE = b"From: <news@junk.test>\r\nSubject: offer\r\n\r\nbuy\r\n"


@pytest.fixture
def home(tmp_path: Path) -> tuple[LocalDelivery, Path]:
    root = tmp_path / "qmail"
    for sub in ("control", "alias", "users"):
        (root / sub).mkdir(parents=True)
    (root / "control" / "me").write_text("mx.test\n")
    home = root / "homes" / "u"
    home.mkdir(parents=True)
    (root / "users" / "mailboxes").write_text(f"u:{home}\n")
    queue = Queue(root / "queue")
    queue.create()
    return LocalDelivery(Control.load(root), queue), home


@pytest.mark.parametrize(("meta", "folder"), [({"junk": "1"}, ".Junk/new"), ({}, "new")])
def test_junk_meta_picks_the_junk_folder(home, meta, folder):
    local, path = home
    env = Envelope("Q1", "s@junk.test", ("u@mx.test",), len(MESSAGE), 0.0, meta)
    result = local.deliver(env, MESSAGE, "u@mx.test")
    assert result.kind == "ok", result
    [delivered] = [p for p in path.rglob("*") if p.is_file() and p.parent.name == "new"]
    assert str(delivered.parent).endswith(folder)
    assert delivered.read_bytes().endswith(b"buy\n")
    assert (".Junk" in delivered.parts) == bool(meta)


def _forwarded(local: LocalDelivery, meta: dict[str, str]) -> tuple[Envelope, bytes]:
    """Deliver to the alias ``info`` (a forward to the mailbox ``u``), then read the copy
    it queued, as pyqmail-send would pick it up."""
    assert local.queue is not None
    alias = local.control.alias_dir / ".qmail-info"
    alias.write_text("# Written by the Ansible role pyqmail_aliases\n&u@mx.test\n")
    env = Envelope("Q1", "s@junk.test", ("info@mx.test",), len(MESSAGE), 0.0, meta)
    result = local.deliver(env, MESSAGE, "info@mx.test")
    assert result.kind == "ok" and "forwarded to u@mx.test" in result.detail, result
    [queued] = local.queue.ids("new")
    [stored] = local.queue.load("new", queued)
    return stored.env, stored.body


@pytest.mark.parametrize(("meta", "folder"), [({"junk": "1"}, ".Junk/new"), ({}, "new")])
def test_a_quarantined_message_to_an_alias_lands_in_junk(home, meta, folder):
    """info@ -> u@: the forwarded copy keeps ``junk``, so u's copy goes to .Junk, not to the
    Inbox (the alias once dropped it with the rest of the original's meta)."""
    local, path = home
    env, body = _forwarded(local, meta)
    assert env.meta.get("junk") == meta.get("junk")
    assert (env.meta["forwarded_for"], env.meta["origin"]) == ("info@mx.test", "Q1")
    result = local.deliver(env, body, "u@mx.test")
    assert result.kind == "ok", result
    [delivered] = [p for p in path.rglob("*") if p.is_file() and p.parent.name == "new"]
    assert str(delivered.parent).endswith(folder)
    assert (".Junk" in delivered.parts) == bool(meta)
    assert b"Delivered-To: info@mx.test" in delivered.read_bytes()


def test_a_forward_keeps_smtputf8_and_not_how_the_original_arrived(home):
    local, _ = home
    arrived = {"client": "192.0.2.1", "helo": "x", "auth": "bob", "tls": "TLSv1.3:x:256"}
    env, _ = _forwarded(local, {"smtputf8": "1", "origin": "auth", **arrived})
    assert env.meta["smtputf8"] == "1"
    assert env.meta["origin"] == "Q1"  # not signed again: its signatures travel in front
    assert not set(arrived) & set(env.meta)


def test_every_meta_the_delivery_code_reads_is_forwarded_or_named_here():
    """A new ``meta.get("key")`` in pyqmail-send's delivery, the queue or the signing
    policy must be decided for forwards: carried (``FORWARDED_META``) or not (here)."""
    not_carried = {"origin"}  # the copy's origin is the original's id: never signed again
    src = Path(local_module.__file__).resolve().parents[1]
    read: set[str] = set()
    for package in ("send", "queue", "dkim"):
        for module in (src / package).glob("*.py"):
            read |= set(re.findall(r"meta(?:\.get\(|\[)\"(\w+)\"", module.read_text()))
    assert "junk" in read and "smtputf8" in read
    assert read - not_carried == set(FORWARDED_META)

"""Delivery state records (pyqmail.queue.state): typed, the same bytes on disk as before,
and readable by the queue tool without the daemon."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyqmail.queue.state import (
    Attempt,
    Bounced,
    Ended,
    append_end,
    append_state,
    encode,
    ended_messages,
    from_json,
    read_state,
)
from tests.interpreter import fresh_stdout

# A state file exactly as pyqmail-send wrote it before the records were typed (made by the
# dict-based append_state/append_end of commit 161151a): a queue from then must still read.
OLD_FILE = (
    b'{"ev":"deferred","rcpt":2,"t":1700000000.5,"detail":"451 4.4.1 try later",'
    b'"status":"4.4.1","remote":"mx.remote.test","diag":"smtp; 451 4.4.1 try later"}\n'
    b'{"ev":"done","rcpt":0,"t":1700000001.25,"detail":"delivered to Maildir caf\\u00e9"}\n'
    b'{"ev":"failed","rcpt":1,"t":1700000002.0,"detail":"550 5.1.1 no such user",'
    b'"status":"5.1.1","remote":"mx.remote.test","diag":"smtp; 550 5.1.1 no such user",'
    b'"expired":false}\n'
    b'{"ev":"bounced","t":1700000003.125,"bounce":"18a.1f.2abc"}\n'
    b'{"ev":"end","id":"17f.2a.1def"}\n'
)
OLD_RECORDS = [
    Attempt(
        "deferred",
        2,
        1700000000.5,
        "451 4.4.1 try later",
        "4.4.1",
        "mx.remote.test",
        "smtp; 451 4.4.1 try later",
    ),
    Attempt("done", 0, 1700000001.25, "delivered to Maildir caf\u00e9"),
    Attempt(
        "failed",
        1,
        1700000002.0,
        "550 5.1.1 no such user",
        "5.1.1",
        "mx.remote.test",
        "smtp; 550 5.1.1 no such user",
    ),
    Bounced(1700000003.125, "18a.1f.2abc"),
    Ended("17f.2a.1def"),
]


def test_an_old_state_file_reads_as_typed_records(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(OLD_FILE + b'{"ev":"done","rcpt":3')  # torn by a crash: ignored
    assert read_state(path) == OLD_RECORDS
    assert ended_messages(path) == {"17f.2a.1def"}


def test_records_are_written_byte_for_byte_as_before(tmp_path: Path) -> None:
    """The same bytes as the dict-based writer: a queue written now reads with older code."""
    assert b"".join(encode(r) for r in OLD_RECORDS) == OLD_FILE
    path = tmp_path / "state"
    for record in OLD_RECORDS[:4]:
        assert not isinstance(record, Ended)
        append_state(path, record, durable=False)
    append_end(path, "17f.2a.1def")
    assert path.read_bytes() == OLD_FILE


@pytest.mark.parametrize(
    "tail", [b'{"ev":"deferred","rcpt":0', b"\0" * 37], ids=["torn record", "NULs"]
)
def test_a_record_after_a_crash_tail_is_still_read(tmp_path: Path, tail: bytes) -> None:
    """A power loss left the file ending in a torn record or in NULs (its size reached the
    disk, its last block did not): what is appended after it starts a line of its own,
    or the ``done`` record, made durable, would be read back as garbage and the recipient
    delivered again."""
    path = tmp_path / "state"
    path.write_bytes(OLD_FILE + tail)
    done = Attempt("done", 0, 1700000004.0, "delivered to Maildir")
    bounced = Bounced(1700000005.0, "18a.1f.2abd")
    append_state(path, done)
    append_end(path, "17f.2b.0000")
    append_state(path, bounced)
    assert read_state(path) == [*OLD_RECORDS, done, Ended("17f.2b.0000"), bounced]


def test_a_done_record_writes_no_failure_fields() -> None:
    """``status``/``remote``/``diag`` belong to failures, ``expired`` to ``failed`` only."""
    done = Attempt("done", 0, 1.0, "ok", "2.0.0", "mx.test", "smtp; 250 ok", expired=True)
    assert encode(done) == b'{"ev":"done","rcpt":0,"t":1.0,"detail":"ok"}\n'
    deferred = Attempt("deferred", 0, 1.0, "451", "4.0.0", "mx.test", "d", expired=True)
    assert b"expired" not in encode(deferred)


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"ev":"done"}',  # no recipient
        b'{"ev":"done","rcpt":"0","t":1}',  # recipient not an integer
        b'{"ev":"done","rcpt":0,"t":"soon"}',  # time not a number
        b'{"ev":["done"],"rcpt":0,"t":1}',
        b'{"ev":"vanished","rcpt":0,"t":1}',
        b'{"ev":"end","id":7}',
        b"\xff\xfe",
    ],
)
def test_a_line_that_is_no_record_is_skipped(tmp_path: Path, line: bytes) -> None:
    path = tmp_path / "state"
    path.write_bytes(line + b"\n" + OLD_FILE)
    assert read_state(path) == OLD_RECORDS


def test_lenient_fields_read_as_the_daemon_always_read_them() -> None:
    """A missing field takes the default the dict-based reader gave it."""
    assert from_json({"ev": "failed", "rcpt": 0}) == Attempt("failed", 0, 0.0, remote="local")
    assert from_json({"ev": "bounced"}) == Bounced(0.0, "")
    assert from_json({"ev": "deferred", "rcpt": 1, "t": "2.5"}) == Attempt("deferred", 1, 2.5)


def test_a_missing_state_file_is_no_records(tmp_path: Path) -> None:
    assert read_state(tmp_path / "missing") == []
    assert ended_messages(tmp_path / "missing") == set()


def test_the_queue_tool_does_not_load_the_daemon() -> None:
    """pyqmail-queue reads state files through pyqmail.queue, not pyqmail-send's manager."""
    code = "import sys, pyqmail.tools.queue; print('pyqmail.send.manager' in sys.modules)"
    out = fresh_stdout(code)
    assert out == "False\n"


# A child whose file size limit lets only part of the next record in: the write stops
# short at the limit, as it does on a disk that fills up (SIGXFSZ is ignored by Python, so
# the next write fails with EFBIG instead of killing the process).
SHORT_WRITE = """
import os, resource, sys
from pathlib import Path
from pyqmail.queue.state import Bounced, Signed, append_end, append_state, write_signed
path = Path(sys.argv[1])
kind = sys.argv[2]
size = path.stat().st_size if path.exists() else 0
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, resource.RLIM_INFINITY))
try:
    if kind == "end":
        append_end(path, "18a.1f.2abc")
    elif kind == "signed":
        write_signed(path, [Signed("18a.1f.2abc", b"DKIM-Signature: " + b"x" * 200)])
    else:
        append_state(path, Bounced(1700000003.125, "18a.1f.2abc"))
except OSError as exc:
    print("error", exc.errno)
else:
    print("written")
"""


@pytest.mark.parametrize("kind", ["end", "state", "signed"])
def test_a_record_cut_short_by_a_full_disk_is_an_error_not_a_record(
    tmp_path: Path, kind: str
) -> None:
    """A write that stops short (the disk, or the file size limit, is full) used to count
    as the record: a segment's end then read back as torn, and its message was delivered
    again after a restart although pyqmail-send had taken it as ended. Now the rest is
    written too, and the error that stops it reaches the caller, which tries again later
    (ends) or treats the recipient as not done."""
    path = tmp_path / "state"
    path.write_bytes(encode(Ended("17f.2a.1def")))
    before = read_state(path)
    out = fresh_stdout(SHORT_WRITE, str(path), kind)
    assert out == f"error {errno.EFBIG}\n"
    if kind != "signed":  # the file holds the old records and a torn tail, no new record
        assert read_state(path) == before
        append_end(path, "18a.1f.2abc")  # with room again, the next record is whole
        assert ended_messages(path) == {"17f.2a.1def", "18a.1f.2abc"}
    else:  # a state file the pickup could not write whole is not left behind
        assert not path.exists()


def test_a_state_file_whose_directory_sync_failed_is_created_and_synced_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first record creates the file and syncs state/. When that sync fails, the
    caller is told (it keeps the recipient pending) and the file goes; before, the next
    record found the file, appended to it without syncing state/ again, and the file's
    name might never reach the disk (all its recipients delivered again after a crash)."""
    calls: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(target):
            calls.append(target)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "state"
    path.mkdir()
    record = tmp_path / "state" / "18a.1f.2abc"
    with pytest.raises(OSError, match="Input/output error"):
        append_state(record, Bounced(1700000003.125, "18b.1f.2abc"))
    assert not record.exists()
    append_state(record, Bounced(1700000004.125, "18c.1f.2abc"))
    assert calls == [str(path), str(path)]
    assert read_state(record) == [Bounced(1700000004.125, "18c.1f.2abc")]


def test_a_failed_fsync_of_state_in_another_thread_after_the_create_fails_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first record's file is created; before its own fsync of state/, another thread's
    fsync of state/ fails (the DKIM pickup's, say), and Linux reports that failure to it
    alone: this record's own fsync then succeeds without writing the name. The record is
    not durable, so the call must fail (its ticket was taken before the create)."""
    from pyqmail.queue.dirsync import DirSync

    path = tmp_path / "state"
    path.mkdir()
    record = path / "18a.1f.2abc"
    real_fsync = os.fsync

    def other_thread_fails() -> None:
        raise OSError(errno.EIO, "Input/output error")

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if os.readlink(f"/proc/self/fd/{fd}") == str(record):  # between create and sync
            shared = DirSync.of(str(path))
            with pytest.raises(OSError):
                shared.sync(shared.ticket(), other_thread_fails)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        append_state(record, Bounced(1700000003.125, "18b.1f.2abc"))
    assert not record.exists()

"""Who may read what in the queue ("Permissions" in pyqmail.queue.store), and the roles that set
it up.

The layout's modes (``Queue.create`` and the role pyqmail_control must agree), the mode and
owner each kind of writer gives a queue file (the owner, root for the owner, a member of
the group), and the AUTH hashes' group (the verifiers', which the delivery user is not in).
tests/attacks/test_privileges.py runs the daemons under those identities.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyqmail.queue.store import LAYOUT, ROOT_MODE, TRIGGER, Queue
from pyqmail.queue.writer import QueueWriter
from tests.conftest import IMPOSSIBLE_HERE
from tests.queue_util import commit
from tests.runas import IS_ROOT, Ident, chown_tree, run_as, spare_ids

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tasks(role: str) -> list[dict[str, Any]]:
    data = yaml.safe_load((ROLES / role / "tasks" / "main.yml").read_text())
    out: list[dict[str, Any]] = []
    for task in data:
        out.extend(task.get("block", [task]))
    return out


def _task(role: str, name: str) -> dict[str, Any]:
    (task,) = [t for t in _tasks(role) if t.get("name") == name]
    return task


def _defaults(role: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    return data


def test_create_sets_every_mode_whatever_the_umask(tmp_path: Path) -> None:
    """mkdir drops setgid and applies the umask: create() sets the modes itself."""
    old = os.umask(0o077)
    try:
        q = Queue(tmp_path / "queue")
        q.create()
    finally:
        os.umask(old)
    assert _mode(q.root) == ROOT_MODE
    assert {sub: _mode(q.path(sub)) for sub in LAYOUT} == LAYOUT
    assert stat.S_ISFIFO(os.stat(q.root / TRIGGER).st_mode)
    assert _mode(q.root / TRIGGER) == 0o620
    # the group may create and rename in tmp/ and new/, list new/ only, and nothing else
    assert LAYOUT["tmp"] & 0o070 == 0o030 and LAYOUT["new"] & 0o070 == 0o070
    assert all(LAYOUT[s] & stat.S_ISVTX and LAYOUT[s] & stat.S_ISGID for s in ("tmp", "new"))
    assert all(LAYOUT[s] & 0o077 == 0 for s in ("mess", "state", "bad"))


def test_role_creates_the_layout_of_the_code() -> None:
    queue_dir = _task("pyqmail_control", "Create the queue directory")["ansible.builtin.file"]
    assert int(queue_dir["mode"], 8) == ROOT_MODE
    subdirs = _task(
        "pyqmail_control", "Create the queue subdirectories (pyqmail.queue.store layout)"
    )
    args = subdirs["pyqmail.mail.pyqmail_directories"]
    made = {i["path"].rsplit("/", 1)[1]: int(i["mode"], 8) for i in args["paths"]}
    assert made == LAYOUT
    assert all(i["path"].startswith("{{ pyqmail__root }}/queue/") for i in args["paths"])
    assert (args["owner"], args["group"]) == ("{{ pyqmail__send_user }}", "{{ pyqmail__group }}")


def test_role_gives_the_hashes_to_the_verifiers_only() -> None:
    """control/smtpusers is root:<auth group> 0640; only pyqmail-smtpd's user is in it."""
    common = _defaults("pyqmail")
    assert common["pyqmail__auth_group"] != common["pyqmail__group"]
    smtp_users = _task("pyqmail_mailboxes", "Manage the SMTP AUTH users")[
        "pyqmail.mail.pyqmail_smtp_user"
    ]
    assert (smtp_users["owner"], smtp_users["group"], smtp_users["mode"]) == (
        "root",
        "{{ pyqmail__auth_group }}",
        "0640",
    )
    users = _task("pyqmail_users", "Create the service users")
    groups = {u["name"]: u.get("groups", []) for u in users["loop"]}
    assert groups["{{ pyqmail__smtpd_user }}"] == ["{{ pyqmail__auth_group }}"]
    assert groups["{{ pyqmail__send_user }}"] == []
    assert groups["{{ pyqmail__log_user }}"] == []
    # Other groups an admin added stay: append where groups are listed, and where none are,
    # the module leaves the groups alone (append there would only draw Ansible's warning).
    assert users["ansible.builtin.user"]["append"] == "{{ item.groups is defined }}"
    assert users["ansible.builtin.user"]["groups"] == "{{ item.groups | default(omit) }}"
    made = _task(
        "pyqmail_users", "Create the group of the password verifiers (may read control/smtpusers)"
    )
    assert made["ansible.builtin.group"]["name"] == "{{ pyqmail__auth_group }}"


def _queue_files(q: Queue) -> list[os.stat_result]:
    return [os.stat(q.path("new", name)) for name in q.ids("new")]


def _write_one_and_a_segment(q: Queue) -> None:
    q.enqueue("a@b.test", ["c@d.test"], b"alone\r\n")
    held = []
    for n in range(2):
        w = QueueWriter(q, "a@b.test", [f"r{n}@d.test"], defer=True)
        w.write(b"x\r\n")
        held.append(w)
    commit(held)


def test_the_owner_writes_private_files(tmp_path: Path) -> None:
    """Bounces: pyqmail-send owns the queue and alone reads them (0600, even under umask 022)."""
    q = Queue(tmp_path / "queue")
    q.create()
    old = os.umask(0o022)
    try:
        _write_one_and_a_segment(q)
    finally:
        os.umask(old)
    files = _queue_files(q)
    assert len(files) == 2
    assert {(st.st_uid, stat.S_IMODE(st.st_mode)) for st in files} == {(os.geteuid(), 0o600)}


@pytest.mark.skipif(
    not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} handing a file to another user needs root"
)
def test_root_hands_its_files_to_the_owner(tmp_path: Path) -> None:
    """cron's sendmail as root: the file belongs to pyqmail-send, 0600, never root's 0640."""
    owner, group = spare_ids(2)
    q = Queue(tmp_path / "queue")
    q.create()
    chown_tree(q.root, owner, group)
    old = os.umask(0o077)
    try:
        q.enqueue("root@b.test", ["c@d.test"], b"from cron\r\n")
    finally:
        os.umask(old)
    (st,) = _queue_files(q)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner, group, 0o600)


_GROUP_WRITER = """
import pyqmail.queue.store as qm
import pyqmail.queue.writer as qw
q = qm.Queue(sys.argv[4])
os.umask(0o077)
q.enqueue("a@b.test", ["c@d.test"], b"alone\\r\\n")
held = []
for n in range(2):
    w = qw.QueueWriter(q, "a@b.test", [f"r{n}@d.test"], defer=True)
    w.write(b"x\\r\\n")
    held.append(w)
print(json.dumps([type(r).__name__ for r in tests.queue_util.commit(held)]))
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="pyqmail-perms-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} writing as another user needs root")
def test_a_group_member_writes_files_the_owner_reads_through_the_group(open_dir: Path) -> None:
    """pyqmail-smtpd: 0640 in the queue's group (setgid tmp/), whatever its umask; its
    segments too (an unnamed tmp file linked into new/)."""
    owner, writer, group = spare_ids(3)
    q = Queue(open_dir / "queue")
    q.create()
    chown_tree(q.root, owner, group)
    got = run_as(
        Ident(writer, writer, (group,)),
        _GROUP_WRITER,
        str(q.root),
        preload="import pyqmail.queue.store, tests.queue_util",  # pyqmail-smtpd's commit path
    )
    assert got == ["Envelope", "Envelope"]
    files = _queue_files(q)
    assert len(files) == 2
    assert {(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) for st in files} == {
        (writer, group, 0o640)
    }
    assert os.listdir(q.path("tmp")) == []


_QUEUE_TOOL = """
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = pyqmail.tools.queue.main(["--root", sys.argv[4], "list"])
print(json.dumps([code, err.getvalue()]))
"""


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} running as another user needs root")
def test_queue_tool_says_who_may_run_it(open_dir: Path) -> None:
    """A member of the group (not the owner) gets a clear refusal, not a traceback."""
    owner, member, group = spare_ids(3)
    q = Queue(open_dir / "queue")
    q.create()
    q.enqueue("a@b.test", ["c@d.test"], b"x\r\n")
    chown_tree(q.root, owner, group)
    code, err = run_as(
        Ident(member, group, (group,)),
        _QUEUE_TOOL,
        str(open_dir),
        # argparse imports locale and shutil late; the python may be root's alone
        preload="import contextlib, io, locale, shutil, pyqmail.tools.queue",
    )
    assert code == 2
    assert err == (
        f"pyqmail-queue: {q.path('mess')}: Permission denied (mess/ and state/ are"
        " pyqmail-send's: run as root or as its user)\n"
    )


def test_role_gives_the_relay_passwords_to_pyqmail_send_alone() -> None:
    name = "Write the smarthost credentials (readable by pyqmail-send alone, not pyqmail-smtpd)"
    args = _task("pyqmail_control", name)["pyqmail.mail.pyqmail_control_files"]
    assert (args["owner"], args["group"], args["mode"], args["secret"]) == (
        "{{ pyqmail__send_user }}",
        "root",
        "0400",
        True,  # created 0600, never readable by others on its way to 0400
    )


def test_the_injector_does_not_need_the_relay_passwords(tmp_path: Path) -> None:
    """pyqmail-sendmail loads the control files without smtproutes-auth (a user in group
    pyqmail may inject but not read it; tests/attacks/test_privileges.py runs that user)."""
    from pyqmail.control.send import Control, ControlError

    control = tmp_path / "control"
    control.mkdir()
    (control / "me").write_text("mx.test\n")
    (control / "smtproutes").write_text(":relay.test\n")
    (control / "smtproutes-auth").write_bytes(b"\xff not even text\n")
    # the one reader's wording (pyqmail.control.reader), as pyqmail-smtpd always said it
    with pytest.raises(ControlError, match="smtproutes-auth:1: not valid UTF-8"):
        Control.load(tmp_path)
    assert Control.load(tmp_path, relay_auth=False).route("x.test").user == ""


def test_pickup_fsyncs_both_directories_before_scheduling(
    send_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move out of smtpd's reach is durable: rename, fsync(mess/) and fsync(new/) before
    any message of the batch is scheduled, so after a power loss a message is either still
    in new/ (picked up again, nothing delivered yet) or only in mess/."""
    import io

    from pyqmail.send import loader
    from pyqmail.send import manager as send

    q = Queue(send_root / "queue")
    for n in range(3):
        q.enqueue("a@remote.test", [f"user{n}@mx.test"], b"x\r\n")
    events: list[str] = []
    real = loader.fsync_dir
    monkeypatch.setattr(loader, "fsync_dir", lambda p: events.append(Path(p).name) or real(p))
    m = send.Manager(send_root, send.Log(io.StringIO()))
    real_add = m._add
    monkeypatch.setattr(m, "_add", lambda *a: events.append("schedule") or real_add(*a))
    assert m.pickup() == 3
    assert events == ["mess", "new", "schedule", "schedule", "schedule"]
    assert q.ids("new") == [] and len(q.ids("mess")) == 3

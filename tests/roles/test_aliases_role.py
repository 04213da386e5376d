"""pyqmail_aliases: one source of truth per alias file. A listed alias named root, postmaster
or mailer-daemon replaces the pyqmail_aliases__postmaster default (written once, not twice
per run); an alias deleted from the list loses its file, but a file the role did not write
(no marker line) stays. An alias whose targets are [] is a discard address; one without
targets is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.queue.store import Queue
from pyqmail.send.local import LocalDelivery
from tests.roles.playbook import changed_tasks, results_by_task, run_role_tasks


def play(tmp_path: Path, aliases: list[dict[str, Any]], *args: str) -> dict[str, Any]:
    return run_role_tasks(
        ("pyqmail_aliases",),
        tmp_path / "play",
        {
            "pyqmail__root": str(tmp_path / "qmail"),
            "pyqmail__service_dir": str(tmp_path / "service"),
            "pyqmail_aliases__postmaster": "admin@example.org",
            "pyqmail_aliases__aliases": aliases,
        },
        *args,
    )


def deliveries(tmp_path: Path) -> dict[str, list[str]]:
    """file name -> its delivery lines (comments left out)."""
    return {
        path.name: [line for line in path.read_text().splitlines() if not line.startswith("#")]
        for path in sorted((tmp_path / "qmail" / "alias").glob(".qmail-*"))
    }


def test_a_listed_root_alias_replaces_the_default_and_is_idempotent(tmp_path: Path) -> None:
    aliases = [
        {"name": "root", "targets": ["ops@example.org"]},
        {"name": "help.desk", "targets": ["alice@example.org", "/var/vmail/help/Maildir/"]},
    ]
    play(tmp_path, aliases)
    assert deliveries(tmp_path) == {
        ".qmail-help:desk": ["&alice@example.org", "/var/vmail/help/Maildir/"],
        ".qmail-mailer-daemon": ["&admin@example.org"],
        ".qmail-postmaster": ["&admin@example.org"],
        ".qmail-root": ["&ops@example.org"],
    }
    assert changed_tasks(play(tmp_path, aliases)) == []


def test_an_alias_left_out_of_the_list_is_removed_a_hand_made_one_stays(tmp_path: Path) -> None:
    play(tmp_path, [{"name": "help", "targets": ["alice@example.org"]}])
    alias = tmp_path / "qmail" / "alias"
    (alias / ".qmail-sales").write_text("&bob@example.org\n")  # by hand
    play(tmp_path, [], "--check")
    assert (alias / ".qmail-help").exists()  # check mode changes nothing
    play(tmp_path, [])
    assert deliveries(tmp_path) == {
        ".qmail-mailer-daemon": ["&admin@example.org"],
        ".qmail-postmaster": ["&admin@example.org"],
        ".qmail-root": ["&admin@example.org"],
        ".qmail-sales": ["&bob@example.org"],
    }
    assert changed_tasks(play(tmp_path, [])) == []


def test_an_alias_without_targets_is_a_discard_address(tmp_path: Path) -> None:
    """targets: [] writes the marker line alone: a .qmail of comments only, which delivers
    nowhere (dot-qmail(5)), in the alias directory as the role makes it (root:root 0755,
    where a default ./Maildir/ delivery could never be written)."""
    play(tmp_path, [{"name": "noreply", "targets": []}, {"name": "void", "targets": []}])
    root = tmp_path / "qmail"
    assert deliveries(tmp_path)[".qmail-noreply"] == deliveries(tmp_path)[".qmail-void"] == []
    (root / "control").mkdir()
    (root / "control" / "me").write_text("mx.test\n")
    queue = Queue(root / "queue")
    queue.create()
    local = LocalDelivery(Control.load(root), queue)
    for name in ("noreply", "void"):
        env = Envelope("Q1", "a@remote.test", (f"{name}@mx.test",), 1, 0.0)
        result = local.deliver(env, b"Subject: x\r\n\r\nbody\r\n", f"{name}@mx.test")
        assert result.kind == "ok", result
        assert result.detail.startswith(f"discarded: {root}/alias/.qmail-{name} ")
    assert [p for p in tmp_path.rglob("*") if p.parent.name == "new"] == []
    assert queue.ids("new") == []


def test_an_alias_without_a_targets_key_is_refused_and_nothing_written(tmp_path: Path) -> None:
    """A forgotten targets key must not make a discard address by itself: the role refuses,
    naming the alias, before any alias file is written."""
    out = run_role_tasks(
        ("pyqmail_aliases",),
        tmp_path / "play",
        {
            "pyqmail__root": str(tmp_path / "qmail"),
            "pyqmail__service_dir": str(tmp_path / "service"),
            "pyqmail_aliases__postmaster": "admin@example.org",
            "pyqmail_aliases__aliases": [{"name": "noreply"}],
        },
        must_pass=False,
    )
    failed = results_by_task(out)["Check that every alias kept names its targets"]
    assert "alias noreply has no targets" in json.dumps(failed)
    assert not list((tmp_path / "qmail" / "alias").glob(".qmail-*"))

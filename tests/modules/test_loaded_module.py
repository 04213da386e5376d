"""library/pyqmail_loaded.py: the note of what each linked daemon loaded, and the reloads due.

Scratch trees only: a qmail root with control/, a service directory whose links point into
root/supervise, relay rules cdbs and a Dovecot configuration. Each change a run or an admin
makes to a loaded file must make its services due, and nothing else must."""

from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.modules.utils import REPO, AnsibleExitJson, AnsibleFailJson, set_module_args

loaded_module: Any = importlib.import_module("pyqmail_loaded")

SERVICES = ("qmail-smtpd", "qmail-smtpd-ssl", "qmail-send", "dovecot")


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Any]:
    """The module's arguments for a scratch host with every kind of service linked."""
    root = tmp_path / "qmail"
    (root / "control" / "tlshosts").mkdir(parents=True)
    (root / "control" / "me").write_text("mx1.example.org\n")
    (root / "control" / "servercert.pem").write_text("cert\n")
    service = tmp_path / "service"
    service.mkdir()
    for name in SERVICES:
        (root / "supervise" / name).mkdir(parents=True)
        (service / name).symlink_to(root / "supervise" / name)
    (root / "supervise" / "unlinked").mkdir()
    (service / "other").mkdir()  # not a link: svscan's, not ours
    (tmp_path / "tcp").mkdir()
    (tmp_path / "tcp" / "smtp.cdb").write_bytes(b"cdb")
    (tmp_path / "dovecot.conf").write_text("protocols = imap\n")
    return {
        "root": str(root),
        "service_dir": str(service),
        "rules_path": str(tmp_path / "tcp" / "smtp"),
        "dovecot_config": str(tmp_path / "dovecot.conf"),
    }


def run(args: dict[str, Any], **more: Any) -> dict[str, Any]:
    raised = (AnsibleExitJson, AnsibleFailJson)
    with set_module_args({**args, **more}), pytest.raises(raised) as exc:
        loaded_module.main()
    result: dict[str, Any] = exc.value.result  # type: ignore[union-attr]
    return result


def due(args: dict[str, Any]) -> list[str]:
    result = run(args)
    assert not result["changed"], result
    return list(result["due"])


def rewrite_keeping_mtime(path: Path, text: str) -> None:
    """Change ``path``'s content, same size, with its old mtime (as ``cp -p`` leaves it)."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_service_without_a_note_is_due_and_a_noted_one_is_not(host: dict[str, Any]) -> None:
    assert due(host) == sorted(SERVICES)
    result = run(host, state="noted")
    assert result["changed"] and result["due"] == sorted(SERVICES), result
    assert due(host) == []
    note = Path(host["service_dir"]) / "qmail-smtpd" / "loaded"
    assert stat.S_IMODE(note.stat().st_mode) == 0o600
    assert sorted(line.split()[0] for line in note.read_text().splitlines()) == ["control", "rules"]
    assert not (Path(host["root"]) / "supervise" / "unlinked" / "loaded").exists()
    assert not (Path(host["service_dir"]) / "other" / "loaded").exists()
    assert run(host, state="noted")["changed"] is False


def test_a_control_file_changed_with_its_old_mtime_makes_listeners_and_send_due(
    host: dict[str, Any],
) -> None:
    run(host, state="noted")
    rewrite_keeping_mtime(Path(host["root"]) / "control" / "me", "mx2.example.org\n")
    result = run(host)
    assert result["due"] == ["qmail-send", "qmail-smtpd", "qmail-smtpd-ssl"], result
    assert result["handlers"] == ["pyqmail reload listeners", "pyqmail reload send"]


@pytest.mark.parametrize(
    "change",
    [
        lambda c: (c / "tlshosts" / "mx2.example.org.pem").write_text("ca\n"),  # added, deep
        lambda c: (c / "me").unlink(),  # removed
        lambda c: (c / "newfile").symlink_to("/nonexistent"),  # a dangling link
    ],
    ids=["added-in-a-subdirectory", "removed", "dangling-link"],
)
def test_files_added_or_removed_under_control_make_listeners_due(
    host: dict[str, Any], change: Any
) -> None:
    run(host, state="noted")
    change(Path(host["root"]) / "control")
    assert due(host) == ["qmail-send", "qmail-smtpd", "qmail-smtpd-ssl"]


def test_a_linked_certificate_renewed_at_its_target_makes_listeners_and_dovecot_due(
    host: dict[str, Any], tmp_path: Path
) -> None:
    live = tmp_path / "live.pem"
    live.write_text("cert one\n")
    cert = Path(host["root"]) / "control" / "servercert.pem"
    cert.unlink()
    cert.symlink_to(live)
    run(host, state="noted")
    rewrite_keeping_mtime(live, "cert two\n")  # renewed where the link points
    assert due(host) == sorted(SERVICES)


def test_rules_load_only_the_listeners_and_dovecot_config_only_dovecot(
    host: dict[str, Any], tmp_path: Path
) -> None:
    run(host, state="noted")
    (tmp_path / "tcp" / "smtp-submission.cdb").write_bytes(b"own")
    (tmp_path / "tcp" / "smtp.txt").write_text("not a cdb a listener loads\n")
    result = run(host)
    assert result["due"] == ["qmail-smtpd", "qmail-smtpd-ssl"], result
    assert result["handlers"] == ["pyqmail reload listeners"]
    run(host, state="noted", daemons=["listeners"])
    rewrite_keeping_mtime(Path(host["dovecot_config"]), "protocols = pop3\n")
    result = run(host)
    assert (result["due"], result["handlers"]) == (["dovecot"], ["pyqmail reload dovecot"])


def test_noted_writes_only_the_daemons_asked_for(host: dict[str, Any]) -> None:
    result = run(host, state="noted", daemons=["send"])
    assert result["due"] == ["qmail-send"], result
    assert due(host) == ["dovecot", "qmail-smtpd", "qmail-smtpd-ssl"]


def test_check_mode_writes_no_note(host: dict[str, Any]) -> None:
    result = run(host, state="noted", _ansible_check_mode=True)
    assert result["changed"] and result["due"] == sorted(SERVICES), result
    assert not list(Path(host["root"]).glob("supervise/*/loaded"))


def test_a_note_that_cannot_be_written_fails_naming_it(host: dict[str, Any]) -> None:
    blocked = Path(host["service_dir"]) / "qmail-send" / "loaded"
    blocked.mkdir()  # a directory where the note goes: the rename over it fails
    result = run(host, state="noted", daemons=["send"])
    assert result.get("failed"), result
    assert str(blocked) in result["msg"], result


def test_no_service_directory_means_nothing_due(host: dict[str, Any], tmp_path: Path) -> None:
    assert due({**host, "service_dir": str(tmp_path / "none")}) == []


ROUTES = {
    "databytes": ["smtpd"],
    "tlshosts": ["send"],
    "dkim": ["send"],
    "me": ["smtpd", "send"],
    "smtpusers.kick": [],
}


@pytest.mark.parametrize(
    ("change", "wanted"),
    [
        (lambda c: (c / "databytes").write_text("1000\n"), ["qmail-smtpd", "qmail-smtpd-ssl"]),
        (lambda c: (c / "tlshosts" / "mx2.example.org.pem").write_text("ca\n"), ["qmail-send"]),
        (lambda c: (c / "dkim").mkdir() or (c / "dkim" / "k").write_text("k\n"), ["qmail-send"]),
        (
            lambda c: (c / "unknownfile").write_text("x\n"),
            ["qmail-send", "qmail-smtpd", "qmail-smtpd-ssl"],
        ),
        (lambda c: (c / "smtpusers.kick").write_text("alice\n"), []),
    ],
    ids=[
        "listeners-only",
        "send-only-in-a-directory",
        "dkim-keys",
        "unrouted-counts-for-both",
        "read-by-none",
    ],
)
def test_a_file_one_daemon_reads_makes_only_that_daemon_due(
    host: dict[str, Any], change: Any, wanted: list[str]
) -> None:
    """A reload of the listeners alone after a change to databytes must not leave
    pyqmail-send due at the next run (molecule's multihost: the certificates play reloads the
    listeners for clientca.pem, the config play pyqmail-send for tlshosts/)."""
    args = {**host, "routes": ROUTES}
    run(args, state="noted")
    change(Path(host["root"]) / "control")
    assert due(args) == wanted


@pytest.mark.parametrize(
    "routes", [{"databytes": "smtpd"}, {"databytes": ["smtpd", "listeners"]}, {"me": None}]
)
def test_a_route_that_names_no_daemon_is_refused_naming_it(
    host: dict[str, Any], routes: dict[str, Any]
) -> None:
    result = run({**host, "routes": routes})
    assert result.get("failed"), result
    assert result["msg"].startswith(f"routes.{next(iter(routes))} is "), result


def role_loaded_routes() -> dict[str, Any]:
    """The role pyqmail's pyqmail__loaded_routes as a play sees it (templated by Ansible)."""
    import yaml
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    role_vars = yaml.safe_load((REPO / "roles" / "pyqmail" / "vars" / "main.yml").read_text())
    templar = Templar(loader=DataLoader(), variables=role_vars)
    template = trust_as_template(role_vars["pyqmail__loaded_routes"])
    routes: dict[str, Any] = templar.template(template)
    return routes


def test_kicks_recorded_by_pyqmail_users_make_nothing_due_with_the_roles_routes(
    host: dict[str, Any],
) -> None:
    """pyqmail-users and Dovecot's kicks write control/smtpusers.kick and its lock beside the
    user file, which no daemon loads: with the role's own routes, nothing is due after them."""
    from pyqmail.authdb import add_kicks, drop_kicks, kicks_path

    args = {**host, "routes": role_loaded_routes()}
    users = Path(host["root"]) / "control" / "smtpusers"
    run(args, state="noted")
    add_kicks(kicks_path(str(users)), ["alice@example.org"])
    assert sorted(p.name for p in users.parent.glob("smtpusers.*")) == [
        "smtpusers.kick",
        "smtpusers.kick.lock",
    ]
    assert due(args) == []
    drop_kicks(kicks_path(str(users)), ["alice@example.org"])
    assert due(args) == []
    (users.parent / "dkim").mkdir()
    (users.parent / "dkim" / "k.key").write_text("key\n")  # the DKIM keys: pyqmail-send's
    assert due(args) == ["qmail-send"]

"""The role pyqmail_dkim's tasks, run for real by ansible-playbook (local connection).

The play imports the role's tasks with its defaults and the role pyqmail's handlers into a
qmail root in a temporary directory. It checks control/dkimkeys (Contract A: only the keys
that sign now, ``domain:selector:algorithm:keyfile``), the key files' owner and mode, the fact
pyqmail_dkim__published (Contract B), that a second run changes nothing, and that turning DKIM
off removes control/dkimkeys and keeps the keys. The group and user tasks are left out
(pyqmail__check_fresh): they would change this machine's accounts; only check mode runs them,
with a group that does not exist (DKIM switched on for the first time on an installed host).
"""

from __future__ import annotations

import grp
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import results_by_task, run_role_tasks

GROUP = "daemon"


def run_role(
    base: Path, *, check: bool = False, **more: object
) -> tuple[dict[str, list[dict[str, Any]]], Any]:
    """Run the role's tasks; (task name -> results, the fact pyqmail_dkim__published)."""
    out = run_role_tasks(
        ("pyqmail_dkim",),
        base,
        {
            "pyqmail__root": str(base / "qmail"),
            "pyqmail__service_dir": str(base / "service"),
            "pyqmail__me": "mx.example.org",
            "pyqmail__check_fresh": True,
            "pyqmail__preflight_done": True,  # the role pyqmail's restart_note runs its dependency
            "pyqmail__venv": str(base / "venv"),  # where pyqmail__send_restart_marker is looked for
            "pyqmail_control__locals": ["example.org", "mx.example.org", "localhost"],
            "pyqmail_dkim__group": GROUP,
            **more,
        },
        *(["--check"] if check else []),
        must_pass=False,
        after=[
            {
                "name": "Show the published records",
                "ansible.builtin.debug": {"var": "pyqmail_dkim__published"},
            }
        ],
    )
    ran = results_by_task(out)
    published = ran.get("Show the published records", [{}])[0].get("pyqmail_dkim__published")
    return ran, published


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_dkimkeys_and_published_records(tmp_path: Path) -> None:
    (tmp_path / "qmail" / "control").mkdir(parents=True)
    ran, published = run_role(tmp_path)
    failed = {name: r for name, rs in ran.items() for r in rs if r.get("failed")}
    assert not failed, [r.get("msg") for r in failed.values()]
    control = tmp_path / "qmail" / "control"
    lines = [
        line
        for line in (control / "dkimkeys").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    # The default domains: the local ones but localhost; both algorithms each.
    assert len(lines) == 4, lines
    gid = grp.getgrnam(GROUP).gr_gid
    seen = set()
    for line in lines:
        domain, selector, algorithm, keyfile = line.split(":")
        seen.add((domain, algorithm))
        assert selector.endswith("-rsa" if algorithm == "rsa-sha256" else "-ed25519")
        # named after the host (inventory_hostname localhost): hosts never share a selector
        assert selector.startswith("localhost-"), selector
        key = Path(keyfile)
        assert key == control / "dkim" / domain / f"{selector}.key"
        assert mode_of(key) == 0o640
        assert (key.stat().st_uid, key.stat().st_gid) == (0, gid)
        assert mode_of(key.parent) == 0o750
        assert (key.parent.stat().st_uid, key.parent.stat().st_gid) == (0, gid)
    assert seen == {
        (d, a) for d in ("example.org", "mx.example.org") for a in ("rsa-sha256", "ed25519-sha256")
    }
    assert mode_of(control / "dkimkeys") == 0o644
    assert {(r["domain"], r["algorithm"]) for r in published} == seen
    assert all(r["txt"].startswith("v=DKIM1; k=") for r in published)
    assert set(published[0]) == {"domain", "selector", "algorithm", "txt"}
    assert "PRIVATE KEY" not in json.dumps(ran)

    again, published_again = run_role(tmp_path)
    changed = [name for name, rs in again.items() for r in rs if r.get("changed")]
    assert changed == [], changed
    assert published_again == published

    off, none = run_role(tmp_path, pyqmail_dkim__enabled=False)
    assert not (control / "dkimkeys").exists()
    assert none == []
    assert len(list((control / "dkim").glob("*/*.key"))) == 4
    assert not [name for name, rs in off.items() for r in rs if r.get("failed")]


def test_check_mode_changes_nothing_and_publishes_only_existing_keys(tmp_path: Path) -> None:
    (tmp_path / "qmail" / "control").mkdir(parents=True)
    ran, published = run_role(
        tmp_path,
        check=True,
        # A virtual domain is local too (control/virtualdomains, domain:prefix lines).
        pyqmail_control__extra={"virtualdomains": "# shops\nshop.example:alice\nx@y.example:b"},
        pyqmail_dkim__domains=["example.org", "shop.example"],
    )
    assert not [name for name, rs in ran.items() for r in rs if r.get("failed")]
    keys = ran["Keep the DKIM keys of each signing domain (rotation state in state.json)"][0]
    assert [r["item"] for r in keys["results"] if r.get("changed")] == [
        "example.org",
        "shop.example",
    ]
    assert published == []
    assert not (tmp_path / "qmail" / "control" / "dkim").exists()
    assert not (tmp_path / "qmail" / "control" / "dkimkeys").exists()


def test_check_mode_where_dkim_is_switched_on_on_an_installed_host(tmp_path: Path) -> None:
    """An installed host (pyqmail__check_fresh false) without the DKIM group yet: check mode
    makes no group, and the manager's joining it is reported, not run (the user module fails
    "Group ... does not exist" in check mode too)."""
    group = "pyqmail-dkim-test-absent"
    with pytest.raises(KeyError):
        grp.getgrnam(group)
    (tmp_path / "qmail" / "control").mkdir(parents=True)
    ran, published = run_role(
        tmp_path,
        check=True,
        pyqmail__check_fresh=False,
        pyqmail__send_user="nobody",
        pyqmail_dkim__group=group,
    )
    failed = {name: r for name, rs in ran.items() for r in rs if r.get("failed")}
    assert not failed, [r.get("msg") for r in failed.values()]
    assert ran["Create the group that may read the DKIM keys"][0].get("changed")
    report = ran[
        "Report that pyqmail-send's manager joins the group check mode did not make "
        "(it then restarts)"
    ][0]
    assert report.get("changed"), report
    joined = ran["Put pyqmail-send's manager in that group (it gets its groups when it starts)"][0]
    assert joined.get("skipped"), joined
    assert "nobody joins pyqmail-dkim-test-absent once the run makes that group" in report["msg"]
    assert published == []
    with pytest.raises(KeyError):
        grp.getgrnam(group)


def test_a_domain_that_is_not_local_fails(tmp_path: Path) -> None:
    (tmp_path / "qmail" / "control").mkdir(parents=True)
    ran, _ = run_role(tmp_path, pyqmail_dkim__domains=["bank.example"])
    result = ran["Keep the DKIM keys of each signing domain (rotation state in state.json)"][0]
    assert result.get("failed")
    messages = [r.get("msg", "") for r in result["results"]]
    assert "domain: 'bank.example' is not a local domain of this host" in messages[0]
    assert not (tmp_path / "qmail" / "control" / "dkim" / "bank.example").exists()
    assert not (tmp_path / "qmail" / "control" / "dkimkeys").exists()

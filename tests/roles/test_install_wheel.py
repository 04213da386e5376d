"""The role pyqmail_install with the wheel a collection ships (issue 20): an installed
collection has no daemon sources, so the role installs pyqmail_install__wheel (by default the
wheel in its files/, which scripts/build-collection puts there) instead of building one. Run
through ansible-playbook on this machine with the role's wheel tasks, a scratch venv and wheel
directory; the installed daemon has the collection's version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles.playbook import REPO, ansible_env

TASKS = REPO / "roles" / "pyqmail_install" / "tasks" / "wheel.yml"
PYQMAIL = REPO / "roles" / "pyqmail"
VERSION = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
# The shared tasks' (roles/pyqmail/tasks/restart_note.yml), as the include_role names them.
NOTE_SAYS_RESTART = (
    "pyqmail.mail.pyqmail : Restart with the play's handlers, the note says it is due: "
    "pyqmail restart daemons"
)
FIND_SERVICES = "Find the supervised pyqmail services"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The daemon wheel, built as scripts/build-collection builds it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--wheel-dir", str(out), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (built,) = out.glob("pyqmail-*-py3-none-any.whl")
    assert built.name == f"pyqmail-{VERSION}-py3-none-any.whl"
    return built


def run(
    tmp: Path,
    given: str,
    after: list[dict[str, Any]] | None = None,
    options: tuple[str, ...] = (),
    **more: Any,
) -> subprocess.CompletedProcess[str]:
    """The role's wheel tasks with ``pyqmail_install__wheel: given`` (and ``more`` variables),
    then the tasks ``after``; the role pyqmail's vars and handlers, an empty service directory
    (the restart handler runs; it has nothing to signal). ``options``: more ansible-playbook
    options (``--check``)."""
    play = {
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars_files": [str(PYQMAIL / part / "main.yml") for part in ("defaults", "vars")],
        "tasks": [{"ansible.builtin.import_tasks": str(TASKS)}, *(after or [])],
        "handlers": [{"ansible.builtin.import_tasks": str(PYQMAIL / "handlers" / "main.yml")}],
    }
    playbook = tmp / "play.yml"
    playbook.write_text(json.dumps([play]))
    (tmp / "service").mkdir(exist_ok=True)
    extra = {
        "pyqmail__venv": str(tmp / "venv"),
        "pyqmail__service_dir": str(tmp / "service"),
        "pyqmail__check_fresh": False,
        # the inventory checked, as the role pyqmail (a dependency) does first in a role run:
        # the restart note's include_role of that role would check it again
        "pyqmail__preflight_done": True,
        "pyqmail_install__wheel": given,
        "pyqmail_install__wheel_dir": str(tmp / "cache"),
        "ansible_python_interpreter": sys.executable,
        **more,
    }
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
         str(playbook), "-e", json.dumps(extra), *options],
        cwd=REPO, env=ansible_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def stats(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout)["stats"]["localhost"]
    return result


def test_the_given_wheel_is_installed_once(tmp_path: Path, wheel: Path) -> None:
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    first = stats(run(tmp_path, str(wheel)))
    assert first["changed"] >= 2, first  # copy, install, stamp
    assert (tmp_path / "cache" / wheel.name).read_bytes() == wheel.read_bytes()
    # The scratch venv lacks the daemon's Debian dependencies: ask the installed metadata.
    python = tmp_path / "venv" / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('pyqmail'))"
    version = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == VERSION
    assert (tmp_path / "venv" / "bin" / "pyqmail-smtpd").is_file()
    assert stats(run(tmp_path, str(wheel)))["changed"] == 0


def test_a_missing_wheel_is_named(tmp_path: Path) -> None:
    proc = run(tmp_path, str(tmp_path / "pyqmail-9.9.9-py3-none-any.whl"))
    assert proc.returncode != 0
    assert (
        f"pyqmail_install__wheel: {tmp_path}/pyqmail-9.9.9-py3-none-any.whl is missing on the "
        "controller" in proc.stdout
    ), proc.stdout[-3000:]


def test_a_wheel_that_is_not_pyqmails_is_named(tmp_path: Path) -> None:
    other = tmp_path / "other-1.0-py3-none-any.whl"
    other.write_bytes(b"PK")
    proc = run(tmp_path, str(other))
    assert proc.returncode != 0
    assert f"{other} is not a pyqmail-<version>-py3-none-any.whl" in proc.stdout, proc.stdout[
        -3000:
    ]


def build_task(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The result of the task that runs pip wheel."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for task in json.loads(proc.stdout)["plays"][0]["tasks"]:
        if task["task"]["name"].startswith("Build the wheel on the controller (pure Python"):
            result: dict[str, Any] = task["hosts"]["localhost"]
            return result
    raise AssertionError("no pip wheel task in the output")


def test_the_wheel_is_built_once_per_source_checksum(tmp_path: Path) -> None:
    """Issue 20: an unchanged source tree reuses the wheel built before (no pip wheel, about
    5 s); a changed source file builds again."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    more: dict[str, Any] = {  # the role's defaults for a build (only its tasks run here)
        "pyqmail_install__source_dir": str(source),
        "pyqmail_install__build_python": sys.executable,
        "pyqmail_install__build_isolation": True,
    }
    first = run(tmp_path, "", **more)
    assert "skipped" not in build_task(first)
    stamp = (source / ".cache" / "wheel" / "stamp").read_text().split()
    assert len(stamp) == 3 and stamp[1] == f"pyqmail-{VERSION}-py3-none-any.whl", stamp
    second = run(tmp_path, "", **more)
    assert build_task(second).get("skipped") is True
    assert stats(second)["changed"] == 0
    with (source / "src" / "pyqmail" / "log.py").open("a") as handle:
        handle.write("# changed\n")
    third = run(tmp_path, "", **more)
    assert "skipped" not in build_task(third)
    assert (source / ".cache" / "wheel" / "stamp").read_text().split()[0] != stamp[0]


def ran(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The names of the tasks (handlers too) that ran on localhost, skipped ones left out."""
    return [
        task["task"]["name"]
        for play in json.loads(proc.stdout)["plays"]
        for task in play["tasks"]
        if not task["hosts"]["localhost"].get("skipped")
    ]


def test_a_run_that_ends_before_its_handlers_restarts_next_time(
    tmp_path: Path, wheel: Path
) -> None:
    """The wheel installed and its checksum recorded, then the run ends before the restart
    handler (a failed task in a play without force_handlers, as a Ctrl-C would): the
    restart-pending note stays on the host, and the next run restarts the daemons though the
    wheel no longer changes; the run after that restarts nothing."""
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    marker = tmp_path / "venv" / "pyqmail-restart-pending"
    failing = [{"name": "A later task fails", "ansible.builtin.fail": {"msg": "interrupted"}}]
    first = run(tmp_path, str(wheel), failing)
    assert first.returncode != 0
    assert "Install the wheel into the virtualenv" in ran(first)
    assert FIND_SERVICES not in ran(first)  # no handler ran
    assert (tmp_path / "venv" / "pyqmail-wheel.sha1").is_file()
    assert marker.is_file()
    assert oct(marker.stat().st_mode & 0o777) == "0o600"

    second = run(tmp_path, str(wheel))
    stats(second)  # the run passes
    assert "Install the wheel into the virtualenv" not in ran(second)
    assert NOTE_SAYS_RESTART in ran(second)
    assert FIND_SERVICES in ran(second)
    assert "Forget the pending restart of the daemons (pyqmail__restart_marker)" in ran(second)
    assert not marker.exists()
    assert stats(run(tmp_path, str(wheel)))["changed"] == 0


def test_check_mode_notes_nothing_and_keeps_a_note_left_before(tmp_path: Path, wheel: Path) -> None:
    """Check mode installs no wheel and writes no note (on a first install too); a note an
    earlier run left still says the restart is due, and stays for the run that restarts."""
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    (tmp_path / "cache").mkdir()  # the wheel directory: check mode creates nothing
    marker = tmp_path / "venv" / "pyqmail-restart-pending"
    looked = run(tmp_path, str(wheel), options=("--check",))
    stats(looked)
    assert "Install the wheel into the virtualenv" not in ran(looked)
    assert NOTE_SAYS_RESTART not in ran(looked)
    assert FIND_SERVICES not in ran(looked)  # no handler notified
    assert not marker.exists()
    assert not (tmp_path / "venv" / "pyqmail-wheel.sha1").exists()

    failing = [{"name": "A later task fails", "ansible.builtin.fail": {"msg": "interrupted"}}]
    assert run(tmp_path, str(wheel), failing).returncode != 0
    assert marker.is_file()
    looked = run(tmp_path, str(wheel), options=("--check",))
    stats(looked)
    assert NOTE_SAYS_RESTART in ran(looked)
    assert FIND_SERVICES in ran(looked)
    assert marker.is_file()  # check mode removes nothing


def test_the_virtualenv_the_note_goes_in_is_made_before_the_wheel() -> None:
    """The shared restart note is written only into an existing directory (nothing runs from a
    missing one): the role makes pyqmail__venv, unconditionally, before its wheel tasks, so a
    first install notes its restart too."""
    tasks = yaml.safe_load((REPO / "roles" / "pyqmail_install" / "tasks" / "main.yml").read_text())
    names = [task["name"] for task in tasks]
    make = tasks[
        names.index(
            "Create the virtualenv (sees Debian's python3-* packages, the daemon's dependencies)"
        )
    ]
    wheel_at = next(
        i for i, task in enumerate(tasks) if task.get("ansible.builtin.import_tasks") == "wheel.yml"
    )
    assert names.index(make["name"]) < wheel_at
    assert "when" not in make
    assert make["ansible.builtin.command"]["creates"] == "{{ pyqmail__venv }}/bin/python"
    assert "{{ pyqmail__venv }}" in make["ansible.builtin.command"]["argv"]


def test_every_play_runs_its_notified_handlers_when_a_later_task_fails() -> None:
    """force_handlers on every play of the collection's playbooks: a task that fails after a
    change still lets the reloads and restarts that change notified run."""
    plays = [
        (path.name, play)
        for path in sorted((REPO / "playbooks").glob("*.yml"))
        for play in yaml.safe_load(path.read_text())
        if "hosts" in play
    ]
    assert len(plays) >= 9
    assert [name for name, play in plays if play.get("force_handlers") is not True] == []

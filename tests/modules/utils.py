"""Helpers for module tests, after community.general's tests/unit/plugins/modules/utils.py.

Two ways to test a module in library/:
- in-process: ``with set_module_args({...}):`` then call ``module.main()`` and catch
  ``AnsibleExitJson`` / ``AnsibleFailJson`` (exit_json/fail_json are patched to raise);
- through Ansible for real: ``run_module("pyqmail_tcprules", {...}, check=True, diff=True)``
  runs ``ansible-playbook`` against localhost (connection local) with the task as
  ``pyqmail.mail.pyqmail_tcprules`` (the checkout is that collection) and returns its result.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from ansible.module_utils import basic
from ansible.module_utils.common.text.converters import to_bytes

from tests.collection import fqcn

REPO = Path(__file__).resolve().parents[2]
# In-process runs import a module by its file name; its module_utils imports
# (ansible_collections.pyqmail.mail.plugins.module_utils.*) resolve through tests.collection.
sys.path.insert(0, str(REPO / "library"))


class AnsibleExitJson(Exception):  # noqa: N818 - the name community.general uses
    """Raised by the patched exit_json; .result holds its arguments."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__(kwargs)
        self.result = kwargs


class AnsibleFailJson(Exception):  # noqa: N818
    """Raised by the patched fail_json; .result holds its arguments."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__(kwargs)
        self.result = kwargs


def _exit_json(self: basic.AnsibleModule, **kwargs: Any) -> None:
    kwargs.setdefault("changed", False)
    raise AnsibleExitJson(kwargs)


def _fail_json(self: basic.AnsibleModule, **kwargs: Any) -> None:
    kwargs["failed"] = True
    raise AnsibleFailJson(kwargs)


@contextlib.contextmanager
def set_module_args(args: dict[str, Any]) -> Iterator[None]:
    """Feed ``args`` to the next AnsibleModule and make exit/fail raise."""
    args = dict(args)
    args.setdefault("_ansible_remote_tmp", "/tmp")
    args.setdefault("_ansible_keep_remote_files", False)
    serialized = to_bytes(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    with (
        mock.patch.object(basic, "_ANSIBLE_ARGS", serialized),
        mock.patch.object(basic, "_ANSIBLE_PROFILE", "legacy", create=True),
        mock.patch.object(basic.AnsibleModule, "exit_json", _exit_json),
        mock.patch.object(basic.AnsibleModule, "fail_json", _fail_json),
    ):
        yield


def run_module(
    module: str,
    args: dict[str, Any],
    *,
    check: bool = False,
    diff: bool = False,
    become_user: str | None = None,
    system_python: bool = False,
) -> dict[str, Any]:
    """Run one module task through ansible-playbook on localhost; return its result dict.

    ``module`` may be short (``pyqmail_tcprules``): the task always uses the fully qualified
    name, the only one this checkout's ansible.cfg resolves. ``system_python``: under Debian's
    python3 with no pyqmail package (the tests' ``PYTHONPATH`` dropped), as on a managed host;
    see ``skip_where_system_python_has_pyqmail``."""
    task: dict[str, Any] = {
        "name": "under test",
        fqcn(module): args,
        "register": "r",
        "ignore_errors": True,
    }
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "connection": "local",
            "tasks": [task, {"ansible.builtin.debug": {"var": "r"}}],
        }
    ]
    env = _without_pythonpath() if system_python else dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
            "PYTHONWARNINGS": "ignore",
        }
    )
    playbook = Path(env.get("TMPDIR", "/tmp")) / f"pyqmail-test-{os.getpid()}-{module}.yml"
    playbook.write_text(json.dumps(play))
    cmd = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "-i",
        "localhost,",
        "-e",
        f"ansible_python_interpreter={SYSTEM_PYTHON if system_python else sys.executable}",
        str(playbook),
    ]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=300, check=False
        )
    finally:
        playbook.unlink(missing_ok=True)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(
            textwrap.dedent(f"ansible-playbook printed no JSON:\n{proc.stdout}\n{proc.stderr}")
        ) from exc
    result: dict[str, Any] = out["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return result


SYSTEM_PYTHON = "/usr/bin/python3"


def _without_pythonpath() -> dict[str, str]:
    """This process's environment without ``PYTHONPATH`` (which holds the tests' src/)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def skip_where_system_python_has_pyqmail() -> None:
    """The fallback-import tests (a module whose pyqmail import must fall back to the
    collection's module_utils copy) mean nothing where Debian's python3 imports pyqmail."""
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import pyqmail"],
        capture_output=True,
        env=_without_pythonpath(),
        check=False,
    )
    if probe.returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} can import pyqmail; the fallback import is not exercised")


def run_in_process(
    module: Any, args: dict[str, Any], *, check: bool = False, diff: bool = False
) -> dict[str, Any]:
    """Run an imported module's main() in-process; the result of exit_json (fail_json raises)."""
    import pytest

    args = {"_ansible_check_mode": check, "_ansible_diff": diff, **args}
    with set_module_args(args), pytest.raises(AnsibleExitJson) as exc:
        module.main()
    return exc.value.result


def fail_in_process(module: Any, args: dict[str, Any]) -> str:
    """Run an imported module's main() in-process expecting fail_json; its message."""
    import pytest

    with set_module_args(args), pytest.raises(AnsibleFailJson) as exc:
        module.main()
    return str(exc.value.result["msg"])

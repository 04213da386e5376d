"""pyqmail_services: one run template for every listener, one log/run for every service.

Rendered by Ansible's own template action (as the role does) with the role's vars and
defaults for each listener kind and qmail-send, then checked with ``sh -n`` and read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "pyqmail_services"
SUPERVISE = ROLE / "templates" / "var" / "qmail" / "supervise"
KINDS = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["pyqmail_services__kinds"]
PORTS = {"smtp": 25, "smtps": 465, "submission": 587}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """service name -> (run, log/run) as the role's two template tasks write them."""
    out = tmp_path_factory.mktemp("run")
    items = [
        {"name": KINDS[k]["service"], "kind": k, "port": p, "rules": f"/etc/tcp/smtp-{k}.cdb"}
        for k, p in PORTS.items()
    ] + [{"name": "qmail-send", "kind": "send", "port": 0}]
    variables = {
        **yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()),
        "pyqmail_services__kinds": KINDS,
        "pyqmail_services__listen_host": "127.0.0.1",
        "pyqmail__smtpd_user": "pyqmaild",
        "pyqmail__send_user": "pyqmails",
        "pyqmail__remote_user": "pyqmailr",
        "pyqmail__mailbox_user": "pyqmailv",
        "pyqmail__log_user": "pyqmaill",
        "pyqmail__venv": "/opt/pyqmail",
        "pyqmail__root": "/var/qmail",
        "pyqmail__log_dir": "/var/log/qmail",
        "pyqmail__allow_wildcard": False,
        "items": items,
        "out": str(out),
    }
    run_src = "{{ 'qmail-send' if item.kind == 'send' else 'listener' }}/run.j2"
    tasks = [
        {"ansible.builtin.template": {"src": f"{SUPERVISE}/{src}", "dest": f"{out}/{dest}",
                                      "mode": "0755", "validate": "/bin/sh -n %s"},
         "loop": "{{ items }}"}
        for src, dest in ((run_src, "{{ item.name }}.run"),
                          ("any/log/run.j2", "{{ item.name }}.log"))
    ]  # fmt: skip
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local", "tasks": tasks}]
    playbook = out / "play.yml"
    playbook.write_text(json.dumps(play))
    (out / "vars.json").write_text(json.dumps(variables))
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
         "-e", f"@{out / 'vars.json'}", "-e", f"ansible_python_interpreter={sys.executable}",
         str(playbook)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {
        item["name"]: (
            (out / f"{item['name']}.run").read_text(),
            (out / f"{item['name']}.log").read_text(),
        )
        for item in items
    }


def test_one_template_per_concept() -> None:
    assert sorted(str(p.relative_to(SUPERVISE)) for p in SUPERVISE.rglob("*.j2")) == [
        "any/log/run.j2",
        "listener/conftest.j2",
        "listener/run.j2",
        "qmail-send/conftest.j2",
        "qmail-send/run.j2",
    ]


@pytest.mark.parametrize("kind", list(PORTS))
def test_listener_run_script(rendered: dict[str, tuple[str, str]], kind: str) -> None:
    name = KINDS[kind]["service"]
    run, _ = rendered[name]
    lines = run.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert lines[2].startswith(f"# {name}: ")
    assert f"on port {PORTS[kind]} - " in lines[2]
    assert lines[3].endswith("runs as pyqmaild.")
    assert lines[4:6] == ["exec 2>&1", "exec softlimit -a 1073741824 \\"]
    assert f"--listen 127.0.0.1:{PORTS[kind]} --mode {KINDS[kind]['mode']} \\" in run
    assert f"--rules /etc/tcp/smtp-{kind}.cdb --user pyqmaild \\" in run
    assert run.rstrip("\n").endswith('--workers auto "$@"')  # ./run --check: the handler's
    assert "\n\n" not in run.rstrip("\n"), "a template tag left an empty line"


def test_listener_scripts_differ_only_in_what_is_theirs(
    rendered: dict[str, tuple[str, str]],
) -> None:
    runs = {kind: rendered[KINDS[kind]["service"]][0].splitlines() for kind in PORTS}
    lengths = {len(lines) for lines in runs.values()}
    assert lengths == {len(runs["smtp"])}
    for index in (0, 1, 4, 5, 6):
        assert len({lines[index] for lines in runs.values()}) == 1, index


def test_log_run_scripts(rendered: dict[str, tuple[str, str]]) -> None:
    for name, (_, log) in rendered.items():
        assert log.splitlines()[2] == (
            f"# {name} log: timestamped, rotated by size, written as pyqmaill."
        )
        assert log.endswith(f"multilog t s1000000 n10 /var/log/qmail/{name}\n")
    send = rendered["qmail-send"][0]
    assert "pyqmail-send --root /var/qmail --user pyqmails" in send
    assert '--remote-user pyqmailr --local-user pyqmailv "$@"' in send

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

from tests.roles.test_preflight import problems_of

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


def test_hostile_values_stay_words_in_every_run_script(tmp_path: Path) -> None:
    """Inventory values with shell metacharacters and line breaks, rendered anyway (the
    preflight refuses the paths: test_preflight.py): ``sh -n`` passes and running each script
    (its programs absent or refusing, ``install`` a stand-in) runs no injected command."""
    base = tmp_path
    pwned = base / "PWNED"
    evil_path = f"{base}/x;touch {pwned};y$(touch {pwned})`touch {pwned}`"
    evil_user = f"nobody;touch {pwned}\ntouch {pwned}"
    scanners = REPO / "roles" / "pyqmail_scanners" / "templates" / "var" / "qmail" / "supervise"
    variables = {
        **yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()),
        "pyqmail_services__kinds": KINDS,
        "pyqmail_services__listen_host": "127.0.0.1",
        "pyqmail_services__workers": f"1;touch {pwned}",
        **{f"pyqmail__{u}_user": evil_user for u in ("smtpd", "send", "remote", "mailbox", "log")},
        "pyqmail__venv": evil_path,
        "pyqmail__root": evil_path,
        "pyqmail__log_dir": evil_path,
        "pyqmail__allow_wildcard": False,
        "pyqmail_scanners__clamd_listen": f"{evil_path}/clamd.ctl",
        "pyqmail_scanners__rspamd_listen": f"{evil_path}/rspamd.sock",
        "pyqmail_scanners__clamd_config": evil_path,
        "pyqmail_scanners__rspamd_confdir": evil_path,
        "pyqmail_scanners__rspamd_rundir": evil_path,
        "pyqmail_scanners__rspamd_dbdir": evil_path,
        "item": {"name": "qmail-smtpd", "kind": "smtp", "port": 25, "rules": evil_path},
    }
    renders = {
        "listener": SUPERVISE / "listener" / "run.j2",
        "send": SUPERVISE / "qmail-send" / "run.j2",
        "log": SUPERVISE / "any" / "log" / "run.j2",
        "clamd": scanners / "clamd" / "run.j2",
        "rspamd": scanners / "rspamd" / "run.j2",
        "scanner-log": scanners / "any" / "log" / "run.j2",
    }
    tasks = [
        {
            "ansible.builtin.template": {"src": str(src), "dest": f"{base}/{name}", "mode": "0755"},
            "vars": {"pyqmail_scanners__service": "clamd"},
        }
        for name, src in renders.items()
    ]
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local", "tasks": tasks}]
    (base / "play.yml").write_text(json.dumps(play))
    (base / "vars.json").write_text(json.dumps(variables))
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
         "-e", f"@{base / 'vars.json'}", "-e", f"ansible_python_interpreter={sys.executable}",
         str(base / "play.yml")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stubs = base / "bin"
    stubs.mkdir()
    for stub in ("install", "setuidgid", "softlimit"):  # nothing outside this directory
        (stubs / stub).write_text("#!/bin/sh\nexit 111\n")
        (stubs / stub).chmod(0o755)
    scratch = base / "cwd"
    scratch.mkdir()
    for name in renders:
        script = base / name
        assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0, name
        subprocess.run(
            ["sh", str(script)], cwd=scratch, capture_output=True, timeout=30, check=False,
            env={"PATH": f"{stubs}:/usr/bin:/bin"},
        )  # fmt: skip
        assert not pwned.exists(), (name, script.read_text())

    for name in ("pyqmail__root", "pyqmail__venv", "pyqmail__log_dir", "pyqmail__rules_path"):
        assert problems_of({name: evil_path}) == [
            f"{name}: {evil_path!r} is not an absolute path of letters, digits and '._/+@-' "
            "only (no blanks, no shell metacharacters)"
        ], name
    for name in ("pyqmail_scanners__clamd_listen", "pyqmail_scanners__rspamd_listen"):
        problems = problems_of({name: "/tmp/x;date>/tmp/PWNED/clamd.ctl"})
        assert len(problems) == 1 and "is not a usable Unix socket path" in problems[0], problems

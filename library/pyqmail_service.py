#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_service
short_description: Manage a daemontools-supervised service (run scripts, link, state)
description:
  - Does what the qmail guides do by hand for each service - write C(run) and C(log/run),
    link the supervise directory into the service directory, C(svc -u/-d/-t/-h), then
    C(svstat) after a few seconds to see that it stayed up.
  - Writes O(run) and O(log_run) (mode 0755) when given, compared first, atomically. Changing
    them does not restart the service; notify a handler with O(state=restarted).
  - Links O(src) to O(service_dir)/O(name) with an atomic rename of a new symlink. svscan
    notices a new link within 5 seconds; the module waits (up to O(timeout)) for supervise to
    answer before it controls the service. When the link pointed to another directory, the
    supervise processes of that directory are stopped (C(svc -dx)) after the switch.
  - After starting, restarting or reloading, it waits until C(svstat) reports the service up
    with the same pid for O(wait) seconds. C(svstat) counts whole seconds, so the module
    also counts how long it has seen that pid itself, and after C(svc -h) (the pid stays)
    only that counts; a pid the HUP ended fails the task. A service that keeps
    restarting makes the task fail with the last lines of its log (C(log/main/current) of
    multilog, or else what C(./run) prints when run once for at most 3 seconds).
  - When the service has a log service (C(log/run) exists), that one must then be up with
    the same pid for O(wait) seconds too (C(svc -u) when it is down). A log service that
    keeps restarting (log directory missing or not writable, bad C(log/run)) fails the task
    with what C(log/run) prints when run once with no input, and the end of svscan's
    C(readproctitle) line when one runs.
  - Runs C(svc) and C(svstat) with C(LC_ALL=C) and finds them in C(/command) (djb's layout)
    as well as the usual directories.
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Nothing is written, linked or signalled; RV(state) and RV(pid) are then the
      current ones.
  diff_mode:
    support: full
    details: Before/after of C(run) and C(log/run), and a summary of the link and state.
  platform:
    platforms: posix
options:
  name:
    description:
      - Name of the link in O(service_dir). Not empty, no C(/), not starting with C(.)
        (svscan ignores such names).
    type: str
    required: true
  src:
    description:
      - The supervise directory holding C(run) (and C(log/run)), such as
        C(/var/qmail/supervise/qmail-smtpd). Absolute. Created (mode 0755) when O(run) is
        given. Required unless O(state=absent).
    type: path
  service_dir:
    description: The directory svscan watches (Debian's daemontools-run C(/etc/service)).
    type: path
    default: /etc/service
  run:
    description: Contents of C(run). Omit to leave the existing script alone.
    type: str
  log_run:
    description: Contents of C(log/run), usually C(exec setuidgid qmaill multilog t ./main).
    type: str
  down:
    description:
      - V(true) creates the C(down) file (supervise does not start the service by itself,
        for example after a reboot), V(false) removes it; omitted leaves it alone.
      - Set it before the first link of a service that must not start at once.
    type: bool
  state:
    description:
      - V(present) - files and link only, no state change.
      - V(up) / V(down) - C(svc -u) / C(svc -d) when needed.
      - V(restarted) - C(svc -t) (C(svc -u) when down), every time the task runs; use it in a
        handler.
      - V(reloaded) - C(svc -h) (C(svc -u) when down), every time the task runs.
      - V(absent) - remove the link, then C(svc -dx) the service and its log service.
    type: str
    choices: [present, up, down, restarted, reloaded, absent]
    default: up
  wait:
    description:
      - Seconds the service must stay up (same pid) after it was started, restarted or
        reloaded; the guides check after 5-10 seconds. V(0) waits only until it is up.
    type: float
    default: 5
  timeout:
    description:
      - Seconds to wait for svscan to pick up a new link, for the service to come up and
        stay up O(wait) seconds, or to go down; then as long again at most for its log
        service. Must be larger than O(wait).
    type: float
    default: 30
"""

EXAMPLES = r"""
- name: qmail-smtpd on port 25, logged by multilog
  pyqmail.mail.pyqmail_service:
    name: qmail-smtpd
    src: /var/qmail/supervise/qmail-smtpd
    run: |
      #!/bin/sh
      exec /opt/pyqmail/bin/pyqmail-smtpd --root /var/qmail --listen 192.0.2.10:25 --mode smtp 2>&1
    log_run: |
      #!/bin/sh
      exec setuidgid qmaill multilog t ./main
    state: up

- name: Restart after a configuration change (in a handler)
  pyqmail.mail.pyqmail_service:
    name: qmail-smtpd
    src: /var/qmail/supervise/qmail-smtpd
    state: restarted

- name: Stop and remove a service
  pyqmail.mail.pyqmail_service:
    name: qmail-smtpd-ssl
    state: absent
"""

RETURN = r"""
state:
  description: C(up), C(down), C(unsupervised) (not picked up by svscan / supervise) or
    C(absent).
  returned: always
  type: str
  sample: up
pid:
  description: Pid of the service process when up, else null.
  returned: always
  type: int
  sample: 4242
uptime:
  description: Seconds since the service last started or stopped (svstat), null when not
    supervised.
  returned: always
  type: int
  sample: 6
normally_up:
  description: False when the C(down) file exists.
  returned: when supervised
  type: bool
paused:
  description: True when the service was paused with C(svc -p) (up states resume it).
  returned: when supervised
  type: bool
log_state:
  description: State of the log service (C(up), C(down), C(unsupervised)); null without one.
  returned: always
  type: str
log_pid:
  description: Pid of multilog when up.
  returned: always
  type: int
link:
  description: Path of the link in the service directory.
  returned: always
  type: str
  sample: /etc/service/qmail-smtpd
actions:
  description: What was done (or would be in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["wrote /var/qmail/supervise/qmail-smtpd/run", "linked", "svc -u"]
log_tail:
  description: The last lines of the service's log, when the service failed to stay up.
  returned: failure
  type: list
  elements: str
pids_seen:
  description: Every pid seen up while waiting, when the service failed to stay up.
  returned: failure
  type: list
  elements: int
"""

import os
import stat
import traceback
from typing import Any, NoReturn

from ansible.module_utils.basic import AnsibleModule

try:
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_daemontools import (
        DAEMONTOOLS_DIRS,
        SVC_OPTIONS,
        Status,
        SvstatError,
        WaitResult,
        log_tail,
        parse_svstat_line,
        plan_svc,
        run_script_output,
        wait_for,
    )
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import write_file

    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()

SCRIPT_MODE = 0o755
LOG_LINES = 20
UP_STATES = ("up", "restarted", "reloaded")


def readproctitle_errors(limit: int = 400) -> str:
    """The end of what svscan's stderr wrote into readproctitle's title (Debian's svscanboot
    pipes svscan 2>&1 into ``readproctitle service errors: ...``), or "" when none runs."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"readproctitle":
            text = b" ".join(argv[1:]).decode("utf-8", "replace").rstrip(". \0")
            return text[-limit:]
    return ""


class ServiceModule:
    """Maps options, writes the scripts and the link, then drives svc and watches svstat."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        p = module.params
        self.name: str = p["name"]
        self.state: str = p["state"]
        self.service_dir: str = p["service_dir"]
        self.src: str | None = p["src"]
        self.link = os.path.join(self.service_dir, self.name)
        self.actions: list[str] = []
        self.diffs: list[dict[str, str]] = []
        self.changed = False
        self.before = ""
        self.svc = module.get_bin_path("svc", required=True, opt_dirs=list(DAEMONTOOLS_DIRS))
        self.svstat = module.get_bin_path("svstat", required=True, opt_dirs=list(DAEMONTOOLS_DIRS))

    # ---- helpers -------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """src, checked to be given (every state but absent needs it)."""
        if self.src is None:
            self.fail(f"src is required with state={self.state}")
        return self.src

    def fail(self, msg: str, **extra: Any) -> NoReturn:
        self.module.fail_json(
            msg=msg, changed=self.changed, actions=self.actions, link=self.link, **extra
        )
        raise AssertionError("fail_json returned")

    def did(self, action: str) -> None:
        self.changed = True
        self.actions.append(action)

    def status(self, path: str) -> Status:
        rc, out, err = self.module.run_command(
            [self.svstat, path], environ_update={"LC_ALL": "C"}, check_rc=False
        )
        if rc != 0:
            self.fail(f"svstat {path} failed (exit {rc}): {err.strip() or out.strip()}")
        try:
            return parse_svstat_line(out, path)
        except SvstatError as exc:
            self.fail(str(exc))

    def svc_call(self, options: list[str], path: str) -> None:
        for option in options:
            if option not in SVC_OPTIONS:
                self.fail(f"internal error: unknown svc option {option}")
        rc, _out, err = self.module.run_command(
            [self.svc, *options, path], environ_update={"LC_ALL": "C"}, check_rc=False
        )
        if rc != 0:
            self.fail(f"svc {' '.join(options)} {path} failed (exit {rc}): {err.strip()}")

    def check_arguments(self) -> None:
        p = self.module.params
        name = self.name
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            self.fail(
                f"name {name!r} must be a plain file name: not empty, no '/', "
                "not starting with '.' (svscan ignores those)"
            )
        if self.src is not None and not os.path.isabs(self.src):
            self.fail(f"src {self.src!r} must be an absolute path")
        if self.src is None and self.state != "absent":
            self.fail(f"src is required with state={self.state}")
        if self.src is None and (p["run"] is not None or p["log_run"] is not None):
            self.fail("run and log_run need src (the directory to write them to)")
        if not os.path.isdir(self.service_dir):
            self.fail(
                f"service_dir {self.service_dir} is not a directory; install daemontools-run "
                "or create it and start svscan on it"
            )
        for option in ("run", "log_run"):
            if p[option] is not None and not p[option].startswith("#!"):
                self.fail(
                    f"{option} must start with '#!' (supervise executes it directly), "
                    f"got {p[option][:20]!r}"
                )
        if p["wait"] < 0 or p["timeout"] <= 0:
            self.fail("wait must be >= 0 and timeout > 0")
        if self.state in UP_STATES and p["timeout"] <= p["wait"]:
            self.fail(
                f"timeout ({p['timeout']:g}) must be larger than wait ({p['wait']:g}), "
                "or the service can never be seen up long enough"
            )

    # ---- files and link --------------------------------------------------------------------

    def ensure_dir(self, path: str) -> None:
        if os.path.isdir(path):
            return
        if os.path.lexists(path):
            self.fail(f"{path} exists and is not a directory")
        self.did(f"created {path}")
        if not self.module.check_mode:
            try:
                os.makedirs(path, mode=0o755)
            except OSError as exc:
                self.fail(f"cannot create {path}: {exc}")

    def ensure_script(self, path: str, content: str) -> None:
        data = content.encode("utf-8")
        try:
            with open(path, "rb") as f:
                current: bytes | None = f.read()
        except FileNotFoundError:
            current = None
        except OSError as exc:
            self.fail(f"cannot read {path}: {exc}")
        if current == data:
            if stat.S_IMODE(os.stat(path).st_mode) != SCRIPT_MODE:
                self.did(f"chmod 0755 {path}")
                if not self.module.check_mode:
                    os.chmod(path, SCRIPT_MODE)
            return
        self.did(f"wrote {path}")
        self.diffs.append(
            {
                "before_header": path,
                "after_header": path,
                "before": current.decode("utf-8", "replace") if current is not None else "",
                "after": content,
            }
        )
        if self.module.check_mode:
            return
        try:
            write_file(path, data, SCRIPT_MODE)
        except OSError as exc:
            self.fail(f"cannot write {path}: {exc}")

    def ensure_files(self) -> None:
        p = self.module.params
        if p["run"] is not None or p["log_run"] is not None:
            self.ensure_dir(self.directory)
        elif not os.path.isdir(self.directory):
            self.fail(f"src {self.directory} does not exist; create it or give run (and log_run)")
        if p["run"] is not None:
            self.ensure_script(os.path.join(self.directory, "run"), p["run"])
        if p["log_run"] is not None:
            self.ensure_dir(os.path.join(self.directory, "log"))
            self.ensure_script(os.path.join(self.directory, "log", "run"), p["log_run"])
        if not self.module.check_mode and not os.path.exists(os.path.join(self.directory, "run")):
            self.fail(f"{self.directory}/run does not exist; give run")
        down = os.path.join(self.directory, "down")
        if p["down"] is True and not os.path.exists(down):
            self.did(f"created {down}")
            if not self.module.check_mode:
                with open(down, "wb"):
                    pass
        elif p["down"] is False and os.path.lexists(down):
            self.did(f"removed {down}")
            if not self.module.check_mode:
                os.unlink(down)

    def link_target(self) -> str | None:
        """Where the link points (absolute), None if there is none; fail on a non-link."""
        if not os.path.lexists(self.link):
            return None
        if not os.path.islink(self.link):
            self.fail(
                f"{self.link} exists and is not a symlink; move it away (pyqmail manages "
                "services as links to their supervise directory)"
            )
        target = os.readlink(self.link)
        return os.path.normpath(os.path.join(self.service_dir, target))

    def ensure_link(self) -> bool:
        """Link src into service_dir; True when the link is new (svscan has yet to see it)."""
        old = self.link_target()
        if old == os.path.normpath(self.directory):
            return False
        self.did("linked" if old is None else f"relinked (was {old})")
        if self.module.check_mode:
            return True
        tmp = os.path.join(self.service_dir, f".{self.name}.pyqmail-{os.getpid()}")
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(self.directory, tmp)
            os.rename(tmp, self.link)
        except OSError as exc:
            self.fail(f"cannot link {self.link} -> {self.directory}: {exc}")
        if old is not None and os.path.realpath(old) != os.path.realpath(self.directory):
            self.stop_supervise(old)  # svscan keeps the old supervise running otherwise
        return True

    def linked_elsewhere(self, directory: str) -> list[str]:
        """Other links in service_dir to ``directory``: it must keep running for them."""
        real = os.path.realpath(directory)
        others = []
        for entry in sorted(os.listdir(self.service_dir)):
            path = os.path.join(self.service_dir, entry)
            if path != self.link and os.path.realpath(path) == real:
                others.append(path)
        return others

    def stop_supervise(self, directory: str) -> None:
        """svc -dx the service and its log service, then wait for supervise to exit."""
        timeout = self.module.params["timeout"]
        others = self.linked_elsewhere(directory)
        if others:
            self.actions.append(f"left {directory} running: also linked as {', '.join(others)}")
            return
        for path in (directory, os.path.join(directory, "log")):
            if not os.path.isdir(path) or not self.status(path).supervised:
                continue
            self.did(f"svc -dx {path}")
            if self.module.check_mode:
                continue
            self.svc_call(["-d", "-x"], path)
            result = wait_for(lambda p=path: self.status(p), "unsupervised", timeout=timeout)
            if not result.ok:
                self.fail(result.reason)

    # ---- states --------------------------------------------------------------------------

    def absent(self) -> None:
        target = self.link_target()
        targets = [t for t in (target, self.src) if t is not None]
        if target is not None:
            self.did(f"unlinked {self.link}")
            if not self.module.check_mode:
                os.unlink(self.link)  # first, so svscan does not start supervise again
        for directory in dict.fromkeys(os.path.normpath(t) for t in targets):
            self.stop_supervise(directory)
        self.finish(None)

    def drive(self, new_link: bool) -> None:
        """svc as the state asks, then wait for the outcome."""
        p = self.module.params
        if self.state == "present":
            self.finish(self.status(self.directory) if not new_link else None)
        if self.module.check_mode:
            current = None if new_link else self.status(self.directory)
            if current is not None and current.supervised:
                options = plan_svc(self.state, current)
            else:  # supervise is not running yet: what it will do once svscan starts it
                options = self.predict_unsupervised()
            if options:
                self.did("svc " + " ".join(options))
            self.finish(current)
        supervised = wait_for(
            lambda: self.status(self.directory), "supervised", timeout=p["timeout"]
        )
        if not supervised.ok:
            self.fail(supervised.reason)
        current = supervised.status
        if self.state == "reloaded" and current.up:
            # supervise passes svc -h on about a second after it starts ./run, perhaps
            # before a slow start has its HUP handler: a HUP then would end a healthy
            # service (a reload right after a start). An old pid passes at once.
            current = self.wait_up().status
        options = plan_svc(self.state, current)
        old_pid = current.pid if self.state == "restarted" and current.up else None
        if options:
            self.svc_call(options, self.directory)
            self.did("svc " + " ".join(options))
        if self.state == "down":
            result = wait_for(lambda: self.status(self.directory), "down", timeout=p["timeout"])
            if not result.ok:
                self.fail_with_log(result.reason, result.status, result.pids)
        else:  # after svc -h the pid stays: watch it survive the signal
            result = self.wait_up(old_pid=old_pid, watched=self.state == "reloaded")
        if self.state == "reloaded" and current.up and result.status.pid != current.pid:
            self.fail_with_log(
                f"{self.directory} did not survive svc -h: pid {current.pid} ended and "
                f"supervise started pid {result.status.pid}; does ./run handle HUP?",
                result.status,
                result.pids,
            )
        if self.state != "down":
            self.check_log_service()
        self.finish(result.status)

    def wait_up(self, *, old_pid: int | None = None, watched: bool = False) -> WaitResult:
        """The service up with one pid for O(wait) seconds (``wait_for``'s goal ``up``), or
        the task fails with the end of its log."""
        p = self.module.params
        result = wait_for(
            lambda: self.status(self.directory),
            "up",
            stable=p["wait"],
            timeout=p["timeout"],
            old_pid=old_pid,
            watched=watched,
        )
        if not result.ok:
            self.fail_with_log(result.reason, result.status, result.pids)
        return result

    def check_log_service(self) -> None:
        """The log service (``<src>/log``) must be up and stay up too.

        A restart-looping multilog (log directory missing or not writable, bad log/run)
        blocks the service's output pipe sooner or later; svstat of the service alone does
        not show it. Started with svc -u when it is down; fails with what log/run prints.
        """
        p = self.module.params
        log = os.path.join(self.directory, "log")
        if not os.path.isfile(os.path.join(log, "run")):
            return
        current = self.status(log)
        if current.supervised:
            options = plan_svc("up", current)
            if options:
                self.svc_call(options, log)
                self.did(f"svc {' '.join(options)} {log}")
        result = wait_for(lambda: self.status(log), "up", stable=p["wait"], timeout=p["timeout"])
        if result.ok:
            return
        try:
            lines = run_script_output(log, timeout=3.0, lines=LOG_LINES)
        except OSError as exc:
            lines = [f"cannot run {log}/run: {exc}"]
        source = "output of log/run run once (with no input)"
        errors = readproctitle_errors()
        if errors:
            lines.append(f"svscan's readproctitle: {errors}")
        msg = (
            f"the service is up but its log service is not: {result.reason}; "
            "its output will block once the pipe to the log service fills"
        )
        if lines:
            msg += f"; {source}:\n" + "\n".join(lines)
        self.fail(
            msg,
            log_tail=lines,
            pids_seen=list(result.pids),
            **self.describe(self.status(self.directory)),
        )

    def predict_unsupervised(self) -> list[str]:
        """svc options a real run would send once supervise starts (check mode only).

        supervise starts ./run at once unless the down file exists.
        """
        down = self.module.params["down"]
        if down is None:
            down = os.path.exists(os.path.join(self.directory, "down"))
        starts = not down
        return {
            "present": [],
            "up": [] if starts else ["-u"],
            "down": ["-d"] if starts else [],
            "restarted": ["-t"] if starts else ["-u"],
            "reloaded": ["-h"] if starts else ["-u"],
        }[self.state]

    def fail_with_log(self, reason: str, status: Status, pids: tuple[int, ...]) -> NoReturn:
        lines = log_tail(self.directory, LOG_LINES)
        source = "log"
        if not lines and self.state != "down":
            source = "output of ./run run once"
            try:
                lines = run_script_output(self.directory, timeout=3.0, lines=LOG_LINES)
            except OSError as exc:
                lines = [f"cannot run {self.directory}/run: {exc}"]
        msg = reason
        if lines:
            msg += f"; last lines of its {source}:\n" + "\n".join(lines)
        self.fail(msg, log_tail=lines, pids_seen=list(pids), **self.describe(status))

    def describe(self, status: Status | None) -> dict[str, Any]:
        result: dict[str, Any] = {
            "state": "absent" if status is None else status.state,
            "pid": status.pid if status is not None else None,
            "uptime": status.seconds if status is not None else None,
        }
        if status is not None and status.supervised:
            result["normally_up"] = status.normally_up
            result["paused"] = status.paused
        log = os.path.join(self.src, "log") if self.src else None
        log_status = self.status(log) if log and os.path.isdir(log) else None
        result["log_state"] = log_status.state if log_status is not None else None
        result["log_pid"] = log_status.pid if log_status is not None else None
        return result

    def finish(self, status: Status | None) -> NoReturn:
        result = {
            "changed": self.changed,
            "actions": self.actions,
            "link": self.link,
            **self.describe(status),
        }
        if status is None and self.state != "absent":
            result["state"] = "unsupervised"
        if self.module._diff:
            after = self.summary(result["state"])
            if self.module.check_mode:
                after += "".join(f"would: {action}\n" for action in self.actions)
            self.diffs.append(
                {
                    "before_header": f"{self.link} (link and state)",
                    "after_header": f"{self.link} (link and state)",
                    "before": self.before,
                    "after": after,
                }
            )
            result["diff"] = self.diffs
        self.module.exit_json(**result)
        raise AssertionError("exit_json returned")

    def summary(self, state: str) -> str:
        target = self.link_target() if os.path.lexists(self.link) else None
        return f"link: {target or '(none)'}\nstate: {state}\n"

    def run(self) -> None:
        self.check_arguments()
        if self.module._diff:
            current = self.status(self.src) if self.src and os.path.isdir(self.src) else None
            self.before = self.summary(current.state if current is not None else "absent")
        if self.state == "absent":
            self.absent()
        self.ensure_files()
        new_link = self.ensure_link()
        self.drive(new_link)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "src": {"type": "path"},
            "service_dir": {"type": "path", "default": "/etc/service"},
            "run": {"type": "str"},
            "log_run": {"type": "str"},
            "down": {"type": "bool"},
            "state": {
                "type": "str",
                "choices": ["present", "up", "down", "restarted", "reloaded", "absent"],
                "default": "up",
            },
            "wait": {"type": "float", "default": 5.0},
            "timeout": {"type": "float", "default": 30.0},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg="cannot import module_utils/pyqmail_daemontools", exception=IMPORT_ERROR
        )
    ServiceModule(module).run()


if __name__ == "__main__":
    main()

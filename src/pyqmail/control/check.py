"""``--check`` for both daemons: load the configuration as the daemon will, touch nothing.

``pyqmail-smtpd --check`` and ``pyqmail-send --check`` call ``check_smtpd``/``check_send``.
The roles' reload handlers run them (as the daemon's user) before ``svc -h``/``svc -t``, so
a configuration the daemon could not load is refused with the daemon's own message while
the running daemons keep their old state.

Output: exit 0 and one line on stdout (``... OK: ...``, with any start-up warnings at its
end); or exit 111 and one line per problem on stderr, each as the daemon itself reports it
(``pyqmail-smtpd: fatal: <file>:<line>: <problem>``, ``pyqmail-send: <problem>``).

pyqmail-smtpd's start-up conditions live here too (``startup_problems``/``startup_warnings``)
so the daemon and its check cannot drift apart.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyqmail import tls
from pyqmail.authlock import lock_path
from pyqmail.checks import libraries
from pyqmail.checks.greylist import STATE_FILE as GREYLIST_FILE
from pyqmail.control import send as send_control
from pyqmail.control import smtpd as smtpd_control
from pyqmail.control.reader import ControlError
from pyqmail.queue.format import QueueError
from pyqmail.queue.store import Queue
from pyqmail.rules import Rules, RulesError
from pyqmail.smtpd.authguard import state_path
from pyqmail.smtpd.senders import SENDERS_FILE, load_map

TLS_MODES = ("smtps", "submission")


def startup_problems(cfg: smtpd_control.Config, mode: str) -> list[str]:
    """What keeps pyqmail-smtpd from starting in ``mode`` with ``cfg`` (besides the files).

    The AUTH state file is only checked here, not created (``auth_state_problem``); the
    daemon creates it at start (``AuthState.check``)."""
    problems = []
    if mode in TLS_MODES and cfg.server_tls is None:
        problems.append(f"{cfg.control / 'servercert.pem'}: missing, and --mode {mode} needs TLS")
    try:
        Queue(cfg.queue_dir).check()
    except QueueError as exc:
        problems.append(str(exc))
    try:
        load_map(cfg.root / SENDERS_FILE)  # the sender rules (pyqmail.smtpd.senders)
    except ControlError as exc:
        problems.append(str(exc))
    return problems


def startup_warnings(cfg: smtpd_control.Config, mode: str) -> list[str]:
    """Odd but workable configurations, logged at start (and shown by ``--check``)."""
    warnings = []
    if mode == "smtp" and cfg.server_tls is None:
        warnings.append("no control/servercert.pem: STARTTLS not offered")
    if mode != "smtp" and cfg.authdb is None:
        warnings.append("no control/smtpusers: AUTH not offered")
    if not cfg.rcpthosts:
        warnings.append("control/rcpthosts empty or missing: only relay clients may send")
    if cfg.authdb is not None and (locks := login_locks_problem(cfg.root)) is not None:
        # a warning, not a refusal: an upgraded daemon restarts before the pyqmail_control
        # role has made <root>/auth, and AUTH alone waits for it (454), not all of SMTP
        warnings.append(f"{locks}; until it can, AUTH answers 454")
    return warnings


def auth_state_problem(root: Path) -> str | None:
    """Whether this user could open (or create) the shared AUTH state, without doing so."""
    return state_problem(state_path(root), "the AUTH state")


def login_locks_problem(root: Path) -> str | None:
    """Whether this user could open (or create) the login locks IMAP/POP3 share
    (``pyqmail.authlock``), without doing so."""
    return state_problem(lock_path(root), "the login locks")


def state_problem(path: Path, what: str) -> str | None:
    """Whether this user could open (or create) the SQLite file ``path``, without doing so."""
    where = f"{path}: cannot open {what}"
    parent = path.parent
    uid = os.getuid()
    if not parent.is_dir():
        if not os.access(parent.parent, os.W_OK | os.X_OK):
            return f"{where}: cannot create {parent} as uid {uid}"
        return None
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{where}: cannot create files in {parent} as uid {uid}"
    if os.path.lexists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f"{where}: not readable and writable by uid {uid}"
    return None


def load_rules(path: Path) -> Rules:
    """The tcprules cdb, as pyqmail-smtpd loads it (``RulesCache`` in pyqmail.smtpd) and
    with its messages: a cdb with host-name rules needs the ``hosts`` libraries
    (``pyqmail.checks.libraries``), or its ``=`` rules could never match."""
    try:
        rules = Rules.load(path)
    except OSError as exc:
        raise ControlError(f"{path}: cannot read rules: {exc.strerror}") from exc
    except RulesError as exc:
        raise ControlError(f"{path}: {exc}") from exc
    if rules.names:
        libraries.require("hosts", path)
    return rules


def smtpd_report(root: Path, mode: str, rules: Path | None) -> tuple[list[str], str]:
    """(problems, summary) of what pyqmail-smtpd would load with these arguments."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = smtpd_control.load(root, inbound=smtpd_control.inbound(mode))
    except ControlError as exc:
        problems.append(str(exc))
    if cfg is not None:
        problems += startup_problems(cfg, mode)
        if cfg.authdb is not None and (state := auth_state_problem(root)) is not None:
            problems.append(state)
        grey = root / GREYLIST_FILE
        if cfg.screen.greylist.active and (state := state_problem(grey, "the greylist")):
            problems.append(state)
    else:
        try:
            Queue(root / "queue").check()
        except QueueError as exc:
            problems.append(str(exc))
    rules_text = "no rules"
    if rules is not None:
        try:
            load_rules(rules)
        except ControlError as exc:
            problems.append(str(exc))
        rules_text = f"rules {rules}"
    if problems or cfg is None:
        return problems, ""
    users = "off" if cfg.authdb is None else f"{len(cfg.authdb)} user(s)"
    senders = load_map(root / SENDERS_FILE)
    held = "off" if senders is None else f"{len(senders.owned)} login(s)"
    summary = (
        f"configuration of {root} for --mode {mode} OK: me {cfg.me}, "
        f"{len(cfg.rcpthosts)} rcpthosts, TLS {'on' if cfg.server_tls else 'off'}, "
        f"AUTH {users}, senders {held}, {rules_text}, {_checks_text(cfg)}"
    )
    warnings = startup_warnings(cfg, mode)
    return [], summary + "".join(f"; warning: {w}" for w in warnings)


def _checks_text(cfg: smtpd_control.Config) -> str:
    """The blocklists and greylisting in force (``pyqmail.checks``), for the OK line."""
    lists, grey = cfg.screen.dnsbl, cfg.screen.greylist
    greylist = f"greylist {grey.delay}s" if grey.active else "greylist off"
    scan = cfg.scan
    scanners = f"rspamd {scan.rspamd or 'off'}, clamd {scan.clamd or 'off'}"
    return (
        f"{len(lists.lists)} blocklist(s), {len(lists.allow)} allow list(s), {greylist}, {scanners}"
    )


def check_smtpd(root: Path, mode: str, rules: Path | None) -> int:
    """``pyqmail-smtpd --check``: 0 and one OK line, or 111 and the daemon's errors."""
    problems, summary = smtpd_report(root, mode, rules)
    for problem in problems:
        sys.stderr.write(f"pyqmail-smtpd: fatal: {problem}\n")
    if problems:
        return 111
    sys.stdout.write(f"pyqmail-smtpd: {summary}\n")
    return 0


def _send_tls_files(control_dir: Path) -> tuple[list[Path], list[str]]:
    """clientcert.pem and every tlshosts pin, each loaded into a TLS context as a delivery
    would; (the files, the problems)."""
    clientcert = control_dir / "clientcert.pem"
    files = [clientcert] if clientcert.exists() else []
    files += sorted((control_dir / "tlshosts").glob("*.pem"))
    problems = []
    for path in files:
        try:
            if path == clientcert:
                tls.client_context(verify=False, certfile=path)
            else:
                tls.client_context(verify=True, cafile=path)
        except tls.TLSConfigError as exc:
            problems.append(str(exc))
    return files, problems


def check_send(root: Path) -> int:
    """``pyqmail-send --check``: load what pyqmail-send reads, touch nothing; 0 = usable,
    111 = not.

    The queue layout, the control files (``Control.load``), ``control/clientcert.pem`` and
    every ``control/tlshosts/*.pem`` pin (each loaded into a TLS context as a delivery
    would), and ``control/dkimkeys`` with every key file it names (``pyqmail.dkim.keys``).
    Every problem is printed on stderr, one line each.
    """
    problems: list[str] = []
    try:
        Queue(root / "queue").check()
    except QueueError as exc:
        problems.append(str(exc))
    control: send_control.Control | None = None
    try:
        control = send_control.Control.load(root)
    except ControlError as exc:
        problems.append(str(exc))
    tls_files, tls_problems = _send_tls_files(root / "control")
    problems += tls_problems
    # pyqmail-smtpd imports this module too, and the key loader brings in cryptography
    # (5 MiB of PSS over pyqmail-smtpd's three processes, measured) that only signing needs.
    from pyqmail.dkim import keys as dkim_keys  # noqa: PLC0415 - pyqmail-send's check only

    signing: dict[str, list[dkim_keys.Key]] = {}
    try:
        signing = dkim_keys.load(root / "control")  # as the daemon: the key files too
    except ControlError as exc:
        problems.append(str(exc))
    for problem in problems:
        sys.stderr.write(f"pyqmail-send: {problem}\n")
    if problems or control is None:
        return 111
    sys.stdout.write(
        f"pyqmail-send: configuration of {root} OK: me {control.me}, "
        f"{len(control.locals)} local domain(s), {len(control.routes)} route(s), "
        f"{len(tls_files)} TLS file(s), "
        f"{sum(map(len, signing.values()))} DKIM key(s) for {len(signing)} domain(s)\n"
    )
    return 0

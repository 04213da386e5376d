"""qmail's local addressing: the mailboxes file and ``.qmail`` files.

Mailboxes (``<root>/users/mailboxes``) replace qmail's ``users/assign``. Mailboxes are
virtual: every one is owned by the mailbox user (``pyqmailv``, the local delivery child's
user), none is a Unix account.
One mailbox per line, ``#`` comments and blank lines allowed::

    name:homedir

``name`` is the local part it receives (case-insensitive; no ``:``, ``/``, ``@`` or
whitespace), ``homedir`` an absolute path. Mail for ``name`` goes where ``homedir/.qmail``
says, or to ``homedir/Maildir/`` when there is no ``.qmail`` (qmail's ``./Maildir/`` default
delivery). ``name-ext`` goes where ``homedir/.qmail-ext`` says, else the nearest
``.qmail-...-default``; with none of them it bounces, as in qmail.

Everything else in a local domain is an alias: ``<root>/alias/.qmail-NAME``, then
``.qmail-PREFIX-default`` files, then ``alias/.qmail-default``; none of them -> the address is
unknown and bounces (#5.1.1). In file names, ``.`` in the address becomes ``:`` and letters
are lowercased (qmail's rules). Relative paths in alias files are relative to ``alias/``.

``.qmail`` lines:

- ``# text``          comment
- ``&address``, or a line starting with a letter or digit: forward to that address
- ``./Maildir/``, ``/abs/Maildir/`` (ending in ``/``): deliver to that Maildir
- ``|program``        refused: pyqmail never runs programs (the delivery is bounced with a
                      reason naming the file); mbox files (a path not ending in ``/``) are
                      refused the same way. ``check_file`` finds both at provisioning time.

A ``.qmail`` file that is empty (0 bytes) means default delivery, ``./Maildir/``; one with
bytes but no delivery line (only comments) delivers nowhere: the message is discarded, as in
qmail (dot-qmail(5)), the way to make an address such as ``noreply@`` that takes mail and
keeps none. One whose first line is blank (nothing but white space) defers, whatever follows,
as qmail-local's "Uh-oh: first line of .qmail file is blank. (#4.2.1)": ``echo > ~/.qmail``
writes such a file, and read as comments only it discarded all the mail. In ``alias/`` an
empty file defers, naming itself: the alias directory has no Maildir to deliver to.

A ``.qmail`` file writable by group or others, or owned by neither the delivery user nor
root, defers delivery (qmail's "Uh-oh"), and so does a home or ``alias/`` directory writable
by group or others or owned by someone else (qmail-local's "home directory is writable",
qmail-getpw's owner check): whoever can write them can redirect the mailbox.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyqmail.send.delivery import Result

_BAD_NAME_CHARS = frozenset(":/@\x00") | frozenset(" \t\r\n")


class MailboxesError(Exception):
    """The mailboxes file is malformed; the message names file and line."""


@dataclass(frozen=True)
class Instruction:
    """One delivery line of a ``.qmail`` file."""

    kind: str  # "forward" | "maildir" | "refused"
    target: str  # address, absolute Maildir path, or the refused line's reason


@dataclass(frozen=True)
class Plan:
    """What to do for one local recipient."""

    instructions: tuple[Instruction, ...]  # none: a .qmail of comments only, discard
    source: str  # the file the instructions came from (for logs and bounces)
    delivered_to: str  # the Delivered-To value


def parse_mailboxes(text: str, origin: str) -> dict[str, Path]:
    boxes: dict[str, Path] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, home = line.partition(":")
        where = f"{origin}:{number}"
        if not sep or not name or not home:
            raise MailboxesError(f"{where}: expected name:homedir, got {line!r}")
        if _BAD_NAME_CHARS.intersection(name):
            raise MailboxesError(f"{where}: mailbox name {name!r} has a forbidden character")
        if not home.startswith("/"):
            raise MailboxesError(f"{where}: homedir must be an absolute path, got {home!r}")
        key = name.lower()
        if key in boxes:
            raise MailboxesError(f"{where}: mailbox {name!r} is listed twice")
        boxes[key] = Path(home)
    return boxes


class Mailboxes:
    """The mailboxes file, re-read whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._boxes: dict[str, Path] = {}

    def get(self) -> dict[str, Path]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._boxes = None, {}
            return self._boxes
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            text = self.path.read_text(encoding="utf-8")
            self._boxes = parse_mailboxes(text, str(self.path))
            self._stamp = stamp
        return self._boxes


def parse_line(line: str, home: Path, origin: str, default_domain: str) -> Instruction | None:
    """One ``.qmail`` line -> an Instruction, or None for comments and blank lines."""
    line = line.rstrip("\r\n")
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("|"):
        return Instruction(
            "refused",
            f"{origin}: program delivery ({stripped[:60]!r}) is not supported: pyqmail does "
            "not run programs; mailboxes are virtual and owned by one user",
        )
    if stripped.startswith(("/", ".")):
        if not stripped.endswith("/"):
            return Instruction(
                "refused",
                f"{origin}: mbox delivery to {stripped!r} is not supported; "
                "use a Maildir (a path ending in '/')",
            )
        return Instruction("maildir", str((home / stripped).resolve()) + "/")
    address = stripped[1:].strip() if stripped.startswith("&") else stripped
    if not address or any(ch.isspace() or ord(ch) < 32 for ch in address):
        return Instruction("refused", f"{origin}: not a valid forwarding address: {stripped!r}")
    if "@" not in address:
        address = f"{address}@{default_domain}"
    return Instruction("forward", address)


def parse_file(path: Path, home: Path, default_domain: str) -> tuple[Instruction, ...]:
    return parse_text(
        path.read_text(encoding="utf-8", errors="surrogateescape"), path, home, default_domain
    )


def parse_text(text: str, path: Path, home: Path, default_domain: str) -> tuple[Instruction, ...]:
    """The instructions of ``text``, the contents of the ``.qmail`` file ``path``."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        ins = parse_line(line, home, f"{path}:{number}", default_domain)
        if ins is not None:
            out.append(ins)
    return tuple(out)


def check_file(path: Path, home: Path | None = None) -> list[str]:
    """Problems in a ``.qmail`` file (for provisioning-time validation); [] when fine."""
    ins = parse_file(path, home or path.parent, "localhost")
    problems = [i.target for i in ins if i.kind == "refused"]
    if os.stat(path).st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"{path}: writable by group or others")
    return problems


def ext_candidates(ext: str) -> list[str]:
    """qmail-local's search: ``.qmail-a-b-c``, ``-a-b-default``, ``-a-default``, ``-default``."""
    names = [f".qmail-{ext}"]
    parts = ext.split("-")
    for i in range(len(parts) - 1, -1, -1):
        prefix = "-".join(parts[:i])
        names.append(f".qmail-{prefix}-default" if prefix else ".qmail-default")
    return names


def _check_directory(directory: Path) -> None:
    """Defer (#4.7.0) when someone other than the delivery user or root could put a
    ``.qmail`` file into ``directory``, a mailbox's home or ``alias/``: qmail-local's "home
    directory is writable" and qmail-getpw's owner check, since whoever can write there can
    redirect the mail. A directory not there yet is left to the callers (they defer)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return
    _check_writers(f"directory {directory}", st)


def _check_dotqmail(path: Path, st: os.stat_result) -> None:
    """The same rule for the file itself: its writers decide where the mail goes."""
    _check_writers(str(path), st)


def _check_writers(what: str, st: os.stat_result) -> None:
    """Defer unless only the delivery user or root can write ``what``."""
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _DeferError(f"{what} is writable by group or others; fix its mode")
    if st.st_uid not in (0, os.geteuid()):
        raise _DeferError(
            f"{what} is owned by uid {st.st_uid}, neither the delivery user "
            f"(uid {os.geteuid()}) nor root; fix its owner"
        )


def _read_plan(
    directory: Path, names: list[str], default_domain: str, *, alias: bool = False
) -> tuple[Path, tuple[Instruction, ...]] | None:
    """The first existing file of ``names`` and its instructions, as dot-qmail(5) reads it.

    A 0-byte file means "deliver to ./Maildir/" (qmail's default delivery); in ``alias/``
    that is no mailbox (the role makes it root's, 0755), so such a file defers with its name
    instead of failing on EACCES for a week. A file whose first line is blank defers
    (#4.2.1, qmail-local's rule): ``echo > .qmail`` or a stray empty line on top is no
    instruction to throw the mail away. Any other file with bytes but no instruction (only
    comments: a discard address such as noreply@, or an alias with ``targets: []``) gives
    no instruction: the message is delivered nowhere (``LocalDelivery`` logs it discarded).
    ``directory`` itself is checked first (``_check_directory``), one stat per delivery."""
    _check_directory(directory)
    for name in names:
        path = directory / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        _check_dotqmail(path, st)
        if st.st_size == 0 and alias:
            raise _DeferError(
                f"{path} is empty: it has no delivery instruction, and an alias has no "
                "Maildir of its own; write a forward or a Maildir into it, or a comment line "
                "to discard its mail",
                "4.3.5",
            )
        if st.st_size == 0:
            return path, (Instruction("maildir", f"{directory}/Maildir/"),)
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if not text.split("\n", 1)[0].strip():
            raise _DeferError(
                f"{path}: first line is blank; a .qmail file starts with a delivery line or a "
                "'#' comment (comments only: discard the mail); an empty file (0 bytes) is "
                "delivery to ./Maildir/",
                "4.2.1",
            )
        return path, parse_text(text, path, directory, default_domain)
    return None


class _DeferError(Exception):
    """A temporary failure before delivery: its text names what is wrong, ``status`` the
    RFC 3463 code (4.7.0 for a mode or owner that lets others redirect the mail)."""

    def __init__(self, text: str, status: str = "4.7.0") -> None:
        super().__init__(f"{text} (#{status})")
        self.status = status


def resolve(
    local: str, delivered_to: str, mailboxes: dict[str, Path], alias_dir: Path, me: str
) -> Plan | Result:
    """Find the instructions for local part ``local``; a Result means bounce or defer."""
    key = local.lower()
    if "/" in key or "\x00" in key or not key:
        return Result.perm(f"no mailbox here by the name {local!r} (#5.1.1)", "5.1.1")
    ext_key = key.replace(".", ":")
    try:
        if key in mailboxes:
            home = mailboxes[key]
            found = _read_plan(home, [".qmail"], me)
            if found is None:
                return Plan((Instruction("maildir", f"{home}/Maildir/"),), "default", delivered_to)
            return Plan(found[1], str(found[0]), delivered_to)
        # name-ext: the longest mailbox name that is a prefix at a '-' boundary
        cut = len(key)
        while (cut := key.rfind("-", 0, cut)) > 0:
            if key[:cut] in mailboxes:
                home = mailboxes[key[:cut]]
                found = _read_plan(home, ext_candidates(ext_key[cut + 1 :]), me)
                if found is None and not home.is_dir():
                    # no .qmail-ext found because there is no home yet: qmail-local defers
                    # when it cannot chdir there, as the mailbox without extension does
                    return Result.temp(
                        f"home directory {home} of mailbox {key[:cut]!r} does not exist (#4.3.0)",
                        "4.3.0",
                    )
                if found is None:
                    return Result.perm(
                        f"no mailbox here by the name {local!r}: {home} has no .qmail for "
                        "this extension (#5.1.1)",
                        "5.1.1",
                    )
                return Plan(found[1], str(found[0]), delivered_to)
        found = _read_plan(alias_dir, ext_candidates(ext_key), me, alias=True)
    except _DeferError as exc:
        return Result.temp(str(exc), exc.status)
    except OSError as exc:
        return Result.temp(f"cannot read .qmail file: {exc} (#4.3.0)", "4.3.0")
    if found is None:
        return Result.perm(f"no mailbox here by the name {local!r} (#5.1.1)", "5.1.1")
    return Plan(found[1], str(found[0]), delivered_to)

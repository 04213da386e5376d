"""What pyqmail-smtpd loads: every module it imports is in each of its processes' memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail import rules
from pyqmail.checks import libraries
from pyqmail.control.reader import ControlError
from tests.interpreter import fresh_stdout


def test_the_receiver_does_not_load_the_signing_stack() -> None:
    """DKIM signing (pyqmail.dkim.keys, pyqmail.dkim.sign) is pyqmail-send's; their
    cryptography import cost pyqmail-smtpd 5 MiB of PSS over its three processes in
    make bench, through pyqmail.control.check's pyqmail-send check."""
    code = (
        "import sys, pyqmail.smtpd.cli, pyqmail.smtpd.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography' "
        "or m == 'pyqmail.dkim' or m.startswith('pyqmail.dkim.')))"
    )
    out = fresh_stdout(code)
    assert out == "[]\n"


def test_a_spawner_loads_neither_email_nor_shutil() -> None:
    """What a spawner imports, the workers keep: the daemon, the event loop and the command
    line read again bring in no ``email`` package (the Received date is pyqmail's) and no
    ``shutil`` with its compressors (argparse's only use, the terminal width, is cli's)."""
    code = (
        "import sys, pyqmail.smtpd.start as start, pyqmail.smtpd.cli as cli\n"
        "start.parse_args(['--listen', '127.0.0.1:0']); cli.resolve_loop('auto')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('email', 'shutil', 'lzma', 'bz2', 'calendar')))"
    )
    out = fresh_stdout(code)
    assert out == "[]\n"


@pytest.mark.parametrize(("columns", "width"), [("60", 58), ("0", 78), ("-3", 78), ("x", 78)])
def test_help_is_as_wide_as_columns_says(
    monkeypatch: pytest.MonkeyPatch, columns: str, width: int
) -> None:
    """``--help`` without shutil: COLUMNS when it is a positive number, else the terminal's
    width, else 80 (what shutil.get_terminal_size would give). Here stdout is no terminal."""
    import os

    from pyqmail.smtpd import cli

    def no_terminal(fd: int = 1) -> os.terminal_size:
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(os, "get_terminal_size", no_terminal)
    monkeypatch.setenv("COLUMNS", columns)
    assert cli._help_formatter("pyqmail-smtpd")._width == width


def test_the_send_check_still_loads_the_keys(tmp_path: Path) -> None:
    """pyqmail-send --check imports the key loader when it runs (not at import)."""
    code = (
        "import sys, pathlib, contextlib, io, pyqmail.control.check as c; "
        "before = 'pyqmail.dkim.keys' in sys.modules\n"
        "with contextlib.redirect_stderr(io.StringIO()): c.check_send(pathlib.Path(sys.argv[1]))\n"
        "print(before, 'pyqmail.dkim.keys' in sys.modules)"
    )
    out = fresh_stdout(code, str(tmp_path))
    assert out == "False True\n"


CHECK_LIBRARIES = ("dns", "dkim", "spf", "publicsuffix2", "authres", "nacl")
PRELOAD = (
    "import sys, pathlib, pyqmail.smtpd.cli, pyqmail.smtpd.server\n"
    "from pyqmail.checks import libraries\n"
    "print(','.join(libraries.preload(pathlib.Path(sys.argv[1]))))\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:])))\n"
    "print('dns.asyncresolver' in sys.modules)"
)


@pytest.mark.parametrize(
    ("files", "groups", "loaded", "asyncresolver"),
    [
        ((), "", [], False),
        (
            ("authchecks",),
            "auth",
            ["authres", "dkim", "dns", "nacl", "publicsuffix2", "spf"],
            False,
        ),
        (("dnsbl",), "lists", ["dns"], True),
        (("dnswl",), "lists", ["dns"], True),
        (("dnsbl", "authchecks"), "auth,lists", sorted(CHECK_LIBRARIES), True),
    ],
)
def test_the_checks_libraries_are_loaded_only_when_their_files_exist(
    tmp_path: Path, files: tuple[str, ...], groups: str, loaded: list[str], asyncresolver: bool
) -> None:
    """pyqmail.checks.libraries: pyqmail-smtpd's own modules import none of them; the
    start-up's preload imports a group when one of its control files exists (its value
    is not read: that happens after the privilege drop)."""
    for name in files:
        (tmp_path / name).write_text("0\n")
    out = fresh_stdout(PRELOAD, str(tmp_path), *CHECK_LIBRARIES)
    assert out.splitlines() == [groups, str(loaded), str(asyncresolver)]


PRELOAD_RULES = (
    "import sys, pathlib, pyqmail.smtpd.cli, pyqmail.smtpd.server\n"
    "from pyqmail.checks import libraries\n"
    "print(libraries.preload_rules(pathlib.Path(sys.argv[1])))\n"
    "print('dns' in sys.modules, 'pyqmail.smtpd.remotehost' in sys.modules)"
)


@pytest.mark.parametrize(
    ("source", "out"),
    [
        ('127.0.0.1:allow,RELAYCLIENT=""\n10.:deny\n:allow\n', "[]\nFalse False"),
        ('=relay.example.org:allow,RELAYCLIENT=""\n:allow\n', "['hosts']\nTrue True"),
        ("=.example.org:deny\n", "['hosts']\nTrue True"),
    ],
)
def test_dnspython_is_loaded_for_a_rules_cdb_with_host_names_only(
    tmp_path: Path, source: str, out: str
) -> None:
    """The ``hosts`` group: a cdb whose rules name no host costs no DNS library; one with
    an ``=`` key loads the client-name lookup before the privilege drop."""
    cdb = tmp_path / "smtp.cdb"
    cdb.write_bytes(rules.compile_rules(rules.parse(source)))
    assert fresh_stdout(PRELOAD_RULES, str(cdb)) == out + "\n"
    assert fresh_stdout(PRELOAD_RULES, str(tmp_path / "absent.cdb")) == "[]\nFalse False\n"


def test_a_group_that_cannot_be_imported_is_a_control_error_naming_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a HUP that turns checks on gets when the daemon's user cannot import them."""
    (tmp_path / "brokenchecks.py").write_text("raise ImportError('cannot read the codecs')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(libraries.GROUPS, "lists", ("brokenchecks",))
    with pytest.raises(ControlError) as exc:
        libraries.require("lists", tmp_path / "control" / "dnsbl")
    assert str(exc.value) == (
        f"{tmp_path}/control/dnsbl: turns on checks whose libraries cannot be loaded "
        "(brokenchecks: cannot read the codecs); pyqmail-smtpd loads them before dropping "
        "privileges when this file exists at start: restart it"
    )
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "dnsbl").write_text("bl.test\n")
    assert libraries.preload(tmp_path / "control") == []  # reported later, by require


def test_host_rules_whose_lookup_cannot_be_imported_are_a_control_error_naming_the_cdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cdb gaining =host rules while the daemon runs, where its user cannot import
    dnspython: ``load_rules`` (the rules cache's, a start's and --check's) refuses it,
    naming the cdb, so the rules loaded before stay rather than rules whose = entries
    could never match."""
    from pyqmail.control.check import load_rules

    (tmp_path / "brokenhosts.py").write_text("raise ImportError('cannot read the codecs')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(libraries.GROUPS, "hosts", ("brokenhosts",))
    cdb = tmp_path / "smtp.cdb"
    cdb.write_bytes(rules.compile_rules(rules.parse("10.:deny\n")))
    assert load_rules(cdb).names is False  # no = key: nothing to import
    cdb.write_bytes(rules.compile_rules(rules.parse("=spam.example:deny\n")))
    with pytest.raises(ControlError) as exc:
        load_rules(cdb)
    assert str(exc.value) == (
        f"{cdb}: turns on host-name rules (=host) whose libraries cannot be loaded "
        "(brokenhosts: cannot read the codecs); pyqmail-smtpd loads them before dropping "
        "privileges when this cdb has them at start: restart it"
    )

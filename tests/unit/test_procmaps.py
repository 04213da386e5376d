"""pyqmail.procmaps: needrestart's rules on maps lines, then on real processes.

The processes are real: a Python child that dlopens a real shared library (zlib) copied into
a directory of the test's, or runs a copy of a real program; the test then deletes or
replaces the file the way dpkg does (a new file renamed over the old one) and reads the
child's /proc as pyqmail-restart-stale does. No /proc is faked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.procmaps import Stale, deleted_code, process_tree, stale_code

LIB = "7f3c1a2b4000-7f3c1a2d0000 r-xp 00022000 fe:01 1835042"  # a code mapping's first fields

MAPS_CASES = [
    # the maps line, the file it counts as (None: not code a package replaced)
    (f"{LIB}    /usr/lib/x86_64-linux-gnu/libssl.so.3 (deleted)\n",
     "/usr/lib/x86_64-linux-gnu/libssl.so.3"),
    (f"{LIB}    /usr/bin/python3.11 (deleted)", "/usr/bin/python3.11"),
    (f"{LIB}    /opt/my lib/libx.so (deleted)", "/opt/my lib/libx.so"),  # spaces in the path
    (f"{LIB}    /tmpfiles/libx.so (deleted)", "/tmpfiles/libx.so"),  # not under /tmp/
    (f"{LIB}    /usr/lib/x86_64-linux-gnu/libssl.so.3", None),  # still there
    ("7f3c1a2b4000-7f3c1a2d0000 r--p 00000000 fe:01 1835042    /usr/lib/libssl.so.3 (deleted)",
     None),  # data, not code
    ("7f3c1a2b4000-7f3c1a2d0000 rw-s 00000000 00:01 0    /dev/zero (deleted)", None),
    ("7ffd5e3f1000-7ffd5e3f3000 r-xp 00000000 00:00 0    [vdso]", None),
    ("7f3c1a2b4000-7f3c1a2d0000 r-xp 00000000 00:00 0 ", None),  # anonymous
    ("7f3c1a2b4000-7f3c1a2d0000 rwxp 00000000 00:00 0", None),
    (f"{LIB}    /memfd:libffi (deleted)", None),
    ("7f3c1a2b4000-7f3c1a2d0000 r-xs 00000000 00:01 32768    /SYSV00000000 (deleted)", None),
    ("7f3c1a2b4000-7f3c1a2d0000 r-xs 00000000 00:01 32769    /SYSV0052a3f1 (deleted)", None),
    (f"{LIB}    /drm mm object (deleted)", None),
    (f"{LIB}    /[aio] (deleted)", None),
    (f"{LIB}    /dev/shm/ffiAbc123 (deleted)", None),
    (f"{LIB}    /tmp/ffiAbc123 (deleted)", None),
    (f"{LIB}    /var/tmp/ffiAbc123 (deleted)", None),
    (f"{LIB}    /run/dovecot/something (deleted)", None),
    (f"{LIB}    /var/run/x (deleted)", None),
    (f"{LIB}    /root/.cache/orcexec.Xa12bC (deleted)", None),
]  # fmt: skip


@pytest.mark.parametrize(("line", "expected"), MAPS_CASES)
def test_maps_lines(line: str, expected: str | None) -> None:
    assert deleted_code(line) == expected


def zlib() -> Path:
    """A real shared library every Debian has (zlib1g), by its real path."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "*"
    for base in ("/usr/lib", "/lib"):
        for path in sorted(Path(base).glob(f"{multiarch}/libz.so.1")):
            return path.resolve()
    pytest.skip("no libz.so.1 in the multiarch library directories")


@pytest.fixture
def code_dir() -> Iterator[Path]:
    """A directory outside the temporary trees (/tmp, /var/tmp, /run) whose deleted files the
    rules leave alone on purpose: where a package's library would be."""
    base = Path.home() / ".cache"
    try:
        base.mkdir(exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="pyqmail-procmaps-", dir=base))
    except OSError as exc:
        pytest.skip(f"cannot make a directory under {base}: {exc}")
    if deleted_code(f"{LIB} {path}/lib.so (deleted)") is None:
        shutil.rmtree(path)
        pytest.skip(f"{path} is a temporary tree the rules ignore")
    yield path
    shutil.rmtree(path)


LOADER = """
import ctypes, mmap, os, subprocess, sys
for path in sys.argv[1:]:
    if path == "memfd":  # executable memory of its own, as libffi makes it
        fd = os.memfd_create("libffi")
        os.write(fd, bytes(4096))
        keep = mmap.mmap(fd, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    elif path.startswith("child:"):  # a process forked from this one maps it instead
        child = subprocess.Popen([sys.executable, __file__, path[6:]], stdout=subprocess.PIPE,
                                 stdin=subprocess.PIPE)
        child.stdout.readline()
    else:
        ctypes.CDLL(path)
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def loader(tmp: Path, *what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A Python process that has mapped each of ``what`` and waits; killed with its children."""
    script = tmp / "loader.py"
    script.write_text(LOADER)
    with subprocess.Popen(
        [sys.executable, str(script), *what], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:  # closes the pipes at the end
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            yield proc
        finally:
            for pid in reversed(process_tree(proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def replace(path: Path) -> None:
    """What dpkg does: the new file written beside, then renamed over the old one."""
    new = path.with_name(path.name + ".dpkg-new")
    shutil.copyfile(path, new)
    os.rename(new, path)


def test_a_deleted_library_is_found(code_dir: Path, tmp_path: Path) -> None:
    lib = code_dir / "libz.so.1"
    shutil.copyfile(zlib(), lib)
    with loader(tmp_path, str(lib)) as proc:
        assert stale_code([proc.pid]) is None  # mapped, not deleted: nothing to do
        lib.unlink()
        found = stale_code([proc.pid])
    assert found is not None
    assert (found.pid, found.path, found.exe) == (proc.pid, str(lib), False)
    assert str(found) == f"pid {proc.pid} ({found.name}) maps {lib}, deleted"


def test_a_replaced_library_is_found(code_dir: Path, tmp_path: Path) -> None:
    lib = code_dir / "libz.so.1"
    shutil.copyfile(zlib(), lib)
    with loader(tmp_path, str(lib)) as proc:
        replace(lib)  # the path exists again, with new bytes: the old inode is what runs
        found = stale_code([proc.pid])
    assert found is not None
    assert (found.pid, found.path, found.exe) == (proc.pid, str(lib), False)


def test_a_replaced_program_is_found(tmp_path: Path) -> None:
    """The program itself (``/proc/PID/exe``): counts wherever it is, as for needrestart."""
    program = tmp_path / "sleep"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    proc = subprocess.Popen([str(program), "60"])
    try:
        assert stale_code([proc.pid]) is None
        replace(program)
        found = stale_code([proc.pid])
    finally:
        proc.kill()
        proc.wait()
    assert found == Stale(proc.pid, "sleep", str(program), exe=True)
    assert str(found) == f"pid {proc.pid} (sleep) runs {program}, deleted"


def test_temporary_code_of_its_own_does_not_count(tmp_path: Path) -> None:
    """A library deleted from /tmp and executable memfd memory: what a daemon makes and
    deletes itself (libffi, JIT), not an upgrade."""
    assert str(tmp_path).startswith("/tmp/"), "pytest's temporary directory is not under /tmp"
    lib = tmp_path / "libz.so.1"
    shutil.copyfile(zlib(), lib)
    with loader(tmp_path, str(lib), "memfd") as proc:
        lib.unlink()
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert f"{lib} (deleted)" in maps
        assert "/memfd:libffi (deleted)" in maps
        assert stale_code([proc.pid]) is None


def test_a_child_mapping_a_deleted_library_is_found_through_its_parent(
    code_dir: Path, tmp_path: Path
) -> None:
    """The supervised pid maps nothing deleted; a process it forked does (Dovecot's
    imap-login after a libssl3 update)."""
    lib = code_dir / "libz.so.1"
    shutil.copyfile(zlib(), lib)
    with loader(tmp_path, f"child:{lib}") as proc:
        tree = process_tree(proc.pid)
        assert tree[0] == proc.pid
        assert len(tree) == 2
        lib.unlink()
        assert stale_code([proc.pid]) is None
        found = stale_code(tree)
    assert found is not None
    assert (found.pid, found.path) == (tree[1], str(lib))


def test_process_tree_of_a_process_that_is_gone() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert process_tree(proc.pid) == []
    assert stale_code([proc.pid]) is None

"""pyqmail-smtpd --loop: uvloop if installed (auto), asyncio on request, clear error if missing."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest

from pyqmail.smtpd import cli as smtpd

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


@pytest.mark.parametrize(
    ("choice", "installed", "result"),
    [
        ("asyncio", True, "asyncio"),
        ("asyncio", False, "asyncio"),
        ("auto", True, "uvloop"),
        ("auto", False, "asyncio"),
        ("uvloop", True, "uvloop"),
        ("uvloop", False, "--loop uvloop: cannot import uvloop"),
    ],
)
def test_resolve_loop(
    monkeypatch: pytest.MonkeyPatch, choice: str, installed: bool, result: str
) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> ModuleType:
        if name == "uvloop":
            if not installed:
                raise ImportError("No module named 'uvloop'")
            return ModuleType("uvloop")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)
    if result.startswith("--"):
        with pytest.raises(smtpd.UsageError, match=result):
            smtpd.resolve_loop(choice)
    else:
        assert smtpd.resolve_loop(choice) == result


def test_loop_flag_parsed() -> None:
    opts = smtpd.parse_args(["--listen", "127.0.0.1:0", "--loop", "asyncio"])
    assert opts.loop == "asyncio"
    auto = smtpd.parse_args(["--listen", "127.0.0.1:0"])
    assert auto.loop == "auto"  # resolved where the daemon is imported, not in the supervisor
    assert smtpd.resolve_loop(auto.loop) == ("uvloop" if HAVE_UVLOOP else "asyncio")

"""DKIM selectors per host: two hosts signing for one domain never make the same selector.

Each host makes its own keys (``pyqmail_dkim_key``), so the selector names must differ per
host: the role's default prefix is the host's short inventory name (``host_prefix`` in
``module_utils/pyqmail_dkim.py``, the filter ``pyqmail_dkim_prefix``). A host whose
``state.json`` holds selectors of the old default prefix (``s``) keeps signing with them and
moves to its own prefix at its next rotation; the DNS zone refuses what still clashes
(``tests/unit/test_dns_zone.py``).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tests.collection import module_utils
from tests.modules.test_dkim_key_module import DOMAIN, args, call, ok, published, run_twice, signing
from tests.modules.test_dkim_key_module import keydir as keydir  # noqa: PLC0414 - the fixture

dkim: Any = module_utils("pyqmail_dkim")
REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 12, 2, 6, 0, tzinfo=dt.UTC)
ROT = {"rotate_days": 30, "prepublish_days": 7, "retire_days": 10}


def _filters() -> Any:
    spec = importlib.util.spec_from_file_location(
        "dkim_filters", REPO / "filter_plugins" / "pyqmail_dkim.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FilterModule().filters()["pyqmail_dkim_prefix"]


def when(days: float) -> str:
    return (T0 + dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("host", "prefix"),
    [
        ("mx1.example.org", "mx1-"),
        ("MX2.Example.ORG.", "mx2-"),
        ("submit", "submit-"),
        ("mail_host.example.org", "mail-host-"),
        ("1mx.example.org", "h1mx-"),
        ("192.0.2.25", "h192-0-2-25-"),  # an address whole: its first label says nothing
        ("2001:db8::25", "h2001-db8-25-"),
        ("xn--bcher-kva.example", "xn-bcher-kva-"),
    ],
)
def test_the_default_prefix_is_the_hosts_short_name_as_a_dns_label(host: str, prefix: str) -> None:
    assert _filters()(host) == prefix
    assert dkim.prefix_problem(prefix) is None


def test_long_names_are_bounded_and_stay_distinct() -> None:
    a = _filters()("mailserver-frankfurt-primary-01.example.org")
    b = _filters()("mailserver-frankfurt-primary-02.example.org")
    assert a != b
    for prefix in (a, b):
        assert len(prefix) <= dkim.HOST_LABEL_MAX + 1 and dkim.prefix_problem(prefix) is None
        selector = f"{prefix}20261202z-ed25519"
        assert dkim.LABEL_RE.match(selector), selector  # one DNS label (63 at most)


def test_two_hosts_planning_the_same_day_get_distinct_selectors() -> None:
    """The normal multi-host setup: mx1 and submit both sign example.org and make their
    first keys (and every rotation's) on the same day."""
    plans = {
        host: dkim.plan(
            dkim.State(DOMAIN), T0, prefix=_filters()(host), rotate_days=30,
            prepublish_days=7, retire_days=10,
        )
        for host in ("mx1.example.org", "submit.example.org")
    }  # fmt: skip
    selectors = {host: {k.selector for k in p.state.keys} for host, p in plans.items()}
    assert selectors["mx1.example.org"] == {"mx1-20261202-rsa", "mx1-20261202-ed25519"}
    assert selectors["submit.example.org"] == {"submit-20261202-rsa", "submit-20261202-ed25519"}
    later = T0 + dt.timedelta(days=23)  # both make their next pair on the same run
    nxt = {
        host: dkim.plan(
            p.state, later, prefix=_filters()(host), rotate_days=30, prepublish_days=7,
            retire_days=10,
        ).generated
        for host, p in plans.items()
    }  # fmt: skip
    names = [k.selector for keys in nxt.values() for k in keys]
    assert len(names) == len(set(names)) == 4


def test_a_state_of_the_old_prefix_keeps_signing_then_rotates_to_the_new(keydir: Path) -> None:
    """Keys made with the old default (``s``): after the upgrade the same keys sign and stay
    published, nothing changes on disk, and the next pair is named after the host."""
    keydir.parent.mkdir()
    old = {"s20261202-rsa", "s20261202-ed25519"}
    assert signing(run_twice(args(keydir, now=when(0), selector_prefix="s", **ROT))) == old
    new_prefix = _filters()("mx1.example.org")
    upgraded = ok(call(args(keydir, now=when(1), selector_prefix=new_prefix, **ROT)))
    assert not upgraded["changed"], upgraded
    assert signing(upgraded) == published(upgraded) == old
    pre = run_twice(args(keydir, now=when(23), selector_prefix=new_prefix, **ROT))
    new = {"mx1-20261225-rsa", "mx1-20261225-ed25519"}
    assert set(pre["generated"]) == new and signing(pre) == old
    assert published(pre) == old | new
    switch = run_twice(args(keydir, now=when(30), selector_prefix=new_prefix, **ROT))
    assert signing(switch) == new and set(switch["retired"]) == old
    gone = run_twice(args(keydir, now=when(40), selector_prefix=new_prefix, **ROT))
    assert set(gone["removed"]) == old and published(gone) == new


def test_without_rotation_the_old_prefix_signs_on(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0), selector_prefix="s")))
    later = run_twice(args(keydir, now=when(400), selector_prefix="mx1-"))
    assert signing(later) == published(later) == {"s20261202-rsa", "s20261202-ed25519"}
    assert later["generated"] == []

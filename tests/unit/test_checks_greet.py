"""Who waits for port 25's greeting, and how long (pyqmail.checks.greet)."""

from __future__ import annotations

import pytest

from pyqmail.checks import greet


@pytest.mark.parametrize(
    ("mode", "env", "pause"),
    [
        ("smtp", {}, 5),
        ("smtp", {"RELAYCLIENT": ""}, 0),
        ("smtp", {"RBLSMTPD": ""}, 0),  # rblsmtpd's allow-list mark
        ("smtp", {"RBLSMTPD": "-listed"}, 5),  # a refusal text is the lists' business
        ("smtp", {"GREETDELAY": "0"}, 0),
        ("smtp", {"GREETDELAY": " 12 "}, 12),
        ("smtp", {"GREETDELAY": "60"}, 60),
        ("smtp", {"GREETDELAY": "61"}, 5),
        ("smtp", {"GREETDELAY": "-1"}, 5),
        ("smtp", {"GREETDELAY": ""}, 5),
        ("smtp", {"GREETDELAY": "\u0663"}, 5),  # an Arabic-Indic 3: a digit, not ASCII
        ("submission", {"GREETDELAY": "9"}, 0),
        ("smtps", {}, 0),
    ],
)
def test_pause(mode: str, env: dict[str, str], pause: int) -> None:
    assert greet.pause(mode, env, 5) == pause


@pytest.mark.parametrize(("value", "bad"), [(None, False), ("0", False), ("60", False),
                                            ("61", True), ("x", True), ("", True)])  # fmt: skip
def test_bad_value(value: str | None, bad: bool) -> None:
    assert greet.bad_value(value) is bad

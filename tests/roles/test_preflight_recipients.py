"""The preflight refuses bad input to the inbound checks of issue 17 (recipients, greeting
pause), naming the variable, before anything on a host changes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.roles.test_preflight import problems_of

NOT_DNS = (
    "is not a DNS domain name (lower-case labels of letters, digits and '-', at least two, "
    "separated by dots)"
)

BAD: list[tuple[dict[str, Any], str]] = [
    (
        {"pyqmail_control__rcptcatchall": ["exa mple.org"]},
        f"pyqmail_control__rcptcatchall[0]: 'exa mple.org' {NOT_DNS}",
    ),
    (
        {"pyqmail_control__rcptcatchall": [".mail.example.org"]},
        f"pyqmail_control__rcptcatchall[0]: '.mail.example.org' {NOT_DNS}",
    ),
    (
        {"pyqmail_control__rcptcatchall": ["elsewhere.test"]},
        "pyqmail_control__rcptcatchall[0]: 'elsewhere.test' is not a local domain "
        "(pyqmail_control__locals or pyqmail_control__extra.virtualdomains)",
    ),
    (
        {"pyqmail_control__rcptcheck": "maybe"},
        "pyqmail_control__rcptcheck: 'maybe' is not a boolean",
    ),
    (
        {"pyqmail_rules__rules": [{"address": "10.", "env": {"GREETDELAY": "61"}}]},
        "pyqmail_rules__rules[0].env.GREETDELAY: '61' is not a greeting pause in seconds, 0 to 60",
    ),
    (
        {"pyqmail__listener_env": {"smtp": {"GREETDELAY": "soon"}}},
        "pyqmail__listener_env.smtp.GREETDELAY: 'soon' is not a greeting pause in seconds, 0 to 60",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD)
def test_bad_input_names_the_variable(overrides: dict[str, Any], expected: str) -> None:
    assert problems_of(overrides) == [expected]


@pytest.mark.parametrize(
    "overrides",
    [
        {"pyqmail_control__rcptcatchall": ["mail.example.org"]},
        {
            "pyqmail_control__extra": {"virtualdomains": "shop.example:alice\n"},
            "pyqmail_control__rcptcatchall": ["shop.example"],
        },
        {"pyqmail_control__rcptcheck": False},
        {"pyqmail_rules__rules": [{"address": "10.", "env": {"GREETDELAY": "0"}}]},
        {"pyqmail_rules__rules": [{"address": "10.", "env": {"GREETDELAY": "60"}}]},
    ],
)
def test_good_input_passes(overrides: dict[str, Any]) -> None:
    assert problems_of(overrides) == []

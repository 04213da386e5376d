"""The DNS zone filters (filter_plugins/pyqmail_dns.py) and the example hosts their tests share.

Three hosts as in inventory/example: mx1 (example.org local, MX 10, DKIM keys), mx2 (backup MX
for example.org), submit (no port 25; its users send as example.org: pyqmail_dns__send_domains).
``zone(host)`` is the file the role would write.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import tests.collection  # noqa: F401 - puts the collection on sys.path for the filter's imports

REPO = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "pyqmail_dns_filters", REPO / "filter_plugins" / "pyqmail_dns.py"
)
assert _SPEC is not None and _SPEC.loader is not None
filters: Any = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(filters)

TLSA = "ab" * 32
# An RSA 2048 public key's record is longer than one 255-byte string.
RSA_TXT = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 9
ED_TXT = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
DKIM = [
    {"domain": "example.org", "selector": "s2026a-rsa", "algorithm": "rsa-sha256", "txt": RSA_TXT},
    {
        "domain": "example.org",
        "selector": "s2026a-ed",
        "algorithm": "ed25519-sha256",
        "txt": ED_TXT,
    },
]


def settings(host: str, **over: Any) -> dict[str, Any]:
    """The settings the role hands pyqmail_dns_host for one example host (role defaults)."""
    base: dict[str, Any] = {
        "host": host,
        "me": host,
        "ipv4": [],
        "ipv6": [],
        "locals": [host],
        "relay_domains": [],
        "send_domains": [],
        "receives": True,
        "sends": True,
        "spf_extra": [],
        "dkim": [],
        "tlsa": TLSA,
        "mx_priority": 10,
        "backup_mx_priority": 20,
        "ttl": 3600,
        "spf_all": "-all",
        "dmarc_policy": "none",
        "dmarc_rua": "",
        "tlsrpt_rua": "",
        "mta_sts_mode": "testing",
        "mta_sts_max_age": 604800,
    }
    return {**base, **over}


def example_hosts(common: dict[str, Any] | None = None, **mx1: Any) -> list[dict[str, Any]]:
    """The three example hosts, checked by pyqmail_dns_host: ``common`` overrides the settings
    of all (group_vars), ``mx1`` those of mx1 only (host_vars)."""
    raw = [
        settings(
            "mx1.example.org",
            ipv4=["192.0.2.25"],
            ipv6=["2001:db8::25"],
            locals=["example.org", "mx1.example.org"],
            dkim=DKIM,
            **mx1,
        ),
        settings("mx2.example.org", ipv4=["192.0.2.26"], relay_domains=["example.org"]),
        settings(
            "submit.example.org",
            ipv4=["192.0.2.30"],
            receives=False,
            tlsa="",
            send_domains=["example.org"],
        ),
    ]
    return [filters.dns_host({**s, **(common or {})}) for s in raw]


def zone(host: str = "mx1.example.org", common: dict[str, Any] | None = None, **mx1: Any) -> str:
    return str(filters.dns_zone(example_hosts(common, **mx1), host))

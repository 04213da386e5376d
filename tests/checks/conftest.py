"""The checks' shared fixtures: a test module's ``ZONES`` served by a real knotd on
loopback, and the inbound checks' settings asking it (a module whose zones or time limits
differ defines its own ``dns_server`` or ``settings``, which pytest prefers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from tests.dnsserver import DnsServer


@pytest.fixture(scope="module")
def dns_server(request: pytest.FixtureRequest) -> Iterator[DnsServer]:
    """The requesting module's ``ZONES`` (zone origin -> records), served for the module."""
    with DnsServer(request.module.ZONES) as server:
        yield server


@pytest.fixture
def settings(dns_server: DnsServer) -> AuthSettings:
    """Inbound checks on (authserv-id mx.test, 5 s budget), DNS from ``dns_server``."""
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    return AuthSettings(enabled=True, authserv_id="mx.test", timeout=5, resolver=res)

"""``pyqmail-dns check --fetch-policy --resolver``: names outside the zones of --nameserver.

The review of session 37: the CNAME chain of ``mta-sts.<domain>`` was followed by asking
``--nameserver`` alone, but a domain's own server is not authoritative for a hosting
provider's zone (it answers REFUSED, or a referral for a delegated zone): the policy was
MISSING although every sender, asking a recursive resolver (RFC 8461 3.3), fetches it. Such a
name is now asked of ``--resolver`` (default: the system resolver; here always a knot on
loopback). When that resolver cannot answer either, the line names the hop and the resolver.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyqmail.tools.dns import main, resolver_address
from tests.e2e.test_dns_check_policy import HOSTED, PolicyServer, run_policy_check
from tests.e2e.test_dns_check_policy import ca as ca  # noqa: PLC0414 - the fixture
from tests.e2e.test_dns_check_policy import web as web  # noqa: PLC0414 - the fixture
from tests.pki import CA


def test_a_resolver_that_does_not_know_the_hop_is_named(
    tmp_path: Path, ca: CA, web: PolicyServer
) -> None:
    """--resolver is a knot serving neither hosting.test nor hosted.example.org: each policy
    is MISSING with the hop that could not be resolved, why --nameserver was not asked for
    it (REFUSED, a referral), the resolver that was asked instead and its answer."""
    outside = {"other.test.": "@ A 127.0.0.1\n"}
    result = run_policy_check(tmp_path, ca, web.port, add=HOSTED, outside=outside)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("2 problem(s) in "), result.stdout
    for (domain, hop), why in zip(
        [("example.org", "sts.hosting.test"), ("mx1.example.org", "sts.hosted.example.org")],
        ["answered REFUSED", "gave no authoritative answer \\(a referral\\)"],
        strict=True,
    ):
        line = re.escape(
            f"MISSING https://mta-sts.{domain}/.well-known/mta-sts.txt: expected the policy, "
            f"found {hop}: no answer from DNS: All nameservers failed to answer the query "
            f"{hop}. IN CNAME: Server Do53:127.0.0.1@"
        )
        line += r"(\d+) answered REFUSED \(--nameserver 127\.0\.0\.1 port \d+ "
        line += why + r", so the resolver 127\.0\.0\.1 port (\d+) \(--resolver\) was asked\) "
        line += re.escape(f"(CNAME chain mta-sts.{domain} -> {hop})")
        found = [m for m in map(re.compile(line).fullmatch, lines) if m]
        assert len(found) == 1, (line, result.stdout)
        assert found[0][1] == found[0][2]  # the port dnspython asked is the one named
    assert web.paths == []


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[0::1]", ("::1", 53)),
    ],
)
def test_resolver_addresses(text: str, address: tuple[str, int]) -> None:
    assert resolver_address(text) == address


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--resolver", "ns.example"], "--resolver 'ns.example': 'ns.example' is not an IP"),
        (["--resolver", "127.0.0.1:0"], "--resolver '127.0.0.1:0': the port '0' is not a number"),
        (["--resolver", "127.0.0.1:x"], "--resolver '127.0.0.1:x': the port 'x' is not a number"),
        (["--resolver", "[::1]5353"], "--resolver '[::1]5353': after ']' only ':PORT' may"),
        (["--resolver", "1.2.3.4:5:6"], "--resolver '1.2.3.4:5:6': '1.2.3.4:5:6' is not an IP"),
    ],
)
def test_a_bad_resolver_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], error: str
) -> None:
    """Exit 2 before the zone file is read, naming the option and what is wrong."""
    head = ["check", str(tmp_path / "dns.zone"), "--fetch-policy", "--nameserver", "127.0.0.1"]
    with pytest.raises(SystemExit) as info:
        main(head + argv)
    assert info.value.code == 2
    assert f"pyqmail-dns: error: {error}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--fetch-policy"], ["--nameserver", "127.0.0.1"]])
def test_a_resolver_that_would_not_be_used_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Only the policy fetch asks --resolver, and only for names --nameserver does not
    serve: given without either, it would be silently ignored."""
    with pytest.raises(SystemExit) as info:
        main(["check", str(tmp_path / "dns.zone"), "--resolver", "127.0.0.1", *argv])
    assert info.value.code == 2
    assert (
        "error: --resolver 127.0.0.1: only used with --fetch-policy and --nameserver"
        in capsys.readouterr().err
    )

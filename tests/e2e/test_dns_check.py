"""``pyqmail-dns check`` against a real knot serving the zone the role writes (tests/dnszone).

The zone file is split into the zones an operator would publish it in (example.org and the
reverse zones), served by knotd on loopback, and the command runs as a process: all published
-> exit 0; a missing DKIM key, a different SPF, a missing MX -> exit 1, one line each.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.dnsserver import DnsServer, split_zones
from tests.dnszone import zone

BIN = Path(sys.executable).parent
ORIGINS = ["example.org.", "2.0.192.in-addr.arpa.", "8.b.d.0.1.0.0.2.ip6.arpa."]


def run_check(path: Path, dns: DnsServer) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "pyqmail-dns"), "check", str(path)]
    argv += ["--nameserver", dns.host, "--port", str(dns.port), "--timeout", "2"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def served(text: str, drop: tuple[str, ...] = (), add: str = "") -> dict[str, str]:
    """The zones of ``text`` without the lines starting with ``drop``, plus ``add``."""
    kept = "".join(f"{line}\n" for line in text.splitlines() if not line.startswith(drop))
    return split_zones(kept + add, ORIGINS)


def test_all_published_exits_0(tmp_path: Path) -> None:
    text = zone()
    path = tmp_path / "dns.zone"
    path.write_text(text)
    with DnsServer(served(text)) as dns:
        result = run_check(path, dns)
    count = sum(1 for line in text.splitlines() if line and not line.startswith(";"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"all {count} records published\n"


def test_missing_dkim_different_spf_missing_mx_exit_1(tmp_path: Path) -> None:
    text = zone()
    path = tmp_path / "dns.zone"
    path.write_text(text)
    spf = 'example.org. 3600 IN TXT "v=spf1'
    zones = served(
        text,
        drop=("s2026a-ed._domainkey.", spf, "example.org. 3600 IN MX 20 "),
        add='example.org. 3600 IN TXT "v=spf1 ip4:203.0.113.9 -all"\n'
        'example.org. 3600 IN TXT "google-site-verification=abc"\n',
    )
    with DnsServer(zones) as dns:
        result = run_check(path, dns)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("3 problem(s) in ")
    assert (
        "MISSING example.org. MX: expected 20 mx2.example.org., found 10 mx1.example.org." in lines
    )
    assert (
        "DIFFERENT example.org. TXT: expected 'v=spf1 ip4:192.0.2.25 ip4:192.0.2.26 "
        "ip4:192.0.2.30 ip6:2001:db8::25 -all', found 'v=spf1 ip4:203.0.113.9 -all'" in lines
    )
    assert (
        "MISSING s2026a-ed._domainkey.example.org. TXT: expected "
        "'v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=', found nothing"
        in lines
    )


def test_an_extra_mx_and_a_missing_ptr_are_reported(tmp_path: Path) -> None:
    text = zone()
    path = tmp_path / "dns.zone"
    path.write_text(text)
    zones = served(
        text, drop=("25.2.0.192.in-addr.arpa.",), add="example.org. 3600 IN MX 5 mx.evil.test.\n"
    )
    with DnsServer(zones) as dns:
        result = run_check(path, dns)
    assert result.returncode == 1
    assert (
        "EXTRA example.org. MX: expected not this record (not in the zone file), "
        "found 5 mx.evil.test." in result.stdout.splitlines()
    )
    assert "MISSING 25.2.0.192.in-addr.arpa. PTR: expected mx1.example.org., found nothing" in (
        result.stdout
    )


def test_a_bad_zone_file_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "dns.zone"
    path.write_text("example.org. 3600 IN MX ten mx1.example.org.\n")
    result = subprocess.run(
        [str(BIN / "pyqmail-dns"), "check", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"pyqmail-dns: {path}: not a zone file:")
    missing = subprocess.run(
        [str(BIN / "pyqmail-dns"), "check", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2 and "No such file" in missing.stderr


def test_a_second_spf_dmarc_sts_tlsrpt_or_dkim_next_to_the_expected_one_is_extra(
    tmp_path: Path,
) -> None:
    """The expected records are all there, and a leftover second one of each kind too: each
    makes receivers ignore both (SPF permerror, no DMARC policy, no MTA-STS), so each is an
    EXTRA line with the reason, and the exit is 1."""
    text = zone()
    path = tmp_path / "dns.zone"
    path.write_text(text)
    zones = served(
        text,
        add='example.org. 3600 IN TXT "v=spf1 include:_spf.old.example -all"\n'
        'example.org. 3600 IN TXT "google-site-verification=abc"\n'
        '_dmarc.example.org. 3600 IN TXT "v=DMARC1; p=reject"\n'
        '_mta-sts.example.org. 3600 IN TXT "v=STSv1; id=old"\n'
        '_smtp._tls.example.org. 3600 IN TXT "v=TLSRPTv1; rua=mailto:old@example.org"\n'
        's2026a-ed._domainkey.example.org. 3600 IN TXT "v=DKIM1; k=ed25519; p=old"\n',
    )
    with DnsServer(zones) as dns:
        result = run_check(path, dns)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("5 problem(s) in "), result.stdout
    extra = [line for line in lines if line.startswith("EXTRA ")]
    assert len(extra) == 5, result.stdout
    spf = next(line for line in extra if line.startswith("EXTRA example.org. TXT"))
    assert spf.endswith(
        "found also 'v=spf1 include:_spf.old.example -all': two SPF records: receivers get "
        "permerror and fail the mail (RFC 7208 4.5)"
    )
    assert "expected only 'v=spf1 ip4:192.0.2.25" in spf
    assert any("_dmarc.example.org. TXT" in x and "no DMARC policy" in x for x in extra)
    assert any("_mta-sts.example.org. TXT" in x and "ignore MTA-STS" in x for x in extra)
    assert any("_smtp._tls.example.org. TXT" in x and "no TLS reports" in x for x in extra)
    assert any("s2026a-ed._domainkey.example.org. TXT" in x and "two DKIM keys" in x for x in extra)
    assert "google-site-verification" not in result.stdout


def test_the_next_keys_tlsa_next_to_the_expected_one_is_info_not_a_problem(
    tmp_path: Path,
) -> None:
    """Publishing the next key's TLSA before the key changes is the rollover RFC 7671 8.1
    asks for: INFO and exit 0 while the expected record is there; without it, MISSING."""
    text = zone()
    path = tmp_path / "dns.zone"
    path.write_text(text)
    nxt = "_25._tcp.mx1.example.org. 3600 IN TLSA 3 1 1 " + "cd" * 32 + "\n"
    with DnsServer(served(text, add=nxt)) as dns:
        result = run_check(path, dns)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "INFO _25._tcp.mx1.example.org. TLSA: expected this key's record (published), found "
        f"3 1 1 {'cd' * 32}: another TLSA published: the previous or next key? remove it once "
        "no longer needed"
    )
    assert lines[-1].startswith("all ")
    with DnsServer(served(text, drop=("_25._tcp.",), add=nxt)) as dns:
        result = run_check(path, dns)
    assert result.returncode == 1
    assert "MISSING _25._tcp.mx1.example.org. TLSA" in result.stdout
    assert "EXTRA _25._tcp.mx1.example.org. TLSA" in result.stdout

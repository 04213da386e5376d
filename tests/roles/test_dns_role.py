"""The role pyqmail_dns through ansible-playbook, its preflight checks, and the summary lines.

One run of playbooks/dns.yml on two inventory hosts (local connection, each its own qmail
root): mx1 with a servercert.pem and example.org local, mx2 backup MX for example.org with
another priority. Both files must have one MX set for example.org; mx1's TLSA must be the
SHA-256 of its certificate's key as openssl computes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dnszone import ED_TXT
from tests.modules.test_tlsa_module import openssl_311, servercert
from tests.roles.playbook import REPO, ansible_env
from tests.roles.test_preflight import DEFAULTS, problems_of

DKIM = [
    {"domain": "example.org", "selector": "s1-ed", "algorithm": "ed25519-sha256", "txt": ED_TXT}
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"pyqmail_dns__dmarc_policy": "strict"},
            "pyqmail_dns__dmarc_policy: 'strict' is not one of none, quarantine, reject",
        ),
        ({"pyqmail_dns__spf_all": "+all"}, "pyqmail_dns__spf_all: '+all' is not one of -all, ~all"),
        (
            {"pyqmail_dns__dmarc_rua": "postmaster"},
            "pyqmail_dns__dmarc_rua: 'postmaster' is not a mail address (user@domain)",
        ),
        (
            {"pyqmail_dns__mx_priority": 65536},
            "pyqmail_dns__mx_priority: 65536 is out of range: must be from 0 to 65535",
        ),
        (
            {"pyqmail_dns__ipv6": ["192.0.2.1"]},
            "pyqmail_dns__ipv6[0]: '192.0.2.1' is not an IPv6 address",
        ),
        (
            {"pyqmail_dns__spf_extra": ["include:a.example", "+all"]},
            "pyqmail_dns__spf_extra[1]: '+all' has a qualifier: give the term alone "
            "(pyqmail_dns__spf_all ends the record)",
        ),
        (
            {"pyqmail_dns__spf_extra": ["a:192.0.2.1"]},
            "pyqmail_dns__spf_extra[0]: 'a:192.0.2.1' names an IP address, not a domain: write "
            "ip4:192.0.2.1 (RFC 7208 5: a:, mx:, include: and exists: take a domain name)",
        ),
        (
            {"pyqmail_dns__spf_extra": ["include:example.org", "include:%{x}.example.net"]},
            "pyqmail_dns__spf_extra[1]: 'include:%{x}.example.net' has the macro %{x...}: "
            "a domain takes only the macro letters s l o d i p h v (RFC 7208 7.2, 7.3)",
        ),
        (
            {"pyqmail_dns__spf_extra": ["include:example.org", "include:mail.example.org."]},
            "pyqmail_dns__spf_extra[1]: 'include:mail.example.org.' includes, in the SPF record "
            "of mail.example.org (pyqmail__me), that record itself: a loop, which every receiver "
            "ends with permerror (RFC 7208 4.6.4)",
        ),
        (
            {"pyqmail_dns__spf_extra": ["exists:%{l}@%{d}.rate.example.org", "include:%{o}"]},
            "pyqmail_dns__spf_extra[1]: 'include:%{o}' includes the record it is in (%{d} is the "
            "domain whose record is read, %{o} the sender's, the same domain for its own mail): "
            "a loop, which every receiver ends with permerror (RFC 7208 4.6.4)",
        ),
        (
            {"pyqmail_dns__spf_extra": [f"include:s{i}.example" for i in range(11)]},
            "pyqmail_dns__spf_extra: 11 terms that need a DNS lookup (a, mx, include:, exists:); "
            "SPF allows 10 in all, including those of the included records (RFC 7208 4.6.4), "
            "or every receiver fails the mail with permerror: use ip4:/ip6: or fewer include:",
        ),
        (
            {"pyqmail_dns__mta_sts_mode": "enforce"},
            "pyqmail_dns__mta_sts_mode: 'enforce' needs certificates from a public CA for every "
            "MX name and for mta-sts.<domain> (RFC 8461 section 4), but "
            "pyqmail_certificates__provided_cert is not set, so the MX presents the run's own "
            "CA, which senders do not trust and would refuse to deliver to: set "
            "pyqmail_certificates__provided_cert (and _key), or keep 'testing'",
        ),
        (
            {"pyqmail_dns__send_domains": ["not a domain"]},
            "pyqmail_dns__send_domains[0]: 'not a domain' is not a domain name",
        ),
    ],
)
def test_preflight_names_the_bad_variable(overrides: dict[str, Any], expected: str) -> None:
    assert problems_of(overrides) == [expected]


def test_preflight_accepts_an_include_of_a_domain_the_host_is_backup_mx_for() -> None:
    """A backup MX for a partner, sending through the partner's smarthost: the role writes no
    SPF record for partner.example (its primary is elsewhere), so include:partner.example is
    no loop (the review of session 37: the preflight refused it as one). The zone filter,
    which sees every host, refuses it only when a host of the run has that domain as its own
    (tests/unit/test_spf_terms.py)."""
    relay = {
        "pyqmail_control__relay_domains": ["partner.example"],
        "pyqmail_dns__spf_extra": ["include:partner.example"],
    }
    assert problems_of(relay) == []
    locals_ = [*DEFAULTS["pyqmail_control__locals"], "partner.example"]
    local = {**relay, "pyqmail_control__locals": locals_}
    assert problems_of(local) == [
        "pyqmail_dns__spf_extra[0]: 'include:partner.example' includes, in the SPF record of "
        "partner.example (pyqmail_control__locals), that record itself: a loop, which every "
        "receiver ends with permerror (RFC 7208 4.6.4)"
    ]


def test_mta_sts_enforce_passes_with_a_provided_certificate() -> None:
    provided = {
        "pyqmail_certificates__provided_cert": "/etc/letsencrypt/live/mx/cert.pem",
        "pyqmail_certificates__provided_key": "/etc/letsencrypt/live/mx/privkey.pem",
    }
    assert problems_of({"pyqmail_dns__mta_sts_mode": "enforce", **provided}) == []


def test_summary_prints_the_zone_and_the_check_command() -> None:
    spec = __import__("importlib.util").util.spec_from_file_location(
        "pyqmail_filters", REPO / "filter_plugins" / "pyqmail.py"
    )
    main = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(main)
    facts = {
        "kinds": {},
        "host": "h",
        "me": "h",
        "listen_ip": "192.0.2.1",
        "config_dir": "/etc",
        "dns": {"path": "/a/h/dns.zone", "lines": ["; x", "h. 3600 IN A 192.0.2.1"]},
    }
    lines = main.services_summary([], facts)
    assert lines[-4:] == [
        "DNS records to publish (/a/h/dns.zone on the controller; check them with",
        "  pyqmail-dns check /a/h/dns.zone):",
        "  ; x",
        "  h. 3600 IN A 192.0.2.1",
    ]
    assert "DNS records" not in "\n".join(main.services_summary([], {**facts, "dns": {}}))
    checked = main.services_summary([], {**facts, "dns": {**facts["dns"], "written": False}})
    assert checked[-4].startswith("DNS records to publish (/a/h/dns.zone not written in check mode")


def host_vars(root: Path, **more: Any) -> dict[str, Any]:
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "pyqmail__root": str(root),
        "pyqmail_aliases__postmaster": "admin@example.org",
        # pyqmail_dkim__published is a fact of the role pyqmail_dkim in a real run; here the
        # inventory gives it, which the preflight would call a typo.
        "pyqmail__strict_variables": False,
        **more,
    }


def _dns_play(
    inventory: Path, artifacts: Path, playbook: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``playbook`` (a dns play) on ``inventory``'s hosts from the checkout, zones written
    under ``artifacts``; the exit status is the caller's to judge."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            str(inventory),
            "-e",
            f"pyqmail_dns__zone_dir={artifacts}",
            *args,
            str(playbook),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=ansible_env(),
        timeout=600,
        check=False,
    )


def test_role_writes_one_consistent_zone_per_host(tmp_path: Path) -> None:
    mx1_root, mx2_root, artifacts = tmp_path / "mx1", tmp_path / "mx2", tmp_path / "artifacts"
    (mx1_root / "control").mkdir(parents=True)
    mx2_root.mkdir()
    cert = servercert(mx1_root / "control" / "servercert.pem")
    hosts = {
        "mx1.example.org": host_vars(
            mx1_root,
            pyqmail__me="mx1.example.org",
            pyqmail__listen_ip="192.0.2.25",
            # explicit, so the host's own IPv6 default route (facts) does not show
            pyqmail_dns__ipv6=["2001:db8::25"],
            pyqmail_control__locals=["example.org"],
            pyqmail_dkim__published=DKIM,
        ),
        "mx2.example.org": host_vars(
            mx2_root,
            pyqmail__me="mx2.example.org",
            pyqmail__listen_ip="192.0.2.26",
            pyqmail_dns__ipv6=["2001:db8::26"],
            pyqmail_control__relay_domains=["example.org"],
            pyqmail_dns__backup_mx_priority=30,
        ),
    }
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"mailservers": {"hosts": hosts}}}}))
    proc = _dns_play(inventory, artifacts, REPO / "playbooks" / "dns.yml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    mx1 = (artifacts / "mx1.example.org" / "dns.zone").read_text()
    mx2 = (artifacts / "mx2.example.org" / "dns.zone").read_text()
    mx = [
        "example.org. 3600 IN MX 10 mx1.example.org.",
        "example.org. 3600 IN MX 30 mx2.example.org.",
    ]
    for text in (mx1, mx2):
        assert [
            line for line in text.splitlines() if line.startswith("example.org. 3600 IN MX")
        ] == mx
        spf = "v=spf1 ip4:192.0.2.25 ip4:192.0.2.26 ip6:2001:db8::25 ip6:2001:db8::26 -all"
        assert f'example.org. 3600 IN TXT "{spf}"' in text
        assert f's1-ed._domainkey.example.org. 3600 IN TXT "{ED_TXT}"' in text
    assert f"_25._tcp.mx1.example.org. 3600 IN TLSA 3 1 1 {openssl_311(cert)}" in mx1
    assert "; no TLSA: control/servercert.pem not there yet on mx2.example.org" in mx2
    assert "PRIVATE" not in proc.stdout
    summary = [
        t["hosts"]["mx1.example.org"]["ansible_facts"]["pyqmail_dns__summary"]
        for play in out["plays"]
        for t in play["tasks"]
        if t["task"]["name"].endswith("Hand the records to the summary")
        # Mitogen's strategy (ansible.cfg) may report a task once per host
        and "mx1.example.org" in t["hosts"]
    ]
    assert summary[0]["lines"] == mx1.splitlines()


def _run_dns(
    tmp_path: Path, extra: dict[str, Any], *args: str, play_vars: dict[str, Any] | None = None
) -> tuple[Any, Path]:
    """playbooks/dns.yml on mx1.a.example (a.example local) and mx2.b.example (b.example
    local), each with its own qmail root and ``extra`` as its pyqmail_dns__spf_extra in the
    inventory; with ``play_vars``, a play of the same role with these vars instead."""
    artifacts = tmp_path / "artifacts"
    hosts = {}
    for index, (host, terms) in enumerate(extra.items()):
        (tmp_path / host).mkdir(parents=True)
        hosts[host] = host_vars(
            tmp_path / host,
            pyqmail__me=host,
            pyqmail__listen_ip=f"192.0.2.{25 + index}",
            pyqmail_dns__ipv6=[],
            pyqmail_control__locals=[host.split(".", 1)[1]],
            pyqmail_dns__spf_extra=terms,
        )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"mailservers": {"hosts": hosts}}}}))
    playbook = REPO / "playbooks" / "dns.yml"
    if play_vars is not None:
        play = yaml.safe_load(playbook.read_text())
        play[0]["vars"] = play_vars
        playbook = tmp_path / "dns.yml"
        playbook.write_text(yaml.safe_dump(play))
    proc = _dns_play(inventory, artifacts, playbook, *args)
    try:
        return json.loads(proc.stdout), artifacts
    except json.JSONDecodeError as exc:
        raise AssertionError(f"no JSON:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}") from exc


def _failures(out: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """host -> (name of the task it failed in, its message)."""
    return {
        host: (task["task"]["name"], result["msg"])
        for play in out["plays"]
        for task in play["tasks"]
        for host, result in task["hosts"].items()
        if result.get("failed")
    }


SPF_LOOP = (
    "pyqmail_dns__spf_extra: an include loop across the SPF records a.example, b.example, "
    "which this run writes: that of a.example has 'include:b.example' (of mx1.a.example), that "
    "of b.example has 'include:a.example' (of mx2.b.example); a receiver that follows it, for "
    "any address these records do not list before it (the servers of an outside provider an "
    'include: is there for), ends with permerror (RFC 7208 4.6.4; pyspf: "Too many DNS '
    "lookups\"): drop one of these include: terms, or put the other host's ip4:/ip6: in place "
    "of its include:"
)
ZONE_TASK = "pyqmail.mail.pyqmail_dns : Compute the zone over every host of the run"


def _refused_in_the_zone(out: dict[str, Any], artifacts: Path) -> None:
    """Both hosts fail computing their zone, naming the whole loop; no zone file is written."""
    failed = _failures(out)
    assert sorted(failed) == ["mx1.a.example", "mx2.b.example"], failed
    for name, msg in failed.values():
        assert name == ZONE_TASK
        assert SPF_LOOP in msg
    assert not list(artifacts.glob("*/dns.zone"))


def test_an_include_loop_across_the_hosts_is_refused_before_any_record(tmp_path: Path) -> None:
    """mx1 puts include:b.example in the SPF of a.example, mx2 include:A.example in that of
    b.example: each host's preflight passes (it sees its own values only), and the zone
    filter, which has both hosts' pyqmail_dns_host results, refuses both zones, naming the
    loop; nothing is written."""
    extra = {"mx1.a.example": ["include:b.example"], "mx2.b.example": ["include:A.example"]}
    out, artifacts = _run_dns(tmp_path, extra)
    _refused_in_the_zone(out, artifacts)


def test_a_loop_through_a_hostvars_reference_is_refused_on_both_hosts(tmp_path: Path) -> None:
    """mx2's term names mx1's domain through hostvars: templated in mx2's own context it is
    include:a.example, a loop with mx1's include:b.example. The preflight of session 38 read
    mx2's variables from mx1's context, where hostvars[...] failed: mx2 was dropped there, so
    mx1 passed and wrote its looping include. Both are refused now."""
    extra = {
        "mx1.a.example": ["include:b.example"],
        "mx2.b.example": ["include:{{ hostvars['mx1.a.example'].pyqmail_control__locals[0] }}"],
    }
    out, artifacts = _run_dns(tmp_path, extra)
    _refused_in_the_zone(out, artifacts)


def test_play_vars_over_a_stale_inventory_value_pass(tmp_path: Path) -> None:
    """The inventory still holds mx2's old include:a.example (a loop with mx1's), but the play
    sets pyqmail_dns__spf_extra from spf_by_host, where mx2 includes _spf.c.example: what the
    run writes has no loop and must pass. The preflight of session 38 read mx2's inventory
    value from mx1's context (hostvars.raw_get has no play vars) and refused mx1."""
    extra = {"mx1.a.example": ["include:b.example"], "mx2.b.example": ["include:a.example"]}
    play_vars = {
        "spf_by_host": {
            "mx1.a.example": ["include:b.example"],
            "mx2.b.example": ["include:_spf.c.example"],
        },
        "pyqmail_dns__spf_extra": "{{ spf_by_host[inventory_hostname] }}",
    }
    out, artifacts = _run_dns(tmp_path, extra, play_vars=play_vars)
    assert _failures(out) == {}
    mx2 = (artifacts / "mx2.b.example" / "dns.zone").read_text()
    assert 'b.example. 3600 IN TXT "v=spf1 ip4:192.0.2.26 include:_spf.c.example -all"' in mx2
    mx1 = (artifacts / "mx1.a.example" / "dns.zone").read_text()
    assert 'a.example. 3600 IN TXT "v=spf1 ip4:192.0.2.25 include:b.example -all"' in mx1


def test_a_cross_include_without_a_way_back_passes(tmp_path: Path) -> None:
    """mx1's a.example includes b.example, whose record (mx2's) includes nothing of the run."""
    extra = {"mx1.a.example": ["include:b.example"], "mx2.b.example": ["include:_spf.c.example"]}
    out, artifacts = _run_dns(tmp_path, extra)
    assert _failures(out) == {}
    mx1 = (artifacts / "mx1.a.example" / "dns.zone").read_text()
    assert 'a.example. 3600 IN TXT "v=spf1 ip4:192.0.2.25 include:b.example -all"' in mx1
    mx2 = (artifacts / "mx2.b.example" / "dns.zone").read_text()
    assert 'b.example. 3600 IN TXT "v=spf1 ip4:192.0.2.26 include:_spf.c.example -all"' in mx2

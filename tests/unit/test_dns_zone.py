"""The zone the role pyqmail_dns writes (filter_plugins/pyqmail_dns.py): records, consistency
across hosts, and a clear error naming the variable for each bad value."""

from __future__ import annotations

import re

import dns.name
import dns.rdatatype
import dns.zone
import pytest
from ansible.errors import AnsibleFilterError

from tests.dnszone import ED_TXT, RSA_TXT, TLSA, example_hosts, filters, settings, zone


def records(text: str) -> dict[tuple[str, str], list[str]]:
    """(owner, type) -> record data, parsed by dnspython (owners must be absolute)."""
    parsed = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    out: dict[tuple[str, str], list[str]] = {}
    for owner, _ttl, rdata in parsed.iterate_rdatas():
        key = (owner.to_text(), dns.rdatatype.to_text(rdata.rdtype))
        value = b"".join(rdata.strings).decode() if key[1] == "TXT" else rdata.to_text()
        out.setdefault(key, []).append(value)
    return {k: sorted(v) for k, v in out.items()}


def block(text: str, domain: str) -> list[str]:
    """The lines of one domain's section."""
    lines = text.splitlines()
    start = lines.index(f"; --- {domain}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("; --- ")), None)
    return lines[start:end]


def test_mx1_has_every_record_of_its_domains_and_itself() -> None:
    got = records(zone())
    assert got["example.org.", "MX"] == ["10 mx1.example.org.", "20 mx2.example.org."]
    assert got["example.org.", "TXT"] == [
        "v=spf1 ip4:192.0.2.25 ip4:192.0.2.26 ip4:192.0.2.30 ip6:2001:db8::25 -all"
    ]
    assert got["s2026a-rsa._domainkey.example.org.", "TXT"] == [RSA_TXT]
    assert got["s2026a-ed._domainkey.example.org.", "TXT"] == [ED_TXT]
    assert got["_dmarc.example.org.", "TXT"] == [
        "v=DMARC1; p=none; rua=mailto:postmaster@example.org"
    ]
    assert got["_smtp._tls.example.org.", "TXT"] == [
        "v=TLSRPTv1; rua=mailto:postmaster@example.org"
    ]
    assert got["_mta-sts.example.org.", "TXT"][0].startswith("v=STSv1; id=")
    assert got["mx1.example.org.", "A"] == ["192.0.2.25"]
    assert got["mx1.example.org.", "AAAA"] == ["2001:db8::25"]
    assert got["_25._tcp.mx1.example.org.", "TLSA"] == [f"3 1 1 {TLSA}"]
    assert got["25.2.0.192.in-addr.arpa.", "PTR"] == ["mx1.example.org."]
    assert (
        "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
        "PTR",
    ) in got


def test_long_dkim_txt_is_split_into_255_byte_strings() -> None:
    line = next(x for x in zone().splitlines() if x.startswith("s2026a-rsa."))
    strings = line.split(" TXT ", 1)[1].split('" "')
    assert len(RSA_TXT) > 255 and len(strings) == 2
    assert len(strings[0].lstrip('"')) == 255


def test_every_host_has_the_same_records_for_a_shared_domain() -> None:
    """mx1 (primary), mx2 (backup) and submit (sends for it) publish one and the same set for
    example.org; submit.example.org is submit's alone."""
    mx1 = block(zone("mx1.example.org"), "example.org")
    assert mx1 == block(zone("mx2.example.org"), "example.org")
    assert mx1 == block(zone("submit.example.org"), "example.org")
    assert "; --- submit.example.org" not in zone("mx1.example.org")


def _tenants() -> list[dict[str, object]]:
    """Two unrelated domains in one inventory: a.example on mxa, b.example on mxb; mxb is also
    backup MX for c.example, whose primary is outside the run."""
    return [
        filters.dns_host(settings("mxa.example", ipv4=["192.0.2.1"], locals=["a.example"])),
        filters.dns_host(
            settings(
                "mxb.example",
                ipv4=["192.0.2.2"],
                ipv6=["2001:db8::2"],
                locals=["b.example"],
                relay_domains=["c.example"],
            )
        ),
    ]


def test_spf_and_mx_of_a_domain_name_only_the_hosts_serving_it() -> None:
    """Each domain's SPF names the hosts that serve it, not every host of the run: a.example's
    record must not authorize b.example's server (and the other way round)."""
    hosts = _tenants()
    a = records(filters.dns_zone(hosts, "mxa.example"))
    b = records(filters.dns_zone(hosts, "mxb.example"))
    assert a["a.example.", "TXT"] == ["v=spf1 ip4:192.0.2.1 -all"]
    assert a["a.example.", "MX"] == ["10 mxa.example."]
    assert b["b.example.", "TXT"] == ["v=spf1 ip4:192.0.2.2 ip6:2001:db8::2 -all"]
    assert b["b.example.", "MX"] == ["10 mxb.example."]
    assert ("b.example.", "TXT") not in a


def test_a_domain_only_backed_up_gets_its_backup_mx_as_a_comment_only() -> None:
    """c.example's primary is outside the run: publishing an MX set of the backup alone, an
    SPF naming none of its senders, DMARC and MTA-STS naming the backup would break its mail.
    The zone says which MX line to add to its existing set, and publishes nothing of it."""
    text = filters.dns_zone(_tenants(), "mxb.example")
    got = records(text)
    assert not [key for key in got if key[0].endswith("c.example.")]
    lines = block(text, "c.example")
    assert "; add to the domain's existing MX set (backup MX):" in lines
    assert ";   c.example. 3600 IN MX 20 mxb.example." in lines
    assert not any("spf1" in x or "DMARC" in x or "STSv1" in x or "TLSRPT" in x for x in lines)


def test_a_domain_sent_for_but_served_elsewhere_gets_an_spf_hint() -> None:
    """A host sending for a domain whose primary is elsewhere (pyqmail_dns__send_domains):
    its addresses are what the domain's own SPF needs added."""
    hosts = [
        filters.dns_host(settings("out.example", ipv4=["192.0.2.9"], send_domains=["d.example"]))
    ]
    lines = block(filters.dns_zone(hosts, "out.example"), "d.example")
    assert "; add to the domain's existing SPF record: ip4:192.0.2.9" in lines


def test_priorities_come_from_the_inventory_of_each_host() -> None:
    got = records(zone("mx2.example.org", mx_priority=5))
    assert got["example.org.", "MX"] == ["20 mx2.example.org.", "5 mx1.example.org."]


def test_no_mx_and_no_tlsa_for_a_host_without_port_25() -> None:
    text = zone("submit.example.org")
    got = records(text)
    assert ("submit.example.org.", "MX") not in got
    assert not any(t == "TLSA" for _, t in got)
    assert "no host of this run receives mail for submit.example.org" in text


def test_policy_variables_and_an_outside_report_address() -> None:
    common = {"spf_all": "~all", "dmarc_policy": "reject", "dmarc_rua": "dmarc@reports.example.net"}
    text = zone(common=common)
    got = records(text)
    assert got["example.org.", "TXT"][0].endswith(" ~all")
    assert got["_dmarc.example.org.", "TXT"] == [
        "v=DMARC1; p=reject; rua=mailto:dmarc@reports.example.net"
    ]
    # RFC 7489 7.1: the report domain says it accepts reports for example.org.
    assert got["example.org._report._dmarc.reports.example.net.", "TXT"] == ["v=DMARC1"]
    assert got["_smtp._tls.example.org.", "TXT"] == [
        "v=TLSRPTv1; rua=mailto:dmarc@reports.example.net"
    ]


def test_mta_sts_id_changes_with_the_policy_only() -> None:
    def sts_id(common: dict[str, object] | None = None, **mx1: object) -> str:
        return records(zone("mx1.example.org", common, **mx1))["_mta-sts.example.org.", "TXT"][0]

    assert sts_id() == sts_id()
    assert sts_id() == sts_id(mx_priority=5)  # the policy lists the MX hosts, not priorities
    assert sts_id() != sts_id({"mta_sts_mode": "enforce"})
    assert sts_id() != sts_id({"mta_sts_max_age": 86400})
    assert sts_id() != sts_id(receives=False)  # mx1 leaves the MX set


def test_addresses_from_the_listen_ip_else_the_facts() -> None:
    facts4, facts6 = {"address": "198.51.100.7"}, {"address": "2001:db8::7"}
    assert filters.host_addresses("192.0.2.25", facts4, {}, [], []) == {
        "ipv4": ["192.0.2.25"],
        "ipv6": [],
    }
    assert filters.host_addresses("0.0.0.0", facts4, facts6, [], []) == {
        "ipv4": ["198.51.100.7"],
        "ipv6": ["2001:db8::7"],
    }
    assert filters.host_addresses("::", {}, {}, [], ["2001:db8::1"]) == {
        "ipv4": [],
        "ipv6": ["2001:db8::1"],
    }


def test_each_family_on_its_own() -> None:
    """A host listening on one IPv4 address (the role default: the default route's) still
    sends over IPv6: its IPv6 default-route address is published too; an explicit IPv4 list
    leaves IPv6 to the listen address or the facts, and the other way round."""
    facts4, facts6 = {"address": "198.51.100.7"}, {"address": "2001:db8::7"}
    assert filters.host_addresses("192.0.2.25", facts4, facts6, [], []) == {
        "ipv4": ["192.0.2.25"],
        "ipv6": ["2001:db8::7"],
    }
    assert filters.host_addresses("0.0.0.0", facts4, facts6, ["192.0.2.9"], []) == {
        "ipv4": ["192.0.2.9"],
        "ipv6": ["2001:db8::7"],
    }
    assert filters.host_addresses("2001:db8::25", facts4, facts6, [], []) == {
        "ipv4": ["198.51.100.7"],
        "ipv6": ["2001:db8::25"],
    }
    assert filters.host_addresses("192.0.2.25", facts4, facts6, [], ["2001:db8::9"]) == {
        "ipv4": ["192.0.2.25"],
        "ipv6": ["2001:db8::9"],
    }
    # link-local and ULA default routes are no address the internet sees
    for local in ("fe80::1", "fd00::7"):
        got = filters.host_addresses("192.0.2.25", facts4, {"address": local}, [], [])
        assert got == {"ipv4": ["192.0.2.25"], "ipv6": []}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"dmarc_policy": "strict"}, "pyqmail_dns__dmarc_policy: 'strict' is not one of none"),
        ({"spf_all": "+all"}, "pyqmail_dns__spf_all: '+all' is not one of -all, ~all"),
        ({"dmarc_rua": "postmaster"}, "pyqmail_dns__dmarc_rua: 'postmaster' is not a mail address"),
        ({"tlsrpt_rua": "a b@x"}, "pyqmail_dns__tlsrpt_rua: 'a b@x' is not a mail address"),
        ({"mx_priority": 70000}, "pyqmail_dns__mx_priority: 70000 is out of range: must be from 0"),
        ({"backup_mx_priority": -1}, "pyqmail_dns__backup_mx_priority: -1 is out of range"),
        ({"ipv4": ["2001:db8::1"]}, "pyqmail_dns__ipv4[0]: '2001:db8::1' is not an IPv4 address"),
        (
            {"dkim": [{"domain": "example.org", "selector": "bad sel", "txt": ED_TXT}]},
            "pyqmail_dkim__published[0].selector: 'bad sel' is not a DNS label",
        ),
    ],
)
def test_bad_input_names_the_variable(over: dict[str, object], message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=re.escape(message)):
        filters.dns_host(settings("mx1.example.org", **over))


def test_hosts_that_disagree_on_a_domain_setting_fail() -> None:
    hosts = example_hosts()
    hosts[1] = filters.dns_host(
        {**settings("mx2.example.org"), "relay_domains": ["example.org"], "dmarc_policy": "reject"}
    )
    with pytest.raises(AnsibleFilterError, match=r"dmarc_policy: the hosts serving example.org"):
        filters.dns_zone(hosts, "mx1.example.org")


def test_hosts_left_out_of_the_run_are_named() -> None:
    """With --limit, the records of the hosts left out are missing: the file says which."""
    hosts = example_hosts()[:1]
    text = filters.dns_zone(hosts, "mx1.example.org", ["mx1.example.org", "mx2.example.org"])
    assert "; not in this run (its MX/SPF/DKIM are missing here): mx2.example.org" in text
    assert records(text)["example.org.", "MX"] == ["10 mx1.example.org."]


OTHER_ED = "v=DKIM1; k=ed25519; p=AAAAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHU999="


def _signing_submit(dkim: list[dict[str, str]]) -> list[dict[str, object]]:
    """The example hosts, submit signing example.org too (a local domain of its own)."""
    hosts = example_hosts()
    hosts[2] = filters.dns_host(
        settings(
            "submit.example.org", ipv4=["192.0.2.30"], receives=False, tlsa="",
            locals=["example.org"], dkim=dkim,
        )
    )  # fmt: skip
    return hosts


def test_one_selector_with_two_keys_fails_naming_domain_selector_and_hosts() -> None:
    """Two hosts that made keys under one prefix on the same day: two TXT records at one name
    make every verifier fail (OpenDKIM: 'multiple keys found'). The zone refuses it."""
    clash = [{"domain": "example.org", "selector": "s2026a-ed", "txt": OTHER_ED}]
    hosts = _signing_submit(clash)
    for host in ("mx1.example.org", "mx2.example.org", "submit.example.org"):
        with pytest.raises(AnsibleFilterError) as caught:
            filters.dns_zone(hosts, host)
        message = str(caught.value)
        assert message.startswith("DKIM selector s2026a-ed of example.org has different keys")
        assert "mx1.example.org: p=..." in message and "submit.example.org: p=..." in message
        assert "two TXT records at s2026a-ed._domainkey.example.org" in message
        assert "pyqmail_dkim__selector_prefix" in message


def test_selectors_of_their_own_or_one_shared_key_pass() -> None:
    own = [{"domain": "example.org", "selector": "submit-20261202-ed25519", "txt": OTHER_ED}]
    got = records(filters.dns_zone(_signing_submit(own), "mx1.example.org"))
    assert got["s2026a-ed._domainkey.example.org.", "TXT"] == [ED_TXT]
    assert got["submit-20261202-ed25519._domainkey.example.org.", "TXT"] == [OTHER_ED]
    same = [{"domain": "example.org", "selector": "s2026a-ed", "txt": ED_TXT}]  # copied key
    got = records(filters.dns_zone(_signing_submit(same), "submit.example.org"))
    assert got["s2026a-ed._domainkey.example.org.", "TXT"] == [ED_TXT]


def test_one_hosts_own_records_with_two_keys_for_a_selector_fail() -> None:
    dkim = [
        {"domain": "example.org", "selector": "s1", "txt": ED_TXT},
        {"domain": "example.org", "selector": "s1", "txt": OTHER_ED},
    ]
    with pytest.raises(AnsibleFilterError, match=r"DKIM selector s1 of example.org has different"):
        filters.dns_host(settings("mx1.example.org", dkim=dkim))


def _smarthost(**over: object) -> list[dict[str, object]]:
    """One host that sends through a relay (pyqmail_dns__sends: false, the README's advice)."""
    base = {"ipv4": ["192.0.2.1"], "locals": ["a.example"], "sends": False, **over}
    return [filters.dns_host(settings("mxa.example", **base))]


def test_a_smarthost_gives_its_relay_terms_to_the_spf() -> None:
    """The relay's include: goes into the domain's SPF (and the host name's), so check can
    find the record published; the host's own address is not in it (it does not send)."""
    hosts = _smarthost(spf_extra=["include:_spf.relay.example", "ip4:198.51.100.0/24"])
    got = records(filters.dns_zone(hosts, "mxa.example"))
    spf = "v=spf1 include:_spf.relay.example ip4:198.51.100.0/24 -all"
    assert got["a.example.", "TXT"] == [spf]
    assert got["mxa.example.", "TXT"] == [spf]


def test_no_sender_known_is_a_comment_not_minus_all() -> None:
    """'v=spf1 -all' says nobody may send: with no address and no relay term the zone says to
    publish one's own SPF instead of a record that fails all of the domain's mail."""
    text = filters.dns_zone(_smarthost(), "mxa.example")
    got = records(text)
    assert ("a.example.", "TXT") not in got and ("mxa.example.", "TXT") not in got
    assert "; no sender known for a.example: publish your own SPF record" in text
    assert "-all" not in text


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        (["~include:x.example"], "spf_extra[0]: '~include:x.example' has a qualifier"),
        (["all"], "spf_extra[0]: 'all' is not an SPF term"),
        (["redirect=_spf.x.example"], "spf_extra[0]: 'redirect=_spf.x.example' is not an SPF"),
        (["ptr"], "spf_extra[0]: 'ptr' is not an SPF term"),
        (["ip4:2001:db8::1"], "spf_extra[0]: 'ip4:2001:db8::1' is not ip4:<IPv4 address"),
        (
            [f"include:s{i}.example" for i in range(11)],
            "pyqmail_dns__spf_extra: 11 terms that need a DNS lookup",
        ),
    ],
)
def test_bad_spf_terms_name_the_variable(terms: list[str], message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=re.escape(message)):
        filters.dns_host(settings("mx1.example.org", spf_extra=terms))


def test_spf_terms_accepted() -> None:
    terms = ["a", "mx", "a:out.example/24", "mx:x.example//64", "exists:%{i}._spf.x.example"]
    assert filters.dns_host(settings("h.example", spf_extra=terms))["spf_extra"] == terms


def test_more_than_ten_lookups_over_the_hosts_of_a_domain_fail() -> None:
    """Each host within the limit, their sum in the domain's SPF over it: a permerror at
    every receiver, so the zone refuses it naming the hosts and the domain."""
    hosts = [
        filters.dns_host(
            settings(
                f"mx{n}.example",
                locals=["a.example"],
                spf_extra=[f"include:s{n}-{i}.example" for i in range(6)],
            )
        )
        for n in (1, 2)
    ]
    with pytest.raises(AnsibleFilterError) as caught:
        filters.dns_zone(hosts, "mx1.example")
    message = str(caught.value)
    assert message.startswith(
        "pyqmail_dns__spf_extra of mx1.example, mx2.example: the SPF of a.example would have 12"
    )
    assert "RFC 7208 4.6.4" in message


def test_tlsa_comment_says_kept_only_for_generated_certificates() -> None:
    generated = zone("mx1.example.org")
    assert "; DANE: needs DNSSEC on this zone; the generated key is kept across renewals" in (
        generated
    )
    provided = zone("mx1.example.org", tlsa_provided=True)
    assert "kept across renewals" not in provided
    assert "this record changes whenever the provided key" in provided
    assert "Publish the next" in provided and "RFC 7671 8.1" in provided


def test_the_zone_says_where_the_mta_sts_policy_is_served_and_prints_it() -> None:
    lines = block(zone(), "example.org")
    at = lines.index("; MTA-STS: serve this at https://mta-sts.example.org/.well-known/mta-sts.txt")
    assert "mta-sts.example.org needs an A/AAAA or CNAME" in lines[at + 1]
    assert lines[at + 2 : at + 7] == [
        ";   version: STSv1",
        ";   mode: testing",
        ";   mx: mx1.example.org",
        ";   mx: mx2.example.org",
        ";   max_age: 604800",
    ]


def test_an_address_the_listeners_do_not_take_is_explained() -> None:
    """pyqmail-smtpd listens on one family (pyqmail__listen_ip; "::" is IPv6 only): the other
    family's address is published for the PTR of the mail sent from it, with a comment that
    senders trying it fall back; a host listening on both families' addresses gets none."""
    host = filters.dns_host(
        settings(
            "mx1.example.org",
            ipv4=["192.0.2.25"],
            ipv6=["2001:db8::25"],
            listen_ip="192.0.2.25",
        )
    )
    text = filters.dns_zone([host], "mx1.example.org")
    assert "; 2001:db8::25: mail is sent from it, but the listeners take IPv4 only" in text
    assert "192.0.2.25: mail is sent from it" not in text
    assert records(text)[("mx1.example.org.", "AAAA")] == ["2001:db8::25"]
    six = filters.dns_host(
        settings("mx1.example.org", ipv4=["192.0.2.25"], ipv6=["2001:db8::25"], listen_ip="::")
    )
    assert "; 192.0.2.25: mail is sent from it, but the listeners take IPv6 only" in (
        filters.dns_zone([six], "mx1.example.org")
    )

# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the role pyqmail_dns: the DNS records a host's mail needs, as a zone file.

Why Python and not Jinja: the records of a domain come from several hosts (every MX host of
the domain, every sending host in its SPF, every host's DKIM selectors), must be the same in
every host's file, and each bad value must fail naming its variable. A DKIM selector that two
hosts publish with different keys fails naming the domain, the selector and the hosts: the zone
would hold two TXT records at one name, and verifiers fail both. Pure functions; the role
hands each host's own settings (``pyqmail_dns_host``) and then all hosts' (``pyqmail_dns_zone``).

The zone file has fully qualified owners (one file may span several zones: the mail domains,
the host's own zone and the reverse zones), explicit TTLs, and the records only a provider can
set (PTR) as records in the reverse name, marked by a comment. ``pyqmail-dns check`` reads it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_spf import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    MAX_LOOKUPS,
    include_loops,
    lookups,
    self_include,
    term_problem,
    too_many,
)

V = "pyqmail_dns__"
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"({_LABEL}\.)*{_LABEL}\Z")
ADDRESS_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+\Z")
SELECTOR_RE = re.compile(rf"({_LABEL}\.)*{_LABEL}\Z")
HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
CHOICES = {
    "spf_all": ("-all", "~all"),
    "dmarc_policy": ("none", "quarantine", "reject"),
    "mta_sts_mode": ("none", "testing", "enforce"),
}
RANGES = {
    "mx_priority": (0, 65535),
    "backup_mx_priority": (0, 65535),
    "ttl": (60, 604800),
    "mta_sts_max_age": (86400, 31557600),
}
# Settings of a domain, not of a host: every host that serves the domain must agree.
DOMAIN_SETTINGS = (
    "ttl",
    "spf_all",
    "dmarc_policy",
    "dmarc_rua",
    "tlsrpt_rua",
    "mta_sts_mode",
    "mta_sts_max_age",
)


def _fail(message: str) -> AnsibleFilterError:
    return AnsibleFilterError(message)


def _domain(value: Any, where: str) -> str:
    """A domain name, lower case, without a trailing dot."""
    text = str(value).lower().rstrip(".") if isinstance(value, str) else ""
    if not DOMAIN_RE.match(text) or len(text) > 253:
        raise _fail(f"{where}: {value!r} is not a domain name")
    return text


def _int(value: Any, key: str) -> int:
    """An integer setting within its range, or an error naming ``pyqmail_dns__<key>``."""
    low, high = RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(f"{V}{key}: {value!r} is not an integer")
    try:
        number = int(value)
    except ValueError:
        raise _fail(f"{V}{key}: {value!r} is not an integer") from None
    if not low <= number <= high:
        raise _fail(f"{V}{key}: {number} is out of range: must be from {low} to {high}")
    return number


def _choice(value: Any, key: str) -> str:
    if value not in CHOICES[key]:
        raise _fail(f"{V}{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return str(value)


def _address(value: Any, key: str) -> str:
    """A report address (``user@domain``; ``mailto:`` accepted); "" = the default."""
    text = str(value).removeprefix("mailto:") if isinstance(value, str) else None
    if text is None or (text and not ADDRESS_RE.match(text)):
        raise _fail(f"{V}{key}: {value!r} is not a mail address (user@domain)")
    return text


def _addresses(value: Any, key: str, version: int) -> list[str]:
    """A list of IPv4 (``version`` 4) or IPv6 addresses, as ipaddress prints them."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _fail(f"{V}{key}: must be a list of IPv{version} addresses")
    out = []
    for index, item in enumerate(value):
        try:
            address = ipaddress.ip_address(str(item))
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise _fail(f"{V}{key}[{index}]: {item!r} is not an IPv{version} address")
        out.append(str(address))
    return out


def _fact_address(fact: Any, version: int) -> list[str]:
    """The address of a default-route fact (ansible_default_ipv4/ipv6), or []. An IPv6 one
    counts only when global unicast (2000::/3, RFC 4291 2.4): a host with only a link-local
    or ULA address sends no mail over IPv6 to the internet."""
    text = fact.get("address") if isinstance(fact, Mapping) else None
    try:
        address = ipaddress.ip_address(str(text)) if text else None
    except ValueError:
        return []
    if address is None or address.version != version:
        return []
    if version == 6 and address not in GLOBAL_UNICAST:
        return []
    return [str(address)]


def host_addresses(
    listen_ip: Any, default_ipv4: Any, default_ipv6: Any, ipv4: Any, ipv6: Any
) -> dict[str, list[str]]:
    """The host's public addresses, each family on its own: pyqmail_dns__ipv4/ipv6 when set,
    else the listen address (pyqmail__listen_ip, what the listeners bind to) when it is of that
    family and not a wildcard, else the address of that family's default route from the facts.

    Each family on its own because pyqmail-send delivers over both (it looks up A and AAAA and
    binds no source address): a host listening on one IPv4 address still sends over IPv6 when
    it has a route, and that mail needs the IPv6 address in SPF, an AAAA and a PTR."""
    out = {"ipv4": _addresses(ipv4, "ipv4", 4), "ipv6": _addresses(ipv6, "ipv6", 6)}
    try:
        listen = ipaddress.ip_address(str(listen_ip).strip("[]"))
    except ValueError:
        listen = None
    for version, fact in ((4, default_ipv4), (6, default_ipv6)):
        key = f"ipv{version}"
        if out[key]:
            continue
        if listen is not None and listen.version == version and not listen.is_unspecified:
            out[key] = [str(listen)]
        else:
            out[key] = _fact_address(fact, version)
    return out


def spf_extra(value: Any) -> list[str]:
    """pyqmail_dns__spf_extra: SPF terms added to the SPF of the domains the host sends for and
    of its own name (a smarthost's ``include:``), checked as the preflight checks them."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _fail(f"{V}spf_extra: must be a list of SPF terms (include:..., ip4:...)")
    out: list[str] = []
    for index, term in enumerate(value):
        problem = term_problem(term)
        if problem:
            raise _fail(f"{V}spf_extra[{index}]: {term!r} {problem}")
        if str(term).lower() not in out:
            out.append(str(term).lower())
    if lookups(out) > MAX_LOOKUPS:
        raise _fail(f"{V}spf_extra: {too_many(lookups(out))}")
    return out


def _no_self_include(host: Mapping[str, Any], terms: Sequence[Any]) -> None:
    """No term includes a record it is put in: the SPF of the host's name and of each domain
    it receives, sends or signs for (an include:-loop is a permerror). A domain it is only
    backup MX for gets a record only if another host of the run has it as its own: the zone
    checks that (``_no_include_of``); include: of it is otherwise how a backup MX sends
    through the partner's smarthost."""
    named = [("pyqmail__me", [host["me"]]), ("pyqmail_control__locals", host["locals"])]
    named += [(f"{V}send_domains", host["send_domains"])]
    named += [("pyqmail_dkim__domains", [d["domain"] for d in host["dkim"]])]
    own: dict[str, str] = {}
    for key, domains in named:
        for domain in domains:
            own.setdefault(domain, key)
    for index, term in enumerate(terms):
        problem = self_include(term, own)
        if problem:
            raise _fail(f"{V}spf_extra[{index}]: {term!r} {problem}")


def _no_include_of(serving: list[dict[str, Any]], domain: str) -> None:
    """No host's term includes the SPF record of ``domain`` that the run writes (a host has it
    as its own) and that gets the terms of every host serving it: a backup MX's include: of
    the domain it relays for is a loop once a host of the run writes that domain's record."""
    primary = sorted(h["host"] for h in serving if _primary(h, domain))
    where = f"which this run writes, as {', '.join(primary)} has it as its own domain"
    for h in serving:
        for term in h["spf_extra"]:
            problem = self_include(term, {domain: where})
            if problem:
                raise _fail(f"{V}spf_extra of {h['host']}: {term!r} {problem}")


def _spf_records(hosts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The SPF records the run's zone files hold, as ``domain_records`` and ``host_records``
    write them: domain -> ``terms`` (host -> its spf_extra, each host the record gets terms
    of) and ``writers`` (the hosts whose zone holds it). A mail domain's record is in the zone
    of every host serving it (``_zone_domains``), with their terms, when one of them has it as
    its own (``_primary``; else ``_foreign_domain`` writes comments only); a host's name gets
    its own terms (``_names_own_spf``). One pass over the hosts: linear in them."""
    records: dict[str, dict[str, Any]] = {}
    primary: set[str] = set()

    def add(domain: str, h: dict[str, Any]) -> None:
        record = records.setdefault(domain, {"terms": {}, "writers": set()})
        record["terms"][h["host"]] = h["spf_extra"]
        record["writers"].add(h["host"])

    for h in hosts:
        domains = _zone_domains(h)
        primary |= {d for d in domains if _primary(h, d)}
        for domain in domains:
            add(domain, h)
    records = {d: r for d, r in records.items() if d in primary}
    for h in hosts:  # the record of a host's name, when its zone writes one (host_records)
        if _names_own_spf(h, _zone_domains(h)) and _spf([h], h["spf_all"], h["me"]) is not None:
            add(h["me"], h)
    return records


def _no_include_loop(hosts: list[dict[str, Any]], host: str) -> None:
    """No SPF record of ``host``'s zone is on an include: loop across the records the run
    writes (a.example includes b.example, whose record, in another host's zone, includes
    a.example). Here, not in the preflight: only the zone filter has every host's values as
    that host templated them (play vars, role vars, ``hostvars[...]``)."""
    problems = [m for writers, m in include_loops(_spf_records(hosts)) if host in writers]
    if problems:
        raise _fail("\n".join(problems))


def dkim_records(published: Any, where: str = "pyqmail_dkim__published") -> list[dict[str, str]]:
    """The published DKIM selectors (the pyqmail_dkim role's fact), checked."""
    if published is None or published == "":
        return []
    if isinstance(published, (str, Mapping)) or not isinstance(published, Sequence):
        raise _fail(f"{where}: must be a list of {{domain, selector, txt}}")
    out = []
    for index, item in enumerate(published):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            raise _fail(f"{at}: must be a dict with domain, selector and txt")
        selector = str(item.get("selector", "")).lower()
        if not SELECTOR_RE.match(selector):
            raise _fail(f"{at}.selector: {item.get('selector')!r} is not a DNS label")
        txt = item.get("txt")
        if not isinstance(txt, str) or not txt.startswith("v=DKIM1"):
            raise _fail(f"{at}.txt: must be the record text, starting with v=DKIM1")
        out.append(
            {
                "domain": _domain(item.get("domain"), f"{at}.domain"),
                "selector": selector,
                "txt": txt,
            }
        )
    return out


def _listen_version(listen_ip: Any) -> int:
    """The one address family the listeners accept (pyqmail__listen_ip: pyqmail-smtpd binds
    ``::`` with IPV6_V6ONLY, so even the IPv6 wildcard takes no IPv4); 0 when not given."""
    try:
        return ipaddress.ip_address(str(listen_ip or "").strip("[]")).version
    except ValueError:
        return 0


def dns_host(settings: Mapping[str, Any]) -> dict[str, Any]:
    """One host's part of the records, checked: its name, addresses, domains it receives for,
    whether it sends, its DKIM selectors, TLSA data and its settings of the domain records.

    ``settings`` keys: host, me, ipv4, ipv6 (from host_addresses), locals, relay_domains,
    send_domains, receives (listens on port 25), listen_ip (pyqmail__listen_ip), sends,
    spf_extra, dkim, tlsa (hex or ""), tlsa_provided (the certificate is
    pyqmail_certificates__provided_*), and the pyqmail_dns__ settings mx_priority,
    backup_mx_priority, ttl, spf_all, dmarc_policy, dmarc_rua, tlsrpt_rua, mta_sts_mode,
    mta_sts_max_age.
    """
    s = settings
    tlsa = str(s.get("tlsa") or "").lower()
    if tlsa and not HEX64_RE.match(tlsa):
        raise _fail(f"TLSA data of {s['host']}: {tlsa!r} is not a SHA-256 in hex")
    out: dict[str, Any] = {
        "host": str(s["host"]),
        "me": _domain(s["me"], "pyqmail__me"),
        "ipv4": _addresses(s.get("ipv4") or [], "ipv4", 4),
        "ipv6": _addresses(s.get("ipv6") or [], "ipv6", 6),
        "locals": sorted({_domain(d, "pyqmail_control__locals") for d in s.get("locals") or []}),
        "relay_domains": sorted(
            {_domain(d, "pyqmail_control__relay_domains") for d in s.get("relay_domains") or []}
        ),
        "send_domains": sorted(
            {_domain(d, f"{V}send_domains") for d in s.get("send_domains") or []}
        ),
        "receives": bool(s.get("receives")),
        "listen_version": _listen_version(s.get("listen_ip")),
        "sends": bool(s.get("sends", True)),
        "spf_extra": spf_extra(s.get("spf_extra") or []),
        "dkim": dkim_records(s.get("dkim")),
        "tlsa": tlsa,
        "tlsa_provided": bool(s.get("tlsa_provided")),
    }
    _no_self_include(out, s.get("spf_extra") or [])
    for domain in sorted({d["domain"] for d in out["dkim"]}):
        _dkim_keys([out], domain)  # one host's own records, checked as the zone will
    for key in RANGES:
        out[key] = _int(s.get(key), key)
    for key in CHOICES:
        out[key] = _choice(s.get(key), key)
    out["dmarc_rua"] = _address(s.get("dmarc_rua", ""), "dmarc_rua")
    out["tlsrpt_rua"] = _address(s.get("tlsrpt_rua", ""), "tlsrpt_rua")
    return out


def txt_rdata(text: str) -> str:
    """TXT record data: quoted character strings of at most 255 bytes each (RFC 1035 3.3.14)."""
    raw = text.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join(
        '"' + c.decode("ascii", "replace").replace("\\", "\\\\").replace('"', '\\"') + '"'
        for c in chunks
    )


def _domain_setting(hosts: list[dict[str, Any]], domain: str, key: str) -> Any:
    """A domain-wide setting of the hosts serving ``domain``: they must agree."""
    seen = {h["host"]: h[key] for h in hosts}
    values = set(seen.values())
    if len(values) > 1:
        shown = ", ".join(f"{host}: {value!r}" for host, value in sorted(seen.items()))
        raise _fail(
            f"{V}{key}: the hosts serving {domain} disagree ({shown}); set it once "
            "for them all (group_vars)"
        )
    return values.pop()


def mta_sts_policy(mode: str, mx: list[str], max_age: int) -> str:
    """The MTA-STS policy file (RFC 8461 3.2) for the domain's MX hosts."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "".join(f"{line}\r\n" for line in lines)


def _mx_set(hosts: list[dict[str, Any]], domain: str) -> list[tuple[int, str]]:
    """(priority, host name) of every host that receives ``domain`` on port 25."""
    out = set()
    for h in hosts:
        if not h["receives"]:
            continue
        if domain in h["locals"]:
            out.add((h["mx_priority"], h["me"]))
        elif domain in h["relay_domains"]:
            out.add((h["backup_mx_priority"], h["me"]))
    return sorted(out)


def _sender_terms(hosts: list[dict[str, Any]]) -> list[str]:
    """The ip4:/ip6: terms of the sending hosts among ``hosts``."""
    return sorted({f"ip{v}:{a}" for h in hosts if h["sends"] for v in (4, 6) for a in h[f"ipv{v}"]})


def _spf(hosts: list[dict[str, Any]], qualifier: str, what: str) -> str | None:
    """The SPF record naming the sending ``hosts``' addresses and every host's
    pyqmail_dns__spf_extra terms; None when there is none (no address known, or the hosts
    send through a relay and give no term of it): "-all" then would fail all of the mail.
    More than 10 lookups in all fails naming ``what`` and the hosts."""
    extra = sorted({t for h in hosts for t in h["spf_extra"]})
    terms = _sender_terms(hosts) + [t for t in extra if t not in _sender_terms(hosts)]
    if lookups(terms) > MAX_LOOKUPS:
        names = ", ".join(sorted(h["host"] for h in hosts if h["spf_extra"]))
        raise _fail(
            f"{V}spf_extra of {names}: the SPF of {what} would have {too_many(lookups(terms))}"
        )
    return " ".join(["v=spf1", *terms, qualifier]) if terms else None


def _spf_lines(owner: str, ttl: int, spf: str | None) -> list[str]:
    """The SPF record of ``owner``, or a comment saying to publish one's own."""
    if spf is not None:
        return [_rr(owner, ttl, "TXT", txt_rdata(spf))]
    return [
        f"; no sender known for {owner}: publish your own SPF record naming the servers its "
        f"mail leaves from (or set {V}ipv4/ipv6, or {V}spf_extra with the relay's include:)"
    ]


def _rr(owner: str, ttl: int, rtype: str, data: str) -> str:
    return f"{owner}. {ttl} IN {rtype} {data}"


def _zone_domains(host: dict[str, Any]) -> list[str]:
    """The mail domains ``host`` receives, relays, sends or signs for: its zone holds their
    records, its settings count for them, and its addresses are in their SPF."""
    signs = (d["domain"] for d in host["dkim"])
    return sorted({*host["locals"], *host["relay_domains"], *host["send_domains"], *signs})


def _serves(host: dict[str, Any], domain: str) -> bool:
    """Whether ``domain`` is one of ``host``'s (``_zone_domains``)."""
    return domain in _zone_domains(host)


def _names_own_spf(me: dict[str, Any], domains: list[str]) -> bool:
    """Whether the host's zone has an SPF record of its name with its terms alone: when the
    name is none of its mail ``domains`` (else that domain's record is the one)."""
    return me["me"] not in domains


def _primary(host: dict[str, Any], domain: str) -> bool:
    """Whether ``domain`` is ``host``'s own (a local domain, or one it signs for): then the run
    knows the domain's whole mail and writes all its records. A domain that hosts of the run
    are only backup MX for (pyqmail_control__relay_domains) or send for
    (pyqmail_dns__send_domains) has its primary elsewhere, with its own records."""
    return domain in host["locals"] or any(d["domain"] == domain for d in host["dkim"])


def _clash(domain: str, selector: str, by_txt: Mapping[str, set[str]]) -> AnsibleFilterError:
    """The error for one selector published with different keys (``by_txt``: key -> hosts)."""
    shown = "; ".join(
        f"{', '.join(sorted(hosts))}: p=...{txt[-12:]}" for txt, hosts in sorted(by_txt.items())
    )
    return _fail(
        f"DKIM selector {selector} of {domain} has different keys ({shown}): two TXT "
        f"records at {selector}._domainkey.{domain} make verifiers fail every signature "
        "made with it. Each host makes its own keys: give each host its own "
        "pyqmail_dkim__selector_prefix (the default is the host's short name), and on all "
        f"hosts but one move <pyqmail__root>/control/dkim/{domain}/ away so the next run "
        "makes keys under the new prefix"
    )


def _dkim_keys(hosts: list[dict[str, Any]], domain: str) -> list[tuple[str, str]]:
    """(selector, TXT) of every DKIM key of ``domain`` the hosts publish. One selector with
    two different keys (two hosts that made keys under the same prefix on the same day) is an
    error naming the hosts: published both, neither verifies."""
    seen: dict[str, dict[str, set[str]]] = {}
    for h in hosts:
        for d in h["dkim"]:
            if d["domain"] == domain:
                seen.setdefault(d["selector"], {}).setdefault(d["txt"], set()).add(h["host"])
    for selector, by_txt in sorted(seen.items()):
        if len(by_txt) > 1:
            raise _clash(domain, selector, by_txt)
    return [(selector, txt) for selector, by_txt in sorted(seen.items()) for txt in by_txt]


def _foreign_domain(serving: list[dict[str, Any]], domain: str, ttl: int) -> list[str]:
    """A domain whose primary is outside the run: only what the run adds to the domain's
    existing records, as comments. Its own MX set, SPF, DMARC and MTA-STS are not known here,
    and a record set naming only this run's hosts would send its mail to the backup MX and
    fail the SPF of its real senders."""
    out = [
        f"; {domain}: no host of this run has it as a local domain (its primary is elsewhere);",
        "; publish none of its records from here, only add these to the ones it has:",
    ]
    mx = _mx_set(serving, domain)
    if mx:
        out.append("; add to the domain's existing MX set (backup MX):")
        out += [f";   {_rr(domain, ttl, 'MX', f'{prio} {name}.')}" for prio, name in mx]
    senders = [h for h in serving if domain in h["send_domains"]]
    terms = _sender_terms(senders) + sorted({t for h in senders for t in h["spf_extra"]})
    if terms:
        out.append(f"; add to the domain's existing SPF record: {' '.join(terms)}")
    return out


def domain_records(hosts: list[dict[str, Any]], domain: str) -> list[str]:
    """The records of one mail domain, the same whichever host's file they are in: its MX
    from the hosts that receive for it, its SPF from the hosts that serve, sign or send for it
    (never from every host of the run: two unrelated domains in one inventory would each
    authorize the other's servers)."""
    serving = [h for h in hosts if _serves(h, domain)]
    setting = {key: _domain_setting(serving, domain, key) for key in DOMAIN_SETTINGS}
    ttl = setting["ttl"]
    out = [f"; --- {domain}"]
    if not any(_primary(h, domain) for h in serving):
        return out + _foreign_domain(serving, domain, ttl)
    _no_include_of(serving, domain)
    mx = _mx_set(serving, domain)
    out += [_rr(domain, ttl, "MX", f"{prio} {name}.") for prio, name in mx]
    if not mx:
        out.append(f"; no host of this run receives mail for {domain} on port 25: no MX")
    out += _spf_lines(domain, ttl, _spf(serving, setting["spf_all"], domain))
    for selector, txt in _dkim_keys(hosts, domain):
        out.append(_rr(f"{selector}._domainkey.{domain}", ttl, "TXT", txt_rdata(txt)))
    rua = setting["dmarc_rua"] or f"postmaster@{domain}"
    dmarc = f"v=DMARC1; p={setting['dmarc_policy']}; rua=mailto:{rua}"
    out.append(_rr(f"_dmarc.{domain}", ttl, "TXT", txt_rdata(dmarc)))
    rua_domain = rua.rpartition("@")[2].lower()
    if rua_domain != domain:
        out.append(f"; {rua_domain} accepts DMARC reports for {domain} (RFC 7489 7.1):")
        out.append(_rr(f"{domain}._report._dmarc.{rua_domain}", ttl, "TXT", '"v=DMARC1"'))
    if mx:
        policy = mta_sts_policy(
            setting["mta_sts_mode"], [m for _preference, m in mx], setting["mta_sts_max_age"]
        )
        sts_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
        out.append(f"; MTA-STS: serve this at https://mta-sts.{domain}/.well-known/mta-sts.txt")
        out.append(
            f"; (no pyqmail role serves it: mta-sts.{domain} needs an A/AAAA or CNAME to a web "
            "server with a certificate for that name from a public CA; RFC 8461 3.2, 3.3)"
        )
        out += [f";   {line}" for line in policy.splitlines()]
        out.append(_rr(f"_mta-sts.{domain}", ttl, "TXT", txt_rdata(f"v=STSv1; id={sts_id}")))
    tlsrpt = setting["tlsrpt_rua"] or rua
    out.append(
        _rr(f"_smtp._tls.{domain}", ttl, "TXT", txt_rdata(f"v=TLSRPTv1; rua=mailto:{tlsrpt}"))
    )
    return out


def _tlsa_comment(me: dict[str, Any]) -> list[str]:
    """What keeps the TLSA record valid: a generated certificate keeps its key across
    renewals; a provided one (ACME) changes it whenever its client makes a new key."""
    if not me["tlsa_provided"]:
        return ["; DANE: needs DNSSEC on this zone; the generated key is kept across renewals"]
    return [
        "; DANE: needs DNSSEC on this zone. The certificate is provided",
        "; (pyqmail_certificates__provided_*): this record changes whenever the provided key",
        "; changes (an ACME client makes a new key unless told to reuse it). Publish the next",
        "; key's record next to this one before the key changes (RFC 7671 8.1), or senders that",
        "; use DANE defer mail to this host.",
    ]


def host_records(me: dict[str, Any], domains: list[str]) -> list[str]:
    """The records of the host itself: A/AAAA, SPF of its name, TLSA, and the PTR."""
    name, ttl = me["me"], me["ttl"]
    out = [f"; --- {name} (this host)"]
    addresses = [("A", a) for a in me["ipv4"]] + [("AAAA", a) for a in me["ipv6"]]
    if not addresses:
        out.append(f"; no address known for {name}: set {V}ipv4 / {V}ipv6")
    listens = me.get("listen_version", 0)
    for rtype, address in addresses:
        version = ipaddress.ip_address(address).version
        if not ipaddress.ip_address(address).is_global:
            out.append(f"; {address} is not a public address: set {V}ipv4 / {V}ipv6")
        if me["receives"] and listens and version != listens:
            out += [
                f"; {address}: mail is sent from it, but the listeners take IPv{listens} only",
                f"; (pyqmail__listen_ip): a sender trying it first falls back to IPv{listens}.",
                f"; Kept for the PTR's forward confirmation; or listen on IPv{version} too.",
            ]
        out.append(_rr(name, ttl, rtype, address))
    if _names_own_spf(me, domains):
        out.append("; SPF of the host name (the HELO name and bounces):")
        out += _spf_lines(name, ttl, _spf([me], me["spf_all"], name))
    if me["receives"] and me["tlsa"]:
        out += _tlsa_comment(me)
        out.append(_rr(f"_25._tcp.{name}", ttl, "TLSA", f"3 1 1 {me['tlsa']}"))
    elif me["receives"]:
        out.append(f"; no TLSA: control/servercert.pem not there yet on {me['host']}")
    if addresses:
        out.append("; PTR: set by the provider of each address (its reverse zone, not yours):")
    for _family, address in addresses:
        out.append(_rr(ipaddress.ip_address(address).reverse_pointer, ttl, "PTR", f"{name}."))
    return out


def dns_zone(hosts: Any, host: str, all_hosts: Any = None) -> str:
    """The zone file of ``host``: the records of every mail domain it serves or signs for
    (computed over ``hosts``, the checked dns_host of every host of the run) and its own."""
    if isinstance(hosts, (str, Mapping)) or not isinstance(hosts, Sequence):
        raise _fail("pyqmail_dns_zone: hosts must be a list of pyqmail_dns_host results")
    hosts = sorted(hosts, key=lambda h: h["host"])
    me = next((h for h in hosts if h["host"] == host), None)
    if me is None:
        raise _fail(f"pyqmail_dns_zone: {host} is not among the hosts")
    domains = _zone_domains(me)
    names = [h["host"] for h in hosts]
    out = [
        f"; DNS records to publish for {host} (pyqmail_dns, written by ansible-playbook site.yml)",
        f"; computed over the hosts of this run: {', '.join(names)}",
    ]
    _no_include_loop(hosts, host)
    missing = sorted(set(all_hosts or []) - set(names))
    if missing:
        out.append(f"; not in this run (its MX/SPF/DKIM are missing here): {', '.join(missing)}")
    for domain in domains:
        out += domain_records(hosts, domain)
    out += host_records(me, domains)
    return "\n".join(out) + "\n"


class FilterModule:
    """The pyqmail_dns role's filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "pyqmail_dns_addresses": host_addresses,
            "pyqmail_dns_host": dns_host,
            "pyqmail_dns_zone": dns_zone,
        }

"""pyqmail.rules against the real ucspi-tcp tools from Debian.

- Our compiler writes the same bytes as ``tcprules`` for the same source (a table covering
  every address form, and random rule sets).
- ``tcprulescheck`` reads our cdb and the one ``tcprules`` wrote the same way for many
  clients, and ``Rules.lookup`` agrees with what it prints (rule, environment, verdict).
- Every line ``tcprules`` refuses, we refuse too.

IPv6 rules need the ucspi-tcp-ipv6 build of the tools (Debian package ucspi-tcp-ipv6,
which conflicts with ucspi-tcp, so scripts/install-system-deps unpacks it into
/usr/local/lib/ucspi-tcp-ipv6; PYQMAIL_UCSPI_TCP_IPV6 overrides the bin directory).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyqmail.rules import (
    Decision,
    Rule,
    Rules,
    RulesError,
    compile_rules,
    format_source,
    make_rule,
    parse,
    tcpremoteip,
)

V4_BIN = Path("/usr/bin")
V6_BIN = Path(os.environ.get("PYQMAIL_UCSPI_TCP_IPV6", "/usr/local/lib/ucspi-tcp-ipv6/usr/bin"))


def _have(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in ("tcprules", "tcprulescheck"))


pytestmark = pytest.mark.skipif(
    not _have(V4_BIN),
    reason="ucspi-tcp's /usr/bin/tcprules and tcprulescheck are missing "
    "(run scripts/install-system-deps or apt-get install ucspi-tcp)",
)
needs_v6 = pytest.mark.skipif(
    not _have(V6_BIN),
    reason=f"ucspi-tcp-ipv6's tcprules/tcprulescheck not found in {V6_BIN} "
    "(scripts/install-system-deps unpacks them there)",
)


def real_compile(bindir: Path, source: str, tmp_path: Path, name: str = "real") -> bytes:
    cdb, tmp = tmp_path / f"{name}.cdb", tmp_path / f"{name}.tmp"
    proc = subprocess.run(
        [str(bindir / "tcprules"), str(cdb), str(tmp)],
        input=source.encode(),
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return cdb.read_bytes()


def real_check(bindir: Path, cdb: Path, ip: str, host: str | None, info: str | None) -> str:
    env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": tcpremoteip(ip)}
    if host is not None:
        env["TCPREMOTEHOST"] = host
    if info is not None:
        env["TCPREMOTEINFO"] = info
    proc = subprocess.run(
        [str(bindir / "tcprulescheck"), str(cdb)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return proc.stdout


def parse_check_output(out: str) -> Decision:
    """tcprulescheck's report as a Decision (its format: tcprulescheck.c ``found``)."""
    lines = out.splitlines()
    if lines == ["default:", "allow connection"]:
        return Decision(True, {}, None)
    assert lines[0].startswith("rule ") and lines[0].endswith(":"), out
    key = lines[0][len("rule ") : -1]
    env = {}
    for line in lines[1:-1]:
        assert line.startswith("set environment variable "), out
        name, _, value = line[len("set environment variable ") :].partition("=")
        env[name] = value
    verdict = {"allow connection": True, "deny connection": False}[lines[-1]]
    return Decision(verdict, env, key)


SOURCE_V4 = """\
# every IPv4 and host address form, allow and deny, several variables, empty values
joe@1.2.3.4:allow,WHO="joe@ip"
joe@=mx.example.com:deny
bob@=relay.example.org:allow,WHO="bob@host",RELAYCLIENT=""
1.2.3.4:allow,RELAYCLIENT="",SMTPAUTH="1",FORCETLS="0"
1.2.3.:allow,P="three"
1.2.:deny
1.:allow,P="one",EMPTY=""
10.1-3.:allow,RANGE="second octet"
192.168.7.10-20:allow,RANGE="last octet",RELAYCLIENT=""
172.16-17.5.:deny,DENIED="env after D"
=mx.example.com:allow,H="exact"
=.example.com:allow,H="domain"
=.org:allow,H="tld"
=:allow,H="any named host"
127.:allow,RELAYCLIENT="",BARELF="1",DATABYTES="10485760",MAXRCPT="100"
0.0.0.0:deny
255.255.255.255:allow,X=/slash delimited, with: colons/
8.8.8.8:allow,X='single'
:allow,SMTPAUTH="0",DEFAULT="yes"
"""

CLIENTS_V4 = [
    (ip, host, info)
    for ip in [
        "1.2.3.4",
        "1.2.3.5",
        "1.2.9.9",
        "1.9.9.9",
        "10.0.0.1",
        "10.1.0.1",
        "10.3.255.255",
        "10.4.0.1",
        "192.168.7.9",
        "192.168.7.10",
        "192.168.7.15",
        "192.168.7.20",
        "192.168.7.21",
        "172.16.5.1",
        "172.17.5.1",
        "172.18.5.1",
        "127.0.0.1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "8.8.8.8",
        "9.9.9.9",
    ]
    for host in [None, "mx.example.com", "a.b.example.com", "x.example.org", "plain"]
    for info in [None, "joe"]
] + [
    ("7.7.7.7", "relay.example.org", "bob"),
    ("1.2.3.4", "mx.example.com", "bob"),
    ("7.7.7.7", "mx.example.com", "joe"),
]


def test_v4_table_compiles_to_identical_bytes(tmp_path: Path) -> None:
    assert compile_rules(parse(SOURCE_V4)) == real_compile(V4_BIN, SOURCE_V4, tmp_path)


def test_v4_table_tcprulescheck_agrees(tmp_path: Path) -> None:
    real = tmp_path / "real.cdb"
    real.write_bytes(real_compile(V4_BIN, SOURCE_V4, tmp_path))
    ours = tmp_path / "ours.cdb"
    ours.write_bytes(compile_rules(parse(SOURCE_V4)))
    rules = Rules.load(ours)
    seen_keys = set()
    for ip, host, info in CLIENTS_V4:
        expected = real_check(V4_BIN, real, ip, host, info)
        assert real_check(V4_BIN, ours, ip, host, info) == expected, (ip, host, info)
        decision = rules.lookup(ip, host, info)
        assert decision == parse_check_output(expected), (ip, host, info, expected)
        seen_keys.add(decision.key)
    # The client list exercises every rule of the table.
    assert seen_keys >= {r.address for r in parse(SOURCE_V4) if "-" not in r.address}


def test_module_style_source_compiles_identically(tmp_path: Path) -> None:
    rules = [
        make_rule("127.", "allow", {"RELAYCLIENT": ""}),
        make_rule("10.0.0.1-3", "deny"),
        make_rule("=.example.net", "allow", {"SMTPAUTH": "1", "FORCETLS": "1"}),
        make_rule("", "allow", {"SMTPAUTH": "0"}),
    ]
    source = format_source(rules, "Managed by Ansible.\ntcprules source")
    assert real_compile(V4_BIN, source, tmp_path) == compile_rules(rules)


# Lines the real tcprules refuses (exit 100): we must refuse them too.
REFUSED_BY_TCPRULES = [
    "1.2.3.4:allo",
    "1.2.3.4:allowx",
    '1.2.3.4:allow X="1"',
    "1.2.3.4:allow,X",
    "1.2.3.4:allow,X=",
    '1.2.3.4:allow,X="abc',
    "1.2.3.4:allow,X=abc",
    '1.2.3.4:allow,X="1",',
    "1.2.3.4:allow\r",
    "10.x-3.:allow",
    "10.1-y.:allow",
    "::1:allow",  # the IPv4-only tcprules splits at the first colon
]


@pytest.mark.parametrize("line", REFUSED_BY_TCPRULES)
def test_we_refuse_what_tcprules_refuses(line: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(V4_BIN / "tcprules"), str(tmp_path / "x.cdb"), str(tmp_path / "x.tmp")],
        input=(line + "\n").encode(),
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 100, proc.stderr
    assert b"unable to parse this line" in proc.stderr
    if line == "::1:allow":
        parse(line)  # valid for the IPv6 build; covered by the IPv6 tests below
        return
    with pytest.raises(RulesError):
        parse(line)


@pytest.mark.parametrize("line", ["garbage without colon", "  # indented comment"])
def test_we_refuse_what_tcprules_skips_silently(line: str, tmp_path: Path) -> None:
    cdb = real_compile(V4_BIN, line + "\n", tmp_path)
    assert cdb == compile_rules([])  # tcprules dropped the line without a word
    with pytest.raises(RulesError):
        parse(line)


_octet = st.integers(0, 255).map(str)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
# No host name ends in a number (pyqmail.rules refuses such a rule: it is an IP address
# written with "=", and no forward-confirmed name can match it).
_host = (
    st.lists(_label, min_size=1, max_size=3)
    .map(".".join)
    .filter(lambda h: not h.rpartition(".")[2].isdigit())
)
_address = st.one_of(
    st.just(""),
    st.just("="),
    st.lists(_octet, min_size=4, max_size=4).map(".".join),
    st.lists(_octet, min_size=1, max_size=3).map(lambda parts: ".".join(parts) + "."),
    st.tuples(st.lists(_octet, min_size=0, max_size=2), st.integers(0, 255), st.integers(0, 9))
    .filter(lambda t: t[1] + t[2] <= 255)
    .map(lambda t: ".".join([*t[0], f"{t[1]}-{t[1] + t[2]}"]) + "."),
    _host.map(lambda h: "=" + h),
    _host.map(lambda h: "=." + h),
    st.tuples(_label, st.lists(_octet, min_size=4, max_size=4)).map(
        lambda t: f"{t[0]}@{'.'.join(t[1])}"
    ),
)
_value = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x17F, exclude_characters='"'), max_size=8
).filter(str.isprintable)
_env = st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), _value, max_size=3)
_rules = st.lists(
    st.tuples(_address, st.sampled_from(["allow", "deny"]), _env), min_size=0, max_size=12
)


def _unique(items: list[tuple[str, str, dict[str, str]]]) -> list[Rule]:
    rules, keys = [], set()
    for address, action, env in items:
        rule = make_rule(address, action, env)
        if keys.isdisjoint(rule.cdb_keys()):
            keys.update(rule.cdb_keys())
            rules.append(rule)
    return rules


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(items=_rules)
def test_random_rule_sets_compile_identically(
    items: list[tuple[str, str, dict[str, str]]], tmp_path: Path
) -> None:
    rules = _unique(items)
    source = format_source(rules)
    assert real_compile(V4_BIN, source, tmp_path) == compile_rules(rules)
    assert [(r.address, r.allow, r.env) for r in parse(source)] == [
        (r.address, r.allow, r.env) for r in rules
    ]


SOURCE_V6 = """\
joe@::1:allow,WHO="joe"
::1:allow,RELAYCLIENT="",V6="loopback"
2001:db8::1:deny
2001:db8:1::allow,P="2001:db8:1:"
2001:db8:::allow,P="2001:db8::"
2001:db8::allow,P="2001:db8:"
fe80::allow,P="link-local"
:::allow,P="::"
1.2.3.:allow,P="v4"
=.example.com:allow,H="domain"
:allow,DEFAULT="1"
"""

CLIENTS_V6 = [
    (ip, host, info)
    for ip in [
        "::1",
        "0:0:0:0:0:0:0:1",
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8:1::5",
        "2001:db8:1:0:0:0:0:5",
        "2001:db8:2::5",
        "2001:db9::1",
        "fe80::1",
        "::2",
        "::ffff:1.2.3.4",
        "1.2.3.4",
        "5.6.7.8",
        "1:0:2:3:4:5:6:7",
    ]
    for host in [None, "v6.example.com"]
    for info in [None, "joe"]
]


@needs_v6
def test_v6_table_compiles_to_identical_bytes(tmp_path: Path) -> None:
    assert compile_rules(parse(SOURCE_V6)) == real_compile(V6_BIN, SOURCE_V6, tmp_path)


@needs_v6
def test_v6_table_tcprulescheck_agrees(tmp_path: Path) -> None:
    real = tmp_path / "real.cdb"
    real.write_bytes(real_compile(V6_BIN, SOURCE_V6, tmp_path))
    ours = tmp_path / "ours.cdb"
    ours.write_bytes(compile_rules(parse(SOURCE_V6)))
    rules = Rules.load(ours)
    seen_keys = set()
    for ip, host, info in CLIENTS_V6:
        expected = real_check(V6_BIN, real, ip, host, info)
        assert real_check(V6_BIN, ours, ip, host, info) == expected, (ip, host, info)
        decision = rules.lookup(ip, host, info)
        assert decision == parse_check_output(expected), (ip, host, info, expected)
        seen_keys.add(decision.key)
    assert seen_keys >= {r.address for r in parse(SOURCE_V6)}

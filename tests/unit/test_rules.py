"""tcprules parsing, validation, compilation and tcpserver's lookup order (no binaries)."""

from __future__ import annotations

import ipaddress

import pytest

from pyqmail.cdb import CDB, make
from pyqmail.rules import (
    Decision,
    Rule,
    Rules,
    RulesError,
    candidates,
    compile_rules,
    format_source,
    ip6_fmt,
    make_rule,
    parse,
    tcpremoteip,
)

# line, address, allow, env, cdb keys
VALID = [
    ("1.2.3.4:allow", "1.2.3.4", True, (), ["1.2.3.4"]),
    ("1.2.3.4:deny", "1.2.3.4", False, (), ["1.2.3.4"]),
    ("0.0.0.0:deny", "0.0.0.0", False, (), ["0.0.0.0"]),
    ("255.255.255.255:deny", "255.255.255.255", False, (), ["255.255.255.255"]),
    ('127.:allow,RELAYCLIENT=""', "127.", True, (("RELAYCLIENT", ""),), ["127."]),
    ("10.1.:allow", "10.1.", True, (), ["10.1."]),
    ("10.1.2.:allow", "10.1.2.", True, (), ["10.1.2."]),
    ("10.2-4.:deny", "10.2-4.", False, (), ["10.2.", "10.3.", "10.4."]),
    ("1.2.3.37-39:allow", "1.2.3.37-39", True, (), ["1.2.3.37", "1.2.3.38", "1.2.3.39"]),
    ("1-2.5.:allow", "1-2.5.", True, (), ["1.5.", "2.5."]),
    ("9.0-0.1.1:allow", "9.0-0.1.1", True, (), ["9.0.1.1"]),
    ("=mx.example.com:allow", "=mx.example.com", True, (), ["=mx.example.com"]),
    ("=.example.com:allow", "=.example.com", True, (), ["=.example.com"]),
    ("=host_1-a:allow", "=host_1-a", True, (), ["=host_1-a"]),
    ("=:allow", "=", True, (), ["="]),
    (":deny", "", False, (), [""]),
    ("joe@127.0.0.1:allow", "joe@127.0.0.1", True, (), ["joe@127.0.0.1"]),
    ("joe@=mx.example.com:deny", "joe@=mx.example.com", False, (), ["joe@=mx.example.com"]),
    ("joe@::1:allow", "joe@::1", True, (), ["joe@::1"]),
    ("::1:allow", "::1", True, (), ["::1"]),
    (":::allow", "::", True, (), ["::"]),
    ("2001:db8::allow", "2001:db8:", True, (), ["2001:db8:"]),
    ("2001:db8:::deny", "2001:db8::", False, (), ["2001:db8::"]),
    ("fe80::1:allow", "fe80::1", True, (), ["fe80::1"]),
    ("1::2:3:4:5:6:7:allow", "1::2:3:4:5:6:7", True, (), ["1::2:3:4:5:6:7"]),
    ("1:2:3:4:5:6:7::allow", "1:2:3:4:5:6:7:", True, (), ["1:2:3:4:5:6:7:"]),
    ("2001::5::allow", "2001::5:", True, (), ["2001::5:"]),
    (
        '1.2.3.4:allow,A="1",B="",C="x y",D="@fix.me"',
        "1.2.3.4",
        True,
        (("A", "1"), ("B", ""), ("C", "x y"), ("D", "@fix.me")),
        ["1.2.3.4"],
    ),
    ("1.2.3.4:allow,X=/a:b,c/", "1.2.3.4", True, (("X", "a:b,c"),), ["1.2.3.4"]),
    ("1.2.3.4:deny,X=''", "1.2.3.4", False, (("X", ""),), ["1.2.3.4"]),
    ('1.2.3.4:allow,_x9="é"', "1.2.3.4", True, (("_x9", "é"),), ["1.2.3.4"]),
    ("1.2.3.4:allow \t", "1.2.3.4", True, (), ["1.2.3.4"]),
]


@pytest.mark.parametrize(("line", "address", "allow", "env", "keys"), VALID)
def test_parse_valid(line: str, address: str, allow: bool, env: tuple, keys: list[str]) -> None:
    (rule,) = parse(line + "\n", "smtp")
    assert (rule.address, rule.allow, rule.env) == (address, allow, env)
    assert rule.cdb_keys() == keys
    assert rule.where == "smtp line 1"
    # The canonical line reparses to the same rule.
    (again,) = parse(rule.line)
    assert (again.address, again.allow, again.env) == (address, allow, env)


@pytest.mark.parametrize(
    ("rule", "data"),
    [
        (make_rule("1.2.3.4", "allow"), b""),
        (make_rule("1.2.3.4", "deny"), b"D\0"),
        (make_rule("", "allow", {"RELAYCLIENT": ""}), b"+RELAYCLIENT=\0"),
        (make_rule("", "deny", [("A", "1"), ("B", "x")]), b"D\0+A=1\0+B=x\0"),
        (make_rule("", "allow", {"V": "é"}), "+V=é\0".encode()),
    ],
)
def test_data_encoding(rule: Rule, data: bytes) -> None:
    assert rule.data() == data


# line, words the error must contain
INVALID = [
    ("1.2.3:allow", "neither a full IPv4 address nor a prefix"),
    ("1.2.3.4.:allow", "an IPv4 address has 4 numbers"),
    ("1.2.3.4.5:allow", "an IPv4 address has 4 numbers"),
    ("1..3.:allow", "empty number"),
    ("010.1.:allow", "no leading zeros"),
    ("256.1.:allow", "'256' is not a number"),
    ("1.2.3.x:allow", "'x' is not a number"),
    ("10.4-2.:allow", "range 4-2 is empty"),
    ("10.2-300.:allow", "'2-300' is not a number"),
    ("1-2.3-4.:allow", "only one range"),
    ("=MX.example.com:allow", "lower case: write =mx.example.com"),
    ("=mx.example.com.:allow", "trailing dot in TCPREMOTEHOST: write =mx.example.com"),
    ("=MX.Example.COM.:allow", "write =mx.example.com"),
    ("=10.1.2.3:allow", "no host name ends in a number"),
    ("=.10:allow", "no host name ends in a number"),
    ("joe@=10.1.2.3:allow", "no host name ends in a number"),
    ("=" + "a" * 64 + ".example:allow", "63 between two dots"),
    ("=" + "a." * 127 + "example:allow", "at most 253 characters"),
    ("=mx..example:allow", "not a host name"),
    ("=-mx.example:allow", "not a host name"),
    ("=a b:allow", "whitespace"),
    ("jo e@1.2.3.4:allow", "whitespace"),
    ("joe@1.2.3.:allow", "no prefixes"),
    ("joe@=.example.com:allow", "no suffixes"),
    ("joe@1.2.3.4-5:allow", "does not expand ranges"),
    ("j:oe@1.2.3.4:allow", "'j:oe' is not a TCPREMOTEINFO user name"),
    ("::allow", "bad address ':'"),
    ("j=oe@1.2.3.4:allow", "not a TCPREMOTEINFO user name"),
    ("::ffff:1.2.3.4:allow", "write 1.2.3.4"),
    ("2001:DB8::1:allow", "2001:db8::1"),
    ("2001:db8:0:0:0:0:0:1:allow", "2001:db8::1"),
    ("1:0:2:3:4:5:6:7:allow", "1::2:3:4:5:6:7"),
    ("2001:0db8::allow", "never matches"),
    ("12345:::allow", "not an IPv6 address"),
    ("1:::::allow", "not an IPv6 address"),
    ("::g:allow", "only hex digits"),
    ("1.2.3.4:allo", "must start with allow or deny"),
    ("1.2.3.4 allow", "no ':'"),
    ("1.2.3.4:allowx", "expected ',VAR=\"value\"' after allow"),
    ('1.2.3.4:allow X="1"', "expected ',VAR=\"value\"' after allow"),
    ("1.2.3.4:allow,X", "variable without '='"),
    ("1.2.3.4:allow,X=", "has no value"),
    ("1.2.3.4:allow,X=abc", "must be quoted"),
    ("1.2.3.4:allow,X= a ", "must be quoted"),
    ('1.2.3.4:allow,X="abc', "unbalanced quote"),
    ('1.2.3.4:allow,X="a"b"', "expected ',VAR=\"value\"'"),
    ('1.2.3.4:allow,X=/a"b/', "double quote"),
    ("1.2.3.4:allow,X=\x01a\x01", "must be quoted"),
    ("1:0:0:0:0:0:0::allow", "never matches"),
    ('1.2.3.4:allow,X="a\tb"', "control characters"),
    ('1.2.3.4:allow,9X="1"', "bad variable name '9X'"),
    ('1.2.3.4:allow,X-Y="1"', "bad variable name 'X-Y'"),
    ('1.2.3.4:allow,="1"', "bad variable name ''"),
    ('1.2.3.4:allow,X="1",X="2"', "X is set twice"),
    ('1.2.3.4:allow,X="1"\r', "carriage return"),
    (" 1.2.3.4:allow", "leading whitespace"),
    ("1.2.3.4:allow\0", "NUL"),
]


@pytest.mark.parametrize(("line", "words"), INVALID)
def test_parse_invalid_names_the_line(line: str, words: str) -> None:
    text = "# comment\n\n127.:allow\n" + line + "\n"
    with pytest.raises(RulesError) as info:
        parse(text, "/etc/tcp/smtp")
    message = str(info.value)
    assert message.startswith("/etc/tcp/smtp line 4 (")
    assert repr(line) in message
    assert words in message


def test_comments_and_blank_lines_are_skipped() -> None:
    rules = parse("# c\n\n   \n\t\n#127.:deny\n127.:allow\n1.2.3.4:deny")
    assert [(r.address, r.allow, r.where) for r in rules] == [
        ("127.", True, "<rules> line 6"),
        ("1.2.3.4", False, "<rules> line 7"),
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1.2.3.4:allow\n1.2.3.4:deny\n", "line 2 ('1.2.3.4:deny'): address 1.2.3.4 is already"),
        ("10.1-3.:allow\n10.2.:deny\n", "address 10.2. is already used by <rules> line 1"),
        (":allow\n:deny\n", "address (default) is already used"),
    ],
)
def test_duplicate_addresses_are_refused(text: str, words: str) -> None:
    with pytest.raises(RulesError, match="only ever use the first") as info:
        parse(text)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("address", "action", "env", "words"),
    [
        ("127.", "permit", {}, "action must be allow or deny, not 'permit'"),
        ("127", "allow", {}, "neither a full IPv4 address"),
        ("127.", "allow", {"A B": "1"}, "bad variable name 'A B'"),
        ("127.", "allow", {"A": 'x"y'}, "double quote"),
        ("127.", "allow", {"A": "x\ny"}, "control characters"),
        ("127.", "allow", {"A": "x\0y"}, "control characters"),
        ("127.", "allow", {"A": 1}, "must be a string"),
        (1, "allow", {}, "must be a string"),
        ("1.2.3.4:allow", "allow", {}, "bad address"),
        ("1.2.3.4,X", "allow", {}, "quote or a comma"),
    ],
)
def test_make_rule_invalid(address: object, action: str, env: dict, words: str) -> None:
    with pytest.raises(RulesError) as info:
        make_rule(address, action, env, "rules[3]")  # type: ignore[arg-type]
    assert str(info.value).startswith("rules[3] (")
    assert words in str(info.value)


def test_format_source_round_trip() -> None:
    rules = [
        make_rule("127.", "allow", {"RELAYCLIENT": "", "SMTPAUTH": "1"}),
        make_rule("10.1-3.", "deny"),
        make_rule("=.example.com", "allow", {"X": "a b,c:d"}),
        make_rule("", "allow"),
    ]
    text = format_source(rules, "Managed by test.\n\nsecond line")
    assert text == (
        "# Managed by test.\n#\n# second line\n"
        '127.:allow,RELAYCLIENT="",SMTPAUTH="1"\n'
        "10.1-3.:deny\n"
        '=.example.com:allow,X="a b,c:d"\n'
        ":allow\n"
    )
    again = parse(text)
    assert [(r.address, r.allow, r.env) for r in again] == [
        (r.address, r.allow, r.env) for r in rules
    ]


def test_compile_orders_keys_like_tcprules() -> None:
    rules = parse('10.1-2.:deny\n127.:allow,R=""\n:allow\n')
    db = CDB.from_bytes(compile_rules(rules))
    assert list(db.items()) == [
        (b"10.1.", b"D\0"),
        (b"10.2.", b"D\0"),
        (b"127.", b"+R=\0"),
        (b"", b""),
    ]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("::", "::"),
        ("::1", "::1"),
        ("1::", "1::"),
        ("1:0:2:3:4:5:6:7", "1::2:3:4:5:6:7"),  # a single zero group is compressed too
        ("0:1:2:3:4:5:6:7", "::1:2:3:4:5:6:7"),
        ("1:2:3:4:5:6:7:0", "1:2:3:4:5:6:7::"),
        ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),  # the longest run wins
        ("1:0:0:2:0:0:3:4", "1::2:0:0:3:4"),  # the first of equal runs wins
        ("2001:DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("fe80::a:b", "fe80::a:b"),
        ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
        ("::1.2.3.4", "::102:304"),  # IPv4-compatible is not IPv4-mapped
        ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
    ],
)
def test_ip6_fmt(address: str, expected: str) -> None:
    assert ip6_fmt(ipaddress.IPv6Address(address).packed) == expected


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::FFFF:7f00:1", "127.0.0.1"),
        ("::1", "::1"),
        ("fe80::1%lo", "fe80::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
    ],
)
def test_tcpremoteip(ip: str, expected: str) -> None:
    assert tcpremoteip(ip) == expected


@pytest.mark.parametrize("ip", ["", "1.2.3", "1.2.3.256", "localhost", "::g", "01.2.3.4"])
def test_tcpremoteip_rejects_junk(ip: str) -> None:
    with pytest.raises(RulesError, match="not an IP address"):
        tcpremoteip(ip)


def test_candidates_follow_rules_c() -> None:
    assert list(candidates("1.2.3.4", "a.b.example.com", "joe")) == [
        "joe@1.2.3.4",
        "joe@=a.b.example.com",
        "1.2.3.4",
        "=a.b.example.com",
        "1.2.3.",
        "1.2.",
        "1.",
        "=.b.example.com",
        "=.example.com",
        "=.com",
        "=",
        "",
    ]
    assert list(candidates("10.0.0.1")) == ["10.0.0.1", "10.0.0.", "10.0.", "10.", ""]
    assert list(candidates("2001:db8::1", "Mail.Example.")) == [
        "2001:db8::1",
        "=mail.example",
        "2001:db8::",
        "2001:db8:",
        "2001:",
        "=.example",
        "=",
        "",
    ]


RULES = """\
joe@1.2.3.4:allow,WHO="joe"
joe@=mx.example.com:deny
1.2.3.4:allow,RELAYCLIENT="",SMTPAUTH="1"
1.2.3.:allow,P="1.2.3."
1.2.:deny,IGNORED="x"
10.1-3.:allow,R="range"
=mx.example.com:allow,H="exact"
=.example.com:allow,H="domain"
=:allow,H="named"
127.:allow,RELAYCLIENT=""
::1:allow,V6="loopback"
2001:db8::allow,V6="doc"
:allow,DEFAULT="1"
"""


@pytest.mark.parametrize(
    ("ip", "host", "info", "decision"),
    [
        ("1.2.3.4", None, None, Decision(True, {"RELAYCLIENT": "", "SMTPAUTH": "1"}, "1.2.3.4")),
        ("1.2.3.4", None, "joe", Decision(True, {"WHO": "joe"}, "joe@1.2.3.4")),
        ("1.2.3.5", "mx.example.com", "joe", Decision(False, {}, "joe@=mx.example.com")),
        (
            "1.2.3.4",
            "mx.example.com",
            "bob",
            Decision(True, {"RELAYCLIENT": "", "SMTPAUTH": "1"}, "1.2.3.4"),
        ),
        ("1.2.3.5", "mx.example.com", None, Decision(True, {"H": "exact"}, "=mx.example.com")),
        ("1.2.3.5", None, None, Decision(True, {"P": "1.2.3."}, "1.2.3.")),
        ("1.2.9.9", None, None, Decision(False, {}, "1.2.")),
        ("1.2.9.9", "mx.example.com", None, Decision(True, {"H": "exact"}, "=mx.example.com")),
        ("10.2.0.1", None, None, Decision(True, {"R": "range"}, "10.2.")),
        ("10.4.0.1", None, None, Decision(True, {"DEFAULT": "1"}, "")),
        ("9.9.9.9", "a.b.example.com", None, Decision(True, {"H": "domain"}, "=.example.com")),
        ("9.9.9.9", "example.com", None, Decision(True, {"H": "named"}, "=")),
        ("9.9.9.9", "MX.EXAMPLE.COM", None, Decision(True, {"H": "exact"}, "=mx.example.com")),
        ("9.9.9.9", "", None, Decision(True, {"DEFAULT": "1"}, "")),
        ("127.0.0.1", None, None, Decision(True, {"RELAYCLIENT": ""}, "127.")),
        ("::ffff:127.0.0.1", None, None, Decision(True, {"RELAYCLIENT": ""}, "127.")),
        ("::1", None, None, Decision(True, {"V6": "loopback"}, "::1")),
        ("0:0::1", None, None, Decision(True, {"V6": "loopback"}, "::1")),
        ("2001:db8:5::1", None, None, Decision(True, {"V6": "doc"}, "2001:db8:")),
        ("2001:db9::1", None, None, Decision(True, {"DEFAULT": "1"}, "")),
    ],
)
def test_lookup(ip: str, host: str | None, info: str | None, decision: Decision) -> None:
    rules = Rules.from_rules(parse(RULES))
    assert rules.lookup(ip, host, info) == decision


def test_no_rule_at_all_allows_with_empty_env(tmp_path) -> None:
    path = tmp_path / "smtp.cdb"
    path.write_bytes(compile_rules(parse("127.:deny\n")))
    assert Rules.load(path).lookup("10.0.0.1") == Decision(True, {}, None)
    assert Rules.load(path).lookup("127.0.0.1") == Decision(False, {}, "127.")


def test_foreign_data_is_read_like_tcpserver() -> None:
    db = make(
        [
            (b"1.1.1.1", b"+A=1\0+NOEQUALS\0Xjunk\0+B=x=y\0+C=unterminated"),
            (b"2.2.2.2", b"+A=1\0D\0+B=2\0"),
        ]
    )
    rules = Rules.from_bytes(db)
    assert rules.lookup("1.1.1.1") == Decision(True, {"A": "1", "B": "x=y"}, "1.1.1.1")
    assert rules.lookup("2.2.2.2") == Decision(False, {}, "2.2.2.2")


def test_lookup_rejects_a_bad_ip() -> None:
    with pytest.raises(RulesError, match="not an IP address"):
        Rules.from_rules([]).lookup("999.1.1.1")


def test_load_corrupt_and_missing(tmp_path) -> None:
    bad = tmp_path / "bad.cdb"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(RulesError, match=r"bad\.cdb: not a valid cdb"):
        Rules.load(bad)
    with pytest.raises(FileNotFoundError):
        Rules.load(tmp_path / "missing.cdb")


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("", False),
        ("127.0.0.1:allow\n1.2.3.:deny\n:allow\n", False),
        ("joe@=mx.example.com:deny\n", False),  # needs an ident, which pyqmail never asks
        ("=mx.example.com:deny\n", True),
        ("10.:allow\n=.example.com:allow\n", True),
        ("=:allow\n", True),
    ],
)
def test_names_says_whether_any_rule_names_a_host(source: str, names: bool) -> None:
    """Found once per load: only such a cdb makes pyqmail-smtpd look client names up."""
    assert Rules.from_rules(parse(source)).names is names


def test_the_name_matters_unless_the_exact_address_has_a_rule() -> None:
    """tcpserver tries the exact address before ``=host``; every other key after it."""
    rules = Rules.from_rules(parse('127.0.0.1:allow,RELAYCLIENT=""\n127.:deny\n=x.test:deny\n'))
    assert rules.name_matters("127.0.0.1") is False
    assert rules.name_matters("::ffff:127.0.0.1") is False
    assert rules.name_matters("127.0.0.2") is True
    assert rules.name_matters("::1") is True
    assert Rules.from_rules(parse("127.:deny\n")).name_matters("127.0.0.2") is False

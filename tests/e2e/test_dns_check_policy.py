"""``pyqmail-dns check --fetch-policy``: the MTA-STS policy fetched as a sender fetches it.

Real parts: knot serves the role's zone (tests/dnszone) plus ``mta-sts.<domain>`` A records
(or CNAMEs, some to a hosting provider's zone ``hosting.test``, which a second knot serves:
the first refuses it, as a domain's own server does) pointing at 127.0.0.1, where a real
HTTPS server (the standard library's, TLS with a certificate of a throw-away CA, tests/pki)
answers per Host header what each test sets; the command runs as a process with
``--cafile`` that CA and ``--resolver`` the second knot (or the first: the system resolver,
which would ask beyond loopback, is never used).
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.tools.mtasts import PolicyError, expected_policies, matches, parse_policy
from tests.dnsserver import DnsServer, recording
from tests.dnszone import zone
from tests.e2e.test_dns_check import BIN, served
from tests.pki import CA

NAMES = ("mta-sts.example.org", "mta-sts.mx1.example.org")
A_RECORDS = "".join(f"{name}. 3600 IN A 127.0.0.1\n" for name in NAMES)
GOOD = {
    "mta-sts.example.org": "version: STSv1\r\nmode: testing\r\nmx: mx1.example.org\r\n"
    "mx: mx2.example.org\r\nmax_age: 604800\r\n",
    "mta-sts.mx1.example.org": "version: STSv1\nmode: testing\nmx: mx1.example.org\n"
    "max_age: 604800\n",
}


class PolicyServer:
    """HTTPS on 127.0.0.1: ``answers[host]`` is (status, headers, body) for that Host."""

    def __init__(self, ca: CA, tmp: Path, names: tuple[str, ...] = NAMES) -> None:
        leaf = ca.issue(list(names))
        pem = tmp / "web.pem"
        pem.write_bytes(leaf.key_pem + leaf.cert_pem)
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {
            host: (200, {"Content-Type": "text/plain; charset=utf-8"}, body.encode())
            for host, body in GOOD.items()
        }
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                host = (self.headers.get("Host") or "").split(":")[0]
                status, headers, body = outer.answers.get(host, (404, {}, b"no such site\n"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def ca() -> CA:
    return CA()


@pytest.fixture
def web(ca: CA, tmp_path: Path) -> Iterator[PolicyServer]:
    server = PolicyServer(ca, tmp_path)
    yield server
    server.close()


def run_policy_check(
    tmp_path: Path,
    ca: CA,
    port: int,
    add: str = A_RECORDS,
    outside: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The command against knot serving the role's zones plus ``add``; ``--resolver`` (asked
    for the names that knot does not serve) is a second knot serving the zones ``outside``
    when given, else the first knot itself."""
    text = zone()
    path = tmp_path / "dns.zone"
    path.write_text(text)
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    with DnsServer(served(text, add=add)) as dns, contextlib.ExitStack() as stack:
        resolver = stack.enter_context(DnsServer(outside)) if outside else dns
        argv = [str(BIN / "pyqmail-dns"), "check", str(path), "--fetch-policy"]
        argv += ["--nameserver", dns.host, "--port", str(dns.port), "--timeout", "3"]
        argv += ["--resolver", f"{resolver.host}:{resolver.port}"]
        argv += ["--https-port", str(port), "--cafile", str(cafile)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_both_policies_served_exit_0(tmp_path: Path, ca: CA, web: PolicyServer) -> None:
    result = run_policy_check(tmp_path, ca, web.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith(" records published and 2 MTA-STS policies served\n")
    assert web.paths == ["/.well-known/mta-sts.txt"] * 2


def test_a_wildcard_covering_the_mx_hosts_is_no_problem(
    tmp_path: Path, ca: CA, web: PolicyServer
) -> None:
    body = b"version: STSv1\nmode: testing\nmx: *.example.org\nmax_age: 604800\n"
    web.answers["mta-sts.example.org"] = (200, {"Content-Type": "text/plain"}, body)
    result = run_policy_check(tmp_path, ca, web.port)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_different_policy_and_a_redirect_are_reported(
    tmp_path: Path, ca: CA, web: PolicyServer
) -> None:
    """example.org serves enforce, a year, and an old MX; mx1's site redirects (a sender
    must not follow it): one line each, exit 1."""
    body = (
        b"version: STSv1\nmode: enforce\nmx: mx1.example.org\nmx: old.example.net\n"
        b"max_age: 31557600\n"
    )
    web.answers["mta-sts.example.org"] = (200, {"Content-Type": "text/plain"}, body)
    web.answers["mta-sts.mx1.example.org"] = (
        301,
        {"Location": "https://www.example.org/mta-sts.txt"},
        b"",
    )
    result = run_policy_check(tmp_path, ca, web.port)
    assert result.returncode == 1, result.stdout + result.stderr
    url = "https://mta-sts.example.org/.well-known/mta-sts.txt"
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("5 problem(s) in "), result.stdout
    assert f"DIFFERENT {url}: mode: expected testing, found enforce" in lines
    assert f"DIFFERENT {url}: max_age: expected 604800, found 31557600" in lines
    assert (
        f"DIFFERENT {url}: mx: expected one matching mx2.example.org, found "
        "mx1.example.org old.example.net" in lines
    )
    assert (
        f"EXTRA {url}: mx: the policy also accepts hosts matching old.example.net, which no MX "
        "record of the zone names" in lines
    )
    assert (
        "MISSING https://mta-sts.mx1.example.org/.well-known/mta-sts.txt: expected the policy, "
        "found HTTP 301 Moved Permanently to https://www.example.org/mta-sts.txt "
        "(only 200 counts)" in lines
    )


def test_a_wrong_certificate_html_and_no_address_are_missing(
    tmp_path: Path, ca: CA, web: PolicyServer
) -> None:
    """A certificate for other names (a sender refuses it), a page of HTML, and no A
    record at all: each domain's policy is MISSING with the reason."""
    wrong = PolicyServer(ca, tmp_path, names=("www.example.org",))
    try:
        result = run_policy_check(tmp_path, ca, wrong.port)
    finally:
        wrong.close()
    assert result.returncode == 1
    assert result.stdout.count("certificate verify failed") == 2, result.stdout
    web.answers["mta-sts.example.org"] = (200, {"Content-Type": "text/html"}, b"<html>")
    result = run_policy_check(tmp_path, ca, web.port, add=A_RECORDS.splitlines()[0] + "\n")
    lines = result.stdout.splitlines()
    assert (
        "MISSING https://mta-sts.example.org/.well-known/mta-sts.txt: expected the policy, "
        "found Content-Type text/html, not text/plain" in lines
    )
    assert (
        "MISSING https://mta-sts.mx1.example.org/.well-known/mta-sts.txt: expected the "
        "policy, found mta-sts.mx1.example.org does not exist in DNS" in lines
    ), result.stdout


# mta-sts.example.org: a CNAME to a zone the domain's knot does not serve (it answers
# REFUSED); mta-sts.mx1.example.org: one to a zone delegated from example.org (a referral),
# whose name is a CNAME back to example.org, which the second knot does not serve.
HOSTED = (
    "mta-sts.example.org. 3600 IN CNAME sts.hosting.test.\n"
    "mta-sts.mx1.example.org. 3600 IN CNAME sts.hosted.example.org.\n"
    "hosted.example.org. 3600 IN NS ns.hosting.test.\n"
    "web.example.org. 3600 IN A 127.0.0.1\n"
)
HOSTING = {
    "hosting.test.": "sts A 127.0.0.1\n",
    "hosted.example.org.": "sts CNAME web.example.org.\n",
}


def test_a_policy_host_published_as_a_cname_is_followed(
    tmp_path: Path, ca: CA, web: PolicyServer
) -> None:
    """A hosting provider's names, which the domain's own server does not serve (REFUSED,
    a referral), are asked of the recursive resolver (--resolver), and a chain coming back
    to the domain's zone of its server again: both policies are fetched from the targets'
    address, the certificate checked for the mta-sts names (it has no other)."""
    result = run_policy_check(tmp_path, ca, web.port, add=HOSTED, outside=HOSTING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith(" records published and 2 MTA-STS policies served\n")
    assert web.paths == ["/.well-known/mta-sts.txt"] * 2


def test_a_cname_loop_and_a_chain_too_long_are_missing(
    tmp_path: Path, ca: CA, web: PolicyServer
) -> None:
    """A loop through two zones (one the second knot serves) and one inside a zone (which
    knot answers as a chain dnspython refuses as too long) are named; so is a chain of 9
    hops, while one of 8 (the limit) is followed to its address."""
    add = (
        "mta-sts.example.org. 3600 IN CNAME a.hosting.test.\n"
        "mta-sts.mx1.example.org. 3600 IN CNAME loop.example.org.\n"
        "loop.example.org. 3600 IN CNAME mta-sts.mx1.example.org.\n"
    )
    hosting = "a CNAME b\nb CNAME mta-sts.example.org.\n"
    result = run_policy_check(tmp_path, ca, web.port, add=add, outside={"hosting.test.": hosting})
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for url, chain in [
        (
            "https://mta-sts.example.org/.well-known/mta-sts.txt",
            "mta-sts.example.org -> a.hosting.test -> b.hosting.test -> mta-sts.example.org",
        ),
        (
            "https://mta-sts.mx1.example.org/.well-known/mta-sts.txt",
            "mta-sts.mx1.example.org -> loop.example.org -> mta-sts.mx1.example.org",
        ),
    ]:
        name = chain.split(" ", 1)[0]
        line = f"MISSING {url}: expected the policy, found {name} is a CNAME loop: {chain}"
        assert line in lines, result.stdout
    hops = [f"c{i}.example.org" for i in range(1, 10)]
    add = "".join(
        f"{owner}. 3600 IN CNAME {target}.\n"
        for owner, target in zip(["mta-sts.example.org", *hops], hops, strict=False)
    )
    add += "c9.example.org. 3600 IN A 127.0.0.1\n"
    add += "mta-sts.mx1.example.org. 3600 IN CNAME c2.example.org.\n"  # c2 ... c9: 8 hops
    result = run_policy_check(tmp_path, ca, web.port, add=add)
    assert result.returncode == 1, result.stdout + result.stderr
    chain = " -> ".join(["mta-sts.example.org", *hops])
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("1 problem(s) in "), result.stdout
    assert lines[-2] == (
        "MISSING https://mta-sts.example.org/.well-known/mta-sts.txt: expected the policy, "
        f"found mta-sts.example.org: a CNAME chain over 8 hops: {chain} ..."
    ), result.stdout
    assert web.paths == ["/.well-known/mta-sts.txt"]  # mx1's, 8 hops away


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "No such file or directory"),
        (b"not a certificate\n", "no PEM certificate could be read ("),
    ],
)
def test_a_bad_cafile_is_a_usage_error_before_any_lookup(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    """A --cafile that is missing or holds no certificate: exit 2 (not 1, "problems
    found") with the file and the reason, no traceback, and no query asked before."""
    text = zone()
    path = tmp_path / "dns.zone"
    path.write_text(text)
    cafile = tmp_path / "ca.pem"
    if content is not None:
        cafile.write_bytes(content)
    with DnsServer(served(text)) as dns, recording((dns.host, dns.port)) as (address, asked):
        argv = [str(BIN / "pyqmail-dns"), "check", str(path), "--fetch-policy"]
        argv += ["--nameserver", address[0], "--port", str(address[1]), "--timeout", "3"]
        argv += ["--cafile", str(cafile)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"pyqmail-dns: --cafile {cafile}: {why}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert (result.stdout, asked) == ("", [])


def test_a_policy_that_is_not_valid_is_reported(tmp_path: Path, ca: CA, web: PolicyServer) -> None:
    body = b"version: STSv1\nmode: enforce\nmode: testing\nmx: mx1.example.org\nmax_age: 86400\n"
    web.answers["mta-sts.mx1.example.org"] = (200, {"Content-Type": "text/plain"}, body)
    result = run_policy_check(tmp_path, ca, web.port)
    assert result.returncode == 1
    assert (
        "DIFFERENT https://mta-sts.mx1.example.org/.well-known/mta-sts.txt: expected a valid "
        "policy, found 'mode' must be there exactly once" in result.stdout.splitlines()
    )


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("mode: testing\nmx: a.example\nmax_age: 1\n", "'version' must be there exactly once"),
        ("version: STSv2\nmode: testing\nmx: a\nmax_age: 1\n", "version 'STSv2': only STSv1"),
        ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode 'strict': one of enforce"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mode enforce without any 'mx' line"),
        ("version: STSv1\nmode: none\nmax_age: 31557601\n", "max_age '31557601': a number"),
        ("version: STSv1\nmode: none\nmax_age: -1\n", "max_age '-1': a number"),
        ("version: STSv1\n<html>\n", "line 2 is not 'key: value': '<html>'"),
        ("version: STSv1\nmode: none\nmax_age: 8640\u00b2\n", "max_age '8640\u00b2': a number"),
        ("version: STSv1\n-x: y\n", "line 2 is not 'key: value': '-x: y'"),
    ],
)
def test_policy_errors_name_the_problem(body: str, error: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(body)
    assert str(info.value).startswith(error)


def test_an_extension_field_is_ignored() -> None:
    """RFC 8461 3.2: extension names may hold "." and "-"; senders ignore unknown ones."""
    body = "version: STSv1\nmode: none\nx-report.uri: mailto:a@example.org\nmax_age: 86400\n"
    assert parse_policy(body).mode == "none"


def test_the_zone_files_policies_and_mx_matching() -> None:
    """What the role prints is what the command reads (a change of the printed format
    breaks this, not the admins' checks); RFC 8461 4.1's wildcard covers one label only."""
    policies = expected_policies(zone())
    assert list(policies) == ["example.org", "mx1.example.org"]
    assert policies["example.org"].mx == ("mx1.example.org", "mx2.example.org")
    assert (policies["example.org"].mode, policies["example.org"].max_age) == ("testing", 604800)
    assert parse_policy(GOOD["mta-sts.example.org"]) == policies["example.org"]
    assert matches("*.example.org", "mx1.example.org")
    assert not matches("*.example.org", "a.mx1.example.org")
    assert not matches("*.example.org", "example.org")
    assert matches("mx1.example.org", "MX1.example.org.")

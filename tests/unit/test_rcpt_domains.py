"""Which domain a recipient is judged and delivered in (s34 review items 2 to 4).

- a bare ``RCPT TO:<postmaster>`` (RFC 5321 4.5.1) became ``postmaster@<me>``, which is not
  delivered here unless ``me`` is in ``locals``: with ``locals: [example.org]`` and ``me =
  mx1.example.org`` it went to remote delivery and bounced "loops back to myself";
- ``postmaster@<our domain>`` could be refused at RCPT (``validrcptto`` without the
  address, a virtual domain without a ``prefix-postmaster``);
- then (review round 2) that pass was too wide: under a ``.example.com`` rcpthosts wildcard,
  with ``validrcptto``, ``postmaster@<anything>.example.com`` was accepted and, not being
  delivered anywhere, bounced "loops back to myself" to a possibly forged sender. The pass
  is now for the domains delivered here (locals, virtualdomains) only;
- under SMTPUTF8 a U-label domain (``bücher.example``) was compared as a raw string with
  the A-labels of ``rcpthosts`` (553 where ``xn--bcher-kva.example`` got 250).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from test_protocol_support import policy, ready

from pyqmail.checks.recipients import LocalRecipients, judge
from pyqmail.control import smtpd as config
from pyqmail.control.send import Control
from pyqmail.send.dotqmail import Plan
from pyqmail.send.local import LocalDelivery
from pyqmail.smtpd.policy import build_policy

IDN = "xn--bcher-kva.example"  # bücher.example


def rcpt(address: str, *, utf8: bool = True, **overrides: object) -> tuple[str, tuple[str, ...]]:
    """The reply to one RCPT and the recipients the transaction then holds."""
    srv = ready(policy(**overrides))
    assert srv.cmd(f"MAIL FROM:<a@elsewhere.example>{' SMTPUTF8' if utf8 else ''}")[0] == "2"
    reply = srv.cmd(f"RCPT TO:<{address}>")
    tx = srv.conn._tx
    return reply, tuple(tx.recipients) if tx is not None else ()


# ----- the bare <postmaster> ------------------------------------------------------------------


def test_bare_postmaster_goes_to_the_policys_local_domain_whatever_the_checks() -> None:
    reply, recipients = rcpt(
        "Postmaster",
        postmaster_domain="example.org",
        rcpthosts=lambda _d: False,
        validrcptto=lambda _a: False,
    )
    assert (reply, recipients) == ("250 2.1.5 Ok", ("postmaster@example.org",))


@pytest.mark.parametrize(
    ("me", "locals_", "domain"),
    [
        ("mx1.example.org", "example.org\n", "example.org"),
        ("mx1.example.org", "zz.example\nexample.org\nmx1.example.org\n", "mx1.example.org"),
        ("mx1.example.org", "zz.example\nexample.org\n", "example.org"),  # the first, sorted
        ("mx1.example.org", None, "mx1.example.org"),  # locals absent: me
    ],
)
def test_the_postmaster_domain_is_one_delivered_here(
    tmp_path: Path, me: str, locals_: str | None, domain: str
) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text(f"{me}\n")
    if locals_ is not None:
        (tmp_path / "control" / "locals").write_text(locals_)
    cfg = config.load(tmp_path)
    assert cfg.postmaster_domain == domain
    assert build_policy(cfg, "smtp", "192.0.2.1", {}).postmaster_domain == domain
    delivery = Control(tmp_path, me, cfg.locals, {})
    assert delivery.is_local(f"postmaster@{domain}") == "postmaster"  # local, not remote


# ----- postmaster@ every domain we accept mail for ---------------------------------------------


def recipients_root(tmp_path: Path) -> LocalRecipients:
    """What the roles write: a mailbox, the postmaster alias, one virtual domain."""
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "mailboxes").write_text(f"alice:{tmp_path}/homes/alice\n")
    (tmp_path / "alias").mkdir()
    (tmp_path / "alias" / ".qmail-postmaster").write_text("alice\n")
    delivery = Control(tmp_path, "mx.test", frozenset({"example.test"}), {"virt.test": "virt"})
    return LocalRecipients(tmp_path, delivery)


def ours(domain: str) -> bool:
    return domain in ("example.test", "virt.test", "relay.test")


@pytest.mark.parametrize("address", ["postmaster@example.test", "PostMaster@Example.TEST"])
def test_postmaster_is_accepted_with_validrcptto_alone(tmp_path: Path, address: str) -> None:
    delivery = Control(tmp_path, "mx.test", frozenset({"example.test"}), {})
    valid = frozenset({"alice@example.test"})
    assert judge(address, ours, valid, None, delivery) == ""
    assert judge("bob@example.test", ours, valid, None, delivery) != ""
    assert judge("postmaster@evil.test", ours, frozenset(), None, delivery) == ""  # relay rule's


def test_postmaster_is_accepted_in_every_domain_delivered_here(tmp_path: Path) -> None:
    local = recipients_root(tmp_path)
    for address in ("postmaster@example.test", "postmaster@virt.test"):
        assert judge(address, ours, None, local, local.delivery) == "", address
        assert judge(address, ours, frozenset({"@other.test"}), local, local.delivery) == ""
    assert judge("nobody@virt.test", ours, None, local, local.delivery) == "unknown-recipient"


def test_a_relayed_domains_postmaster_follows_validrcptto(tmp_path: Path) -> None:
    """relay.test is in rcpthosts but delivered elsewhere (backup MX): its postmaster is
    accepted as any of its addresses is, not because of its name."""
    local = recipients_root(tmp_path)
    other = frozenset({"@other.test"})
    assert judge("postmaster@relay.test", ours, None, local, local.delivery) == ""
    assert judge("postmaster@relay.test", ours, other, local, local.delivery) != ""
    listed = frozenset({"postmaster@relay.test"})
    assert judge("postmaster@relay.test", ours, listed, local, local.delivery) == ""


@pytest.mark.parametrize("rcptcheck", ["1", "0"])
def test_postmaster_under_an_rcpthosts_wildcard_is_no_pass_for_undelivered_names(
    tmp_path: Path, rcptcheck: str
) -> None:
    """The review's case through the configuration pyqmail-smtpd loads: rcpthosts
    ``.example.com``, validrcptto present; a made-up subdomain's postmaster is refused at
    RCPT (no bounce to a forged sender later), the delivered domains' are accepted."""
    c = tmp_path / "control"
    c.mkdir()
    (c / "me").write_text("mx.example.com\n")
    (c / "rcpthosts").write_text("example.com\n.example.com\nvirt.test\n")
    (c / "locals").write_text("example.com\nmx.example.com\n")
    (c / "virtualdomains").write_text("virt.test:virt\n.lists.example.com:lists\n")
    (c / "validrcptto").write_text("alice@example.com\n")
    (c / "rcptcheck").write_text(f"{rcptcheck}\n")
    (tmp_path / "alias").mkdir()
    (tmp_path / "alias" / ".qmail-postmaster").write_text("alice\n")
    check = config.load(tmp_path).valid_recipient()
    assert check is not None
    for address in ("postmaster@anything.example.com", "Postmaster@Forged.Example.COM"):
        assert check(address) == "not-in-validrcptto", address
    for address in (
        "postmaster@example.com",
        "postmaster@mx.example.com",
        "postmaster@virt.test",
        "PostMaster@a.lists.example.com",
    ):
        assert check(address) == "", address


def test_a_virtual_domains_postmaster_goes_to_its_own_else_to_the_local_one(
    tmp_path: Path,
) -> None:
    local = recipients_root(tmp_path)
    delivery = LocalDelivery(local.delivery, None)
    plan = delivery.plan("postmaster@virt.test")
    assert isinstance(plan, Plan), plan
    assert plan.source == str(tmp_path / "alias" / ".qmail-postmaster")
    assert plan.delivered_to == "postmaster@virt.test"
    other = delivery.plan("nobody@virt.test")  # other unknown names still bounce
    assert not isinstance(other, Plan) and other.status == "5.1.1"
    (tmp_path / "alias" / ".qmail-virt-postmaster").write_text("bob@elsewhere.test\n")
    plan = delivery.plan("Postmaster@virt.test")
    assert isinstance(plan, Plan), plan
    assert plan.source == str(tmp_path / "alias" / ".qmail-virt-postmaster")


# ----- internationalised domains ------------------------------------------------------------


def idn_hosts(domain: str) -> bool:
    return domain in (IDN, "example.test")


@pytest.mark.parametrize(
    "domain",
    [
        "bücher.example",
        "BÜCHER.example",
        "Bücher.Example",
        unicodedata.normalize("NFD", "bücher.example"),  # u + combining diaeresis
    ],
)
def test_a_u_label_domain_is_judged_and_queued_as_its_a_labels(domain: str) -> None:
    seen: list[str] = []
    reply, recipients = rcpt(
        f"Jörg@{domain}", rcpthosts=idn_hosts, validrcptto=lambda a: seen.append(a) or True
    )
    assert (reply, recipients) == ("250 2.1.5 Ok", (f"Jörg@{IDN}",))  # the local part kept
    assert seen == [f"Jörg@{IDN}"]


def test_u_labels_follow_the_rules_a_labels_do() -> None:
    """SMTPUTF8 still needed, rcpthosts still decides; the two forms are one recipient."""
    assert rcpt("a@bücher.example", utf8=False, rcpthosts=idn_hosts)[0] == (
        "553 5.6.7 sorry, non-ASCII address needs SMTPUTF8"
    )
    assert rcpt("a@bücher.test", rcpthosts=idn_hosts)[0] == (
        "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"
    )
    srv = ready(policy(rcpthosts=idn_hosts))
    assert srv.cmd("MAIL FROM:<a@elsewhere.example> SMTPUTF8") == "250 2.1.0 Ok"
    assert srv.cmd(f"RCPT TO:<a@{IDN}>") == "250 2.1.5 Ok"
    assert srv.cmd("RCPT TO:<a@bücher.example>") == "250 2.1.5 Ok"
    srv.cmd("DATA")
    assert srv.messages[0].start.recipients == (f"a@{IDN}",)


@pytest.mark.parametrize(
    ("domain", "label"),
    [
        ("straße.example", "stra\\xdfe"),  # IDNA 2003 maps it to strasse: another domain
        ("\uff45xample.test", "\\uff45xample"),  # full-width: the same letters, not the same label
        ("a.\u2ff0x.example", "\\u2ff0x"),  # a character IDNA prohibits
        ("\u05d0a.example", "\\u05d0a"),  # right-to-left and left-to-right mixed
        ("x\u3002y.example", "x\\u3002y"),  # an ideographic full stop: a dot to IDNA
    ],
)
def test_a_label_without_a_sure_a_label_is_refused_by_name(domain: str, label: str) -> None:
    reply, recipients = rcpt(f"a@{domain}", relay_client=True)
    assert reply == f"553 5.1.3 sorry, the domain label '{label}' has no IDNA A-label form"
    assert recipients == ()


def test_a_relayed_u_label_recipient_travels_as_a_labels() -> None:
    reply, recipients = rcpt("user@日本語.example", relay_client=True)
    assert (reply, recipients) == ("250 2.1.5 Ok", ("user@xn--wgv71a119e.example",))


def test_the_sender_is_kept_as_the_client_wrote_it() -> None:
    srv = ready(policy(rcpthosts=idn_hosts))
    assert srv.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8") == "250 2.1.0 Ok"
    assert srv.cmd("RCPT TO:<a@bücher.example>") == "250 2.1.5 Ok"
    srv.cmd("DATA")
    start = srv.messages[0].start
    assert (start.sender, start.recipients) == ("jörg@bücher.example", (f"a@{IDN}",))

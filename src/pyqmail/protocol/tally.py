"""What a session has done that moves no mail, and when that ends it (Postfix's limits).

A session ends with ``421 4.7.0 ... too many errors`` once it has made ``Policy.max_errors``
errors (``maxerrors``) or ``Policy.max_auth_failures`` failed logins. Besides the replies
that are errors in themselves (syntax, sequence, a refused recipient), three things a
well-behaved client also does now and then become errors only past a margin, so that they
cannot go on for ever yet never cost an honest client its session:

- junk commands (NOOP, RSET, VRFY, ..., a repeated HELO or RCPT): past ``Policy.max_junk``
  (``maxjunk``; Postfix ``smtpd_junk_command_limit``);
- deferred MAIL commands (a 4xx from greylisting or from a login's sending limit): past
  ``Policy.max_deferred`` (10). No accepted recipient is at stake at MAIL, so these end the
  session as Postfix's ``smtpd_hard_error_limit`` does;
- RCPTs answered ``452 4.5.3`` without being looked at: past
  ``Policy.max_rcpt_overshoot`` per transaction (Postfix
  ``smtpd_recipient_overshoot_limit``, 1000). A pipelining MTA sends every RCPT before it
  reads the first 452, so a long list must still reach DATA. Two things give these 452s:
  the transaction's recipient limit, and the session's deferred RCPTs.

Deferred RCPTs (a 4xx from greylisting or a sending limit) are never errors: an error would
end the session before DATA and lose the recipients the transaction had already accepted
(a 100-recipient list to a greylisting server got 421 on five attempts in a row). Their
limit is what they cost the server instead: once a session has had
``Policy.max_deferred_rcpt`` (100) of them, every further RCPT gets ``452 4.5.3`` at once,
without greylisting, the sending limits or the recipient check being asked (no triplet
written, no log line), and counts as an overshoot. The client can still go on to DATA with
the recipients accepted; a list of N new recipients thus has 100 of them greylisted per
attempt and is delivered, attempt after attempt, to those that passed.

The junk and deferral counts start again when a message is queued (Postfix: "reset after
mail is delivered"); the errors do not. Each margin's first excess is reported once
through ``Policy.notice``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyqmail.protocol.events import Policy

REPLY_TOO_MANY_RCPTS = "452 4.5.3 Error: too many recipients"
REPLY_TOO_MANY_DEFERRED = (
    "452 4.5.3 Error: too many recipients deferred in this session, try the rest later"
)


@dataclass
class Tally:
    """One session's counts; ``SMTPConnection`` asks ``exhausted`` before each command."""

    policy: Policy
    errors: int = 0
    auth_failures: int = 0
    junk: int = 0  # since the last queued message
    deferred_mail: int = 0  # since the last queued message
    deferred_rcpt: int = 0  # since the last queued message
    _rcpt_stop_noted: bool = False

    @property
    def exhausted(self) -> bool:
        """True once the session must end with 421 at its next command."""
        policy = self.policy
        return self.errors >= policy.max_errors or self.auth_failures >= policy.max_auth_failures

    def junk_command(self) -> None:
        """One more command that moves no mail (``max_junk`` 0: no limit)."""
        self.junk += 1
        if self.policy.max_junk:
            self._past(self.junk, self.policy.max_junk, "junk-limit", "junk commands")

    def deferral(self, *, rcpt: bool) -> None:
        """One more MAIL or RCPT answered with a 4xx by a check (greylisting, a limit)."""
        if rcpt:
            self.deferred_rcpt += 1
            return
        self.deferred_mail += 1
        self._past(self.deferred_mail, self.policy.max_deferred, "defer-limit", "deferred MAILs")

    def rcpt_refusal(self) -> str | None:
        """The 452 for a RCPT that must not be looked at now, or None: the transaction's
        recipient limit is the core's to check; this is the session's deferral limit."""
        limit = self.policy.max_deferred_rcpt
        if self.deferred_rcpt < limit:
            return None
        if not self._rcpt_stop_noted:
            self._rcpt_stop_noted = True
            self.policy.notice("rcpt-defer-limit", f"{limit} deferred RCPTs, further ones 452")
        return REPLY_TOO_MANY_DEFERRED

    def overshoot(self, count: int) -> None:
        """The transaction's ``count``-th RCPT answered 452 unseen (limit or deferrals)."""
        limit = self.policy.max_rcpt_overshoot
        self._past(count, limit, "rcpt-overshoot", "RCPTs answered 452 in one transaction")

    def delivered(self) -> None:
        """A message was queued: the client moves mail, its junk and deferrals start again."""
        self.junk = self.deferred_mail = self.deferred_rcpt = 0
        self._rcpt_stop_noted = False

    def _past(self, count: int, limit: int, event: str, what: str) -> None:
        """Past ``limit`` each one is an error; the first time, the server logs it."""
        if count > limit:
            if count == limit + 1:
                self.policy.notice(event, f"more than {limit} {what}")
            self.errors += 1

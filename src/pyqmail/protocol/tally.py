"""What a session has done that moves no mail, and when that ends it (Postfix's limits).

A session ends with ``421 4.7.0 ... too many errors`` once it has made ``Policy.max_errors``
errors (``maxerrors``) or ``Policy.max_auth_failures`` failed logins. Besides the replies
that are errors in themselves (syntax, sequence, a refused recipient), three things a
well-behaved client also does now and then become errors only past a margin, so that they
cannot go on for ever yet never cost an honest client its session:

- junk commands (NOOP, RSET, VRFY, ..., a repeated HELO or RCPT): past ``Policy.max_junk``
  (``maxjunk``; Postfix ``smtpd_junk_command_limit``);
- deferred MAIL and RCPT commands (a 4xx from greylisting or from a login's sending
  limit): past ``Policy.max_deferred``. Postfix counts each as an error from the first,
  which with its ``smtpd_hard_error_limit`` of 20 ends a session after 20 of them; a
  margin of 10 before ``maxerrors``' 10 gives the same. Without it a client could make
  pyqmail-smtpd write a greylist triplet (and a log line) for each of an endless stream of
  RCPTs;
- RCPTs past the transaction's recipient limit (``452 4.5.3``): past
  ``Policy.max_rcpt_overshoot`` per transaction (Postfix
  ``smtpd_recipient_overshoot_limit``, 1000). A pipelining MTA sends every RCPT before it
  reads the first 452, so a long list must still reach DATA.

The junk and deferral counts start again when a message is queued (Postfix: "reset after
mail is delivered"); the errors do not. Each margin's first excess is reported once
through ``Policy.notice``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyqmail.protocol.events import Policy


@dataclass
class Tally:
    """One session's counts; ``SMTPConnection`` asks ``exhausted`` before each command."""

    policy: Policy
    errors: int = 0
    auth_failures: int = 0
    junk: int = 0  # since the last queued message
    deferred: int = 0  # since the last queued message

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

    def deferral(self) -> None:
        """One more MAIL or RCPT answered with a 4xx by a check (greylisting, a limit)."""
        self.deferred += 1
        self._past(self.deferred, self.policy.max_deferred, "defer-limit", "deferred MAIL/RCPT")

    def overshoot(self, count: int) -> None:
        """The transaction's ``count``-th RCPT past its recipient limit (answered 452)."""
        limit = self.policy.max_rcpt_overshoot
        self._past(count, limit, "rcpt-overshoot", "RCPTs past the recipient limit")

    def delivered(self) -> None:
        """A message was queued: the client moves mail, its junk and deferrals start again."""
        self.junk = 0
        self.deferred = 0

    def _past(self, count: int, limit: int, event: str, what: str) -> None:
        """Past ``limit`` each one is an error; the first time, the server logs it."""
        if count > limit:
            if count == limit + 1:
                self.policy.notice(event, f"more than {limit} {what}")
            self.errors += 1

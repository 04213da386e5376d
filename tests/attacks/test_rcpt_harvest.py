"""Directory harvesting: guessing local parts at RCPT (issue 17 item 1).

An outside client tries common names, case and dot variants, extensions of a real mailbox
and of an alias, and path tricks against a root the roles would write. It learns nothing but
``550 5.1.1`` for names delivery would not find, and after ``maxerrors`` (default 10) wrong
guesses the session ends with ``421``: a dictionary costs a connection per ten guesses.
Class: ``rcpt-harvest``.
"""

from __future__ import annotations

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.e2e.conftest import QmailRoot, StartDaemon

OUTSIDE = "127.0.0.9"

GUESSES = [
    "admin", "info", "root2", "webmaster", "sales-team", "support", "test", "user", "mail",
    "alice.smith", "alice_", "alice+tag", "ali", "lists", "sales-", "-sales", "x" * 200,
    "..", ".qmail", "default", "qmail-default", "alice@", "\"alice\"", "sales-..",
]  # fmt: skip


def test_guessed_local_parts_are_refused_and_cost_the_session(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    qmail_root.control("locals", "mx.test\n")
    qmail_root.write("users/mailboxes", f"alice:{qmail_root.path}/homes/alice\n")
    qmail_root.write("alias/.qmail-sales", "alice\n")
    d = smtpd()
    refused = 0
    sessions = 0
    pending = list(GUESSES)
    while pending:
        sessions += 1
        with Wire(d.port, source=OUTSIDE) as w:
            assert w.reply()[0] == 220
            assert w.cmd("EHLO harvester.example")[0] == 250
            assert w.cmd("MAIL FROM:<h@harvester.example>")[0] == 250
            while pending:
                code, text = w.cmd(f"RCPT TO:<{pending[0]}@mx.test>")
                if code == 421:
                    assert w.until_eof(5) == []
                    break
                guess = pending.pop(0)
                tried("rcpt-harvest")
                assert code in (550, 501, 553), (guess, code, text)
                refused += code == 550
            else:
                assert w.cmd("RCPT TO:<alice@mx.test>")[0] == 250  # the real one still works
    assert sessions == 3  # 24 wrong guesses, 10 per session
    assert refused >= 15
    assert "status=5.1.1 reason=unknown-recipient" in d.output

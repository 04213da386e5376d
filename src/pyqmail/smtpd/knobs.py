"""Per-session limits of pyqmail-smtpd that have no qmail control file of their own.

Read from ``<root>/control`` with the other control files (``pyqmail.control.smtpd.load``) and
swapped with them on HUP. Names follow qmail's style; the semantics follow Postfix:

=================  ===========================================================================
``authheader``     1: the Received header names the AUTH login (``authenticated user: ...``);
                   0 (default): it does not, as Postfix's ``smtpd_sasl_authenticated_header
                   = no`` — the login name would otherwise travel with relayed mail. The
                   ``with ESMTPA`` keyword still says that the client authenticated.
``maxjunk``        junk commands (NOOP, RSET, VRFY, EXPN, HELP, ETRN, TURN, a repeated
                   HELO/EHLO, an RCPT repeating an address) a session may send before
                   each further one counts as a protocol error (Postfix
                   ``smtpd_junk_command_limit``); ``maxerrors`` errors then end the session
                   with ``421 4.7.0``. The count restarts when a message is queued ("reset
                   after mail is delivered"). Default 100; 0 = no limit
``greetdelay``     seconds the ``smtp`` listener waits before its 220 greeting (postscreen's
                   ``greet_wait``); a client that talks in that time gets ``554 5.5.0`` and is
                   dropped (logged ``pregreet``). Not for RELAYCLIENT clients nor those
                   with ``RBLSMTPD=""``, not on the ``smtps``/``submission`` listeners; a
                   rule's ``GREETDELAY`` sets one client's pause (``pyqmail.checks.greet``).
                   Default 0 (off, no detection); 1 to 6 on a public MX, at most 60
``timeoutstress``  the idle timeout (instead of ``timeoutsmtpd``) while the listener is under
                   stress; default 10, as Postfix's ``smtpd_timeout = ${stress?10}:300``
``stresspercent``  the listener is under stress while its connections, counted over all its
                   workers, are at least this percentage of ``maxconn``; default 80, 1 to 100
``authmsgsperhour`` messages one AUTH login may have queued in the last hour, over every
                   worker and listener (``pyqmail.smtpd.sendlimits``); more: ``450 4.7.1`` at
                   MAIL. Default 200; 0 = no limit
``authrcptsperhour`` recipients of those messages; more: ``450 4.7.1`` at RCPT. Default 1000;
                   0 = no limit
=================  ===========================================================================

A session's idle timeout is decided each time it makes progress (``idle_timeout``): a
client that went idle before the stress began keeps its longer deadline until it next
talks, like Postfix, whose timeout applies per read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyqmail.control import table


@dataclass(frozen=True)
class SessionKnobs:
    """The values of the control files above (defaults: the documented ones)."""

    auth_header: bool = False
    max_junk: int = 100
    greet_delay: int = 0
    timeout_stress: int = 10
    stress_percent: int = 80
    auth_msgs_per_hour: int = 200
    auth_rcpts_per_hour: int = 1000


def load(control: Path) -> SessionKnobs:
    """Read the knobs from ``control`` as ``pyqmail.control.table`` says (ControlError if bad)."""
    return SessionKnobs(
        auth_header=table.AUTHHEADER.read(control) == 1,
        max_junk=table.MAXJUNK.read(control),
        greet_delay=table.GREETDELAY.read(control),
        timeout_stress=table.TIMEOUTSTRESS.read(control),
        stress_percent=table.STRESSPERCENT.read(control),
        auth_msgs_per_hour=table.AUTHMSGSPERHOUR.read(control),
        auth_rcpts_per_hour=table.AUTHRCPTSPERHOUR.read(control),
    )


def under_stress(knobs: SessionKnobs, connections: int, maxconn: int) -> bool:
    """True while ``connections`` (the listener's, all workers) reach the stress threshold."""
    return connections * 100 >= knobs.stress_percent * maxconn


def idle_timeout(knobs: SessionKnobs, normal: int, connections: int, maxconn: int) -> int:
    """Seconds a client may now take to make progress: ``normal``, or less under stress."""
    if under_stress(knobs, connections, maxconn):
        return min(normal, knobs.timeout_stress)
    return normal

"""The greeting pause on port 25 (postscreen's ``greet_wait``): who waits, and how long.

A spam bot often talks before the 220 greeting: it does not wait for the server. The
``smtp`` listener holds its greeting back ``control/greetdelay`` seconds; a client that
sends anything in that time gets ``554 5.5.0`` and is dropped, logged ``pregreet``
(``pyqmail.smtpd.session``). Who is spared, per client, from the tcprules cdb:

- ``RELAYCLIENT`` set: the relay clients (they are ours);
- ``RBLSMTPD`` set to the empty string: rblsmtpd's allow-list mark (a client allowed past
  the blocklists is allowed past this test too, as postscreen's allow-list skips all);
- ``GREETDELAY=n``: this client's pause in seconds instead of the control file's
  (0 = none, the allow-list entry for one host; more = a longer pause for a suspicious
  range), 0 to 60. A value that is not such a number is logged and ignored.

The ``smtps`` and ``submission`` listeners never pause: their clients are users.
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_PAUSE = 60  # as control/greetdelay (pyqmail.control.table.GREETDELAY)


def pause(mode: str, env: Mapping[str, str], default: int) -> int:
    """Seconds to hold the greeting back for a client with rule environment ``env``."""
    if mode != "smtp" or "RELAYCLIENT" in env or env.get("RBLSMTPD") == "":
        return 0
    return client_pause(env.get("GREETDELAY"), default)


def client_pause(value: str | None, default: int) -> int:
    """The rule's ``GREETDELAY``, or ``default`` when it is absent or malformed."""
    if value is None:
        return default
    text = value.strip()
    if text.isdigit() and text.isascii() and int(text) <= MAX_PAUSE:
        return int(text)
    return default


def bad_value(value: str | None) -> bool:
    """True when a rule's ``GREETDELAY`` is set but is not a pause ``client_pause`` takes."""
    return value is not None and client_pause(value, -1) == -1

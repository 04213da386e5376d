"""Senders whose address changes with every message (``pyqmail.checks.greysender``).

BATV, SRS and VERP senders were keyed raw: each retry of a new message was a new triplet,
so such a sender never became known and every message waited out the delay.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.checks.greylist import Greylist
from pyqmail.checks.greysender import normalise
from tests.greylist_util import GREY, T0


@pytest.mark.parametrize(
    ("sender", "key"),
    [
        ("User@Example.COM", "user@example.com"),
        ("", ""),
        ("postmaster", "postmaster"),
        # BATV (prvs=, Microsoft's msprvs1=, Barracuda's btv1==...==)
        ("prvs=1234abcdef=alice@example.com", "alice@example.com"),
        ("PRVS=0042f00baa=alice@example.com", "alice@example.com"),
        ("msprvs1=17827NRhq8a9X=bounces-125828-1@bounce.example", "bounces-#-#@bounce.example"),
        ("btv1==0d6f4a6c0f8==alice@example.com", "alice@example.com"),
        # SRS: the original sender back
        ("SRS0=HHH=TT=orig.example=alice@fwd.example", "alice@orig.example"),
        ("SRS0+x7Yq=5Z=orig.example=alice@fwd.example", "alice@orig.example"),
        ("SRS1=HHH=fwd1.example==HHH=TT=orig.example=alice@fwd2.example", "alice@orig.example"),
        ("SRS0=broken@fwd.example", "srs#=broken@fwd.example"),
        # VERP: numbers and +extensions
        ("bounce-1001-4711@lists.example", "bounce-#-#@lists.example"),
        ("list+bob=mx.test@lists.example", "list@lists.example"),
        ("msg-20240101.123456@mailer.example", "msg-#.#@mailer.example"),
    ],
)
def test_normalise(sender: str, key: str) -> None:
    assert normalise(sender) == key


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("prvs=1234abcdef=alice@example.com", "prvs=2345bcdefa=alice@example.com"),
        (
            "SRS0=aaaa=T1=orig.example=alice@fwd.example",
            "SRS0=bbbb=T2=orig.example=alice@fwd.example",
        ),
        ("bounce-1001-4711@lists.example", "bounce-1002-9876@lists.example"),
    ],
)
def test_a_retry_with_a_fresh_tag_passes(tmp_path: Path, first: str, second: str) -> None:
    """The second message's address differs from the first's; its retry still passes, and
    the one after that is known."""
    grey = Greylist(tmp_path)
    assert grey.check("192.0.2.7", first, "u@mx.test", GREY, T0).action == "defer"
    assert grey.check("192.0.2.8", second, "u@mx.test", GREY, T0 + 300).log == "greylist=pass"
    assert grey.check("192.0.2.9", first, "u@mx.test", GREY, T0 + 600).log == "greylist=known"
    grey.close()

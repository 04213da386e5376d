"""How many attack variants each class tried, printed at the end of the pytest run."""

from __future__ import annotations

import threading
from collections import Counter

TRIED: Counter[str] = Counter()
_LOCK = threading.Lock()


def tried(cls: str, count: int = 1) -> None:
    """Record ``count`` attack variants of class ``cls`` actually sent to a daemon."""
    with _LOCK:
        TRIED[cls] += count

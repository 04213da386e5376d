"""Giving a process's freed heap memory back to the kernel once it has gone quiet.

Why: after a burst of sessions, a pyqmail-smtpd worker has freed most of what the burst
allocated (buffers, TLS records, parsed commands), but glibc's malloc keeps freed memory
in its heap for reuse, so the worker's resident size, and the PSS an admin sees, stays
at the burst's level. ``malloc_trim(0)`` returns the free pages inside the heap, not
only at its top (glibc 2.8 and later); on this project's benchmark it took 0.7 MiB off
two workers at rest (``bench/README.md``). It costs some 50 µs the first time after a
burst and about 1 µs when there is nothing to give back.

``ctypes`` is already loaded in the daemons (``pyqmail.tickets``, ``pyqmail.send.spawn``),
so this costs no import. Elsewhere than glibc (musl has no ``malloc_trim``) ``trim``
does nothing.
"""

from __future__ import annotations

import ctypes

_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]  # int malloc_trim(size_t pad)
    _malloc_trim.restype = ctypes.c_int


def trim() -> bool:
    """``malloc_trim(0)``; True if memory was given back."""
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))

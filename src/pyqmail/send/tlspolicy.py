"""The client TLS contexts of remote delivery, per remote host (``pyqmail.send.remote`` says
which one a connection uses): verifying, unverified, or pinned by ``control/tlshosts``.

Its own module so that remote.py keeps to the SMTP conversation; the contexts are built by
``pyqmail.tls.client_context`` and cached here by the identity of the files they come from.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

from pyqmail.tls import client_context


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file's current content for cache keys: inode, size, mtime; None if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class TlsPolicy:
    """Every client TLS context pyqmail-send uses, built from the control directory.

    Contexts are cached (loading CA stores is slow) under a key that includes the identity of
    the files they were built from, so a renewed ``clientcert.pem`` or a changed
    ``tlshosts/<fqdn>.pem`` takes effect at the next delivery attempt, as qmail-remote reads
    them per attempt, without a HUP.
    """

    def __init__(self, control_dir: Path) -> None:
        self.control_dir = control_dir
        self._clientcert_path = control_dir / "clientcert.pem"
        self._cache: dict[tuple[object, ...], ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def _cached(self, kind: str, pin: Path | None = None) -> ssl.SSLContext:
        """The context for ``kind`` ("verify", "none" or "pin"); raises TLSConfigError."""
        cert_stamp = _file_stamp(self._clientcert_path)
        cert = self._clientcert_path if cert_stamp is not None else None
        key = (kind, str(pin), _file_stamp(pin) if pin else None, cert_stamp)
        with self._lock:
            ctx = self._cache.get(key)
            if ctx is None:
                if kind == "verify":
                    ctx = client_context(verify=True, certfile=cert)
                elif kind == "none":
                    ctx = client_context(verify=False, certfile=cert)
                else:
                    ctx = client_context(verify=True, cafile=str(pin), certfile=cert)
                # Drop contexts built from older versions of the same files.
                for old in [k for k in self._cache if k[:2] == key[:2]]:
                    del self._cache[old]
                self._cache[key] = ctx
            return ctx

    def pin(self, fqdn: str) -> Path | None:
        if "/" in fqdn or fqdn.startswith("."):
            return None
        path = self.control_dir / "tlshosts" / f"{fqdn.lower()}.pem"
        return path if path.exists() else None

    def verifying(self) -> ssl.SSLContext:
        return self._cached("verify")

    def unverified(self) -> ssl.SSLContext:
        return self._cached("none")

    def pinned(self, pin: Path) -> ssl.SSLContext:
        return self._cached("pin", pin)

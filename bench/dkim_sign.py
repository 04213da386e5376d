"""DKIM signatures per second for one 4 KiB message: dkimpy against pyqmail.dkim.sign.

Why this exists: pyqmail-send signs every submitted message once at pickup, in its manager
(``pyqmail.dkim``), so the cost of a signature is paid on the queue's main path. The two
candidates were dkimpy (Debian python3-dkim: pure-Python RSA, Ed25519 through PyNaCl, its
own canonicalization) and pyqmail's own relaxed/relaxed canonicalization with the
private-key operation in ``cryptography`` (OpenSSL). Both sign the same message with the same
keys (RSA-2048, Ed25519), relaxed/relaxed, the same header set; the figure is signatures per
CPU second of one process (one core), best of ``--rounds`` rounds of ``--seconds`` each.
Rows ``private op`` time only the RSA/Ed25519 operation of ``cryptography`` on a
precomputed input, to show how much of a signature is canonicalization and hashing.

    .venv/bin/python bench/dkim_sign.py [--seconds 2] [--rounds 3] [--size 4096]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from pyqmail.dkim.keys import Key
from pyqmail.dkim.sign import SIGNED, sign


def make_message(size: int) -> bytes:
    head = (
        b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
        b"Subject: a benchmark message\r\nDate: Wed, 02 Dec 2026 06:00:00 +0000\r\n"
        b"Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and  again.\r\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 2] + b"\r\n"
    return head + body


def rate(fn: Callable[[], object], seconds: float, rounds: int) -> float:
    """Best calls per CPU second of this process over ``rounds`` rounds of about ``seconds``
    (wall) each: CPU time, not wall time, so other load on the machine does not count."""
    best = 0.0
    for _ in range(rounds):
        count, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            for _ in range(5):
                fn()
            count += 5
        best = max(best, count / max(time.process_time() - cpu, 1e-9))
    return best


def dkimpy_signer(
    message: bytes, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
) -> Callable[[], bytes]:
    """dkimpy's ``dkim.sign`` with the key in the form it takes (PKCS#1 PEM for RSA, the raw
    Ed25519 seed in base64: it cannot read PKCS#8 Ed25519 keys)."""
    if isinstance(key, rsa.RSAPrivateKey):
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        algorithm = b"rsa-sha256"
    else:
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        pem = base64.b64encode(raw)
        algorithm = b"ed25519-sha256"
    names = [n.encode() for n in SIGNED]

    def run() -> bytes:
        return dkim.sign(
            message,
            b"s1",
            b"example.org",
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=names,
            signature_algorithm=algorithm,
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    message = make_message(args.size)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    keys = {
        "RSA-2048": Key("example.org", "s1", "rsa-sha256", rsa_key),
        "Ed25519": Key("example.org", "s1", "ed25519-sha256", ed_key),
    }
    digest_input = message[:600]
    rows: list[tuple[str, str, float]] = []
    for name, key in keys.items():
        private = key.private
        rows.append(
            ("dkimpy 1.1 (pure-Python RSA / PyNaCl)", name, rate(
                dkimpy_signer(message, private), args.seconds, args.rounds
            ))
        )  # fmt: skip
        rows.append(
            ("pyqmail.dkim.sign (cryptography)", name, rate(
                lambda key=key: sign(message, [key], 1_790_000_000), args.seconds, args.rounds
            ))
        )  # fmt: skip
        if isinstance(private, rsa.RSAPrivateKey):
            op: Callable[[], bytes] = lambda p=private: p.sign(  # noqa: E731
                digest_input, padding.PKCS1v15(), hashes.SHA256()
            )
        else:
            op = lambda p=private: p.sign(hashlib.sha256(digest_input).digest())  # noqa: E731
        rows.append(("private op only (cryptography)", name, rate(op, args.seconds, args.rounds)))
    both = rate(
        lambda: sign(message, list(keys.values()), 1_790_000_000), args.seconds, args.rounds
    )
    rows.append(("pyqmail.dkim.sign, both keys (one message)", "RSA+Ed25519", both))
    print(f"message {len(message)} bytes, best of {args.rounds} x {args.seconds:g} s, CPU time")
    print(f"{'signer':46} {'key':12} {'sigs/CPU s':>12} {'CPU ms':>8}")
    for signer, key_name, per_second in rows:
        print(f"{signer:46} {key_name:12} {per_second:12.0f} {1000 / per_second:8.3f}")


if __name__ == "__main__":
    main()

"""pyqmail.smtpd.limits.ConnTable: exact per-client connection counts shared by forked workers."""

from __future__ import annotations

import ipaddress
import os
import random
import zlib
from collections import Counter

import pytest

from pyqmail.smtpd.limits import ConnTable, key_bytes, limit_key

A, B = "127.0.11.243", "127.0.0.77"  # the issue's pair: one bucket under crc32 % 4096


def test_issue_pair_collided_in_the_old_buckets() -> None:
    assert zlib.crc32(A.encode()) % 4096 == zlib.crc32(B.encode()) % 4096


def test_a_full_client_does_not_refuse_its_bucket_neighbour() -> None:
    table = ConnTable(2, maxconn=1000)
    for _ in range(50):
        assert table.admit(key_bytes(A), 1000, 50).refused is None
    assert table.admit(key_bytes(A), 1000, 50).refused == "maxconnip=50"
    got = table.admit(key_bytes(B), 1000, 50)
    assert got.refused is None and got.counted and got.held == 0


def test_counts_are_summed_over_workers_and_reset_per_worker() -> None:
    table = ConnTable(3, maxconn=100)
    key = key_bytes("192.0.2.7")
    for slot in (0, 1, 1, 2):
        table.slot = slot
        assert table.admit(key, 100, 10).counted
    assert table.held(key) == 4 and table.total() == 4
    table.reset(1)
    assert table.held(key) == 2 and table.total() == 2
    table.slot = 2
    table.release(key, counted=True)
    assert table.held(key) == 1 and table.total() == 1


def test_total_limit() -> None:
    table = ConnTable(1, maxconn=3)
    for i in range(3):
        assert table.admit(key_bytes(f"192.0.2.{i}"), 3, 10).refused is None
    assert table.admit(key_bytes("192.0.2.99"), 3, 10).refused == "maxconn=3"


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
    ],
)
def test_limit_key_groups_ipv6_by_64(ip: str, key: str) -> None:
    assert limit_key(ip) == key


@pytest.mark.parametrize(
    "ip",
    [
        "192.0.2.7",
        "0.0.0.0",
        "255.255.255.255",
        "::ffff:192.0.2.7",
        "2001:db8:1:2:3:4:5:6",
        "2001:db8::1%eth0",
        "::1",
        "fe80::1",
        "?",
        "",
        "1.2.3",
        "01.2.3.4",
        "192.0.2.7\x00",
        "unix:/run/x",
    ],
)
def test_key_bytes_are_ipaddress_packed_form(ip: str) -> None:
    """The 16-byte key is what ``ipaddress`` packs: the IPv4 address mapped into IPv6, or
    the /64's network address; all zero for what is no address."""
    key = limit_key(ip)
    try:
        if "/" in key:
            expected = ipaddress.IPv6Network(key).network_address.packed
        else:
            expected = ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(key)}").packed
    except ValueError:
        expected = bytes(16)
    assert key_bytes(ip) == expected


def test_ipv6_one_key_per_64_distinct_64s_apart() -> None:
    table = ConnTable(1, maxconn=100)
    for host in range(1, 4):
        assert table.admit(key_bytes(f"2001:db8:0:1::{host}"), 100, 3).refused is None
    assert table.admit(key_bytes("2001:db8:0:1:ffff::9"), 100, 3).refused == "maxconnip=3"
    assert table.admit(key_bytes("2001:db8:0:2::1"), 100, 3).refused is None
    assert key_bytes("192.0.2.7") != key_bytes("::ffff:192.0.2.8")
    assert key_bytes("192.0.2.7") == key_bytes("::ffff:192.0.2.7")


def test_matches_a_model_under_random_use() -> None:
    """Inserts, releases and worker resets in random order keep every count exact (the
    backward-shift deletion keeps probe runs intact)."""
    rng = random.Random(7)
    table = ConnTable(3, maxconn=600)
    model: Counter[tuple[bytes, int]] = Counter()
    keys = [key_bytes(f"10.0.{i // 200}.{i % 200}") for i in range(400)]
    for step in range(6000):
        slot = rng.randrange(3)
        table.slot = slot
        live = [k for k in model if k[1] == slot and model[k]]
        if step % 1500 == 1499:
            table.reset(slot)
            for k in [k for k in model if k[1] == slot]:
                del model[k]
        elif live and rng.random() < 0.45:
            key = rng.choice(live)[0]
            table.release(key, counted=True)
            model[key, slot] -= 1
            if not model[key, slot]:
                del model[key, slot]
        else:
            key = rng.choice(keys)
            if table.admit(key, 10_000, 10_000).counted:
                model[key, slot] += 1
    for key in keys:
        assert table.held(key) == sum(n for (k, _), n in model.items() if k == key)


def test_full_table_admits_new_keys_uncounted() -> None:
    table = ConnTable(1, maxconn=10)  # capacity 1024; "full" at 768 entries
    admitted = [table.admit(key_bytes(f"10.1.{i // 256}.{i % 256}"), 10_000, 5) for i in range(800)]
    assert all(a.refused is None for a in admitted)
    uncounted = [a for a in admitted if not a.counted]
    assert len(uncounted) == 800 - table.capacity * 3 // 4
    full_key = key_bytes("10.1.0.1")  # counted before the table filled: still limited
    for _ in range(4):
        table.admit(full_key, 10_000, 5)
    assert table.admit(full_key, 10_000, 5).refused == "maxconnip=5"


def test_shared_with_a_forked_worker() -> None:
    table = ConnTable(2, maxconn=100)
    key = key_bytes(A)
    pid = os.fork()
    if pid == 0:
        table.slot = 1
        code = 0 if all(table.admit(key, 100, 3).counted for _ in range(2)) else 1
        os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert table.held(key) == 2
    assert table.admit(key, 100, 3).refused is None
    assert table.admit(key, 100, 3).refused == "maxconnip=3"
    table.reset(1)  # the worker is gone: so are its connections
    assert table.held(key) == 1


def test_reset_drops_an_entry_left_twice_by_a_killed_worker() -> None:
    table = ConnTable(2, maxconn=100)
    key = key_bytes("192.0.2.7")
    table.slot = 0
    table.admit(key, 100, 10)
    table.admit(key, 100, 10)
    # what a SIGKILL between the copy and the clear of a backward shift leaves behind
    i = next(i for i in range(table.capacity) if table._entry(i)[1])
    j = (i + 1) % table.capacity
    table._put(j, *table._entry(i))
    assert table.held(key) == 4
    table.reset(1)
    assert table.held(key) == 2

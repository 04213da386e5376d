"""The SMTP core's state machine and the shape of its package.

- Rule 1 of ``pyqmail.protocol.states``: the state changes only in ``SMTPConnection._enter``
  (an AST scan of the package), ``_enter`` refuses a change outside ``TRANSITIONS``, and a
  scripted set of sessions takes exactly the table's transitions: none outside it (so every
  other test and the fuzzers, which would raise ``TransitionError``, run inside the table too)
  and none of the table's left unexercised.
- The package: no import cycles, each module importable alone (sizes: tests/unit/test_layout.py).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_protocol_support import TLS, policy

from pyqmail.protocol import (
    KNOWN_MECHANISMS,
    AuthRequest,
    MessageEnd,
    Policy,
    SMTPConnection,
    State,
    TransitionError,
)
from pyqmail.protocol import sasl as protocol_sasl
from pyqmail.protocol.states import INITIAL, INPUT, TRANSITIONS
from tests.core_buffers import held_bytes

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "pyqmail" / "protocol"
STATE_ATTRIBUTES = frozenset({"state", "_state"})
Edge = tuple[State, State]


class Recording(SMTPConnection):
    """The real core, noting each transition it takes (``_enter`` still decides)."""

    def __init__(self, pol: Policy, taken: set[Edge]) -> None:
        super().__init__(pol)
        self.taken = taken

    def _enter(self, new: State) -> None:
        self.taken.add((self.state, new))
        super()._enter(new)


def _feed(conn: SMTPConnection, *lines: str) -> list[object]:
    events: list[object] = []
    for line in lines:
        events += conn.receive(line.encode() + b"\r\n")
    return events


def _greeted(pol: Policy, taken: set[Edge], *lines: str) -> Recording:
    conn = Recording(pol, taken)
    conn.start()
    _feed(conn, *lines)
    return conn


B64_PLAIN = "AGJvYgBodW50ZXIy"  # \0bob\0hunter2
TX = ("EHLO c.example", "MAIL FROM:<a@example.net>", "RCPT TO:<u@example.test>")


def _sessions(taken: set[Edge]) -> Iterator[SMTPConnection]:
    """One short session per group of edges; each ends wherever it ends."""
    pol = policy(auth_mechanisms=("PLAIN", "LOGIN"), starttls_available=True, databytes=10)
    early = Recording(pol, taken)
    early.receive(b"EHLO too.early\r\n")
    early.start()  # input before the greeting: CONNECTED -> CLOSED
    yield early
    yield _greeted(pol, taken, "QUIT")  # GREETED -> CLOSED
    yield _greeted(pol, taken, "EHLO c.example", "EHLO c.example", "QUIT")
    yield _greeted(pol, taken, "EHLO c.example", "MAIL FROM:<a@example.net>", "RSET", "QUIT")
    yield _greeted(pol, taken, "EHLO c.example", "MAIL FROM:<a@example.net>", "QUIT")
    yield _greeted(pol, taken, *TX, "RCPT TO:<v@example.test>", "RSET")
    yield _greeted(pol, taken, *TX, "QUIT")
    big = _greeted(pol, taken, *TX, "DATA", "more than ten bytes", ".")  # DATA -> READY
    _feed(big, "MAIL FROM:<a@example.net>", "RCPT TO:<u@example.test>", "DATA")
    _feed(big, "x\nbare LF")  # DATA -> CLOSED
    yield big
    for answer in ("queued", "failed", "timeout"):
        conn = _greeted(pol, taken, *TX, "DATA")
        assert any(isinstance(e, MessageEnd) for e in _feed(conn, "."))
        if answer == "queued":
            conn.message_queued("Q1")
        elif answer == "failed":
            conn.message_failed()
        else:
            conn.timeout()
        yield conn
    # AUTH in clear: only on a listener without TLS (``Policy.auth_needs_tls``)
    yield from _auth_sessions(policy(auth_mechanisms=("PLAIN", "LOGIN"), databytes=10), taken)
    for handshake in (True, False):
        conn = _greeted(pol, taken, "EHLO c.example", "STARTTLS")
        if handshake:
            conn.tls_started(TLS)
        else:
            conn.timeout()
        yield conn


def _auth_sessions(pol: Policy, taken: set[Edge]) -> Iterator[SMTPConnection]:
    conn = _greeted(pol, taken, "EHLO c.example", "AUTH LOGIN", "Ym9i")  # AUTH_INPUT again
    _feed(conn, "aHVudGVyMg==")  # AUTH_INPUT -> WAIT_AUTH
    conn.auth_result("bob")  # WAIT_AUTH -> READY
    yield conn
    yield _greeted(pol, taken, "EHLO c.example", "AUTH PLAIN", "*")  # AUTH_INPUT -> READY
    conn = _greeted(pol, taken, "EHLO c.example", "AUTH PLAIN")
    conn.timeout()  # AUTH_INPUT -> CLOSED
    yield conn
    conn = _greeted(pol, taken, "EHLO c.example")
    assert any(isinstance(e, AuthRequest) for e in _feed(conn, f"AUTH PLAIN {B64_PLAIN}"))
    conn.timeout()  # WAIT_AUTH -> CLOSED
    yield conn


def _table_edges() -> set[Edge]:
    return {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


def test_the_sessions_take_exactly_the_transitions_in_the_table() -> None:
    taken: set[Edge] = set()
    for _ in _sessions(taken):
        pass
    table = _table_edges()
    assert taken - table == set(), "transitions outside the table"
    assert table - taken == set(), "table entries no session takes"


def test_enter_refuses_a_transition_outside_the_table() -> None:
    conn = SMTPConnection(policy())
    with pytest.raises(TransitionError, match="connected -> data"):
        conn._enter(State.DATA)
    assert conn.state is State.CONNECTED


def test_the_state_is_read_only_from_outside() -> None:
    conn = SMTPConnection(policy())
    with pytest.raises(AttributeError):
        conn.state = State.READY  # type: ignore[misc]
    assert conn.state is INITIAL


def test_every_state_has_a_table_row_a_reader_and_a_way_in_and_out() -> None:
    assert set(TRANSITIONS) == set(State) == set(INPUT)
    reachable, todo = {INITIAL}, [INITIAL]
    while todo:
        for new in TRANSITIONS[todo.pop()]:
            if new not in reachable:
                reachable.add(new)
                todo.append(new)
    assert reachable == set(State)
    assert all(State.CLOSED in TRANSITIONS[s] for s in State if s is not State.CLOSED)
    assert TRANSITIONS[State.CLOSED] == {}


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _state_writes(tree: ast.AST) -> Iterator[str | None]:
    """The enclosing function of every write to an attribute named state/_state."""
    owner: dict[ast.AST, str] = {}
    for func in _functions(tree):  # outer functions first: inner ones overwrite
        for node in ast.walk(func):
            owner[node] = func.name
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and (
            getattr(node.func, "id", None) == "setattr"
            or getattr(node.func, "attr", None) == "__setattr__"
        ):
            yield f"setattr in {owner.get(node)}"  # any setattr in the core is suspect
        for target in targets:
            if any(_names_state(sub) for sub in ast.walk(target)):
                yield owner.get(node)


def _names_state(node: ast.AST) -> bool:
    """``x.state``/``x._state``, or a subscript with that key (``vars(x)["_state"]``)."""
    if isinstance(node, ast.Attribute):
        return node.attr in STATE_ATTRIBUTES
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value in STATE_ATTRIBUTES
    return False


def test_only_enter_assigns_the_state() -> None:
    writes = [
        (path.name, func)
        for path in _modules()
        for func in _state_writes(ast.parse(path.read_text()))
    ]
    assert writes == [("connection.py", "_enter")]


def _imports(path: Path) -> set[str]:
    """The pyqmail.protocol submodules ``path`` imports (``from pyqmail.protocol import x``
    counts as importing submodule x; importing the package itself as "__init__")."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "pyqmail.protocol":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "pyqmail.protocol."
        ):
            found.add((node.module or "").rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "pyqmail.protocol":
                    found.add("__init__")
                elif alias.name.startswith("pyqmail.protocol."):
                    found.add(alias.name.rsplit(".", 1)[1])
    return found


def test_no_import_cycles_inside_the_package() -> None:
    graph = {path.stem: _imports(path) for path in _modules()}
    submodules = set(graph) - {"__init__"}
    for name in submodules:
        assert graph[name] <= submodules, f"{name} imports the package or something unknown"
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_each_module_imports_alone(module: str) -> None:
    name = "pyqmail.protocol" + ("" if module == "__init__" else f".{module}")
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True)


def test_every_known_mechanism_has_an_exchange() -> None:
    assert set(protocol_sasl.EXCHANGES) == KNOWN_MECHANISMS


CALLS: list[tuple[str, Callable[[SMTPConnection], object]]] = [
    ("timeout", lambda conn: conn.timeout()),
    ("connection_lost", lambda conn: conn.connection_lost()),
]


@pytest.mark.parametrize(("name", "call"), CALLS)
def test_closing_twice_stays_inside_the_table(
    name: str, call: Callable[[SMTPConnection], object]
) -> None:
    conn = SMTPConnection(policy())
    conn.start()
    call(conn)
    assert conn.closed, name
    assert call(conn) == []
    assert conn.connection_lost() == []
    assert conn.closed


def test_the_memory_measure_sees_every_buffer() -> None:
    """tests/core_buffers.held_bytes replaces the removed ``buffered`` property: it must see
    the input buffer, the DATA reader's held-back end-marker prefix and its header copy."""
    conn = SMTPConnection(policy())
    conn.start()
    conn.receive(b"x" * 100)  # a command line without its end
    assert held_bytes(conn) == 100
    conn = SMTPConnection(policy())
    conn.start()
    _feed(conn, *TX, "DATA")
    assert held_bytes(conn) == 0
    conn.receive(b"Subject: x\r\n")  # held: the CRLF (may start the end marker) + header copy
    assert held_bytes(conn) == len(b"\r\n") + len(b"Subject: x")

"""The outbound row of ``make bench-e2e``: submitted mail signed with DKIM and relayed.

The client (``bench/loadgen.py``) submits messages from the signing domain
(``loadgen@bench.test``) for a remote domain (``user@sink.test``); the server signs each
with both keys of ``bench/dkim_peer.py`` (RSA-2048 and Ed25519, relaxed/relaxed) and relays
it to the sink (``bench/dkim_sink.py``) on 127.0.0.1, which counts the messages and checks
that each carries the two signatures. The rate is messages / (first submission -> the sink
has seen all of them).

- pyqmail: the client is a relay client (tcprules ``127.0.0.1:allow,RELAYCLIENT=""``, so
  the envelope's ``origin`` is ``relay``: a message pyqmail signs), ``control/dkimkeys``
  names the two keys, ``control/smtproutes`` sends ``sink.test`` to the sink; pyqmail-send
  signs at pickup and delivers (``concurrencyremote`` 20, its default, and
  ``concurrencydestination`` 20: every message goes to the one sink).
- Postfix: the private instance of ``bench/servers.py`` relaying for ``mynetworks``
  (127.0.0.0/8) to ``relayhost = [127.0.0.1]:<sink>`` through smtp(8) (Postfix's default 20
  parallel deliveries), signing with the same keys through two private OpenDKIM milters,
  one per key (``bench/dkim_peer.py`` says why two).

A server whose messages reach the sink without both signatures is reported as not signing
(no rate, no ratio): a benchmark that does not sign is not a benchmark of signing. The
first message the sink kept is also verified cryptographically against the keys' TXT
records (``verify_first``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.certs import CertFiles
from bench.dkim_peer import DkimKey, DkimPeerError, OpenDkim, copy_keys, make_keys
from bench.dkim_sink import dkim_signatures
from bench.e2e_throughput import PostfixE2E, PyqmailE2E, Result, run_line, run_once
from bench.lines import LineReader
from bench.procstat import tree_cpu_seconds
from bench.servers import ServerError
from pyqmail import rules

SIGNING_DOMAIN = "bench.test"
SINK_DOMAIN = "sink.test"
SENDER = f"loadgen@{SIGNING_DOMAIN}"
RECIPIENT = f"user@{SINK_DOMAIN}"
SINK = Path(__file__).resolve().parent / "dkim_sink.py"
LOADGEN_ARGS = ["--sender", SENDER, "--recipient", RECIPIENT]
__all__ = ["CLASSES", "DkimPeerError", "Row", "print_summary", "run_row"]


class Sink:
    """The sink process (``bench/dkim_sink.py``), asked for its count through a pipe."""

    def __init__(self, timeout: float = 20) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SINK), "--domain", SIGNING_DOMAIN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout.fileno())
        self.port = int(self._ask(None, "ready", timeout)["port"])

    def _ask(self, word: str | None, event: str, timeout: float = 10) -> dict[str, Any]:
        proc = self.proc
        assert proc.stdin is not None
        if word is not None:
            proc.stdin.write(word + "\n")
            proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            msg = self.reader.json(max(deadline - time.monotonic(), 0))
            if msg is None:
                self.stop()
                raise ServerError(f"the sink gave no {event!r} within {timeout}s")
            if msg.get("event") == event:
                return msg

    def count(self) -> int:
        return int(self._ask("count", "count")["messages"])

    def report(self) -> dict[str, Any]:
        return self._ask("report", "report")

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class PyqmailOutbound(PyqmailE2E):
    """pyqmail-smtpd taking relay-client submissions, pyqmail-send signing and relaying."""

    def __init__(self, base: Path, certs: CertFiles, keys: list[DkimKey]) -> None:
        super().__init__(base, certs)
        self.keys = keys
        self.sink: Sink | None = None
        self.rules_cdb = self.dir / "smtp.cdb"

    def prepare(self) -> None:
        assert self.sink is not None
        control = self.root / "control"
        control.mkdir(parents=True, exist_ok=True)
        (control / "smtproutes").write_text(f"{SINK_DOMAIN}:127.0.0.1:{self.sink.port}\n")
        # every message has the one destination: all 20 workers to it, as Postfix's limit
        (control / "concurrencydestination").write_text("20\n")
        super().prepare()  # control files, queue; chowns the whole root to the user
        # After the chown: the keys stay 0600, readable by pyqmail-send's user only.
        copies = copy_keys(self.keys, control / "dkim" / SIGNING_DOMAIN, self.user)
        (control / "dkimkeys").write_text("".join(k.dkimkeys_line() + "\n" for k in copies))
        source = '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'
        self.rules_cdb.write_bytes(rules.compile_rules(rules.parse(source, "bench rules")))

    def command(self) -> list[str]:
        return [*super().command(), "--rules", str(self.rules_cdb)]

    def start(self, timeout: float = 20) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sink = Sink()
        try:
            super().start(timeout)
        except BaseException:
            self.sink.stop()
            raise

    def delivered(self) -> int:
        return self.sink.count() if self.sink is not None else 0

    def stop(self, timeout: float = 15) -> None:
        super().stop(timeout)
        if self.sink is not None:
            self.sink.stop()


class PostfixOutbound(PostfixE2E):
    """The private Postfix relaying to the sink through smtp(8), signing through two
    OpenDKIM milters (one per key)."""

    name = "postfix"

    def __init__(self, base: Path, certs: CertFiles, keys: list[DkimKey]) -> None:
        super().__init__(base, certs)
        self.milters = [OpenDkim(self.dir / f"opendkim-{k.selector}", k) for k in keys]
        self.sink: Sink | None = None

    def main_cf(self, spool: Path, data: Path) -> str:
        assert self.sink is not None
        drop = ("smtpd_data_restrictions", "# Keep", "default_transport", "relayhost")
        keep = [
            line
            for line in super(PostfixE2E, self).main_cf(spool, data).splitlines()
            if not line.startswith(drop)
        ]
        keep += [
            "default_transport = smtp",
            f"relayhost = [127.0.0.1]:{self.sink.port}",
            "smtp_tls_security_level = none",
            f"smtpd_milters = {', '.join(m.milter for m in self.milters)}",
            "non_smtpd_milters = $smtpd_milters",
            "milter_default_action = tempfail",
            "milter_protocol = 6",
        ]
        return "\n".join(keep) + "\n"

    def master_cf(self) -> str:
        return super().master_cf() + "smtp unix - - n - - smtp\n"

    def start(self, timeout: float = 20) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.sink = Sink()
        try:
            for milter in self.milters:
                milter.start()
            super().start(timeout)
        except BaseException:
            self._stop_helpers()
            raise

    def delivered(self) -> int:
        return self.sink.count() if self.sink is not None else 0

    def cpu(self) -> float:
        """Postfix's tree and the OpenDKIM milters (signing is part of the work)."""
        procs = [m.proc for m in self.milters if m.proc is not None]
        return super().cpu() + sum(tree_cpu_seconds(p.pid) for p in procs)

    def _stop_helpers(self) -> None:
        for milter in self.milters:
            milter.stop()
        if self.sink is not None:
            self.sink.stop()

    def stop(self, timeout: float = 15) -> None:
        super().stop(timeout)
        self._stop_helpers()


CLASSES: dict[str, type[PyqmailOutbound] | type[PostfixOutbound]] = {
    "pyqmail": PyqmailOutbound,
    "postfix": PostfixOutbound,
}


def verify_first(message: str, keys: list[DkimKey]) -> str:
    """Verify every signature of one delivered message against the keys' TXT records with
    dkimpy (another implementation than either signer): ``pass``, or why not."""
    try:
        import dkim
    except ImportError:
        return "not verified (dkimpy is not installed: pip install -r requirements-dev.txt)"
    records = {f"{k.selector}._domainkey.{k.domain}.": k.txt_record() for k in keys}

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        del timeout
        text = name.decode() if isinstance(name, bytes) else name
        return records.get(text, "").encode()

    raw = message.encode("latin-1")
    verifier = dkim.DKIM(raw)
    results = []
    for index in range(len(dkim_signatures(raw))):
        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except dkim.DKIMException as exc:
            return f"fail: signature {index}: {exc}"
        results.append(ok)
    if not results:
        return "fail: no signature"
    return "pass" if all(results) else f"fail: {results}"


@dataclass
class Row:
    """The outbound row's runs per server, and why a server has no figure."""

    runs: dict[str, list[Result]] = field(default_factory=dict)
    not_signing: dict[str, str] = field(default_factory=dict)
    verified: dict[str, str] = field(default_factory=dict)


def _check_signed(report: dict[str, Any], expect: int, keys: list[DkimKey]) -> tuple[str, str]:
    """(what is wrong, dkimpy's verdict on the first message): nothing is wrong when every
    message reached the sink with both signatures and the first one verifies."""
    if report["messages"] != expect:
        return f"{report['messages']} messages at the sink for {expect} sent", ""
    if report["signed"] != expect:
        seen = ", ".join(f"{v}: {n}" for v, n in sorted(report["verdicts"].items()))
        return f"{report['signed']} of {expect} messages carry both signatures ({seen})", ""
    verdict = verify_first(report["first"], keys)
    if verdict.startswith("fail"):
        return f"the signatures do not verify ({verdict})", verdict
    return "", verdict


def run_row(args: argparse.Namespace, base: Path, certs: CertFiles) -> Row:
    """``args.rounds`` rounds of the outbound signed workload, servers alternating."""
    keys = make_keys(base / "dkim-keys", SIGNING_DOMAIN)
    row = Row(runs={name: [] for name in args.names})
    names = list(args.names)
    print(
        "# outbound, signed (rsa-sha256 + ed25519-sha256, relaxed/relaxed): "
        f"{SENDER} -> {RECIPIENT}, relayed to the sink; pyqmail-send signs at pickup, "
        "Postfix through two OpenDKIM milters",
        flush=True,
    )
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            if name in row.not_signing:
                continue
            server = CLASSES[name](base / f"dkim-r{rnd}", certs, keys)
            server.start()
            try:
                res = run_once(server, certs, args, LOADGEN_ARGS)
                assert server.sink is not None
                report = server.sink.report()
            finally:
                server.stop()
            wrong, verdict = _check_signed(report, args.messages, keys)
            if wrong and name == "postfix":
                raise ServerError(f"postfix + opendkim did not sign as set up: {wrong}")
            if wrong:
                row.not_signing[name] = wrong
                print(f"round {rnd + 1} {name:8} not signing yet: {wrong}", flush=True)
                continue
            row.verified.setdefault(name, verdict)
            row.runs[name].append(res)
            print(run_line(rnd, name, res) + "  signed: 2 signatures each", flush=True)
    return row


def print_summary(row: Row, args: argparse.Namespace) -> None:
    """The row's medians and the ratio line (``n/a`` when a server did not sign)."""
    print(f"\noutbound signed, {args.messages} messages x {args.rounds} rounds; medians:")
    medians = {}
    for name, runs in row.runs.items():
        if name in row.not_signing or not runs:
            print(f"  {name:8} not signing yet: {row.not_signing.get(name, 'no run')}")
            continue
        medians[name] = statistics.median(r.rate for r in runs)
        cpu = statistics.median(r.cpu_per_msg_ms for r in runs)
        print(
            f"  {name:8} {medians[name]:7.1f} msg/s submitted -> signed -> at the sink, "
            f"{cpu:5.2f} ms CPU/msg; first message: dkimpy {row.verified[name]}"
        )
    if "pyqmail" in medians and "postfix" in medians and medians["postfix"] > 0:
        ratio = f"{medians['pyqmail'] / medians['postfix']:.2f}"
    elif "pyqmail" in row.not_signing:
        ratio = "n/a (pyqmail not signing yet)"
    else:
        ratio = "n/a"
    print(f"dkim outbound ratio vs postfix+opendkim: {ratio}")

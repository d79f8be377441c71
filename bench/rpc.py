"""
RPC benchmark: echo calls over loopback TCP, client and server in separate processes.

Run it from the repository root after installing the project::

    python bench/rpc.py                  # every workload, 3 repetitions, the median kept
    python bench/rpc.py --quick          # smaller counts: a smoke test of well under a minute
    python bench/rpc.py --only W1,W3 --repeat 5 --json results.json

Contenders (each server is its own process; each client run is a fresh process too):

- ``floor``:      a raw ``Int32StringReceiver`` echo server and client, no RPC layer at all
  (msgpack for the records of W4, ``str(i).encode()`` for integers);
- ``stockpb``:    stock ``twisted.spread.pb`` server and client;
- ``pbroker-pb``: pbroker server, pbroker client forced to the ``pb`` dialect;
- ``pbroker``:    pbroker server, pbroker client with its default (native) dialect.

Workloads (the servers' root has ``remote_echo(x): return x``):

- W1: 5,000 serial ``echo(int)`` calls (one in flight);
- W2: 20,000 ``echo(int)`` calls with 100 in flight;
- W3: ``echo(bytes)``, 300 serial calls of 60 KB and 20 of 4 MB, in MB/s per direction;
- W4: 200 serial ``echo`` calls of a list of 1,000 records
  ``{"name": str, "value": float, "tags": [str, str], "id": int}``;
- W5: 50 connections making 200 serial ``echo(int)`` calls each, all at once.

It prints the median rate of every contender on every workload with its ratio to ``floor`` and
to ``stockpb``, the peak memory of each server, and whether pbroker meets its targets.
Only 127.0.0.1 is used; every process started is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
CONTENDERS = ("floor", "stockpb", "pbroker-pb", "pbroker")
#: The server each contender's client talks to.
SERVER_KINDS = {
    "floor": "floor",
    "stockpb": "stockpb",
    "pbroker-pb": "pbroker",
    "pbroker": "pbroker",
}
#: The largest frame the floor's Int32StringReceiver accepts (its default is 99,999 bytes).
FLOOR_MAX_LENGTH = 64 * 1024 * 1024
#: The longest one timed phase may run; a slower contender reports its rate over the calls it
#: completed by then (the JSON output records the count).
MAX_SECONDS = 5.0
QUICK_MAX_SECONDS = 1.0
#: The shortest timed phase: a contender that makes its calls sooner makes them again (the
#: same number each round) until this long has passed, so that a fast run is not decided by
#: one outlier of a few milliseconds.
MIN_SECONDS = 1.0
QUICK_MIN_SECONDS = 0.2
#: The dialect each pbroker contender must have negotiated for its numbers to count.
EXPECTED_DIALECTS = {"pbroker": "pbroker2", "pbroker-pb": "pb"}
#: --pin: the CPUs the server and the client run on (None: wherever the scheduler puts them).
PLACEMENTS: dict[str, tuple[int | None, int | None]] = {
    "none": (None, None),
    "split": (0, 1),
    "same": (0, 0),
}
#: Longest waits, in seconds, before a process or a phase is given up on.
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 10.0
PHASE_TIMEOUT = 60.0
CLIENT_TIMEOUT = 150.0


@dataclass(frozen=True)
class Case:
    """
    One timed measurement: a workload, with one payload size for W3.
    """

    name: str
    workload: str
    label: str
    mode: str  # "serial", "window" or "connections"
    value: str  # "int", "bytes" or "records"
    count: int
    quickCount: int
    warmup: int
    size: int = 0
    window: int = 1
    connections: int = 1

    @property
    def unit(self) -> str:
        return "MB/s" if self.value == "bytes" else "calls/s"


CASES = (
    Case("W1", "W1", "serial echo(int)", "serial", "int", 5000, 1000, 200),
    Case("W2", "W2", "echo(int), 100 in flight", "window", "int", 20_000, 4000, 1000, window=100),
    Case("W3-60KB", "W3", "echo(60 KB bytes)", "serial", "bytes", 300, 60, 10, size=60_000),
    Case("W3-4MB", "W3", "echo(4 MB bytes)", "serial", "bytes", 20, 4, 2, size=4_000_000),
    Case("W4", "W4", "echo(1,000 records)", "serial", "records", 200, 20, 2),
    # For W5 the counts are calls per connection.
    Case(
        "W5", "W5", "50 conns x serial echo(int)", "connections", "int", 200, 40, 5, connections=50
    ),
)
CASES_BY_NAME = {case.name: case for case in CASES}


@dataclass(frozen=True)
class Target:
    contender: str
    case: str
    against: str  # "floor", "stockpb", or "absolute" (a rate in the case's unit)
    goal: float


TARGETS = (
    Target("pbroker", "W1", "floor", 0.9),
    Target("pbroker", "W2", "floor", 0.6),
    Target("pbroker", "W3-60KB", "floor", 0.9),
    Target("pbroker", "W3-4MB", "absolute", 400.0),
    Target("pbroker", "W4", "floor", 0.6),
    Target("pbroker", "W5", "floor", 0.8),
    Target("pbroker-pb", "W1", "stockpb", 2.0),
    Target("pbroker-pb", "W2", "stockpb", 2.0),
    Target("pbroker-pb", "W4", "stockpb", 10.0),
)


def records() -> list[dict[str, Any]]:
    return [
        {"name": f"item{i}", "value": i * 1.5, "tags": [f"t{i}", "common"], "id": i}
        for i in range(1000)
    ]


# Servers


def _floorProtocols() -> tuple[type, type]:
    from twisted.internet.defer import Deferred, fail
    from twisted.protocols.basic import Int32StringReceiver

    class FloorEcho(Int32StringReceiver):
        MAX_LENGTH = FLOOR_MAX_LENGTH

        def stringReceived(self, string: bytes) -> None:
            self.sendString(string)

    class FloorClient(Int32StringReceiver):
        """
        Sends strings and fires one Deferred per echo, in order (the server answers in order).
        """

        MAX_LENGTH = FLOOR_MAX_LENGTH

        def connectionMade(self) -> None:
            self.pending: deque[Deferred[bytes]] = deque()
            self.lost: Any = None

        def stringReceived(self, string: bytes) -> None:
            self.pending.popleft().callback(string)

        def lengthLimitExceeded(self, length: int) -> None:
            self.transport.loseConnection()

        def connectionLost(self, reason: Any = None) -> None:
            self.lost = reason
            pending, self.pending = self.pending, deque()
            for deferred in pending:
                deferred.errback(reason)

        def send(self, payload: bytes) -> Deferred[bytes]:
            if self.lost is not None:
                return fail(self.lost)
            deferred: Deferred[bytes] = Deferred()
            self.pending.append(deferred)
            self.sendString(payload)
            return deferred

    return FloorEcho, FloorClient


def _echoRoot(pb: Any) -> Any:
    class EchoRoot(pb.Root):  # type: ignore[misc,name-defined]
        def remote_echo(self, value: Any) -> Any:
            return value

    return EchoRoot()


def pin(cpu: int | None) -> None:
    """
    Run this process on CPU ``cpu`` only (``None``: leave it to the scheduler).
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def serve(kind: str, port: int, cpu: int | None = None) -> None:
    """
    Serve ``kind`` on 127.0.0.1:``port`` (0: any free port) and print the port as a JSON line;
    when stdin closes, stop and print the peak RSS of this process as a JSON line.
    """
    pin(cpu)
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    if kind == "floor":
        factory: Any = Factory.forProtocol(_floorProtocols()[0])
    elif kind == "stockpb":
        from twisted.spread import pb as stockpb

        factory = stockpb.PBServerFactory(_echoRoot(stockpb))
    elif kind == "pbroker":
        from pbroker import pb

        factory = pb.PBServerFactory(_echoRoot(pb))
    else:
        raise SystemExit(f"unknown server kind {kind!r}")
    listening = reactor.listenTCP(port, factory, interface=HOST)

    def waitForStdinToClose() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        finally:
            reactor.callFromThread(reactor.stop)

    threading.Thread(target=waitForStdinToClose, daemon=True).start()
    # The peak so far is the server's footprint before its first client.
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"port": listening.getHost().port, "maxrss_kib": start}), flush=True)
    reactor.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_kib": peak}), flush=True)


# Clients


def dialectsSupported() -> bool:
    """
    Whether pbroker's PBClientFactory takes ``dialects=`` (the native dialect's API).
    """
    from pbroker import pb

    return "dialects" in inspect.signature(pb.PBClientFactory).parameters


class Connection:
    """
    One client connection: ``call(value)`` returns a Deferred firing with the echoed value.
    """

    def __init__(self, call: Callable[[Any], Any], close: Callable[[], None], dialect: Any):
        self.call = call
        self.close = close
        self.dialect = dialect


async def connect(contender: str, case: Case, port: int, reactor: Any) -> Connection:
    if contender == "floor":
        import msgpack
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(reactor, HOST, port, timeout=10)
        protocol = await connectProtocol(endpoint, _floorProtocols()[1]())
        send = protocol.send
        if case.value == "int":

            def call(value: int) -> Any:
                return send(str(value).encode()).addCallback(int)

        elif case.value == "records":
            packb, unpackb = msgpack.packb, msgpack.unpackb

            def call(value: Any) -> Any:
                return send(packb(value)).addCallback(unpackb)

        else:
            call = send
        return Connection(call, protocol.transport.loseConnection, None)

    if contender == "stockpb":
        from twisted.spread import pb

        factory = pb.PBClientFactory()
    else:
        from pbroker import pb

        if contender == "pbroker-pb" and dialectsSupported():
            factory = pb.PBClientFactory(dialects=[b"pb"])
        else:
            factory = pb.PBClientFactory()
    reactor.connectTCP(HOST, port, factory, timeout=10)
    root = await factory.getRootObject()
    callRemote = root.callRemote

    def call(value: Any) -> Any:
        return callRemote("echo", value)

    dialect = getattr(root.broker, "currentDialect", None)
    if isinstance(dialect, bytes):
        dialect = dialect.decode("ascii", "replace")
    return Connection(call, factory.disconnect, dialect)


def payloads(case: Case) -> Callable[[int], Any]:
    """
    The argument of the ``i``-th call.
    """
    if case.value == "int":
        return lambda i: i
    if case.value == "bytes":
        data = bytes(range(256)) * (case.size // 256) + b"\xab" * (case.size % 256)
        return lambda i: data
    data = records()
    return lambda i: data


def checkEcho(sent: Any, answer: Any, everything: bool) -> None:
    """
    Refuse a wrong echo: an answer of another type, or (for integers, or with
    ``everything``) another value. Comparing every large answer would time the comparison,
    so those are compared in full once per phase.
    """
    if type(answer) is not type(sent) or ((everything or type(sent) is int) and answer != sent):
        raise AssertionError(
            f"echo mismatch: sent {type(sent).__name__} {sent!r:.40}, got {answer!r:.80}"
        )


async def serial(connection: Connection, argument: Callable[[int], Any], count: int, end: float):
    call = connection.call
    clock = time.perf_counter
    done = 0
    answer = sent = None
    for i in range(count):
        sent = argument(i)
        answer = await call(sent)
        checkEcho(sent, answer, False)
        done += 1
        if clock() > end:
            break
    if done:
        checkEcho(sent, answer, True)  # the last answer, in full
    return done


def windowed(
    connection: Connection, argument: Callable[[int], Any], count: int, window: int, end: float
) -> Any:
    """
    Make ``count`` calls keeping ``window`` of them outstanding; fires with the calls made.
    """
    from twisted.internet.defer import Deferred

    finished: Deferred[int] = Deferred()
    call = connection.call
    clock = time.perf_counter
    state = {"issued": 0, "completed": 0, "stop": False}

    def launch() -> None:
        i = state["issued"]
        state["issued"] = i + 1
        sent = argument(i)
        call(sent).addCallbacks(answered, failed, callbackArgs=(sent,))

    def answered(answer: Any, sent: Any) -> None:
        try:
            checkEcho(sent, answer, False)
        except AssertionError as error:
            failed(error)
            return
        state["completed"] += 1
        if finished.called:
            return
        if not state["stop"] and clock() > end:
            state["stop"] = True
        if state["issued"] < count and not state["stop"]:
            try:
                launch()
            except Exception as error:
                finished.errback(error)
        elif state["completed"] == state["issued"]:
            finished.callback(state["completed"])

    def failed(reason: Any) -> None:
        if not finished.called:
            finished.errback(reason)

    try:
        for _ in range(min(window, count)):
            launch()
    except Exception as error:
        if not finished.called:
            finished.errback(error)
    return finished


async def runCase(contender: str, case: Case, port: int, quick: bool, maxSeconds: float) -> dict:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults

    count = case.quickCount if quick else case.count
    warmup = max(1, case.warmup // 4) if quick else case.warmup
    minSeconds = min(QUICK_MIN_SECONDS if quick else MIN_SECONDS, maxSeconds)
    argument = payloads(case)
    connections = [await connect(contender, case, port, reactor) for _ in range(case.connections)]
    try:
        expected = EXPECTED_DIALECTS.get(contender)
        for connection in connections:
            if expected is not None and connection.dialect != expected:
                raise AssertionError(
                    f"{contender} negotiated {connection.dialect!r}, not {expected!r}"
                )
            # Check the echo on every connection, then warm up both sides.
            first = argument(0)
            checkEcho(first, await connection.call(first), True)
        never = time.perf_counter() + PHASE_TIMEOUT
        if case.mode == "window":
            await windowed(connections[0], argument, warmup, case.window, never)
        else:
            await gatherResults(
                [Deferred.fromCoroutine(serial(c, argument, warmup, never)) for c in connections]
            )

        start = time.perf_counter()
        end = start + maxSeconds
        calls = rounds = 0
        while True:
            rounds += 1
            if case.mode == "window":
                calls += await windowed(connections[0], argument, count, case.window, end)
            else:
                done = await gatherResults(
                    [Deferred.fromCoroutine(serial(c, argument, count, end)) for c in connections]
                )
                calls += sum(done)
            elapsed = time.perf_counter() - start
            if elapsed >= minSeconds or calls < rounds * count * case.connections:
                break  # long enough, or the time cap stopped this round
    finally:
        for connection in connections:
            connection.close()
    planned = rounds * count * case.connections
    rate = calls / elapsed
    if case.value == "bytes":
        rate = rate * case.size / 1e6
    return {
        "ok": True,
        "rate": rate,
        "unit": case.unit,
        "calls": calls,
        "planned": planned,
        "elapsed": elapsed,
        "rounds": rounds,
        "dialect": connections[0].dialect,
    }


def client(
    contender: str, caseName: str, port: int, quick: bool, maxSeconds: float, cpu: int | None
) -> None:
    """
    Run one case against the server on ``port`` and print the result as a JSON line.
    """
    pin(cpu)
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    case = CASES_BY_NAME[caseName]

    async def main(reactor: Any) -> None:
        outcome = Deferred.fromCoroutine(runCase(contender, case, port, quick, maxSeconds))
        outcome.addTimeout(PHASE_TIMEOUT + maxSeconds, reactor)
        try:
            result = await outcome
        except BaseException as error:
            result = {"ok": False, "error": _describe(error)}
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


def _describe(error: BaseException) -> str:
    from twisted.python.failure import Failure

    if isinstance(error, Failure):
        error = error.value
    # A connection-lost error carries a Failure: name what it wraps.
    inner = error.args[0] if error.args else None
    if isinstance(inner, Failure):
        text = f"{type(error).__name__}: {type(inner.value).__name__}: {inner.value}"
    else:
        text = f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


# Orchestration


class Server:
    """
    A server subprocess; :meth:`stop` closes its stdin and returns its peak RSS (KiB).
    """

    def __init__(self, kind: str, cpu: int | None = None) -> None:
        self.kind = kind
        # Closed by stop(), which every path out of the orchestrator goes through.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        pinning = [] if cpu is None else ["--cpu", str(cpu)]
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", "0", *pinning],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            bufsize=0,
        )
        self.port = 0
        self.startKib: int | None = None

    def waitForPort(self) -> None:
        ready = self._readLine(SERVER_START_TIMEOUT)
        self.port = int(ready["port"])
        self.startKib = ready.get("maxrss_kib")

    def _readLine(self, timeout: float) -> dict:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{self.kind} server: no answer in {timeout:.0f}s")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                byte = self.process.stdout.read(1)
                if not byte:
                    raise RuntimeError(f"{self.kind} server exited: {self.errors()}")
                line += byte
        return json.loads(line)

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")[-2000:].strip()

    def stop(self) -> int | None:
        """
        Stop the server (killing it if it does not stop); its peak RSS in KiB, if it said.
        """
        peak = None
        try:
            if self.process.poll() is None:
                assert self.process.stdin is not None
                self.process.stdin.close()
                for _ in range(2):  # the port line first if it was never read
                    answer = self._readLine(SERVER_STOP_TIMEOUT)
                    if "port" not in answer:
                        peak = answer.get("maxrss_kib")
                        break
                self.process.wait(SERVER_STOP_TIMEOUT)
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as error:
            print(f"warning: {self.kind} server did not stop cleanly: {error}", file=sys.stderr)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.stderr.close()
        return peak


def runClient(
    contender: str, case: Case, port: int, quick: bool, maxSeconds: float, cpu: int | None = None
) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--client",
        contender,
        "--case",
        case.name,
        "--port",
        str(port),
        "--max-seconds",
        str(maxSeconds),
    ]
    if quick:
        command.append("--quick")
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return {"ok": False, "error": f"client killed after {CLIENT_TIMEOUT:.0f}s"}
    for line in reversed(finished.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = finished.stderr.strip().splitlines()[-1:] or ["no output"]
    return {"ok": False, "error": f"client exit {finished.returncode}: {tail[0][:150]}"}


@dataclass
class Outcome:
    runs: list[dict]
    peakKib: int | None = None
    startKib: int | None = None

    @property
    def failure(self) -> str | None:
        for run in self.runs:
            if not run.get("ok"):
                return str(run.get("error"))
        return None

    @property
    def median(self) -> float | None:
        if not self.runs or self.failure is not None:
            return None
        return statistics.median(run["rate"] for run in self.runs)


def selectCases(only: str | None) -> list[Case]:
    if not only:
        return list(CASES)
    wanted = {name.strip().upper() for name in only.split(",") if name.strip()}
    chosen = [c for c in CASES if c.workload in wanted or c.name.upper() in wanted]
    unknown = wanted - {c.workload for c in CASES} - {c.name.upper() for c in CASES}
    if unknown or not chosen:
        raise SystemExit(
            f"--only: unknown workload(s) {sorted(unknown)}; known: W1..W5, W3-60KB, W3-4MB"
        )
    return chosen


def speedupsLoaded() -> bool:
    """
    Whether pbroker runs with its C extension (else its pure-Python loops are measured).
    """
    from pbroker import _accelerator

    return _accelerator.speedups is not None


def precompile() -> None:
    """
    Byte-compile pbroker, as ``pip install`` does for stock Twisted: an editable checkout
    (with ``PYTHONDONTWRITEBYTECODE`` set) would otherwise compile its modules in every server
    process, and the compiler's peak would count against pbroker's memory.
    """
    import compileall

    import pbroker

    compileall.compile_dir(os.path.dirname(pbroker.__file__), quiet=1)


def orchestrate(options: argparse.Namespace) -> None:
    cases = selectCases(options.only)
    contenders = list(CONTENDERS)
    if options.contenders:
        contenders = [c.strip() for c in options.contenders.split(",") if c.strip()]
        unknown = set(contenders) - set(CONTENDERS)
        if unknown:
            raise SystemExit(f"--contenders: unknown {sorted(unknown)}; known: {CONTENDERS}")
    maxSeconds = options.max_seconds
    if maxSeconds is None:
        maxSeconds = QUICK_MAX_SECONDS if options.quick else MAX_SECONDS
    serverCPU, clientCPU = PLACEMENTS[options.pin]
    if options.pin == "split" and (os.cpu_count() or 1) < 2:
        raise SystemExit("--pin split needs two CPUs")
    precompile()
    native = dialectsSupported()
    if not native:
        print(
            "note: pbroker's PBClientFactory takes no dialects= yet: "
            "pbroker-pb runs with the default client, like pbroker",
            file=sys.stderr,
        )

    # A SIGTERM unwinds like Ctrl-C, through the finally that stops the servers.
    signal.signal(signal.SIGTERM, _terminated)
    began = time.perf_counter()
    outcomes: dict[str, dict[str, Outcome]] = {}
    for case in cases:
        outcomes[case.name] = {c: Outcome([]) for c in contenders}
        # One server per contender and case, so each server's peak memory is its own.
        servers: dict[str, Server] = {}
        try:
            for contender in contenders:
                servers[contender] = Server(SERVER_KINDS[contender], serverCPU)
            for server in servers.values():
                server.waitForPort()
            for repetition in range(options.repeat):
                # Interleaved, rotating the order, so that the contenders share the load.
                shift = repetition % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    result = runClient(
                        contender,
                        case,
                        servers[contender].port,
                        options.quick,
                        maxSeconds,
                        clientCPU,
                    )
                    outcomes[case.name][contender].runs.append(result)
                    _progress(case, contender, repetition, result)
        finally:
            for contender, server in servers.items():
                outcomes[case.name][contender].startKib = server.startKib
                outcomes[case.name][contender].peakKib = server.stop()
    elapsed = time.perf_counter() - began

    print()
    rows = table(cases, contenders, outcomes)
    print()
    verdicts = targets(cases, contenders, outcomes)
    print(
        f"\n{len(cases)} cases x {len(contenders)} contenders x {options.repeat} repetitions "
        f"in {elapsed:.0f}s{' (--quick)' if options.quick else ''}; "
        f"dialects= {'supported' if native else 'NOT supported yet'}; CPU placement "
        f"{options.pin}; pbroker's C speedups {'loaded' if speedupsLoaded() else 'NOT loaded'}; "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )
    if options.json:
        with open(options.json, "w") as file:
            json.dump(
                {
                    "quick": options.quick,
                    "repeat": options.repeat,
                    "maxSeconds": maxSeconds,
                    "dialectsSupported": native,
                    "placement": options.pin,
                    "speedups": speedupsLoaded(),
                    "loadAverage": os.getloadavg(),
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "elapsed": elapsed,
                    "rows": rows,
                    "targets": verdicts,
                    "runs": {
                        name: {
                            c: {"runs": o.runs, "startKib": o.startKib, "peakKib": o.peakKib}
                            for c, o in row.items()
                        }
                        for name, row in outcomes.items()
                    },
                },
                file,
                indent=2,
            )
        print(f"results written to {options.json}")


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _progress(case: Case, contender: str, repetition: int, result: dict) -> None:
    if result.get("ok"):
        partial = (
            ""
            if result["calls"] >= result["planned"]
            else (f" ({result['calls']}/{result['planned']} calls, time cap)")
        )
        text = f"{result['rate']:,.1f} {result['unit']}{partial}"
    else:
        text = f"fails: {result.get('error')}"
    print(f"  {case.name:<8} #{repetition + 1} {contender:<11} {text}", file=sys.stderr, flush=True)


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def table(cases: Iterable[Case], contenders: list[str], outcomes: dict) -> list[dict]:
    header = (
        f"{'case':<8} {'workload':<28} {'contender':<11} {'dialect':<9} {'median':>18} "
        f"{'x floor':>8} {'x stockpb':>9} {'server peak RSS (+growth)':>26}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for case in cases:
        row = outcomes[case.name]
        floor = row["floor"].median if "floor" in row else None
        stock = row["stockpb"].median if "stockpb" in row else None
        for contender in contenders:
            outcome: Outcome = row[contender]
            median = outcome.median
            if median is None:
                shown = "fails"
            else:
                shown = f"{median:,.1f} {case.unit}"
            partial = any(r.get("ok") and r["calls"] < r["planned"] for r in outcome.runs)
            peak = "-"
            if outcome.peakKib is not None:
                peak = f"{outcome.peakKib / 1024:.1f} MiB"
                if outcome.startKib is not None:
                    peak += f" (+{(outcome.peakKib - outcome.startKib) / 1024:.1f})"
            dialects = sorted({r.get("dialect") for r in outcome.runs if r.get("ok")} - {None})
            print(
                f"{case.name:<8} {case.label:<28} {contender:<11} {'/'.join(dialects) or '-':<9} "
                f"{shown:>18} {_ratio(median, floor):>8} {_ratio(median, stock):>9} {peak:>26}"
                + (" *" if partial else "")
            )
            rows.append(
                {
                    "case": case.name,
                    "contender": contender,
                    "unit": case.unit,
                    "median": median,
                    "vsFloor": None if median is None or not floor else median / floor,
                    "vsStockpb": None if median is None or not stock else median / stock,
                    "failure": outcome.failure,
                    "timeCapped": partial,
                    "dialects": dialects,
                    "serverStartKib": outcome.startKib,
                    "serverPeakKib": outcome.peakKib,
                }
            )
        for contender in contenders:
            if row[contender].failure:
                print(f"{'':<8} {contender} fails: {row[contender].failure}")
    if any(r["timeCapped"] for r in rows):
        print("* the time cap stopped some runs early: the rate is over the calls completed")
    return rows


def targets(cases: list[Case], contenders: list[str], outcomes: dict) -> list[dict]:
    print(f"{'target':<40} {'measured':>16} {'goal':>15}  result")
    verdicts = []

    def report(name: str, measured: str, goal: str, met: bool | None, why: str = "") -> None:
        result = ("met" if met else "MISSED") if met is not None else f"n/a ({why})"
        print(f"{name:<40} {measured:>16} {goal:>15}  {result}")
        verdicts.append({"target": name, "measured": measured, "goal": goal, "met": met})

    for target in TARGETS:
        case = CASES_BY_NAME[target.case]
        row = outcomes.get(target.case, {})
        if target.against == "absolute":
            name = f"{target.contender} {target.case}"
            goal = f">= {target.goal:g} {case.unit}"
        else:
            name = f"{target.contender} {target.case} vs {target.against}"
            goal = f">= {target.goal:g}x"
        if target.contender not in row or (
            target.against != "absolute" and target.against not in row
        ):
            report(name, "-", goal, None, "not run")
            continue
        value = row[target.contender].median
        if value is None:
            report(name, "fails", goal, False)
            continue
        if target.against == "absolute":
            report(name, f"{value:,.1f} {case.unit}", goal, value >= target.goal)
            continue
        reference = row[target.against].median
        if not reference:
            report(name, "-", goal, None, f"{target.against} fails")
            continue
        report(name, f"{value / reference:.2f}x", goal, value / reference >= target.goal)

    # Memory: in each case both complete, a pbroker server (either dialect) peaks no higher
    # than stockpb's. (A case stock PB fails, W3-4MB, cannot be compared.)
    for ours in ("pbroker", "pbroker-pb"):
        name = f"{ours} server peak RSS vs stockpb"
        goal = "<= in each case"
        if ours not in contenders or "stockpb" not in contenders:
            report(name, "-", goal, None, "not run")
            continue
        excess: list[tuple[float, str]] = []
        skipped = []
        for case in cases:
            mine = outcomes[case.name][ours]
            theirs = outcomes[case.name]["stockpb"]
            if mine.failure or theirs.failure or mine.peakKib is None or theirs.peakKib is None:
                skipped.append(case.name)
                continue
            excess.append(((mine.peakKib - theirs.peakKib) / 1024, case.name))
        if not excess:
            report(name, "-", goal, None, "no case both complete")
            continue
        worst, worstCase = max(excess)
        report(name, f"{worst:+.1f} MiB {worstCase}", goal, worst <= 0)
        over = [f"{case} {mib:+.1f} MiB" for mib, case in excess if mib > 0]
        if over:
            print(f"{'':<8} {ours}'s server peaks higher in: {', '.join(over)}")
        if skipped:
            print(f"{'':<8} not compared (a server failed): {', '.join(skipped)}")
    return verdicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke test)")
    parser.add_argument(
        "--repeat", type=int, help="runs per case, the median kept (default 3; 1 with --quick)"
    )
    parser.add_argument("--only", help="workloads to run, e.g. W1,W3 (or W3-60KB, W3-4MB)")
    parser.add_argument("--contenders", help=f"contenders to run (default: {','.join(CONTENDERS)})")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.add_argument(
        "--pin",
        choices=sorted(PLACEMENTS),
        default="none",
        help="CPU placement: none (the scheduler's choice, the default), split (server on "
        "CPU 0, client on CPU 1) or same (both on CPU 0)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help=f"cap on one timed phase, in seconds (default {MAX_SECONDS:g}; "
        f"{QUICK_MAX_SECONDS:g} with --quick)",
    )
    # Internal: the subprocesses.
    parser.add_argument(
        "--serve", choices=sorted(set(SERVER_KINDS.values())), help=argparse.SUPPRESS
    )
    parser.add_argument("--client", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=sorted(CASES_BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.repeat is None:
        options.repeat = 1 if options.quick else 3
    if options.repeat < 1:
        parser.error("--repeat must be at least 1")
    if options.serve:
        serve(options.serve, options.port, options.cpu)
    elif options.client:
        if not options.case or not options.port:
            parser.error("--client needs --case and --port")
        maxSeconds = options.max_seconds or (QUICK_MAX_SECONDS if options.quick else MAX_SECONDS)
        client(options.client, options.case, options.port, options.quick, maxSeconds, options.cpu)
    else:
        orchestrate(options)


if __name__ == "__main__":
    main()

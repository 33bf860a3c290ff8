"""GetJob under load while hundreds of WatchJob streams are held open.

Starts the real server as a subprocess (``python -m secateur.server.main`` on
a free loopback port, a temporary state dir, ``--max-concurrent-jobs 0`` so
jobs stay QUEUED and no TensorFlow work competes for CPU), creates N jobs on
a dummy model file, opens S WatchJob streams spread over those jobs and over
several grpc.aio channels (one HTTP/2 connection each) and holds them open,
then calls GetJob as fast as C concurrent callers can for T seconds over the
same channels. Every GetJob latency is recorded; errors are any GetJob
RpcError plus any watch stream that ended or failed before the benchmark
cancelled it, plus a server that does not exit 0 within 30 s of SIGTERM.

With ``--store postgresql://...`` a second arm follows in the same run:
``--replicas`` servers (default 2) sharing that PostgreSQL database, each
API-only; the jobs are created through the first replica, and the channels,
streams and callers are spread over all replicas (channel i on replica
i mod N, --channels rounded up to a multiple of N), so every replica serves
jobs it did not create. One table compares
the arms (server CPU is the sum over the arm's servers).

Target: 1000 GetJob/s with p99 under 20 ms and zero errors, per arm. The exit
code is 0 whatever the outcome; non-zero only when the benchmark itself cannot
run.

Usage: python benchmarks/service_load.py [--jobs 20] [--streams 200] [--seconds 30]
       [--concurrency 16] [--channels 3] [--warmup 1]
       [--store postgresql://USER@HOST:PORT/DB [--replicas 2]]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

TARGET_RPS = 1000.0
TARGET_P99_MS = 20.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 10.0
# Each channel gets its own subchannel (TCP connection) instead of the
# process-wide pool, which would put every channel on one HTTP/2 connection.
CHANNEL_OPTIONS: list[tuple[str, int]] = [("grpc.use_local_subchannel_pool", 1)]


class BenchmarkError(Exception):
    """The benchmark itself could not run (not a missed target)."""


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    command: list[str]
    target: str
    log_path: Path


@dataclass
class Watch:
    call: grpc.aio.UnaryStreamCall
    task: asyncio.Task[None] | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None


@dataclass
class LoadResult:
    latencies_s: list[float]
    errors: list[str]
    seconds: float
    client_cpu_s: float
    server_cpu_s: float


def start_server(workdir: Path, name: str = "server", store: str | None = None) -> Server:
    """Run the server on port 0 and read the bound port from its first line."""
    state = workdir / f"state-{name}"
    models = workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "m.keras").write_bytes(b"dummy: --max-concurrent-jobs 0 never loads it")
    command = [
        sys.executable,
        "-m",
        "secateur.server.main",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--metrics-port",
        "-1",
        "--state-dir",
        str(state),
        "--allowed-uri-prefix",
        str(workdir),
        "--max-concurrent-jobs",
        "0",
        "--max-queued-jobs",
        "1000",
        "--log-level",
        "WARNING",
        *(["--store", store] if store else []),
    ]
    out_path, log_path = workdir / f"{name}.out", workdir / f"{name}.log"
    with open(out_path, "wb") as out, open(log_path, "wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    marker = "secateur serving on "
    while time.monotonic() < deadline:
        for line in out_path.read_text(errors="replace").splitlines():
            if line.startswith(marker):
                address = line[len(marker) :].split(",")[0].strip()
                return Server(proc, command, address, log_path)
        if proc.poll() is not None:
            raise BenchmarkError(
                f"the server exited with {proc.returncode} before serving:\n"
                + log_path.read_text(errors="replace")[-4000:]
            )
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise BenchmarkError(f"the server did not start within {START_TIMEOUT_S:.0f} s")


def stop_server(server: Server) -> str | None:
    """SIGTERM; None when it exited 0 within the limit, else what went wrong."""
    if server.proc.poll() is not None:
        return f"the server had already exited with {server.proc.returncode}"
    server.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    try:
        code = server.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        return f"the server did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM (killed)"
    if code != 0:
        return f"the server exited with {code} after SIGTERM"
    print(f"server stopped: exit 0 after {time.monotonic() - start:.2f} s")
    return None


async def create_jobs(stub: pbg.PruningServiceStub, workdir: Path, n: int) -> list[str]:
    spec = pb.JobSpec(
        model_uri=str(workdir / "models" / "m.keras"),
        output_uri=str(workdir / "out"),
        pruning=pb.PruningSpec(ratio=0.3),
    )
    names = []
    for _ in range(n):
        try:
            job = await stub.CreateJob(
                pb.CreateJobRequest(spec=spec, request_id=uuid.uuid4().hex),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise BenchmarkError(f"CreateJob failed: {_describe(exc)}") from exc
        if job.state != pb.Job.STATE_QUEUED:
            raise BenchmarkError(f"a new job should be QUEUED. Received: {job}")
        names.append(job.name)
    return names


async def _hold(watch: Watch) -> None:
    """Read the stream; anything but our own cancellation ending it is a failure."""
    try:
        async for job in watch.call:
            if not watch.opened.is_set():
                watch.opened.set()
            elif job.state != pb.Job.STATE_QUEUED:
                watch.failure = f"job changed to {pb.Job.State.Name(job.state)}"
        watch.failure = watch.failure or "the stream ended early"
    except asyncio.CancelledError:
        raise
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED or not watch.call.cancelled():
            watch.failure = f"the stream failed: {_describe(exc)}"
    finally:
        watch.opened.set()  # wake the opener whatever happened


async def open_watches(
    stubs: Sequence[pbg.PruningServiceStub], names: Sequence[str], count: int
) -> list[Watch]:
    watches = []
    for i in range(count):
        stub = stubs[i % len(stubs)]
        call = stub.WatchJob(pb.WatchJobRequest(name=names[i % len(names)]))
        watch = Watch(call)
        watch.task = asyncio.create_task(_hold(watch))
        watches.append(watch)
    try:
        await asyncio.wait_for(asyncio.gather(*(w.opened.wait() for w in watches)), START_TIMEOUT_S)
    except TimeoutError:
        pass  # the ones without a first message are counted as failures below
    for w in watches:
        if not w.opened.is_set() and w.failure is None:
            w.failure = "no first message within the start timeout"
    return watches


async def close_watches(watches: Sequence[Watch]) -> None:
    for w in watches:
        w.call.cancel()
    tasks = [w.task for w in watches if w.task is not None]
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_load(
    stubs: Sequence[pbg.PruningServiceStub],
    names: Sequence[str],
    concurrency: int,
    seconds: float,
    warmup: float,
    server_pids: Sequence[int],
) -> LoadResult:
    latencies: list[float] = []
    errors: list[str] = []
    requests = [pb.GetJobRequest(name=n) for n in names]

    async def caller(index: int, until: float, record: bool) -> None:
        stub = stubs[index % len(stubs)]
        i = index
        clock = time.perf_counter
        while clock() < until:
            request = requests[i % len(requests)]
            i += concurrency
            start = clock()
            try:
                job = await stub.GetJob(request, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as exc:
                if record:
                    errors.append(f"GetJob: {_describe(exc)}")
                continue
            if record:
                latencies.append(clock() - start)
                if job.name != request.name:
                    errors.append(f"GetJob({request.name}) returned {job.name}")

    if warmup > 0:
        until = time.perf_counter() + warmup
        await asyncio.gather(*(caller(i, until, False) for i in range(concurrency)))
    servers = [psutil.Process(pid) for pid in server_pids]

    def server_cpu() -> float:
        return sum(sum(s.cpu_times()[:2]) for s in servers)

    server_cpu0 = server_cpu()
    client_cpu0 = time.process_time()
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(caller(i, until, True) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    return LoadResult(
        latencies,
        errors,
        elapsed,
        time.process_time() - client_cpu0,
        server_cpu() - server_cpu0,
    )


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


@dataclass
class ArmResult:
    label: str
    errors: list[str]
    rps: float
    lat_ms: list[float]  # ascending
    server_cpu_pct: float


async def benchmark(
    args: argparse.Namespace, servers: Sequence[Server], workdir: Path, label: str
) -> ArmResult:
    """Run the load against started servers (channel i on server i mod N)."""
    channels = [
        grpc.aio.insecure_channel(servers[i % len(servers)].target, options=CHANNEL_OPTIONS)
        # Rounded up to a multiple of the servers, so each gets as many connections.
        for i in range(math.ceil(args.channels / len(servers)) * len(servers))
    ]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), START_TIMEOUT_S)
        stubs = [pbg.PruningServiceStub(ch) for ch in channels]
        names = await create_jobs(stubs[0], workdir, args.jobs)
        print(f"jobs created: {len(names)} (QUEUED)")
        watches = await open_watches(stubs, names, args.streams)
        opened = sum(w.opened.is_set() and w.failure is None for w in watches)
        print(
            f"watch streams opened: {opened}/{args.streams} over {len(channels)} channels "
            f"(~{math.ceil(args.streams / len(channels))} per HTTP/2 connection) "
            f"to {len(servers)} server(s)"
        )
        pids = [s.proc.pid for s in servers]
        load = await run_load(stubs, names, args.concurrency, args.seconds, args.warmup, pids)
        still_open = sum(
            w.failure is None and w.task is not None and not w.task.done() for w in watches
        )
        stream_errors = [f"WatchJob: {w.failure}" for w in watches if w.failure]
        await close_watches(watches)
    finally:
        for ch in channels:
            await ch.close()

    lat_ms = sorted(x * 1000.0 for x in load.latencies_s)
    calls = len(lat_ms) + sum(e.startswith("GetJob") for e in load.errors)
    rps = len(lat_ms) / load.seconds if load.seconds > 0 else 0.0
    print(f"streams held: {args.streams}; still open at the end: {still_open}/{args.streams}")
    print(
        f"GetJob: {calls} calls ({len(lat_ms)} ok) in {load.seconds:.2f} s "
        f"with {args.concurrency} concurrent callers (after {args.warmup:g} s warm-up)"
    )
    print(f"throughput: {rps:.0f} req/s")
    print(
        "latency ms: "
        + "  ".join(
            f"{label} {percentile(lat_ms, p):.2f}"
            for label, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        )
    )
    print(
        f"cpu during load: client {load.client_cpu_s:.1f} s "
        f"({100 * load.client_cpu_s / load.seconds:.0f}% of a core), "
        f"server {load.server_cpu_s:.1f} s ({100 * load.server_cpu_s / load.seconds:.0f}%); "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    server_pct = 100 * load.server_cpu_s / load.seconds if load.seconds > 0 else 0.0
    return ArmResult(label, load.errors + stream_errors, rps, lat_ms, server_pct)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20, help="jobs to create (default 20)")
    p.add_argument("--streams", type=int, default=200, help="WatchJob streams (default 200)")
    p.add_argument("--seconds", type=float, default=30.0, help="load duration (default 30)")
    p.add_argument(
        "--concurrency", type=int, default=16, help="concurrent GetJob callers (default 16)"
    )
    p.add_argument(
        "--channels", type=int, default=3, help="aio channels / HTTP/2 connections (default 3)"
    )
    p.add_argument(
        "--warmup", type=float, default=1.0, help="unrecorded GetJob seconds first (default 1)"
    )
    p.add_argument(
        "--store",
        help="also run N replicas on this PostgreSQL database (postgresql://USER@HOST:PORT/DB) "
        "beside the SQLite server (default: SQLite only)",
    )
    p.add_argument("--replicas", type=int, default=2, help="servers sharing --store (default 2)")
    args = p.parse_args(argv)
    for name in ("jobs", "concurrency", "channels"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.streams < 0 or args.seconds <= 0 or args.warmup < 0:
        p.error("--streams and --warmup must be >= 0, --seconds > 0")
    if args.store is not None and not args.store.startswith(("postgresql://", "postgres://")):
        p.error(f"--store must be a postgresql:// URL. Received: {args.store!r}")
    if args.replicas < 1:
        p.error(f"--replicas must be >= 1. Received: {args.replicas}")
    return args


def run_arm(
    args: argparse.Namespace, workdir: Path, label: str, count: int, store: str | None
) -> ArmResult:
    """Start ``count`` servers on ``store`` (None: each its own SQLite), load them, stop them.

    Raises:
        BenchmarkError: a server did not start or the load could not run.
    """
    print(f"\n== {label} ==")
    servers: list[Server] = []
    try:
        for i in range(count):
            servers.append(start_server(workdir, f"{label.split(',')[0]}-{i}", store))
            print(f"server: {shlex.join(servers[-1].command)}")
            print(f"server pid {servers[-1].proc.pid} serving on {servers[-1].target}")
        result = asyncio.run(benchmark(args, servers, workdir, label))
    finally:
        stops = [stop_server(s) for s in servers]
    for server, stopped in zip(servers, stops, strict=True):
        if stopped:
            result.errors.append(f"server: {stopped}")
            print(server.log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
    return result


def print_table(results: Sequence[ArmResult]) -> None:
    print(f"\n{'arm':<30} {'GetJob/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'server CPU':>10} {'errors':>6}  verdict")  # fmt: skip
    for r in results:
        p99 = percentile(r.lat_ms, 99)
        ok = r.rps >= TARGET_RPS and p99 < TARGET_P99_MS and not r.errors
        print(
            f"{r.label:<30} {r.rps:>9.0f} {percentile(r.lat_ms, 50):>7.2f} {p99:>7.2f} "
            f"{percentile(r.lat_ms, 100):>7.2f} {r.server_cpu_pct:>9.0f}% {len(r.errors):>6}  "
            f"{'PASS' if ok else 'FAIL'}"
        )
    print(
        f"target: {TARGET_RPS:.0f} GetJob/s in total with p99 under {TARGET_P99_MS:.0f} ms and "
        f"zero errors; {os.cpu_count()} cores (client and servers share them), load average "
        f"{os.getloadavg()[0]:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    arms: list[tuple[str, int, str | None]] = [("sqlite, 1 server", 1, None)]
    if args.store:
        arms.append((f"postgresql, {args.replicas} replicas", args.replicas, args.store))
    results = []
    with tempfile.TemporaryDirectory(prefix="secateur-load-") as tmp:
        for label, count, store in arms:
            try:
                results.append(run_arm(args, Path(tmp), label, count, store))
            except BenchmarkError as exc:
                print(f"benchmark could not run ({label}): {exc}", file=sys.stderr)
                return 2
    for r in results:
        print(f"{r.label}: errors: {len(r.errors)}")
        for line in _summarize(r.errors):
            print(f"  {line}")
    print_table(results)
    return 0


def _summarize(errors: Sequence[str], limit: int = 10) -> list[str]:
    counts: dict[str, int] = {}
    for e in errors:
        counts[e] = counts.get(e, 0) + 1
    lines = [f"{n} x {e}" for e, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return lines[:limit] + ([f"... {len(lines) - limit} more kinds"] if len(lines) > limit else [])


if __name__ == "__main__":
    raise SystemExit(main())

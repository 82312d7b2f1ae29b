"""`bearpaw serve --processes N`: requests/s of N gateway processes against one.

Starts the zero-delay upstream and, one after the other, `bearpaw serve
--processes 1` and `--processes 2` (the real command: one supervisor and
uvicorn workers with a SO_REUSEPORT socket each, gateway/cli/supervisor.py)
on the same configuration, and drives
each with `wrk` at the same concurrencies, non-streaming chat, cache off,
access log on. Nothing is pinned: N processes may use every CPU, and the
upstream and wrk take their share of the same CPUs in both runs, so the
ratio is what adding processes buys on this machine. `--gateway-cpus` and
`--load-cpus` pin the gateway's process tree and the upstream + wrk apart
(taskset), on a host with cores to spare: then the ratio is what a second
process buys on the gateway's own cores, with the load's CPU not taken
from them.

    python bench/processes.py --gateway-cpus 0,1 --load-cpus 2-5

    python bench/processes.py                          # 1 vs 2, c=16 and 64, 5 s cells
    python bench/processes.py --rounds 3 --seconds 8   # alternating, median of 3
    python bench/processes.py --shared redis://127.0.0.1:6379/0
    python bench/processes.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench

With SQLite (the default) the processes share one database file, whose
single writer makes each process wait its turn for the commit its answers
wait on; `--database-url` points the usage records at PostgreSQL instead.

`--shared URL` sets `limits.redis_url` and gives the tenant an RPM limit and a
monthly budget, so every request runs its admission through Redis and its
spend through Redis's counters: the configuration that keeps processes
consistent. "CPU us/req" is the CPU time of the whole process tree
(supervisor and workers, all threads, from /proc) per request served; the
upstream's and wrk's are beside it, and "cores used" is all three together
per second: at 2.0 the box is full, and what the upstream and wrk take at a
higher rate is CPU the second gateway process cannot have.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    PYTHON,
    ROOT,
    LoadResult,
    create_key,
    free_port,
    gateway_config,
    markdown_table,
    pinned,
    start_upstream,
    wait_http,
    wrk,
)

BODY = json.dumps(
    {
        "model": "bench",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16,
    }
)


def tree(root: int) -> list[int]:
    """`root` and every descendant, from /proc (no psutil in the product)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Served:
    """One `bearpaw serve --processes N` and its data directory."""

    def __init__(
        self,
        processes: int,
        models: list[dict],
        shared: str | None,
        database: str | None = None,
        cpus: str | None = None,
    ) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"bearpaw-bench-proc{processes}-"))
        extra: dict = {"database_url": database} if database else {}
        fields: dict = {}
        if shared:
            extra["limits"] = {"redis_url": shared}
            # Limits and budget far above what the run can reach: every request
            # is admitted, but only after counting in Redis.
            fields = {"rpm_limit": 10_000_000, "monthly_budget_usd": 1e9}
        config = gateway_config(self.data_dir, models, cache=False, extra=extra)
        # A tenant of its own: runs may share one database (--database-url).
        tenant = f"bench-{processes}-{self.data_dir.name[-8:]}"
        self.key = create_key(self.data_dir, config, tenant=tenant, **fields)
        self.port = free_port()
        script = Path(PYTHON).parent / "bearpaw"  # the installed entry point
        fallback = [PYTHON, "-c", "from gateway.cli import app; app()"]
        cmd = [str(script)] if script.exists() else fallback
        cmd += ["serve", "--no-worker"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--processes", str(processes)]
        cmd = pinned(cmd, cpus)  # the workers inherit the supervisor's CPUs
        self.log_path = self.data_dir / "serve.log"
        env = {**os.environ, "BEARPAW_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_http(f"http://127.0.0.1:{self.port}/ready", timeout=180)
            # /ready answers as soon as one worker is up; give the others time.
            self._wait_workers(processes)
        except Exception:
            self.stop()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError("serve did not start:\n" + tail) from None
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def _wait_workers(self, processes: int, timeout: float = 120.0) -> None:
        # Each worker's lifespan logs "bearpaw ready" (JSON log, this file).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.read_text().count('"bearpaw ready"') >= processes:
                return
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {processes} workers became ready")

    def stop(self) -> None:
        pids = tree(self.popen.pid)
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(40)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid in pids[1:]:  # a worker the supervisor left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Cell:
    run: LoadResult
    gateway_us: float  # CPU of the gateway's process tree per request
    upstream_us: float  # of the zero-delay upstream
    wrk_us: float  # of the load generator
    cores: float  # all three together, CPU-seconds per second of the run


def measure(
    served: Served, upstream: int, c: int, seconds: float, warmup: float, cpus: str | None = None
) -> Cell:
    """One cell, with the CPU each party used: on a box whose cores the
    gateway shares with the upstream and wrk, what they take (it grows with
    the rate) is what a second gateway process cannot have."""
    wrk(served.url, BODY, c, warmup, served.key, cpus=cpus)
    pids = tree(served.popen.pid)
    before, up_before = tree_cpu(pids), tree_cpu([upstream])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    run = wrk(served.url, BODY, c, seconds, served.key, cpus=cpus)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    gateway = tree_cpu(pids) - before
    up = tree_cpu([upstream]) - up_before
    load = (after.ru_utime - kids.ru_utime) + (after.ru_stime - kids.ru_stime)
    n = run.requests or 1
    return Cell(run, 1e6 * gateway / n, 1e6 * up / n, 1e6 * load / n, (gateway + up + load) / wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="start every process count this many times, alternating (1, 2, 1, 2 ...); "
        "the table shows each cell's median round",
    )
    parser.add_argument("--shared", default=None, help="Redis URL: limits.redis_url")
    parser.add_argument(
        "--database-url",
        default=None,
        help="usage records here instead of a fresh SQLite file (e.g. PostgreSQL)",
    )
    parser.add_argument("--gateway-cpus", default=None, help="taskset -c list for the gateway")
    parser.add_argument("--load-cpus", default=None, help="taskset -c list for upstream + wrk")
    args = parser.parse_args(argv)

    up_port = free_port()
    upstream = start_upstream(up_port, cpus=args.load_cpus)
    models = [{"name": "bench", "replicas": [{"url": f"http://127.0.0.1:{up_port}/v1"}]}]
    counts = [int(x) for x in args.processes.split(",")]
    conc = [int(x) for x in args.concurrency.split(",")]
    results: dict[tuple[int, int], list[Cell]] = {}
    try:
        for n in [n for _ in range(args.rounds) for n in counts]:
            served = Served(n, models, args.shared, args.database_url, args.gateway_cpus)
            try:
                for c in conc:
                    cell = measure(
                        served, upstream.popen.pid, c, args.seconds, args.warmup, args.load_cpus
                    )
                    results.setdefault((n, c), []).append(cell)
                    run = cell.run
                    print(
                        json.dumps(
                            {
                                "processes": n,
                                "concurrency": c,
                                "rps": run.rps,
                                "p50_ms": run.p50_ms,
                                "p99_ms": run.p99_ms,
                                "cpu_us_per_req": round(cell.gateway_us, 1),
                                "upstream_us_per_req": round(cell.upstream_us, 1),
                                "wrk_us_per_req": round(cell.wrk_us, 1),
                                "cores_used": round(cell.cores, 2),
                                "errors": run.errors,
                            }
                        ),
                        flush=True,
                    )
            finally:
                served.stop()
                for line in served.log_path.read_text().splitlines():
                    if "usage writer closing" in line:  # where its commits went
                        print(f"# {n} process(es): {json.loads(line)['msg']}", flush=True)
    finally:
        upstream.stop()
    base = counts[0]
    median = {key: _median(cells) for key, cells in results.items()}
    rows = []
    for n in counts:
        for c in conc:
            cell = median[(n, c)]
            run = cell.run
            ratio = run.rps / median[(base, c)].run.rps if median[(base, c)].run.rps else 0.0
            spread = [x.run.rps for x in results[(n, c)]]
            rows.append(
                [
                    n,
                    c,
                    run.p50_ms,
                    run.p99_ms,
                    run.rps,
                    cell.gateway_us,
                    cell.upstream_us,
                    cell.wrk_us,
                    cell.cores,
                    f"{min(spread):,.0f}-{max(spread):,.0f}",
                    ratio,
                    run.errors,
                ]
            )
    headers = [
        "processes",
        "conc.",
        "p50 ms",
        "p99 ms",
        "RPS",
        "CPU us/req",
        "upstream us/req",
        "wrk us/req",
        "cores used",
        "RPS range",
        "RPS vs 1",
        "errors",
    ]
    state = f"limits.redis_url {args.shared} (RPM limit + budget counted in Redis)"
    db = args.database_url.split("@")[-1] if args.database_url else "SQLite"
    placement = (
        f"gateway on CPUs {args.gateway_cpus or 'any'}, upstream + wrk on {args.load_cpus or 'any'}"
        if args.gateway_cpus or args.load_cpus
        else "nothing pinned"
    )
    print(
        f"\n{os.cpu_count()} CPUs, {placement}; {args.seconds:.0f}s per cell, "
        f"median of {args.rounds} alternating round(s); JSON chat, "
        f"cache off, access log on; usage records in {db}; "
        f"{state if args.shared else 'in-process counters'}\n"
    )
    print(markdown_table(headers, rows))
    if base == 1 and 2 in counts:
        for c in conc:
            ratio = median[(2, c)].run.rps / median[(1, c)].run.rps
            verdict = "met" if ratio >= 1.7 else "NOT met"
            print(f"goal 2 processes >= 1.7x one, c={c}: {ratio:.2f}x: {verdict}")


def _median(cells: list[Cell]) -> Cell:
    """The round whose req/s is the median (the lower middle of an even count)."""
    ordered = sorted(cells, key=lambda cell: cell.run.rps)
    return ordered[(len(ordered) - 1) // 2]


if __name__ == "__main__":
    main()

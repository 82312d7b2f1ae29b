"""The gateway's own cost: added latency and max RPS against a direct call.

Starts the zero-delay upstream (``bench/upstream.py``) and a real gateway
process (``uvicorn gateway.main:app``, uvloop + httptools, cache off) in front
of it, then drives both with ``wrk`` at each concurrency, non-streaming and
streaming, in the same run. With ``--pin`` (default on a machine with 2+ CPUs)
the gateway gets a CPU of its own and the upstream and wrk share another, so
"RPS via gateway" is what one gateway process on one core can do.

    python bench/gateway_overhead.py                 # full table, ~3 minutes
    python bench/gateway_overhead.py --seconds 5 --concurrency 1,64
    python bench/gateway_overhead.py --profile out/  # py-spy the gateway at c=64

Columns: p50/p99 of the whole response (for streams: until [DONE]), added p50
= via p50 - direct p50, and RPS via/direct. "gw CPU us/req" is the gateway
process's own CPU time (all its threads, from /proc) per request served, and
"req/s per core" = 1e6 / that: what one core would serve with nothing else on
it. On a shared machine the RPS columns move with whatever else runs on the
gateway's CPU; the CPU cost per request barely does, so compare that first.
"gw CPU use" is the gateway's CPU seconds per wall second during the cell.

Peer column: with the LiteLLM proxy in the bench's own venv
(``.venv-bench-litellm``, made by ``bash bench/setup_litellm.sh``; never the
product's environment) the same cells are also run against it, on the same
CPU as the gateway, in the same run, and a second table prints Bearpaw's
ratio to it (req/s, and LiteLLM's p99 over Bearpaw's). ``--litellm`` creates
the venv when missing; ``--no-litellm`` skips the peer; by default it runs when
the venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    LITELLM_VENV,
    LoadResult,
    Peer,
    free_port,
    litellm_version,
    markdown_table,
    pinned,
    start_gateway,
    start_litellm,
    start_upstream,
    wrk,
)

MESSAGES = [{"role": "user", "content": "Say hello in five words."}]


def body(stream: bool) -> str:
    payload: dict[str, object] = {"model": "bench", "messages": MESSAGES, "max_tokens": 16}
    if stream:
        payload["stream"] = True
    return json.dumps(payload)


def profile_gateway(pid: int, seconds: int, out: Path) -> str:
    """py-spy for `seconds` on the running gateway; returns a top-N summary."""
    # Installed into the same environment as this interpreter, maybe not on PATH.
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not spy:
        return "py-spy not installed (pip install py-spy)"
    raw = out / "gateway.pyspy.txt"
    subprocess.run(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "500",
            "--format",
            "raw",
            "--threads",
            "--output",
            str(raw),
            # Blocking (the default): each sample pauses the gateway for a
            # moment, but the stack it reads is whole. --nonblocking read torn
            # stacks under uvloop and charged idle waits to the awaiting frame.
        ],
        check=True,
        capture_output=True,
    )
    return summarise_collapsed(raw.read_text())


def summarise_collapsed(text: str, top: int = 25) -> str:
    """Samples per thread, then self time per function and inclusive time per
    gateway/backends/cache function on the event loop's thread (py-spy's
    collapsed stacks recorded with --threads; shares of that thread's samples)."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = main = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread ") else "?"
        threads[thread] += n
        if thread != "MainThread":
            continue
        main += n
        frames = frames[1:]
        own[_short(frames[-1])] += n
        seen: set[str] = set()
        for frame in frames:
            name = _short(frame)
            if any(p in frame for p in ("gateway/", "backends/", "cache/")) and name not in seen:
                seen.add(name)
                inclusive[name] += n
    lines = [f"samples: {total}, by thread:"]
    for name, n in threads.most_common(8):
        lines.append(f"  {100 * n / total:5.1f}%  {name}")
    lines += ["", "event loop (MainThread), self time (top):"]
    for name, n in own.most_common(top):
        lines.append(f"  {100 * n / max(main, 1):5.1f}%  {name}")
    lines += ["", "event loop, inclusive, project code (top):"]
    for name, n in inclusive.most_common(top):
        lines.append(f"  {100 * n / max(main, 1):5.1f}%  {name}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"; line numbers split one
    # function into many rows otherwise.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({tail})"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_floor(url: str, engine: str, seconds: float, cpus: str | None) -> float:
    """req/s of the gateway's shared HTTP client alone (bench/client_floor.py)."""
    script = Path(__file__).resolve().parent / "client_floor.py"
    cmd = [sys.executable, str(script), "--url", url, "--engine", engine]
    cmd += ["--seconds", str(seconds)]
    done = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["rps"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--log-level", default="info", help="gateway log level (info: JSON access log on)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the gateway, write here")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--http-engine",
        choices=["httpcore", "aiohttp", "native"],
        default="aiohttp",
        help="backends.http_engine of the gateway under test",
    )
    parser.add_argument(
        "--litellm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LiteLLM proxy as a peer column (default: when .venv-bench-litellm exists)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a top-level gateway setting for this run (YAML value), e.g. gc_freeze=false",
    )
    args = parser.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    use_peer = args.litellm if args.litellm is not None else LITELLM_VENV.exists()

    cpus = os.cpu_count() or 1
    pin = args.pin if args.pin is not None else cpus >= 2
    gw_cpu, load_cpu = ("1", "0") if pin else (None, None)
    up_port = free_port()
    upstream = start_upstream(up_port, cpus=load_cpu)
    models = [
        {
            "name": "bench",
            "replicas": [{"url": f"http://127.0.0.1:{up_port}/v1", "vllm": False}],
        }
    ]
    gateway = start_gateway(
        models,
        cache=False,
        cpus=gw_cpu,
        log_level=args.log_level,
        extra={"backends": {"http_engine": args.http_engine}, **overrides},
    )
    direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
    via_url = gateway.url + "/chat/completions"
    rows: list[list[object]] = []
    records: list[dict[str, object]] = []
    peer_rows: list[list[object]] = []
    peer: Peer | None = None
    peer_version = ""
    try:
        if use_peer:
            # Same CPU as the gateway: each is measured while the other idles.
            peer = start_litellm(f"http://127.0.0.1:{up_port}/v1", cpus=gw_cpu)
            peer_version = litellm_version(LITELLM_VENV / "bin" / "litellm")
        for mode in args.modes.split(","):
            payload = body(stream=mode == "stream")
            for c in (int(x) for x in args.concurrency.split(",")):
                wrk(via_url, payload, c, args.warmup, gateway.key, load_cpu)
                direct = wrk(direct_url, payload, c, args.seconds, None, load_cpu)
                cpu_before, wall_before = cpu_seconds(gateway.proc.popen.pid), time.monotonic()
                via = wrk(via_url, payload, c, args.seconds, gateway.key, load_cpu)
                cpu = cpu_seconds(gateway.proc.popen.pid) - cpu_before
                wall = time.monotonic() - wall_before
                served = via.requests
                us_per_req = 1e6 * cpu / served if served else 0.0
                rec = {
                    "mode": mode,
                    "concurrency": c,
                    "direct_p50_ms": direct.p50_ms,
                    "direct_p99_ms": direct.p99_ms,
                    "via_p50_ms": via.p50_ms,
                    "via_p99_ms": via.p99_ms,
                    "added_p50_ms": via.p50_ms - direct.p50_ms,
                    "direct_rps": direct.rps,
                    "via_rps": via.rps,
                    "ratio": via.rps / direct.rps if direct.rps else 0.0,
                    "gw_cpu_us_per_req": round(us_per_req, 1),
                    "per_core_rps": float(round(1e6 / us_per_req)) if us_per_req else 0.0,
                    "gw_cpu_use": round(cpu / wall, 2),
                    "errors": direct.errors + via.errors,
                }
                if peer is not None:
                    peer_rec = measure_peer(peer, payload, c, args, load_cpu)
                    rec.update(peer_rec)
                    peer_rows.append(peer_row(mode, c, via, peer_rec))
                records.append(rec)
                rows.append([mode, *list(rec.values())[1:14]])
                print(json.dumps(rec), flush=True)
        # The framework's own ceiling on this machine, same process and pinning:
        # uvicorn + FastAPI + the request-id/metrics/log middleware, no pipeline.
        health_url = gateway.url.removesuffix("/v1") + "/health"
        floor = wrk(health_url, "", 16, args.seconds, None, load_cpu, method="GET")
        # And the other half of a proxied request: the gateway's client alone.
        client_rps = client_floor(direct_url, args.http_engine, args.seconds, gw_cpu)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            payload = body(stream=False)
            loader = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; sys.path.insert(0, 'bench'); from harness import wrk; "
                    f"wrk({via_url!r}, {payload!r}, 64, 14, {gateway.key!r}, {load_cpu!r})",
                ],
                cwd=Path(__file__).resolve().parent.parent,
            )
            time.sleep(2)
            summary = profile_gateway(gateway.proc.popen.pid, 10, args.profile)
            loader.wait()
            (args.profile / "summary.txt").write_text(summary)
            print("\n" + summary)
    finally:
        if peer is not None:
            peer.stop()
        gateway.stop()
        upstream.stop()
    headers = [
        "mode",
        "conc.",
        "direct p50 ms",
        "direct p99 ms",
        "via p50 ms",
        "via p99 ms",
        "added p50 ms",
        "direct RPS",
        "via RPS",
        "via/direct",
        "gw CPU us/req",
        "req/s per core",
        "gw CPU use",
        "errors",
    ]
    print(
        f"\ngateway pinned to CPU {gw_cpu}, upstream+wrk to CPU {load_cpu}; "
        f"{cpus} CPUs; {args.seconds:.0f}s per cell; log level {args.log_level}; "
        f"http_engine {args.http_engine}; settings {overrides or 'default'}\n"
    )
    print(markdown_table(headers, rows))
    print(
        f"\nframework floor, same gateway process: GET /health at c=16 "
        f"{floor.rps:,.0f} req/s, p50 {floor.p50_ms:.2f} ms"
    )
    ceiling = 1.0 / (1.0 / floor.rps + 1.0 / client_rps) if floor.rps and client_rps else 0.0
    print(
        f"client floor, same CPU: the shared client ({args.http_engine}) alone, c=16 "
        f"{client_rps:,.0f} req/s\n"
        f"ceiling of one proxied exchange on this CPU (server floor + client floor, no "
        f"gateway work): {ceiling:,.0f} req/s"
    )
    if peer is not None:
        print_peer(peer_rows, records, peer_version)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


def measure_peer(
    peer: Peer, payload: str, c: int, args: argparse.Namespace, load_cpu: str | None
) -> dict[str, object]:
    """One cell against the LiteLLM proxy: warm-up, then the measured run and
    its CPU time, as for the gateway."""
    url = peer.url + "/chat/completions"
    wrk(url, payload, c, args.warmup, peer.key, load_cpu)
    pid = peer.proc.popen.pid
    cpu_before = cpu_seconds(pid)
    run = wrk(url, payload, c, args.seconds, peer.key, load_cpu)
    cpu = cpu_seconds(pid) - cpu_before
    us = 1e6 * cpu / run.requests if run.requests else 0.0
    return {
        "litellm_p50_ms": run.p50_ms,
        "litellm_p99_ms": run.p99_ms,
        "litellm_rps": run.rps,
        "litellm_cpu_us_per_req": round(us, 1),
        "litellm_errors": run.errors,
    }


def peer_row(mode: str, c: int, via: LoadResult, peer: dict[str, object]) -> list[object]:
    rps = float(peer["litellm_rps"])  # type: ignore[arg-type]
    p99 = float(peer["litellm_p99_ms"])  # type: ignore[arg-type]
    return [
        mode,
        c,
        peer["litellm_p50_ms"],
        p99,
        rps,
        peer["litellm_cpu_us_per_req"],
        peer["litellm_errors"],
        via.p50_ms,
        via.p99_ms,
        via.rps,
        via.rps / rps if rps else 0.0,
        p99 / via.p99_ms if via.p99_ms else 0.0,
    ]


def print_peer(rows: list[list[object]], records: list[dict[str, object]], version: str) -> None:
    headers = [
        "mode",
        "conc.",
        "LiteLLM p50 ms",
        "LiteLLM p99 ms",
        "LiteLLM RPS",
        "LiteLLM CPU us/req",
        "LiteLLM errors",
        "Bearpaw p50 ms",
        "Bearpaw p99 ms",
        "Bearpaw RPS",
        "RPS Bearpaw/LiteLLM",
        "p99 LiteLLM/Bearpaw",
    ]
    print(f"\npeer: LiteLLM proxy {version}, same CPU as the gateway, same run\n")
    print(markdown_table(headers, rows))
    # The two goals, when their cells ran.
    for rec in records:
        if rec["mode"] != "json":
            continue
        if rec["concurrency"] == 16:
            ratio = float(rec["via_rps"]) / float(rec["litellm_rps"] or 1)  # type: ignore[arg-type]
            verdict = "met" if ratio >= 15 else "NOT met"
            print(
                f"goal >= 15x LiteLLM's req/s at c=16 (JSON): {ratio:.1f}x "
                f"({rec['via_rps']:.0f} vs {rec['litellm_rps']:.0f} req/s): {verdict}"
            )
        if rec["concurrency"] == 64:
            share = float(rec["via_p99_ms"]) / float(rec["litellm_p99_ms"] or 1)  # type: ignore[arg-type]
            verdict = "met" if share <= 1 / 20 else "NOT met"
            print(
                f"goal p99 <= 1/20 of LiteLLM's at c=64 (JSON): 1/{1 / share:.1f} "
                f"({rec['via_p99_ms']:.0f} vs {rec['litellm_p99_ms']:.0f} ms): {verdict}"
            )


if __name__ == "__main__":
    main()

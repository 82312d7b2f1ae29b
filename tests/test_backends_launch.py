"""The launch supervisor restarts a crashed server process."""

from __future__ import annotations

import asyncio
import sys
import time

from backends.launch import LaunchProfile, Supervisor

# Stands in for `vllm serve`: exits at once the first time (a crash), then stays up.
CRASH_ONCE = """
import pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("crashed")
    sys.exit(3)
time.sleep(60)
"""


async def test_supervisor_restarts_crashed_process(tmp_path) -> None:
    script = tmp_path / "fake_vllm.py"
    script.write_text(CRASH_ONCE)
    marker = tmp_path / "marker"
    # build_command puts "serve <model> ..." after the executable; the script
    # only reads its first argument, so the marker path goes there.
    profile = LaunchProfile(
        name="tiny",
        model="unused",
        port=18123,
        executable=[sys.executable, str(script), str(marker)],
    )
    supervisor = Supervisor([profile], restart_delay=0.05, stop_timeout=5)
    await supervisor.start()
    try:
        deadline = time.monotonic() + 10
        while supervisor.restarts["tiny"] < 1:
            assert time.monotonic() < deadline, "process was not restarted"
            await asyncio.sleep(0.05)
        process = supervisor.processes["tiny"]
        await asyncio.sleep(0.3)
        assert process.returncode is None  # the restarted one stays up
        assert marker.read_text() == "crashed"
    finally:
        await supervisor.stop()
    assert supervisor.processes["tiny"].returncode is not None
    assert supervisor.restarts["tiny"] == 1  # stopping is not a crash

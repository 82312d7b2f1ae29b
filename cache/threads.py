"""Thread pools of the numeric libraries, capped for the cache's own work.

numpy's OpenBLAS, FAISS (OpenMP and its own OpenBLAS) and torch each keep a
pool of one thread per core, and an idle pool spins for a while after every
call before it sleeps. The cache's numeric work outside the model (a vector
search, the verifier's feature matrix and its two small matrix products, a
few hundred lookups a batch) gains next to nothing from a second core, while
the spinning takes the cores the event loop and the model need: on a 16-core
GPU host the process's CPU per lookup was 6.8 ms with the libraries' default
pools and 0.5 ms with them on one thread (docs/benchmarks.md). ``CacheSettings
.numeric_threads`` caps them; the embedding model's own forward pass is left
alone on the CPU (ONNX Runtime has its own pool, and torch's would slow it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

_controller: Any = None
_controller_lock = threading.Lock()


def _blas_controller() -> Any:
    """threadpoolctl's view of the BLAS libraries loaded now (numpy's, FAISS's),
    made once: inspecting the loaded libraries costs milliseconds."""
    global _controller
    with _controller_lock:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController().select(user_api="blas")
        return _controller


def blas_limiter(threads: int | None) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of context managers that cap the BLAS libraries' pools at
    ``threads`` while the block runs (``None``: no cap). The cap is the
    libraries' own setting, so it holds for the whole process during the
    block; entering and leaving cost about 25 us."""
    if threads is None:
        return contextlib.nullcontext
    controller = _blas_controller()
    if not controller.lib_controllers:
        return contextlib.nullcontext
    return lambda: controller.limit(limits=threads)


def limit_torch_threads(threads: int | None, device: str) -> bool:
    """torch's CPU pool capped at ``threads`` when the model runs on a GPU
    (its CPU ops there are copies and bookkeeping). On the CPU the pool runs
    the forward pass itself, so it is left as it is. Returns whether it was set."""
    if threads is None or device == "cpu":
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with sentence-transformers
        return False
    torch.set_num_threads(threads)
    return True

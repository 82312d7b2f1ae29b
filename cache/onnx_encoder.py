"""A sentence-transformers model whose transformer runs on ONNX Runtime.

On a small CPU the transformer's forward pass is nearly all of a semantic
lookup's cost, and PyTorch spends most of it in small matrix products that ONNX
Runtime's kernels do about three times faster at batch size one. Only the first
module (the transformer) moves; pooling, dense layers and normalisation stay the
model's own torch modules, which keeps any sentence-transformers pipeline exact:
the outputs match PyTorch's to float rounding (tests/test_cache_onnx.py).

The exported graph is written once per model under the cache directory and
reused by every later process (the gateway and each worker).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("bearpaw.cache.onnx")

_OPSET = 17


def onnx_cache_dir() -> Path:
    """Where exported graphs live: $BEARPAW_ONNX_CACHE, else the user cache dir."""
    explicit = os.environ.get("BEARPAW_ONNX_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bearpaw" / "onnx"


def available() -> bool:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def supports(model: Any) -> bool:
    """Whether ``model`` (a SentenceTransformer) starts with a Hugging Face transformer."""
    try:
        first = model[0]
    except (TypeError, IndexError, KeyError):
        return False
    return hasattr(first, "auto_model") and hasattr(model, "preprocess")


class _Forward(torch.nn.Module):
    """The transformer as a module of positional inputs, which the exporter needs."""

    def __init__(self, auto_model: Any, names: list[str]) -> None:
        super().__init__()
        self.inner = auto_model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(**dict(zip(self.names, inputs, strict=True))).last_hidden_state


class OnnxEncoder:
    """``encode`` with the same contract as ``Embedder.encode``: unit float32 rows."""

    def __init__(self, model: Any, key: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        self._model = model
        self._tail = list(model)[1:]
        probe = model.preprocess(["probe"])
        self._names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in probe]
        path = self._export(model, key, probe)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Spinning threads would burn the cores the gateway's event loop needs
        # between lookups; waking costs microseconds against milliseconds of work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _export(self, model: Any, key: str, probe: dict[str, Any]) -> Path:
        digest = hashlib.sha256(f"{key}|{torch.__version__}|{_OPSET}".encode()).hexdigest()[:16]
        path = onnx_cache_dir() / f"{digest}.onnx"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        wrapper = _Forward(model[0].auto_model, self._names).eval()
        inputs = tuple(probe[n] for n in self._names)
        axes = {n: {0: "batch", 1: "tokens"} for n in self._names}
        axes["hidden"] = {0: "batch", 1: "tokens"}
        # Another process may export the same model at the same moment: each
        # writes its own temporary file and the rename makes one of them win whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
        os.close(fd)
        try:
            # The tracer warns about constructs it records as constants (shape
            # checks in the attention mask code); the test compares outputs.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    inputs,
                    tmp,
                    input_names=self._names,
                    output_names=["hidden"],
                    dynamic_axes=axes,
                    opset_version=_OPSET,
                    dynamo=False,
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("exported %s to %s", key, path)
        return path

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        rows: list[np.ndarray] = []
        order: list[int] = []
        for batch in length_batches([len(t) for t in texts], batch_size):
            features = self._model.preprocess([texts[i] for i in batch])
            feed = {n: features[n].numpy() for n in self._names}
            hidden = self._session.run(None, feed)[0]
            features["token_embeddings"] = torch.from_numpy(hidden)
            with torch.inference_mode():
                for module in self._tail:
                    features = module(features)
                vectors = torch.nn.functional.normalize(features["sentence_embedding"], dim=-1)
            rows.append(vectors.numpy())
            order.extend(batch)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        result = np.empty((len(texts), rows[0].shape[1]), dtype=np.float32)
        result[order] = np.concatenate(rows)
        return result


def length_batches(lengths: list[int], batch_size: int, waste: float = 1.5) -> list[list[int]]:
    """Indices grouped into batches of similar length.

    A batch is padded to its longest text, and a micro-batch of lookups mixes
    short and long questions: splitting it where padding would exceed ``waste``
    times the real length costs one more call (well under a millisecond) and
    saves the wasted work, which on QQP-like text was more than half of it.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        size = max(lengths[i], 1)
        # Sorted ascending, so the newcomer sets the padded length of the batch.
        if current and (
            len(current) >= batch_size or size * (len(current) + 1) > waste * (total + size)
        ):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        batches.append(current)
    return batches


_encoders: dict[str, OnnxEncoder] = {}
_lock = threading.Lock()


def shared_encoder(model: Any, key: str) -> OnnxEncoder:
    """One encoder (and one ONNX Runtime session) per model in the process."""
    with _lock:
        encoder = _encoders.get(key)
        if encoder is None:
            encoder = OnnxEncoder(model, key)
            _encoders[key] = encoder
        return encoder

"""Talking to inference servers: replica pool, routing, retries, vLLM launch, hosted providers.

A leaf library: it imports neither ``gateway`` nor ``workers``.
"""

from backends.config import BackendSettings, ModelConfig, ReplicaConfig
from backends.errors import (
    BackendError,
    ModelNotFound,
    NoReplicaAvailable,
    UpstreamError,
    UpstreamTimeout,
)
from backends.pool import ReplicaPool, UpstreamResponse, UpstreamStream

__all__ = [
    "BackendError",
    "BackendSettings",
    "ModelConfig",
    "ModelNotFound",
    "NoReplicaAvailable",
    "ReplicaConfig",
    "ReplicaPool",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamStream",
    "UpstreamTimeout",
]

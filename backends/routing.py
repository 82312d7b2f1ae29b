"""Choosing a replica: least loaded by vLLM metrics, with prefix affinity.

Everything here is a pure function of replica state so it can be tested
without servers and costs one pass over the model's replicas per request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from backends.replica import Replica

_MASK64 = (1 << 64) - 1


def affinity_hash(key: str) -> int:
    """64-bit hash of an affinity key (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest())


def prefix_affinity_key(prefix: str, chars: int) -> str | None:
    """Affinity key for a prompt: the hash of its first ``chars`` characters.

    Prompts shorter than ``chars`` get no key: they share too little to make a
    replica's prefix cache worth a less loaded replica.
    """
    if chars <= 0 or len(prefix) < chars:
        return None
    return hashlib.blake2b(prefix[:chars].encode(), digest_size=16).hexdigest()


def rendezvous_score(key_hash: int, seed: int) -> int:
    """Highest-random-weight score of a replica for a key (splitmix64 finaliser).

    Rendezvous hashing moves only the keys of a replica that leaves or joins,
    which keeps most prefixes on the replica whose KV cache already holds them.
    """
    z = (key_hash ^ seed) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def replica_load(replica: Replica, now: float, stale_after: float) -> tuple[float, float]:
    """(load, kv usage) used to compare replicas; lower is better.

    With fresh metrics the load is vLLM's running + waiting, plus what this
    process sent since the scrape: without that term every request in the
    second between two scrapes would pile onto the replica that looked idle.
    With stale metrics only this process's outstanding requests are known.
    """
    metrics = replica.fresh_metrics(now, stale_after)
    if metrics is None:
        return replica.outstanding / replica.weight, 0.0
    since_scrape = replica.outstanding - replica.outstanding_at_scrape
    if since_scrape < 0:
        since_scrape = 0
    return (metrics.running + metrics.waiting + since_scrape) / replica.weight, metrics.kv_usage


def pick_replica(
    replicas: Sequence[Replica],
    *,
    now: float,
    stale_after: float,
    exclude: Sequence[Replica] = (),
    key_hash: int | None = None,
    affinity_ratio: float = 1.5,
    affinity_slack: float = 4.0,
    rotation: int = 0,
) -> Replica | None:
    """The replica to send to next, or None when none is ready.

    ``exclude`` holds replicas already tried for this request. ``rotation``
    shifts where ties start so equal replicas share sequential traffic.
    With ``key_hash`` the prefix's rendezvous home wins unless its load exceeds
    ``best * affinity_ratio + affinity_slack``.
    """
    count = len(replicas)
    best: Replica | None = None
    best_load = 0.0
    best_kv = 0.0
    home: Replica | None = None
    home_score = -1
    home_load = 0.0
    start = rotation % count if count else 0
    for step in range(count):
        replica = replicas[(start + step) % count]
        if not replica.healthy or not replica.breaker.available():
            continue
        if exclude and replica in exclude:
            continue
        load, kv = replica_load(replica, now, stale_after)
        if best is None or load < best_load or (load == best_load and kv < best_kv):
            best, best_load, best_kv = replica, load, kv
        if key_hash is not None:
            score = rendezvous_score(key_hash, replica.seed)
            if score > home_score:
                home, home_score, home_load = replica, score, load
    if home is not None and home_load <= best_load * affinity_ratio + affinity_slack:
        return home
    return best

"""What an inference server can serve, read from the routes it registered.

vLLM registers its HTTP routes by the tasks the loaded model supports: a
generative model gets /v1/chat/completions and /tokenize but no /v1/embeddings,
/rerank or audio routes. Its FastAPI app publishes those routes in
``/openapi.json`` at the server root, so one GET per server tells the gateway
what each model serves, before a client finds out through a bare 404.

Capability names are the gateway's endpoint names (``chat.completions``,
``embeddings``, ``tokenize``, ...), so a request's endpoint is the capability
it needs.
"""

from __future__ import annotations

from typing import Any

import httpx

# Capability -> the server-root paths any one of which means it is served.
# vLLM registers rerank and score under several paths (the same handler).
ROUTES: dict[str, tuple[str, ...]] = {
    "chat.completions": ("/v1/chat/completions",),
    "completions": ("/v1/completions",),
    "embeddings": ("/v1/embeddings",),
    "responses": ("/v1/responses",),
    "messages": ("/v1/messages",),
    "tokenize": ("/tokenize",),
    "detokenize": ("/detokenize",),
    "rerank": ("/rerank", "/v1/rerank", "/v2/rerank"),
    "score": ("/score", "/v1/score"),
    "audio.transcriptions": ("/v1/audio/transcriptions",),
    "audio.translations": ("/v1/audio/translations",),
}

# Display order: ROUTES' order.
ORDER: tuple[str, ...] = tuple(ROUTES)

# What litellm serves for a hosted model (HostedProvider maps exactly these
# three paths), and what a server that publishes no readable OpenAPI document
# is assumed to serve when it has to be shown. An unknown server's requests are
# never refused for a missing capability: its own answer decides.
HOSTED: frozenset[str] = frozenset({"chat.completions", "completions", "embeddings"})
ASSUMED: frozenset[str] = HOSTED


def from_openapi(document: Any) -> frozenset[str] | None:
    """The capabilities an OpenAPI document's paths show; None when it lists
    none of them (not an inference server's document, so it says nothing)."""
    paths = document.get("paths") if isinstance(document, dict) else None
    if not isinstance(paths, dict):
        return None
    found = frozenset(name for name, routes in ROUTES.items() if any(p in paths for p in routes))
    return found or None


async def fetch_capabilities(
    client: httpx.AsyncClient,
    root: str,
    *,
    authorization: str | None = None,
    timeout: httpx.Timeout | float | None = None,
) -> frozenset[str] | None:
    """GET ``{root}/openapi.json`` and read it; None when the server has no
    readable document. Raises httpx.HTTPError when the server did not answer,
    so the caller can try again later instead of recording "unknown"."""
    headers = {"authorization": authorization} if authorization else None
    response = await client.get(root + "/openapi.json", headers=headers, timeout=timeout)
    if response.status_code != 200:
        return None
    try:
        document = response.json()
    except ValueError:
        return None
    return from_openapi(document)


def route_missing(status: int, body: dict[str, Any] | None) -> bool:
    """Whether an upstream answer means "no such path here" rather than an
    error of the request: a 404 without an OpenAI error object (FastAPI's
    ``{"detail": "Not Found"}``). vLLM's unknown-model 404 carries
    ``{"error": {"message": ...}}`` and is not one."""
    if status != 404:
        return False
    if not body:
        return True
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return False
    return not isinstance(body.get("message"), str) and not isinstance(error, str)


def ordered(capabilities: set[str] | frozenset[str]) -> list[str]:
    """Capabilities in display order (known ones first, then any others sorted)."""
    known = [name for name in ORDER if name in capabilities]
    return known + sorted(set(capabilities) - set(ORDER))

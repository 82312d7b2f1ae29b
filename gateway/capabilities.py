"""What the gateway tells clients a model can serve, and the error when it cannot.

The backend layer learns what each model's servers serve
(backends.capabilities); the gateway adds the APIs it serves itself by
translation, and turns a request for anything else into OpenAI's error object
instead of the backend's bare 404.
"""

from __future__ import annotations

from backends.capabilities import ASSUMED, ordered, route_missing
from backends.errors import UpstreamError
from gateway.errors import APIError

# APIs the gateway's dialects translate into chat completions: served wherever
# chat completions are, whatever the server itself offers.
TRANSLATED: tuple[str, ...] = ("responses", "messages")


def advertised(served: set[str] | None) -> list[str]:
    """A model's capabilities as /v1/models shows them: what its servers serve
    (the assumed default when they do not say), plus the translated APIs."""
    names = set(ASSUMED if served is None else served)
    if "chat.completions" in names:
        names.update(TRANSLATED)
    return ordered(names)


def unsupported(model: str, capability: str, served: set[str] | None) -> APIError:
    """The 400 for a request the model cannot serve, naming both."""
    if served is None:
        why = "its server has no endpoint for it"
    else:
        why = "it serves: " + ", ".join(advertised(served))
    return APIError(
        400,
        f"The model `{model}` does not support {capability} ({why}).",
        code="unsupported_capability",
        param="model",
    )


def require(model: str, endpoint: str, api: str | None, served: set[str] | None) -> None:
    """Refuse a call whose endpoint the model's servers are known not to serve.

    `endpoint` is what goes upstream and so what must be served; `api` is what
    the client called (a dialect's name), which the message names. Unknown
    capabilities refuse nothing: the backend's own answer decides.
    """
    if served is not None and endpoint not in served:
        raise unsupported(model, api or endpoint, served)


def missing_route(
    exc: UpstreamError, model: str, capability: str, served: set[str] | None
) -> APIError | None:
    """The capability error for an upstream 404 that means the path does not
    exist there (capabilities unknown or out of date); None for any other error."""
    if not route_missing(exc.status, exc.body):
        return None
    if served is not None and capability in advertised(served):
        served = None  # what was learnt is out of date: do not list it as served
    return unsupported(model, capability, served)

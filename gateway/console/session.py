"""Browser sign-in with the admin key: a signed session cookie and CSRF tokens.

Shared by the console and the report page. The cookie never holds the admin
key. It holds an issue time and a random nonce, signed with an HMAC keyed by
the admin key, so changing the key signs every browser out. It is HttpOnly
(scripts cannot read it), SameSite=Strict (other sites' pages cannot make the
browser send it) and scoped to /admin.

Every form that changes state carries a CSRF token derived from the session's
nonce (an HMAC again, so nothing is stored); the handler compares it in
constant time and answers 403 when it is missing or wrong. SameSite=Strict
already stops cross-site posts in current browsers; the token is the second
lock for older browsers and same-site subdomains.

Sign-out deletes the cookie and remembers the nonce in this process, so a copy
of the cookie stops working here at once; other gateway processes stop
accepting it when it expires (12 hours).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import RedirectResponse

from gateway.errors import APIError

COOKIE = "bearpaw_admin"
COOKIE_PATH = "/admin"
MAX_AGE_S = 12 * 3600
CSRF_FIELD = "csrf"


class SignInRequired(Exception):
    """A console page was opened without a session: the handler redirects."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class CsrfRejected(Exception):
    """A state-changing form came without the session's CSRF token."""


@dataclass(frozen=True)
class Session:
    issued: int
    nonce: str


def admin_key(request: Request) -> str:
    key = request.app.state.bearpaw.settings.admin_key
    if not key:
        raise APIError(
            403, "The admin API is disabled: set BEARPAW_ADMIN_KEY.", code="admin_disabled"
        )
    return key


def _sign(key: str, text: str) -> str:
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()


def _signed_out(request: Request) -> set[str]:
    return request.app.state.bearpaw.extras.setdefault("console_signed_out", set())


def key_matches(request: Request, presented: str) -> bool:
    return hmac.compare_digest(presented.encode(), admin_key(request).encode())


def current(request: Request) -> Session | None:
    """The request's valid session, or None."""
    raw = request.cookies.get(COOKIE, "")
    parts = raw.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
        return None
    _, issued, nonce, sig = parts
    expected = _sign(admin_key(request), f"session:{issued}:{nonce}")
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return None
    if time.time() - int(issued) > MAX_AGE_S or nonce in _signed_out(request):
        return None
    return Session(int(issued), nonce)


def bearer_ok(request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and key_matches(request, token.strip())


def sign_in(request: Request, target: str) -> RedirectResponse:
    """A redirect to `target` that sets a fresh session cookie."""
    issued, nonce = int(time.time()), secrets.token_urlsafe(16)
    value = f"v1.{issued}.{nonce}.{_sign(admin_key(request), f'session:{issued}:{nonce}')}"
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(
        COOKIE,
        value,
        max_age=MAX_AGE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return resp


def sign_out(request: Request, target: str) -> RedirectResponse:
    session = current(request)
    if session is not None:
        _signed_out(request).add(session.nonce)
    resp = RedirectResponse(target, status_code=303)
    resp.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return resp


def csrf_token(request: Request, session: Session) -> str:
    return _sign(admin_key(request), f"csrf:{session.nonce}")


def require(request: Request) -> Session:
    """The session of a console page, or a redirect to the sign-in form."""
    session = current(request)
    if session is None:
        raise SignInRequired(
            request.url.path + (f"?{request.url.query}" if request.url.query else "")
        )
    return session


async def checked_form(request: Request) -> dict[str, str]:
    """The posted form of a state-changing request, after the session and
    CSRF checks (403 when either fails: a POST is never redirected to sign-in,
    so a forged one cannot be replayed after it)."""
    session = current(request)
    form = await request.form()
    token = str(form.get(CSRF_FIELD) or "")
    if session is None or not hmac.compare_digest(
        token.encode(), csrf_token(request, session).encode()
    ):
        raise CsrfRejected()
    return {k: str(v) for k, v in form.items() if isinstance(v, str)}

"""Who may talk to ``retrieve serve``: a pure ASGI middleware that refuses, before any handler runs, a request
whose ``Host`` is not this server's (DNS rebinding), one from another site or origin (CSRF, cross-site
reads and embeds), and one without this run's token; plus the response headers every page carries.

The threat model and the anchors (Jupyter Server's token and Host checks, OWASP's CSRF and DNS-rebinding
guidance) are in docs/security.md. Every refusal is 403 with one line of JSON, ``{"error": "…"}``.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from retrieval.errors import RetrieveError

from .server import is_loopback

TOKEN_ENV = "RETRIEVE_TOKEN"
TOKEN_CHARS = re.compile(r"[A-Za-z0-9_.~-]{16,256}")  # what survives a URL unescaped; 16+ characters
AUTH_HEADER = re.compile(r"(?:token|bearer)\s+(\S+)\s*", re.IGNORECASE)  # as Jupyter Server reads it

# Pages may use only what they ship: no outside (or inline) scripts, styles, fonts or images.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# The explanation report is one self-contained file with inline style and script: it runs sandboxed, in an
# opaque origin, so its script can neither call the API with the user's cookie nor read the server's pages.
REPORT_CSP = ("sandbox allow-scripts; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
              "script-src 'unsafe-inline'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
HOW_TO_GET_IN = "open the URL that retrieve serve printed (it ends in ?token=…), or send 'Authorization: token …'"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Guard:
    """What the middleware checks: ``token`` (None: no token, loopback only) and the host names accepted in
    ``Host`` besides IP addresses (a rebinding attack always arrives under a name, never under an address)."""

    token: str | None
    names: frozenset[str]

    @classmethod
    def for_address(cls, host: str, token: bool = True, allow_hosts: tuple[str, ...] = ()) -> Guard:
        """The guard for a server listening on ``host``: a fresh token (or ``$RETRIEVE_TOKEN``) unless
        ``token`` is False, which only a loopback address allows. Accepted names: ``localhost``, ``host``
        itself when it is a name, this machine's name when listening beyond loopback, and ``allow_hosts``."""
        fixed = os.environ.get(TOKEN_ENV)
        if not token:
            if not is_loopback(host):
                raise RetrieveError(f"--no-token is allowed only on a loopback address: {host} can be reached from "
                                    "other machines, so the server needs its token there")
            if fixed:
                raise RetrieveError(f"--no-token and {TOKEN_ENV} contradict each other: drop one")
            value = None
        elif fixed is not None:
            if not TOKEN_CHARS.fullmatch(fixed):
                raise RetrieveError(f"{TOKEN_ENV}: give 16 to 256 characters from A-Z a-z 0-9 _ . ~ - "
                                    f"(got {len(fixed)} characters)")
            value = fixed
        else:
            value = secrets.token_urlsafe(32)
        names = {"localhost", *(n.lower().rstrip(".") for n in allow_hosts if n)}
        if not _is_ip(host.strip("[]")):
            names.add(host.lower())
        if not is_loopback(host):
            names.add(socket.gethostname().lower())
        return cls(value, frozenset(names))

    def url(self, base: str) -> str:
        """``base`` (the server's root URL) with the token a browser opens it with."""
        return f"{base}?token={self.token}" if self.token else base


def _split_host(value: str) -> str:
    """The name or address in a ``Host`` header, without the port or an IPv6 address's brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class GuardMiddleware:
    """The checks, in order: Host, then where the request comes from (``Sec-Fetch-Site``, ``Origin``), then the
    token (a ``?token=`` on a GET sets the cookie and redirects to the URL without it)."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._where_from(scope, headers) or self._token(scope, headers)
        if isinstance(refusal, tuple):  # (status, headers): the token redirect
            return await _respond(send, refusal[0], b"", refusal[1])
        if refusal:
            body = json.dumps({"error": refusal}, ensure_ascii=False).encode()
            return await _respond(send, 403, body, [("content-type", "application/json"),
                                                    ("cache-control", "no-store")])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.lower().encode() not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)

    def _where_from(self, scope, headers: dict[str, str]) -> str | None:
        host = headers.get("host", "")
        name = _split_host(host)
        if not name:
            return "refused: the request has no Host header"
        if not _is_ip(name) and name not in self.guard.names:
            return (f"refused: Host {host!r} is not this server's address (a guard against DNS rebinding); open "
                    f"the URL that retrieve serve printed, or start it with --allow-host {name} if that name is yours")
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            navigation = (scope["method"] in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
                          and headers.get("sec-fetch-dest", "document") == "document")
            if not navigation:
                return f"refused: a request from another site (Sec-Fetch-Site: {site}); use this server's own pages"
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin.lower()).netloc != host.lower():
            return f"refused: a cross-origin request (Origin {origin[:100]}); use this server's own pages"
        return None

    def _token(self, scope, headers: dict[str, str]):
        token = self.guard.token
        if token is None:
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given and scope["method"] in ("GET", "HEAD"):
            if not _same(given[-1], token):
                return f"wrong token: {HOW_TO_GET_IN}"
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            # a path, never a scheme or a host: "//evil" or "/\evil" would send the browser elsewhere
            location = "/" + quote(scope["path"].lstrip("/\\"), safe="/:@!$&'()*+,;=-._~") + (f"?{rest}" if rest else "")
            cookie = f"{_cookie_name(scope)}={token}; Path=/; HttpOnly; SameSite=Strict"
            return 303, [("location", location), ("set-cookie", cookie), ("cache-control", "no-store")]
        m = AUTH_HEADER.fullmatch(headers.get("authorization", ""))
        if m:
            return None if _same(m.group(1), token) else f"wrong token: {HOW_TO_GET_IN}"
        jar = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no token
            jar = SimpleCookie()
        morsel = jar.get(_cookie_name(scope))
        if morsel is not None:
            return None if _same(morsel.value, token) else f"wrong token: {HOW_TO_GET_IN}"
        return f"no token: {HOW_TO_GET_IN}"


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())


def _cookie_name(scope) -> str:
    """One cookie per port: browsers share a host's cookies between its ports."""
    server = scope.get("server") or ("", 0)
    return f"retrieve_token_{server[1] or 0}"


async def _respond(send, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    h = [(k.encode(), v.encode()) for k, v in headers]
    h += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    h.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})

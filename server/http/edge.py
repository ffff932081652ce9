"""What a local server must refuse from browsers: other sites' requests and DNS rebinding.

A web page the user opens elsewhere can make the browser send requests to this server:

- a *cross-site* request: a form (or a fetch with a "simple" body) POSTing to, say,
  ``/admin/models/x/load``. Without API keys nothing else stops it. So state-changing
  requests (POST, PUT, PATCH, DELETE) are refused when their ``Origin`` is foreign (neither
  the server's own origin nor one of ``[server] cors_origins``) or when they carry a body
  type that is not JSON: a page can only send JSON to another origin after a CORS
  preflight, which fails unless ``cors_origins`` allows that origin.
- *DNS rebinding*: a page on a domain the attacker points at 127.0.0.1 is same-origin with
  this server as far as the browser knows, and can read every answer. Its requests carry
  the attacker's name in ``Host``. So when the server is bound to a loopback address, only
  loopback names (``localhost``, ``*.localhost``, ``127.x.x.x``, ``[::1]``) are answered,
  plus ``[server] allowed_hosts``; bound to another address, every name is answered
  unless ``allowed_hosts`` lists some.

Requests from programs (curl, SDKs) send no ``Origin`` and are not affected; neither is the
web page at /ui, which calls the API from the server's own origin.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from mlxserve.server.errors import error_response

FORBIDDEN = 403
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _normal_name(name: str) -> str:
    """A host name or IP address (IPv6 without brackets) compared as this module does."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    name = name[:-1] if name.endswith(".") else name
    ip = _ip(name)
    return str(ip) if ip is not None else name


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header value -> (name, port or None); None if it is malformed."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end], value[end + 1 :]
        if end < 0 or _ip(name) is None:
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    if not name:
        return None
    return _normal_name(name), int(rest[1:]) if rest else None


def is_loopback_name(name: str) -> bool:
    """Whether a (normalized) host name can only mean this machine."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    ip = _ip(name)
    if ip is None:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class HostPolicy:
    """Which ``Host`` names the server answers to (see the module's docstring)."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str]) -> None:
        patterns = [_normal_name(host) for host in allowed_hosts]
        self.allow_all = "*" in patterns or (
            not patterns and not is_loopback_name(_normal_name(bind_host))
        )
        self.names = {p for p in patterns if not p.startswith("*.")}
        self.suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))

    def describe(self) -> str:
        listed = sorted(self.names) + [f"*{suffix}" for suffix in self.suffixes]
        return ", ".join(["localhost", "127.0.0.1", "[::1]", *listed])

    def allows(self, host: str | None) -> bool:
        if self.allow_all or host is None:  # no Host at all: HTTP/1.0, never a browser
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name = parsed[0]
        return is_loopback_name(name) or name in self.names or name.endswith(self.suffixes)


class OriginPolicy:
    """Which ``Origin`` may send state-changing requests: the server's own, and
    ``[server] cors_origins``."""

    def __init__(self, cors_origins: Iterable[str]) -> None:
        origins = {origin.strip().rstrip("/").lower() for origin in cors_origins}
        self.allow_all = "*" in origins
        self.origins = origins

    def allows(self, origin: str, host: str | None) -> bool:
        origin = origin.strip()
        if self.allow_all or origin.rstrip("/").lower() in self.origins:
            return True
        return self.same_origin(origin, host)

    @staticmethod
    def same_origin(origin: str, host: str | None) -> bool:
        """Whether ``origin`` names the host and port the request was sent to (the scheme is
        not compared: behind a TLS proxy the server itself sees plain HTTP)."""
        try:
            parts = urlsplit(origin)
            origin_port = parts.port
        except ValueError:
            return False
        default = DEFAULT_PORTS.get(parts.scheme)
        target = split_host(host) if host is not None else None
        if default is None or not parts.hostname or target is None:
            return False  # e.g. "null" (a sandboxed frame, a file:// page)
        name, port = target
        return _normal_name(parts.hostname) == name and (origin_port or default) == (
            port or default
        )


class EdgeMiddleware:
    """Refuses (403, shaped for the API the path belongs to) requests with a ``Host`` the
    server does not answer to, and state-changing requests from foreign origins or with a
    body that is not JSON."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        bind_host: str,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        rejected: Callable[[int, str], None] | None = None,
    ) -> None:
        self.app = app
        self.hosts = HostPolicy(bind_host, allowed_hosts)
        self.origins = OriginPolicy(cors_origins)
        self.rejected = rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        code, message = refusal
        if self.rejected is not None:
            self.rejected(FORBIDDEN, code)
        response = error_response(FORBIDDEN, message, code=code, path=scope.get("path", ""))
        await response(scope, receive, send)

    def refusal(self, scope: Scope) -> tuple[str, str] | None:
        """``(code, message)`` when the request must be refused, else None."""
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        host = headers.get("host")
        if not self.hosts.allows(host):
            return "host_not_allowed", (
                f"this server does not answer to the host name {str(host)[:100]!r} (a web "
                "page reaching it under another name may be a DNS-rebinding attack): it "
                f"answers to {self.hosts.describe()} only; list the name in [server] "
                "allowed_hosts to allow it"
            )
        method = scope.get("method", "")
        if method not in STATE_CHANGING:
            return None
        origin = headers.get("origin")
        fetch_site = headers.get("sec-fetch-site", "").strip().lower()
        if origin is not None and not self.origins.allows(origin, host):
            return "cross_origin_request", (
                f"{method} from the web origin {origin.strip()!r} refused: only the server's "
                "own pages and the origins in [server] cors_origins may send requests that "
                "change state"
            )
        if origin is None and fetch_site in ("cross-site", "same-site"):
            return "cross_origin_request", (
                f"{method} from another site (Sec-Fetch-Site: {fetch_site}) refused: only the "
                "server's own pages and the origins in [server] cors_origins may send "
                "requests that change state"
            )
        content_type = headers.get("content-type", "").strip()
        if content_type and not is_json(content_type):
            return "unsupported_content_type", (
                f"{method} requests must send a JSON body (Content-Type: application/json) or "
                f"none, not {content_type[:100]!r}: form and text bodies are refused, since "
                "any web page can make a browser send them here"
            )
        return None

"""The HTTP side of tenants: the tenant and rate-limit leases of one request, kept in its ASGI
scope, released when its response is over (a stream: when it ends or its client goes away),
and OpenAI's `x-ratelimit-*` headers on the responses of a tenant with limits."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.rate_limits import Lease, RateLimiter
from server.tenants import Tenant

TENANT_KEY = "lln.tenant"
LEASES_KEY = "lln.leases"


def scope_tenant(scope: Scope) -> Tenant | None:
    """The tenant the request was authorized as (None before `_authorize`)."""
    return scope.get(TENANT_KEY)


def hold(scope: Scope, lease: Lease) -> None:
    """Keep `lease` until the response is over."""
    scope.setdefault(LEASES_KEY, []).append(lease)


class LeaseMiddleware:
    """Pure ASGI (no response buffering, streams pass through as they come). refuse(scope):
    an answer to send at once, before routing (a request refused by its key or a rate
    limit), or None."""

    def __init__(
        self, app: ASGIApp, limiter: RateLimiter,
        refuse: Callable[[Scope], Response | None] | None = None,
    ) -> None:  # fmt: skip
        self.app, self.limiter, self.refuse = app, limiter, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refuse(scope) if self.refuse is not None else None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        leases: list[Lease] = []
        scope[LEASES_KEY] = leases

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and leases:
                message = self._with_headers(message, leases[0].tenant)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            for lease in leases:
                self.limiter.release(lease)

    def _with_headers(self, message: Message, tenant: Tenant) -> Message:
        extra = self.limiter.headers(tenant)
        if not extra:
            return message
        headers = [h for h in message.get("headers", []) if not h[0].startswith(b"x-ratelimit")]
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        return {**message, "headers": headers}

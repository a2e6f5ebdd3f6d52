"""What the routes share: the `Service` behind the app, the API key check, and how a request notices that its
client went away."""

# no `from __future__ import annotations`: FastAPI reads the dependencies' annotations at run time
import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ia3.serve.errors import ApiError
from ia3.serve.service import Service, Watch

CLIENT_GONE = 499  # the status recorded for a request whose client disconnected (nginx's convention)

_bearer = HTTPBearer(auto_error=False)
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def get_service(request: Request) -> Service:
    """The `Service` the app was built around (`create_app` puts it in `app.state.service`)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_key(
    svc: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_key_header)],
) -> None:
    """401 unless the request carries the server's API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`);
    nothing to check when the server has no key."""
    key = svc.config.api_key
    if key is None:
        return
    given = api_key if api_key is not None else (credentials.credentials if credentials else None)
    # compare digests in constant time: neither the key's content nor its length leaks through timing
    digest = hashlib.sha256(key.encode()).digest()
    if given is None or not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), digest):
        raise ApiError(
            401,
            "unauthorized",
            "Missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def client_id(request: Request, svc: Service) -> str:
    """Who sent `request`, for fair admission: its peer address, and on a server with an API key also a digest of
    the key it gave (checked by then), so callers with different keys behind one proxy would take separate turns.
    Without a server key the key headers are ignored: a client cannot make itself many clients."""
    host = request.client.host if request.client is not None else "unknown"
    if svc.config.api_key is None:
        return host
    given = request.headers.get("x-api-key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if given is None and scheme.lower() == "bearer":
        given = token.strip()
    return hashlib.sha256((given or "").encode()).hexdigest()[:16] + "@" + host


def watch(request: Request) -> Watch:
    """The request's `Watch`: its client's id, and a wait that resolves when the client disconnects (the body has
    been read by then)."""

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                mark_client_gone(request)
                return

    return Watch(disconnected, client=client_id(request, get_service(request)))


def mark_client_gone(request: Request) -> None:
    """Record that the client went away (the metrics then count the request as 499, not as answered)."""
    request.scope.setdefault("state", {})["client_gone"] = True


def client_gone() -> Response:
    """What a request whose client went away gets (nobody reads it; the status keeps it out of the answered)."""
    return Response(status_code=CLIENT_GONE)

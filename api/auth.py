"""Who is calling: an API key's tenant, a read token's one stream, or anyone (auth off).

With ``BROKER_API_KEYS`` unset every request is allowed (the default, for a private network
or a gateway that authenticates). Set, every ``/v1/*`` request needs ``Authorization: Bearer
<key>``; a key sees only its tenant's streams, and another tenant's stream answers 404 as if
it did not exist, so ids cannot be probed. The state and events of one stream can also be
read with ``?token=<read token>`` (``broker.read_token_signing``), returned by the create.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from starlette.requests import Request

from api.access_log import note
from api.errors import ApiError, not_found
from broker import read_token_signing
from broker.settings import ApiSettings
from broker.state import GenerationState

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="streambroker"'}


@dataclass(frozen=True)
class Caller:
    #: The caller's tenant; None when auth is off (everything is visible).
    tenant: str | None
    #: Set when a read token authorised the request: the one stream it may read.
    stream_id: str | None = None

    def may_see(self, state: GenerationState) -> bool:
        if self.stream_id is not None:
            return state.id == self.stream_id
        return self.tenant is None or state.tenant == self.tenant

    def check(self, state: GenerationState) -> None:
        """404 for a stream this caller may not see: the same answer as a missing one."""
        if not self.may_see(state):
            raise not_found(state.id)


def _unauthorized(message: str, code: str = "unauthorized") -> ApiError:
    return ApiError(401, code, message, headers=_CHALLENGE)


def _tenant_of(settings: ApiSettings, key: str) -> str | None:
    """Constant-time: every configured key is compared, whichever matches."""
    found = None
    for known, tenant in settings.api_keys:
        if hmac.compare_digest(known.encode(), key.encode()):
            found = tenant
    return found


def authenticate(request: Request, settings: ApiSettings, *, token_ok: bool = False) -> Caller:
    """The caller of ``request``, or 401. ``token_ok``: a read token may stand in for a key
    (reading one stream's state and events)."""
    if not settings.api_keys:
        return Caller(tenant=None)
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthorized("use 'Authorization: Bearer <API key>'")
        tenant = _tenant_of(settings, key.strip())
        if tenant is None:
            raise _unauthorized("the API key is not known")
        note(request.scope, auth="key", tenant=tenant)
        return Caller(tenant=tenant)
    token = request.query_params.get("token")
    if token is not None and token_ok:
        try:
            stream_id = read_token_signing.verify(
                settings.read_token_secrets, token, now=time.time()
            )
        except read_token_signing.InvalidToken as exc:
            raise _unauthorized(str(exc), code="invalid_token") from None
        note(request.scope, auth="token")
        return Caller(tenant=None, stream_id=stream_id)
    if token is not None:
        raise _unauthorized("a read token only reads a stream's state and events")
    raise _unauthorized("this broker needs 'Authorization: Bearer <API key>'")


def read_token(settings: ApiSettings, stream_id: str) -> str | None:
    """A read token for a new stream, when auth is on."""
    if not settings.api_keys:
        return None
    return read_token_signing.issue(
        settings.read_token_secrets,
        stream_id,
        now=time.time(),
        ttl_seconds=settings.read_token_seconds,
    )

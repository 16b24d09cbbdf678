"""``/1.0/tokens``: as ``popek token create|list|revoke --format json``.

A token's secret is in the answer to its creation only; the store keeps its
hash, and every other answer shows the record without it.  A project admin
manages the tokens of its own project (a token of another project is not
found); the host admin every project's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views
from popek.core.auth import MAX_DAYS

router = APIRouter(prefix="/1.0/tokens", tags=["tokens"])

TokenId = Annotated[str, Path(min_length=1, max_length=64, description="the token's id")]


@router.get("")
def list_tokens(request: Request, project: Annotated[
        str | None, Query(max_length=63, description="only this project's tokens")] = None,
                ) -> list[dict[str, Any]]:
    """The tokens (of ``project``; a token's: its own project's), never their secrets."""
    who = identity(request)
    with session(who) as core:
        core.check("token.list", project)
        return views.token_summaries(core, project if who.host_admin else who.project)


@router.get("/{token_id}")
def get_token(request: Request, token_id: TokenId) -> dict[str, Any]:
    """One token's record (never its secret)."""
    from popek.core.auth import Tokens

    who = identity(request)
    with session(who) as core:
        core.check("token.show")
        return Tokens(core.store).get(token_id, None if who.host_admin else who.project).public()


class TokenBody(BaseModel):
    """``popek token create``'s options (``project``: the asker's own when not given)."""

    model_config = ConfigDict(extra="forbid")
    project: str | None = Field(default=None, min_length=1, max_length=63)
    role: Literal["admin", "operator", "viewer"]
    console: bool = False
    expires: float | None = Field(default=None, gt=0, le=MAX_DAYS,
                                  description="days until it expires (default: never)")
    name: str | None = Field(default=None, min_length=1, max_length=63)


@router.post("", status_code=201)
def create_token(request: Request, body: TokenBody) -> dict[str, Any]:
    """Create a token: its record and, this once, its ``secret``."""
    from popek.core.requests import TokenCreate

    with session(identity(request)) as core:
        token, secret = core.handle(TokenCreate(body.project or core.project, body.role,
                                                body.console, body.name, body.expires))
    return {**token.public(), "secret": secret}


@router.post("/{token_id}/revoke")
def revoke_token(request: Request, token_id: TokenId) -> dict[str, Any]:
    """Revoke a token at once (it stays listed, as revoked): its record."""
    from popek.core.requests import TokenRevoke

    with session(identity(request)) as core:
        return core.handle(TokenRevoke(token_id)).public()

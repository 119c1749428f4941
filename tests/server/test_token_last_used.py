"""An API token's ``last_used`` is written at most once a minute, so that checking a token
is no write transaction per API request (issue 13 §3: POST /api/deploy/* writes once)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from deploy_core.server.db import api_tokens, make_engine, upgrade
from deploy_core.server.tokens import LAST_USED_EVERY, TokenStore


@pytest.fixture
def tokens(db_url: str) -> Iterator[TokenStore]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield TokenStore(engine, admin_token="admin-secret")
    engine.dispose()


def last_used(tokens: TokenStore, name: str) -> float | None:
    with tokens.engine.connect() as conn:
        value = conn.execute(
            sa.select(api_tokens.c.last_used).where(api_tokens.c.name == name)
        ).scalar_one()
    return None if value is None else float(value)


def set_last_used(tokens: TokenStore, name: str, value: float) -> None:
    with tokens.engine.begin() as conn:
        conn.execute(api_tokens.update().where(api_tokens.c.name == name).values(last_used=value))


def test_last_used_is_written_once_a_minute_at_most(tokens: TokenStore) -> None:
    token = tokens.create_api_token("ci", "deploy")
    assert last_used(tokens, "ci") is None
    caller = tokens.verify(token)
    assert caller is not None and (caller.name, caller.scope) == ("ci", "deploy")
    first = last_used(tokens, "ci")
    assert first is not None
    set_last_used(tokens, "ci", first - 1)  # recent: the next checks write nothing
    for _ in range(3):
        assert tokens.verify(token) is not None
    assert last_used(tokens, "ci") == first - 1
    stale = first - LAST_USED_EVERY - 1
    set_last_used(tokens, "ci", stale)
    assert tokens.verify(token) is not None
    newer = last_used(tokens, "ci")
    assert newer is not None and newer > stale + LAST_USED_EVERY


def test_unknown_and_admin_tokens(tokens: TokenStore) -> None:
    assert tokens.verify("dct_nope") is None
    admin = tokens.verify("admin-secret")
    assert admin is not None and admin.scope == "admin"

"""The artifact store's routes: ``POST /api/artifacts``, ``GET /api/artifacts/{sha256}`` and
``GET /api/artifacts/{sha256}/content`` (the bytes, for peer replicas: admin scope)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from deploy_core.server.artifacts import (
    ArtifactRejected,
    ArtifactStore,
    ArtifactTooLarge,
    format_size,
)
from deploy_core.server.http.web import ApiError, services


def _sha_param(value: str, where: str) -> str:
    if not ArtifactStore.valid_sha256(value):
        raise ApiError(
            422, f"{where} must be a SHA-256: 64 lowercase hex digits, got {value!r:.80}"
        )
    return value


def _too_large(message: str) -> Response:
    # Closing the connection stops a client still sending the rest of the body; it then
    # reads this answer instead of pushing gigabytes that would be thrown away.
    return JSONResponse({"error": message}, status_code=413, headers={"Connection": "close"})


async def upload_artifact(request: Request) -> Response:
    """``POST /api/artifacts`` — the raw body is the package; ``201`` new, ``200`` already
    stored (``"existing": true``), ``413`` over the limit, ``422`` when the optional
    ``X-Content-SHA256`` header (or ``?sha256=``) does not match."""
    store: ArtifactStore = services(request).artifacts
    # Given but empty is a malformed hash, not an absent one.
    announced = request.headers.get("x-content-sha256")
    if announced is None:
        announced = request.query_params.get("sha256")
    expected = _sha_param(announced, "X-Content-SHA256") if announced is not None else None
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > store.max_bytes:
        return _too_large(
            f"artifact of {format_size(int(declared))} is over the server's limit of "
            f"{format_size(store.max_bytes)} ({store.max_bytes} bytes)"
        )
    try:
        info, new = await store.receive(request.stream(), expected_sha256=expected)
    except ArtifactTooLarge as exc:
        return _too_large(str(exc))
    except ArtifactRejected as exc:
        raise ApiError(exc.status, str(exc)) from None
    # Complete and in place: now the other replicas know it (they fetch it from here).
    await asyncio.to_thread(services(request).artifact_source.copies.record, info.sha256, info.size)
    return JSONResponse({**info.to_json(), "existing": not new}, status_code=201 if new else 200)


async def get_artifact(request: Request) -> Response:
    """``GET /api/artifacts/{sha256}`` — an artifact's size and upload time, or ``404``.

    Answers for the whole cluster: an artifact uploaded through any replica (complete) is
    found through every one."""
    sha256 = _sha_param(request.path_params["sha256"], "the artifact id")
    info = await services(request).artifact_source.info(sha256)
    if info is None:
        raise ApiError(
            404,
            f"no artifact {sha256}; upload it with POST /api/artifacts "
            "(deployctl artifact push FILE)",
        )
    return JSONResponse(info.to_json())


async def get_artifact_content(request: Request) -> Response:
    """``GET /api/artifacts/{sha256}/content`` — the bytes of an artifact in this replica's
    store (``application/octet-stream``), or ``404``.

    What a replica fetches a package from when an agent connected to it asks for one it lacks
    (it checks the SHA-256 itself). Needs ``admin``: a package may hold secrets. Only this
    replica's own copy is served: it never fetches from another for this request."""
    store: ArtifactStore = services(request).artifacts
    sha256 = _sha_param(request.path_params["sha256"], "the artifact id")
    path = await asyncio.to_thread(store.locate, sha256)
    if path is None:
        raise ApiError(404, f"no artifact {sha256} in this replica's store")
    return FileResponse(path, media_type="application/octet-stream")


def artifact_routes() -> list[BaseRoute]:
    """The artifact store's routes (under ``/api``)."""
    return [
        Route("/artifacts", upload_artifact, methods=["POST"]),
        Route("/artifacts/{sha256:str}", get_artifact, methods=["GET"]),
        Route("/artifacts/{sha256:str}/content", get_artifact_content, methods=["GET"]),
    ]

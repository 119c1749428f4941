"""schemathesis against the real API: every documented operation, valid and invalid input,
every check (server errors, status codes, content types, response schemas, negative data
rejected, positive data accepted, auth enforced, Allow on 405 …) — zero failures.

The server is real and in-process (HTTP API on a free port, SQLite in tmp); no agent is
connected, so deployments answer 404 (unknown client) or 409, which the document allows.
Streaming (``follow``) is pinned off so that no example waits for a stream to end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis import BaseSchema
from schemathesis.engine import Status, events
from security_harness import running_server

MAX_EXAMPLES = 30
# A fixed seed keeps CI repeatable; set DEPLOY_CENTER_FUZZ_SEED to explore other inputs.
SEED = int(os.environ.get("DEPLOY_CENTER_FUZZ_SEED", "20261127"))

CONFIG: dict[str, Any] = {
    "seed": SEED,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
    "checks": {"enabled": True},
    "request-timeout": 10,
    "cache": {"enabled": False},  # nothing written into the work tree
    # Never stream: a followed log ends only with its deployment.
    "parameters": {"query.follow": "0"},
    "operations": [
        {
            "include-path-regex": "^/api/deploy/[a-z_]+$",  # POST /api/deploy/<kind>
            "include-method": "POST",
            "checks": {
                # Plugins check some rules in validators that JSON Schema cannot say (an
                # image reference's grammar, distinct host ports, absolute paths …): a body
                # valid by the document may still be refused with 422 and the reason.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
                },
                "allow_header_conformance": {"enabled": False},
            },
        },
        {
            # /api/deploy/<kind> (POST) and /api/deploy/{deploy_id} (GET) are one URL
            # template to the router, so Allow names both methods on each, while the
            # document lists each under its own path.
            "include-path-regex": "^/api/deploy/\\{deploy_id\\}$",
            "include-method": "GET",
            "checks": {"allow_header_conformance": {"enabled": False}},
        },
        {
            # A cursor must be one this API made (a client id, encoded) and a label key may
            # not be given twice with different values: JSON Schema says neither, so a
            # request valid by the document may still be refused with 422 and the reason.
            "include-path-regex": "^/api/clients$",
            "include-method": "GET",
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
                }
            },
        },
        {
            # A webhook's URL must be https:// (or http:// to an allowed host) and its secret
            # printable, which the document states but JSON Schema does not check: 422.
            "include-path-regex": "^/api/webhooks$",
            "include-method": "POST",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "409", "422"]}},
        },
    ],
}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseSchema]:
    with running_server(tmp_path_factory.mktemp("schemathesis")) as (server, _loop):
        config = schemathesis.Config.from_dict(
            CONFIG | {"auth": {"openapi": {"bearer": {"bearer": server.state.admin_token}}}}
        )
        yield schemathesis.openapi.from_url(f"{server.api_url}/openapi.json", config=config)


def test_api_conforms_to_its_document(api_schema: BaseSchema) -> None:
    # The engine is what `schemathesis run` drives: every phase (examples, coverage, fuzzing,
    # stateful), every check.
    failures: list[str] = []
    tested: set[str] = set()
    for event in schemathesis.engine.from_schema(api_schema).execute():
        if isinstance(event, events.ScenarioFinished):
            if event.recorder.checks:
                tested.add(event.recorder.label)
            for checks in event.recorder.checks.values():
                for check in checks:
                    info = check.failure_info
                    if check.status is Status.FAILURE and info is not None:
                        failures.append(
                            f"{event.recorder.label} [{check.name}] {info.failure.title}: "
                            f"{info.failure.message}\n    {info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: error {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    assert not failures, f"seed {SEED}:\n" + "\n".join(sorted(set(failures)))
    operations = {
        f"{method.upper()} {path}"
        for path, item in api_schema.raw_schema["paths"].items()
        for method in item
    }
    assert tested >= operations - {"GET /static/{path}"}, operations - tested

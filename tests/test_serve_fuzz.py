"""Fuzz: schemathesis generates requests for every route of /openapi.json (valid and invalid, with and
without a key) against a real server on 127.0.0.1; none may answer 5xx. Bounded: a fixed example
count per route, no shrinking past it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.serve_harness import Running, serve, tiny_editor

EXAMPLES = 25  # per route and method


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serve(Path(tmp_path_factory.mktemp("fuzz")), tiny_editor, max_body_bytes=1024 * 1024) as running:
        yield running


@pytest.mark.slow  # schemathesis over every route: about a minute
def test_no_route_answers_5xx(fuzz_server: Running) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    tried: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        tried.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def no_5xx(case: schemathesis.Case) -> None:
            for key in ("admin", None):  # with an admin key (every route reachable), then without one
                headers = {"X-Key": fuzz_server.keys[key]} if key else {}
                response = case.call(headers=headers, timeout=30)
                assert response.status_code < 500, (
                    case.method,
                    case.path,
                    response.status_code,
                    response.text[:300],
                )
                if response.status_code >= 400 and case.path.startswith("/v1/images/"):
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}  # OpenAI's
                elif response.status_code >= 400:
                    assert "detail" in response.json()

        no_5xx()
    assert len(tried) >= 12, tried


def test_openapi_describes_every_route(fuzz_server: Running) -> None:
    import httpx

    spec = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/v1/flux-kontext-dev",
        "/v1/flux-kontext-pro",
        "/v1/get_result",
        "/v1/edit",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/samples/{token}.{ext}",
        "/v1/review",
        "/v1/images/edits",
    } <= paths
    status = spec["components"]["schemas"]["Status"]["enum"]
    assert status == ["Pending", "Ready", "Error", "Request Moderated", "Content Moderated", "Task not found"]
    assert "X-Key" in str(spec["components"]["securitySchemes"])
    # Descriptions say what the server does: references are served, and the default steps are the
    # loaded model's (the harness starts servers with --steps 1), guidance config's.
    request = spec["components"]["schemas"]["KontextRequest"]["properties"]
    assert "refused" not in request["input_image_2"]["description"]
    assert request["steps"]["description"].startswith("Default 1 ")
    from engine.config import DEFAULT_GUIDANCE

    assert request["guidance"]["description"] == f"Default {DEFAULT_GUIDANCE}."
    form = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"image", "image[]", "prompt", "n", "size", "response_format"} <= set(form["schema"]["properties"])

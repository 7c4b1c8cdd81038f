"""`kontext serve --ray` on a local Ray cluster (2 CPUs, no dashboard): two replicas of the tiny engine
behind the ingress, 8 concurrent BFL-shaped requests, every one answered Ready; the engine replicas
report healthy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serve_harness import SAMPLE_B64, free_port, poll

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a local Ray cluster: about a minute


def test_two_replicas_answer_eight_concurrent_requests(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from engine.config import LoadOptions
    from engine.serve.ray_app import RayOptions, build_app
    from engine.serve.settings import ServeSettings

    port = free_port()
    settings = ServeSettings(data=tmp_path / "data", port=port, keys_file=None, default_steps=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(settings, "tiny", LoadOptions(device="cpu"), RayOptions(replicas=2), None)
        serve.run(app, name="kontext")
        status = serve.status().applications["kontext"]
        assert status.deployments["kontext-engine"].status == "HEALTHY"
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/readyz").status_code == 200
            body = {"prompt": "add a hat", "input_image": SAMPLE_B64}
            with ThreadPoolExecutor(8) as pool:
                responses = list(
                    pool.map(lambda i: c.post("/v1/flux-kontext-dev", json={**body, "seed": i}), range(8))
                )
            assert [r.status_code for r in responses] == [200] * 8
            results = [poll(c, r.json()["id"], timeout=120) for r in responses]
            assert [r["status"] for r in results] == ["Ready"] * 8
            assert httpx.get(results[0]["result"]["sample"]).headers["content-type"] == "image/png"
        replicas = status.deployments["kontext-engine"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
    finally:
        serve.shutdown()
        ray.shutdown()

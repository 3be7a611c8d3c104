"""The REST API (sae_kit.server) through FastAPI's test client, on the tiny served folder of
tests/tiny_served.py: every endpoint, its answers checked against the library, and bad input."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from sae_kit.feature_store import FeatureStore
from sae_kit.models import load_model
from sae_kit.sae import load_sae
from sae_kit.server.app import Limits, create_app
from sae_kit.text_features import encode_text
from tiny_served import D_SAE, HOOK, build_served_root

TOKEN = "s3cret-token"
STEER = {"prompt": "Now is the winter of our discontent", "features": [{"sae": "saes.main", "index": 7, "strength": 60}],
         "max_new_tokens": 6, "temperature": 0.9, "seed": 11}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_served_root(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def client(root):
    return TestClient(create_app(root))


@pytest.fixture(scope="module")
def guarded(root):
    """A server with an API token and small limits."""
    return TestClient(create_app(root, api_token=TOKEN, limits=Limits(max_body_bytes=2048, max_prompt_tokens=8,
                                                                      max_text_tokens=8)))


def test_catalog_lists_models_hooks_and_saes(client):
    models = client.get("/api/models").json()
    assert [(m["id"], m["n_layers"], m["d_model"]) for m in models] == [("model", 2, 32)]
    assert models[0]["hooks"] == [HOOK] and sorted(models[0]["saes"]) == ["saes.fresh", "saes.main"]
    assert client.get("/api/hooks").json() == [{"model": "model", "hook": HOOK, "saes": ["saes.fresh", "saes.main"]}]
    saes = {s["id"]: s for s in client.get("/api/saes").json()}
    assert saes["saes.main"]["analysed"] and saes["saes.main"]["analysis"]["n_windows"] == 16
    assert saes["saes.main"]["d_sae"] == D_SAE and saes["saes.main"]["architecture"] == "topk"
    assert not saes["saes.fresh"]["analysed"] and "sae-kit analyze" in saes["saes.fresh"]["store_problem"]
    assert client.get("/api/saes/saes.main").json() == saes["saes.main"]
    assert client.get("/api/health").json() == {"status": "ok"}


def test_feature_page_sorts_filters_and_pages(client, root):
    store = FeatureStore(root / "saes" / "main" / "features.sqlite")
    page = client.get("/api/saes/saes.main/features", params={"sort": "max_act", "order": "desc", "limit": 7}).json()
    assert page["total"] == D_SAE and len(page["features"]) == 7
    expected = store.list_features(sort="max_act", descending=True, limit=7)[1]
    assert [f["index"] for f in page["features"]] == [f["index"] for f in expected]
    second = client.get("/api/saes/saes.main/features", params={"sort": "max_act", "order": "desc", "limit": 7,
                                                                "offset": 7}).json()
    assert not {f["index"] for f in second["features"]} & {f["index"] for f in page["features"]}
    dense = client.get("/api/saes/saes.main/features", params={"min_density": 0.05, "limit": 500}).json()
    assert dense["total"] == len(dense["features"]) and all(f["density"] >= 0.05 for f in dense["features"])
    word = next(f["top_tokens"][0] for f in store.list_features(limit=500)[1] if f["top_tokens"])
    found = client.get("/api/saes/saes.main/features", params={"q": word}).json()
    assert found["total"] >= 1


def test_feature_endpoint_returns_the_stored_feature(client, root):
    store = FeatureStore(root / "saes" / "main" / "features.sqlite")
    feature = client.get("/api/saes/saes.main/features/5").json()
    assert feature == {"sae": "saes.main", **store.feature(5)}
    assert {"histogram", "top_examples", "quantile_examples", "pos_logits", "neg_logits", "neighbours"} <= set(feature)


@pytest.mark.parametrize("url, status, words", [
    ("/api/saes/nope/features", 404, "GET /api/saes"),
    ("/api/saes/nope", 404, "no SAE"),
    ("/api/saes/saes.fresh/features", 404, "sae-kit analyze"),
    ("/api/saes/saes.fresh/features/0", 404, "sae-kit analyze"),
    (f"/api/saes/saes.main/features/{D_SAE}", 404, "out of range"),
    ("/api/saes/saes.main/features/-1", 404, "out of range"),
    ("/api/saes/saes.main/features/abc", 422, "index"),
    ("/api/saes/saes.main/features?sort=secret", 422, "sort"),
    ("/api/saes/saes.main/features?limit=100000", 422, "limit"),
    ("/api/saes/saes.main/features?min_density=2", 422, "min_density"),
    ("/api/saes/..%2F..%2Fetc/features", 404, ""),
    ("/api/saes/..%2Fsaes%2Fmain/features/0", 404, ""),
    ("/api/saes/.hidden/features", 422, "sae_id"),
])
def test_bad_catalog_requests_get_clear_4xx(client, url, status, words):
    response = client.get(url)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_search_and_encode_agree_with_the_library(client, root):
    text = "Friends, Romans, countrymen, lend me your ears"
    model, sae = load_model(str(root / "model")), load_sae(root / "saes" / "main")
    direct = encode_text(model, sae, HOOK, text)
    found = client.post("/api/search", json={"sae": "saes.main", "text": text, "top_k": 3}).json()
    assert found["tokens"] == direct.tokens and "".join(found["tokens"]) == text
    dense = direct.codes.to_dense()
    for position, entries in enumerate(found["token_features"]):
        assert [e["index"] for e in entries] == dense[position].topk(3).indices.tolist()
    assert found["top_features"][0]["max_value"] == pytest.approx(float(dense.max()), rel=1e-5)
    encoded = client.post("/api/encode", json={"sae": "saes.main", "text": text, "features": [5, 7]}).json()
    assert torch.allclose(torch.tensor(encoded["values"]), dense[:, [5, 7]], atol=1e-6)
    everything = client.post("/api/encode", json={"sae": "saes.main", "text": text}).json()
    assert [len(row) for row in everything["active"]] == direct.codes.l0().tolist()


@pytest.mark.parametrize("body, status, words", [
    ({"sae": "saes.main", "text": ""}, 422, "text"),
    ({"sae": "nope", "text": "hi"}, 404, "no SAE"),
    ({"sae": "../model", "text": "hi"}, 422, "sae"),
    ({"sae": "saes.main", "text": "hi", "top_k": 0}, 422, "top_k"),
    ({"sae": "saes.main", "text": "hi", "surprise": 1}, 422, "surprise"),
    ({"text": "hi"}, 422, "sae"),
])
def test_bad_search_requests(client, body, status, words):
    response = client.post("/api/search", json=body)
    assert response.status_code == status and words in response.json()["detail"]


def test_bad_encode_requests(client, guarded):
    response = client.post("/api/encode", json={"sae": "saes.main", "text": "hi", "features": [D_SAE]})
    assert response.status_code == 422 and "out of range" in response.json()["detail"]
    response = guarded.post("/api/encode", json={"sae": "saes.main", "text": "one two three four five six seven eight nine"})
    assert response.status_code == 422 and "at most 8" in response.json()["detail"]
    response = client.post("/api/encode", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_steer_returns_default_and_steered_text_reproducibly(client):
    first = client.post("/api/steer", json=STEER)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model"] == "model" and body["prompt"] == STEER["prompt"] and body["method"] == "additive"
    assert body["default"] != body["steered"]
    assert client.post("/api/steer", json=STEER).json() == body
    other = client.post("/api/steer", json={**STEER, "seed": 12}).json()
    assert other["default"] != body["default"]
    # Greedy, as the tiny random model's next-token distributions are nearly flat: samples drawn with
    # the same seed then mostly coincide.
    greedy = client.post("/api/steer", json={**STEER, "temperature": 0}).json()
    clamped = client.post("/api/steer", json={**STEER, "temperature": 0, "method": "clamp",
                                              "features": [{"sae": "saes.main", "index": 7, "strength": -60}]}).json()
    assert clamped["default"] == greedy["default"] and clamped["steered"] not in (greedy["steered"], greedy["default"])


@pytest.mark.parametrize("change, status, words", [
    ({"features": []}, 422, "features"),
    ({"features": [{"sae": "saes.main", "index": 7, "strength": 5000}]}, 422, "strength"),
    ({"features": [{"sae": "saes.main", "index": D_SAE, "strength": 1}]}, 422, "out of range"),
    ({"features": [{"sae": "missing", "index": 1, "strength": 1}]}, 404, "no SAE"),
    ({"max_new_tokens": 1000}, 422, "max_new_tokens"),
    ({"temperature": -1}, 422, "temperature"),
    ({"method": "orthogonal"}, 422, "method"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "x" * 2001}, 422, "prompt"),
])
def test_bad_steering_requests(client, change, status, words):
    response = client.post("/api/steer", json={**STEER, **change})
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_steering_token_body_size_and_prompt_length_limits(guarded):
    assert guarded.post("/api/steer", json=STEER).status_code == 401
    wrong = guarded.post("/api/steer", json=STEER, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API token" in wrong.json()["detail"]
    right = {"Authorization": f"Bearer {TOKEN}"}
    short = {**STEER, "prompt": "Now is the winter"}
    assert guarded.post("/api/steer", json=short, headers=right).status_code == 200
    too_long = guarded.post("/api/steer", json={**STEER, "prompt": STEER["prompt"] + " made glorious summer"},
                            headers=right)
    assert too_long.status_code == 422 and "at most 8" in too_long.json()["detail"]
    huge = guarded.post("/api/steer", json={**short, "prompt": "x" * 1900, "pad": "y" * 1000}, headers=right)
    assert huge.status_code == 413 and "2048 bytes" in huge.json()["detail"]
    # Search and the catalog stay open.
    assert guarded.post("/api/search", json={"sae": "saes.main", "text": "Now"}).status_code == 200


def test_concurrent_requests_share_the_model_safely(client):
    requests = [{**STEER, "seed": seed, "method": method} for seed in range(3) for method in ("additive", "clamp")]
    alone = [client.post("/api/steer", json=r).json() for r in requests]
    searches = [{"sae": "saes.main", "text": f"word number {i}"} for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: client.post("/api/steer", json=r).json(), requests))
        searched = list(pool.map(lambda r: client.post("/api/search", json=r).status_code, searches))
    assert together == alone and searched == [200] * 4
    # Concurrent requests were generated together, and still gave what each gives alone.
    (served,) = client.app.state.registry.models.values()
    assert max(served.batchers["steer"].batch_sizes) > 1


def test_concurrent_searches_are_encoded_together_as_each_alone(client):
    bodies = [{"sae": "saes.main", "text": text, "top_k": 2} for text in
              ("Now is the winter", "of our discontent", "made glorious summer by this sun of York", "Now")]
    alone = [client.post("/api/search", json=b).json() for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: client.post("/api/search", json=b).json(), bodies))
    assert [t["tokens"] for t in together] == [a["tokens"] for a in alone]
    for t, a in zip(together, alone):
        assert [[f["index"] for f in row] for row in t["token_features"]] == \
            [[f["index"] for f in row] for row in a["token_features"]]
        assert [f["max_value"] for f in t["top_features"]] == pytest.approx([f["max_value"] for f in a["top_features"]],
                                                                            abs=1e-5)
    (served,) = client.app.state.registry.models.values()
    assert max(served.batchers["encode"].batch_sizes) > 1


def test_openapi_docs_and_ui_are_served(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/models", "/api/hooks", "/api/saes", "/api/saes/{sae_id}/features",
            "/api/saes/{sae_id}/features/{index}", "/api/search", "/api/steer", "/api/encode"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/index.html"
    plotly = client.get("/vendor/plotly.min.js")
    assert plotly.status_code == 200 and len(plotly.content) > 1_000_000
    assert client.get("/ui/../pyproject.toml").status_code == 404


def test_serving_a_folder_without_saes_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        create_app(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        create_app(tmp_path / "missing")

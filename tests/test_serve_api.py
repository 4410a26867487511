"""``cnclip serve`` API through a real HTTP client against a real uvicorn server on 127.0.0.1 (a free port),
with the toy model, the toy detector and a toy index (cnclip_vision.serve.demo). The server requires an API
key and has small limits (1 MB uploads, 4 MP images, 64 labels) so that refusals are cheap to provoke."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import cnclip_vision
import cnclip_vision.errors
from cnclip_vision.serve import BackgroundServer, ServeConfig, Service, create_app
from cnclip_vision.serve.demo import build_demo
from cnclip_vision.serve.server import check_bind, is_loopback

KEY = "test-key-0123456789"
UPLOAD_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("serve-api"), per_class=1, scenes=6, seed=3)


@pytest.fixture(scope="module")
def service(world):
    config = ServeConfig(
        index=str(world.index),
        model="toy-tiny",
        detector="toy-detector",
        api_key=KEY,
        max_upload_bytes=UPLOAD_LIMIT,
        max_image_pixels=4_000_000,
        max_labels=64,
    )
    return Service.load(config)


@pytest.fixture(scope="module")
def server(service):
    with BackgroundServer(create_app(service)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield c


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def assert_json_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    for word in words:
        assert word in body["detail"], body["detail"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def scene_objects(world, image_index: int = 0):
    """The path of scene ``image_index`` and its (name, xyxy box) ground truth."""
    image = world.scenes["images"][image_index]
    names = {c["id"]: c["name"] for c in world.scenes["categories"]}
    objects = [
        (
            names[a["category_id"]],
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
        )
        for a in world.scenes["annotations"]
        if a["image_id"] == image["id"]
    ]
    return world.scene_path(image), objects


# ------------------------------------------------------------------------------------- auth, schema
def test_health_needs_no_key_and_everything_else_does(server, world):
    health = httpx.get(server.url + "/api/health", timeout=30)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["model"] == "toy-tiny" and body["detector"] == "toy-detector"
    assert body["index_size"] == len(world.labels) + len(world.scenes["images"])
    for method, path in [
        ("GET", "/api/info"),
        ("GET", "/openapi.json"),
        ("POST", "/api/search"),
        ("GET", "/api/thumbnail?id=test/000/000000.png"),
    ]:
        for headers in ({}, {"X-API-Key": "wrong-key-but-long"}):
            r = httpx.request(method, server.url + path, headers=headers, json={"text": "猫"}, timeout=30)
            assert_json_error(r, 401, "API key")
            assert r.headers["www-authenticate"] == "ApiKey"


def test_openapi_schema_lists_every_route(client):
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    assert set(schema["paths"]) == {
        "/api/health",
        "/api/info",
        "/api/search",
        "/api/search/image",
        "/api/classify",
        "/api/detect",
        "/api/thumbnail",
    }
    assert "X-API-Key" in json.dumps(schema["components"]["securitySchemes"])
    detect = schema["paths"]["/api/detect"]["post"]
    assert "multipart/form-data" in detect["requestBody"]["content"]
    assert {"200", "413", "415", "422"} <= set(detect["responses"])


def test_info(client, world):
    info = client.get("/api/info").json()
    assert info["index"] == {
        "size": len(world.labels) + len(world.scenes["images"]),
        "modality": "image",
        "thumbnails": True,
        "search": "exact",
    }
    assert info["detector"] == "toy-detector" and info["auth"] is True
    assert info["limits"]["max_upload_bytes"] == UPLOAD_LIMIT and info["limits"]["max_labels"] == 64
    assert len(info["example_labels"]) > 0


# ------------------------------------------------------------------------------------------ search
def test_text_search_finds_the_right_class_through_http(client, world):
    """Every one of the 64 class names as a query, 8 at a time: the single image of that class must come
    first for at least 90% of them (toy-tiny: 98% zero-shot top-1) -- ids, rows and scores survive HTTP."""

    def query(i_label):
        i, label = i_label
        r = client.post("/api/search", json={"text": label, "k": 5})
        assert r.status_code == 200, r.text
        return i, r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(query, enumerate(world.labels)))
    right = 0
    for i, body in answers:
        results = body["results"]
        assert body["query"] == world.labels[i] and body["k"] == 5 and len(results) == 5
        assert [h["rank"] for h in results] == [1, 2, 3, 4, 5]
        scores = [h["score"] for h in results]
        assert scores == sorted(scores, reverse=True)
        right += results[0]["id"].startswith(f"test/{i:03d}/")
    assert right >= 0.9 * len(world.labels), f"{right} of {len(world.labels)} right"


def test_search_goes_through_the_folders_faiss_index(world, tmp_path):
    """With a FAISS index beside the embeddings (`cnclip index build`), the server searches through it and
    finds what exact search finds (HNSW on 70 vectors, tuned to recall@5 = 1)."""
    import shutil

    from cnclip_vision.retrieval import build_ann_index

    index_dir = tmp_path / "index"
    shutil.copytree(world.index, index_dir)
    build_ann_index(index_dir, index_key="HNSW16", target_recall=1.0, k=5, num_queries=10, progress=False)
    config = ServeConfig(index=str(index_dir), model="toy-tiny", images=str(world.images))
    with BackgroundServer(create_app(Service.load(config))) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/api/info").json()["index"]["search"] == "faiss:HNSW16"
        for label in world.labels[:8]:
            body = c.post("/api/search", json={"text": label, "k": 5}).json()
            assert body["results"][0]["id"].startswith(f"test/{world.labels.index(label):03d}/"), body


def test_concurrent_queries_give_the_sequential_answers(client, world):
    labels = world.labels[:16]
    sequential = [client.post("/api/search", json={"text": t, "k": 3}).json()["results"] for t in labels]
    barrier = threading.Barrier(16)

    def one(text):
        barrier.wait(30)
        return client.post("/api/search", json={"text": text, "k": 3}).json()["results"]

    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(one, labels))
    for seq, con in zip(sequential, concurrent):
        assert [h["id"] for h in seq] == [h["id"] for h in con]
        np.testing.assert_allclose([h["score"] for h in seq], [h["score"] for h in con], atol=1e-5)
    stats = client.get("/api/health").json()["batching"]["search_text"]
    assert stats["requests"] >= 32 and stats["failures"] == 0


def test_image_search_finds_the_uploaded_image_first(client, world):
    path = world.images / "test" / "005" / "000000.png"
    r = client.post("/api/search/image", files={"image": ("q.png", path.read_bytes(), "image/png")}, data={"k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] is None and len(body["results"]) == 4
    assert body["results"][0]["id"] == "test/005/000000.png"
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_thumbnail_of_an_indexed_image(client, world):
    hit = client.post("/api/search", json={"text": world.labels[0], "k": 1}).json()["results"][0]
    r = client.get(hit["thumbnail"] + "&size=32")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) == 64  # sizes snap up to 64 / 128 / 256 / 512
    again = client.get(hit["thumbnail"] + "&size=32", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    original = Image.open(world.images / hit["id"]).convert("RGB")
    assert thumb.size == original.size  # 64 px images are never enlarged
    diff = np.abs(np.asarray(thumb, dtype=float) - np.asarray(original, dtype=float)).mean()
    assert diff < 12  # the same picture (JPEG loss only)


@pytest.mark.parametrize(
    "image_id",
    [
        "../scenes.json",
        "../index/manifest.json",
        "/etc/passwd",
        "test/000/../../../scenes.json",
        "test/000/nope.png",
        "label_cn.txt",
        "test",
        "%2e%2e/scenes.json",
    ],
)
def test_thumbnail_serves_index_entries_only(client, image_id):
    assert_json_error(client.get("/api/thumbnail", params={"id": image_id}), 404, "no such image")


# -------------------------------------------------------------------------------- classify, detect
def test_classify_returns_a_distribution_over_the_labels(client, world):
    path = world.images / "test" / "000" / "000000.png"  # class 0
    labels = world.labels[:5]
    r = client.post(
        "/api/classify",
        files={"image": ("a.png", path.read_bytes(), "image/png")},
        data={"labels": f"{labels[0]}，{labels[1]}, {labels[2]}、{labels[3]},{labels[4]},{labels[0]}"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == labels  # split on ，/,/、, stripped, duplicates dropped
    probs = [x["prob"] for x in body["results"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4) and probs == sorted(probs, reverse=True)
    assert sorted(x["label"] for x in body["results"]) == sorted(labels)
    assert body["results"][0]["label"] == labels[0]
    top = client.post(
        "/api/classify",
        files={"image": ("a.png", path.read_bytes(), "image/png")},
        data={"labels": ",".join(labels), "top_k": "2"},
    ).json()
    assert [x["label"] for x in top["results"]] == [x["label"] for x in body["results"][:2]]


def test_detect_finds_the_objects_of_a_scene(client, world):
    path, objects = scene_objects(world, 0)
    names = list(dict.fromkeys(name for name, _ in objects))
    r = client.post(
        "/api/detect",
        files={"image": ("scene.png", path.read_bytes(), "image/png")},
        data={"labels": "，".join(names), "threshold": "0.3", "draw": "true"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == Image.open(path).size
    assert body["labels"] == names and body["threshold"] == 0.3
    dets = body["detections"]
    assert all(d["score"] >= 0.3 and d["label"] in names for d in dets)
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    for d in dets:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= body["width"] and 0 <= y1 < y2 <= body["height"]
    found = [any(d["label"] == name and iou(d["box"], box) >= 0.5 for d in dets) for name, box in objects]
    assert sum(found) >= 0.5 * len(objects), (objects, dets)
    header, data = body["picture"].split(",", 1)
    assert header == "data:image/png;base64"
    drawn = Image.open(io.BytesIO(base64.b64decode(data)))
    assert drawn.format == "PNG" and drawn.width >= body["width"]


@pytest.mark.parametrize("sx, sy", [(1, 1), (2, 2), (3, 2)])
def test_detect_boxes_are_in_original_pixels(client, world, sx, sy):
    """The scene uploaded at other sizes: the boxes match the ground truth scaled the same way."""
    path, objects = scene_objects(world, 1)
    image = Image.open(path).convert("RGB")
    image = image.resize((image.width * sx, image.height * sy), Image.Resampling.NEAREST)
    names = list(dict.fromkeys(name for name, _ in objects))
    body = client.post(
        "/api/detect",
        files={"image": ("s.png", png_bytes(image), "image/png")},
        data={"labels": "，".join(names), "threshold": "0.3"},
    ).json()
    assert (body["width"], body["height"]) == image.size
    found = [
        any(
            d["label"] == name and iou(d["box"], [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]) >= 0.5
            for d in body["detections"]
        )
        for name, box in objects
    ]
    assert sum(found) >= 0.5 * len(objects), (objects, body["detections"])


def test_lower_threshold_returns_a_superset(client, world):
    path, objects = scene_objects(world, 2)
    names = "，".join(dict.fromkeys(name for name, _ in objects))
    low, high = (
        client.post(
            "/api/detect",
            files={"image": ("s.png", path.read_bytes(), "image/png")},
            data={"labels": names, "threshold": t},
        ).json()["detections"]
        for t in ("0.05", "0.6")
    )
    assert [d for d in low if d["score"] >= 0.6] == high
    assert len(low) >= len(high)


# ------------------------------------------------------------------------------------ bad requests
def _scene_upload(world):
    path, _ = scene_objects(world, 0)
    return {"image": ("scene.png", path.read_bytes(), "image/png")}


def test_uploads_that_are_not_images(client):
    for content in (b"hello, this is text", b"\x89PNG\r\n\x1a\n garbage", b"%PDF-1.4\n"):
        r = client.post("/api/search/image", files={"image": ("x.png", content, "image/png")})
        assert_json_error(r, 415, "not an image")
    assert_json_error(client.post("/api/search/image", files={"image": ("x.png", b"", "image/png")}), 422, "empty")


def test_truncated_image(client, world):
    data = (world.images / "test" / "000" / "000000.png").read_bytes()
    r = client.post(
        "/api/classify", files={"image": ("t.png", data[: len(data) // 2], "image/png")}, data={"labels": "猫,狗"}
    )
    assert_json_error(r, 422, "truncated")


def test_upload_over_the_size_limit(client, server):
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    assert len(data) > UPLOAD_LIMIT + 64 * 1024
    r = client.post("/api/search/image", files={"image": ("big.png", data, "image/png")})
    assert_json_error(r, 413, "over the limit")

    body = (
        b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--x--\r\n"
    )

    def chunks():  # no Content-Length: the limit is counted while reading
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = client.post("/api/search/image", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert_json_error(r, 413, "over the limit")
    assert httpx.get(server.url + "/api/health", timeout=30).status_code == 200


def test_decompression_bomb(client):
    bomb = png_bytes(Image.new("1", (20_000, 20_000)))  # 400 M pixels in a few kB
    assert len(bomb) < 200_000
    r = client.post("/api/detect", files={"image": ("bomb.png", bomb, "image/png")}, data={"labels": "猫"})
    assert_json_error(r, 413, "pixels")


@pytest.mark.parametrize(
    "body, words",
    [
        ({"text": ""}, ["empty"]),
        ({"text": "   "}, ["empty"]),
        ({"text": "猫" * 300}, ["300 characters"]),
        ({}, ["text", "required"]),
        ({"txt": "猫"}, ["txt"]),
        ({"text": "猫", "k": "many"}, ["k"]),
        ({"text": "猫", "k": 0}, ["k"]),
        ({"text": "猫", "k": 100_000}, ["k must be"]),
        ({"text": ["猫"]}, ["text"]),
    ],
)
def test_bad_search_requests(client, body, words):
    assert_json_error(client.post("/api/search", json=body), 422, *words)


def test_search_body_that_is_not_json(client):
    r = client.post("/api/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_json_error(r, 422, "invalid request")


def test_bad_label_lists(client, world):
    upload = _scene_upload(world)
    assert_json_error(client.post("/api/detect", files=upload, data={"labels": " ，, "}), 422, "labels is empty")
    thousands = ",".join(f"类别{i}" for i in range(3000))
    for route in ("/api/detect", "/api/classify"):
        assert_json_error(client.post(route, files=upload, data={"labels": thousands}), 422, "too many labels: 3000")
    assert_json_error(client.post("/api/classify", files=upload, data={"labels": "猫" * 200}), 422, "longer than")


def test_missing_and_mistyped_form_fields(client, world):
    upload = _scene_upload(world)
    assert_json_error(client.post("/api/detect", data={"labels": "猫"}), 422, "image")
    assert_json_error(client.post("/api/detect", files=upload), 422, "labels")
    assert_json_error(client.post("/api/detect", files={"file": upload["image"]}, data={"labels": "猫"}), 422, "image")
    assert_json_error(
        client.post("/api/detect", files=upload, data={"labels": "猫", "threshold": "high"}), 422, "threshold"
    )
    assert_json_error(
        client.post("/api/detect", files=upload, data={"labels": "猫", "threshold": "1.5"}), 422, "threshold"
    )
    assert_json_error(client.post("/api/search/image", files=upload, data={"k": "-1"}), 422, "k")
    assert_json_error(client.post("/api/detect", json={"labels": "猫"}), 422, "image")
    assert_json_error(client.get("/api/thumbnail"), 422, "id")
    assert_json_error(client.get("/api/thumbnail", params={"id": "x", "size": "huge"}), 422, "size")


def test_unknown_routes_and_methods(client):
    assert_json_error(client.get("/api/nothing"), 404, "no such route")
    assert_json_error(client.get("/static/../../etc/passwd"), 404)
    assert_json_error(client.get("/api/search"), 405)


def test_an_internal_error_reaches_the_client_without_its_trace(client, service, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals at /srv/model.py line 42")

    monkeypatch.setattr(service.index, "search_text", broken)
    r = client.post("/api/search", json={"text": "猫"})
    body = assert_json_error(r, 500, "internal server error")
    assert "secret" not in r.text and "model.py" not in r.text and body == {"detail": "internal server error"}
    monkeypatch.undo()
    assert client.post("/api/search", json={"text": "猫"}).status_code == 200


def test_server_keeps_serving_after_bad_requests(client, server):
    for _ in range(3):
        client.post("/api/search/image", files={"image": ("x.png", b"junk", "image/png")})
        client.post("/api/search", json={"text": ""})
    assert httpx.get(server.url + "/api/health", timeout=30).json()["status"] == "ok"
    assert client.post("/api/search", json={"text": "红色圆形", "k": 1}).status_code == 200


# ------------------------------------------------------------------------------------- the page
def test_page_and_static_files_come_from_the_package(server):
    page = httpx.get(server.url + "/", timeout=30)  # the page shell is public; it asks for the key itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<html lang="zh-CN">' in page.text and "以文搜图" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):
        r = httpx.get(server.url + asset, timeout=30)
        assert r.status_code == 200, asset
        for text in (page.text, r.text):
            assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
            assert not re.search(r"""(src|href)=["']//|url\(["']?//|import\s""", text)  # no scheme-relative URLs


# ----------------------------------------------------------------------------------- binding
def test_binding_beyond_loopback_needs_an_explicit_option(service):
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert is_loopback(host)
        check_bind(host, allow_remote=False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(cnclip_vision.errors.CNClipError, match="--allow-remote"):
            check_bind(host, allow_remote=False)
        check_bind(host, allow_remote=True)
    with pytest.raises(cnclip_vision.errors.CNClipError, match="--allow-remote"):
        BackgroundServer(create_app(service), host="0.0.0.0")  # refused before any socket is opened


def test_an_index_of_another_dimension_is_refused(service):
    other = cnclip_vision.EmbeddingIndex(torch.randn(3, 7), ["a.png", "b.png", "c.png"])
    with pytest.raises(cnclip_vision.errors.CNClipError, match="7-d embeddings but the model toy-tiny makes 128-d"):
        Service(ServeConfig(index="other", model="toy-tiny"), service.model, other)


def test_config_validation():
    with pytest.raises(ValueError, match="max_upload_bytes"):
        ServeConfig(index="x", max_upload_bytes=0)
    with pytest.raises(ValueError, match="at least 8"):
        ServeConfig(index="x", api_key="short")

"""`dapseg serve` without Label Studio: the labeling config, the class prompts, where images may be read
from, the HTTP routes, limits and per-task errors (tests/test_labelstudio.py runs it against a real
Label Studio)."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from dapseg.api import Segmenter
from dapseg.labeling.labelstudio import mask_to_rle
from dapseg.postprocess import UNLABELED, class_probs
from dapseg.serve.app import create_app
from dapseg.serve.label_config import BrushTarget, LabelConfigError, Prompts, brush_targets
from dapseg.serve.media import MediaError, MediaLimits, MediaReader, is_jwt
from dapseg.serve.prediction import BrushPredictor, model_version
from dapseg.serve.service import BackendService, ServiceLimits
from dapseg.text import ClassSet

LIMITS = MediaLimits(max_pixels=1_000_000, max_bytes=1 << 20, timeout_s=10)
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<BrushLabels name="tag" toName="image"><Label value="person"/><Label value="sky"/>'
          '<Label value="rocket"/></BrushLabels></View>')


# ---------------------------------------------------------------- the labeling config

def test_brush_targets_read_each_control_its_image_field_and_labels():
    xml = ('<View><Header value="Paint"/><Image name="left" value="$photo"/><Image name="right" value="$other"/>'
           '<BrushLabels name="b1" toName="left"><Label value="Sky" background="#00f"/><Label value="Tree"/>'
           '</BrushLabels><Choices name="c" toName="left"><Choice value="ok"/></Choices>'
           '<brushlabels name="b2" toName="right"><Label value="road"/></brushlabels></View>')
    assert brush_targets(xml, max_classes=10) == [
        BrushTarget("b1", "left", "photo", ("Sky", "Tree")),
        BrushTarget("b2", "right", "other", ("road",)),
    ]


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
                  '<View><Image name="image" value="$image"/><BrushLabels name="t" toName="image">'
                  '<Label value="&b;"/></BrushLabels></View>')


@pytest.mark.parametrize(("xml", "message"), [
    ("<View><Image name='image' value='$image'/></View>", "has no <BrushLabels>"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='t' toName='img'><Label value='a'/>"
     "</BrushLabels></View>", "toName='img' is not an <Image>"),
    ("<View><Image name='image' value='image.png'/><BrushLabels name='t' toName='image'><Label value='a'/>"
     "</BrushLabels></View>", "expected a task field"),
    ("<View><Image name='image' valueList='$images'/><BrushLabels name='t' toName='image'><Label value='a'/>"
     "</BrushLabels></View>", "valueList"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='t' toName='image'><Label value='a'/>"
     "<Label value='a'/></BrushLabels></View>", "'a' twice"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='t' toName='image'><Label/>"
     "</BrushLabels></View>", "without a value"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='t' toName='image' value='$labels'/></View>",
     "no <Label> children"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='t' toName='image'>"
     + "".join(f"<Label value='c{i}'/>" for i in range(4)) + "</BrushLabels></View>",
     "more than the server's limit of 3"),
    ("<View><Image", "not valid XML"),
    (BILLION_LAUGHS, "not valid XML"),  # defusedxml refuses entity declarations
])
def test_brush_targets_refuse_configs_with_the_reason(xml, message):
    with pytest.raises(LabelConfigError) as e:
        brush_targets(xml, max_classes=3)
    assert message in str(e.value)


def test_prompts_come_from_the_classes_file_line_whose_first_name_is_the_label(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("Sky; clouds\nperson\nrocket, missile\n")
    prompts = Prompts.from_args(path, "background; wall, floor")
    classes = prompts.class_set(["sky", "Tree", "Person", "Rocket"])
    assert classes.synonyms == (("Sky", "clouds"), ("Tree",), ("person",), ("rocket", "missile"),
                                ("background", "wall"), ("floor",))
    assert classes.unlabeled_classes == (4, 5)
    with pytest.raises(LabelConfigError, match="duplicate class name 'floor'"):
        prompts.class_set(["sky", "Floor"])  # a label may not also be an unlabeled class


# ---------------------------------------------------------------- where images come from

def _png(path, size=(40, 30), seed=0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_local_files_are_read_inside_the_root_only(tmp_path):
    root = tmp_path / "root"
    pixels = _png(root / "photos" / "a.png")
    _png(tmp_path / "secret.png", seed=1)
    (root / "photos" / "link.png").symlink_to(tmp_path / "secret.png")
    reader = MediaReader(LIMITS, local_files_root=root)
    read = lambda url: asyncio.run(reader.read(url, "task 7"))
    np.testing.assert_array_equal(read("/data/local-files/?d=photos/a.png"), pixels)
    np.testing.assert_array_equal(read("/data/local-files/?d=/photos/a.png"), pixels)  # as Label Studio reads ?d=
    for url, message in [
        ("/data/local-files/?d=../secret.png", "leads outside"),
        ("/data/local-files/?d=photos/link.png", "leads outside"),
        ("/data/local-files/?d=photos/missing.png", "image not found under --local-files-root"),
        ("/data/local-files/?d=photos", "is not a file"),
        ("http://elsewhere.example/a.png", "not on Label Studio's host"),
        ("s3://bucket/a.png", "neither a Label Studio URL nor a local-files URL"),
        ("data:image/png;base64,AAAA", "neither a Label Studio URL nor a local-files URL"),
        (str(root / "photos" / "a.png"), "set LABEL_STUDIO_URL"),  # a path is never read from this disk
        (None, "not a URL"),
    ]:
        with pytest.raises(MediaError, match=r"^task 7") as e:
            read(url)
        assert message in str(e.value), (url, str(e.value))


def test_images_over_the_pixel_or_byte_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("1", (2000, 1000)).save(root / "wide.png")  # 2 MP in a few hundred bytes
    _png(root / "big.png", size=(600, 600))  # 1 MB of noise, compressed a little
    decoded = []
    monkeypatch.setattr("dapseg.serve.media.load_image", lambda img: decoded.append(img) or np.zeros((1, 1, 3)))
    reader = MediaReader(LIMITS, local_files_root=root)
    with pytest.raises(MediaError, match=r"2000x1000 = 2,000,000 pixels, more than the server's limit of 1,000,000"):
        asyncio.run(reader.read("/data/local-files/?d=wide.png", "task 1"))
    with pytest.raises(MediaError, match="more than 1,048,576 bytes"):
        asyncio.run(reader.read("/data/local-files/?d=big.png", "task 2"))
    assert decoded == []


def _jwt(payload: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(payload)}.c2lnbmF0dXJl"


def test_is_jwt_tells_personal_access_tokens_from_legacy_tokens():
    assert is_jwt(_jwt({"token_type": "refresh"}))
    assert not is_jwt("0123456789abcdef0123456789abcdef01234567")
    assert not is_jwt("a.b.c")


class FakeLabelStudio:
    """Label Studio's routes as the reader uses them: token refresh and media, over httpx's mock transport."""

    def __init__(self, png: bytes, pat: str) -> None:
        self.png, self.pat, self.requests, self.issued = png, pat, [], 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path, request.headers.get("authorization")))
        if request.url.path == "/api/token/refresh/":
            if json.loads(request.content) != {"refresh": self.pat}:
                return httpx.Response(401)
            self.issued += 1
            return httpx.Response(200, json={"access": f"access{self.issued}"})
        auth = request.headers.get("authorization")
        if request.url.path == "/data/redirect.png":
            return httpx.Response(302, headers={"location": "http://elsewhere.example/x.png"})
        if auth != f"Bearer access{self.issued}" or self.issued < 2:  # the first access token "expires"
            return httpx.Response(401)
        if request.url.path == "/data/upload/1/big.png":
            return httpx.Response(200, content=b"x" * (2 << 20))
        return httpx.Response(200, content=self.png)


def test_downloads_from_label_studio_with_a_personal_access_token(tmp_path):
    pixels = _png(tmp_path / "a.png")
    pat = _jwt({"token_type": "refresh"})
    fake = FakeLabelStudio((tmp_path / "a.png").read_bytes(), pat)

    async def run():
        client = httpx.AsyncClient(transport=httpx.MockTransport(fake), follow_redirects=False)
        reader = MediaReader(LIMITS, label_studio_url="http://ls.example:8080/", api_key=pat, client=client)
        image = await reader.read("/data/upload/1/a.png", "task 1")
        same = await reader.read("http://ls.example:8080/data/upload/1/a.png", "task 2")
        errors = []
        for url in ("/data/redirect.png", "/data/upload/1/big.png"):
            with pytest.raises(MediaError) as e:
                await reader.read(url, "task 3")
            errors.append(str(e.value))
        await reader.close()
        return image, same, errors

    image, same, errors = asyncio.run(run())
    np.testing.assert_array_equal(image, pixels)
    np.testing.assert_array_equal(same, pixels)
    assert "answered HTTP 302" in errors[0]  # a redirect is not followed off Label Studio
    assert "more than 1,048,576 bytes" in errors[1]
    # refresh, 401 with the first access token, refresh again, then the image with the second
    assert fake.requests[:4] == [("POST", "/api/token/refresh/", None),
                                 ("GET", "/data/upload/1/a.png", "Bearer access1"),
                                 ("POST", "/api/token/refresh/", None),
                                 ("GET", "/data/upload/1/a.png", "Bearer access2")]


def test_a_legacy_token_is_sent_as_token(tmp_path):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(403)

    async def run():
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        reader = MediaReader(LIMITS, label_studio_url="http://ls.example", api_key="abc123", client=client)
        with pytest.raises(MediaError, match=r"answered HTTP 403.*check LABEL_STUDIO_API_KEY"):
            await reader.read("/data/upload/1/a.png", "task 1")

    asyncio.run(run())
    assert seen == ["Token abc123"]


# ---------------------------------------------------------------- the backend

@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu")


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "root"
    return root, {name: _png(root / name, size=(48, 40), seed=i) for i, name in enumerate(["a.png", "b.png"])}


def _client(segmenter, root, basic_auth=None, **limits) -> TestClient:
    service = BackendService(BrushPredictor(segmenter, Prompts()), MediaReader(LIMITS, local_files_root=root),
                             ServiceLimits(**limits))
    return TestClient(create_app(service, {"preset": "naclip"}, basic_auth=basic_auth))


def test_predict_gives_one_brush_result_per_class_present_and_errors_per_task(segmenter, photos):
    root, pixels = photos
    tasks = [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"}},
             {"id": 2, "data": {"image": "/data/local-files/?d=../x.png"}},
             {"id": 3, "data": {}},
             {"id": 4, "data": {"image": "/data/local-files/?d=b.png"}}]
    with _client(segmenter, root, max_tasks=3) as client:
        health = client.get("/health").json()
        r = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 4  # one entry per task, in task order
    assert "leads outside" in results[1]["error"] and results[1]["error"].startswith("task 2: ")
    assert results[2]["error"] == "task 3: no field 'image' in its data (the Image 'image' reads $image)"
    assert results[3]["error"].startswith("task 4: not predicted: the request has 4 tasks, more than the server's 3")
    assert all("result" not in e for e in results[1:])  # Label Studio stores nothing for them
    first = results[0]
    assert first["model_version"] == health["model_version"] == model_version(segmenter, Prompts())
    expected = segmenter.predict(pixels["a.png"], ["person", "sky", "rocket"])
    labels = expected.labels.numpy()
    present = [c for c in range(3) if (labels == c).any()]
    assert [reg["value"]["brushlabels"] for reg in first["result"]] == [[["person", "sky", "rocket"][c]]
                                                                       for c in present]
    for reg, c in zip(first["result"], present, strict=True):
        assert (reg["from_name"], reg["to_name"], reg["type"]) == ("tag", "image", "brushlabels")
        assert (reg["original_width"], reg["original_height"]) == (48, 40)
        assert reg["value"]["rle"] == mask_to_rle(labels == c)
    assert first["score"] == pytest.approx(float(expected.probs.max(dim=0).values.mean()), abs=1e-6)


def test_two_brush_controls_on_one_image_give_regions_with_distinct_ids(segmenter, photos):
    root, _ = photos
    config = ('<View><Image name="image" value="$image"/>'
              '<BrushLabels name="stuff" toName="image"><Label value="sky"/><Label value="grass"/></BrushLabels>'
              '<BrushLabels name="things" toName="image"><Label value="person"/><Label value="car"/></BrushLabels>'
              '</View>')
    with _client(segmenter, root) as client:
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}],
                                          "label_config": config})
    (entry,) = r.json()["results"]
    regions = entry["result"]
    assert {reg["from_name"] for reg in regions} == {"stuff", "things"}
    labels = {"stuff": ["sky", "grass"], "things": ["person", "car"]}
    for reg in regions:
        assert reg["value"]["brushlabels"][0] in labels[reg["from_name"]]
    assert len({reg["id"] for reg in regions}) == len(regions)


def test_unlabeled_classes_leave_their_pixels_out_of_every_result(segmenter, photos):
    _, pixels = photos
    prompts = Prompts(unlabeled=ClassSet.parse("background"))
    predictor = BrushPredictor(segmenter, prompts)
    target = brush_targets(CONFIG, 10)[0]
    segmented = predictor.segment(pixels["a.png"], target)
    full = segmenter.predict(pixels["a.png"], ["person", "sky", "rocket", "background"])
    argmax = full.labels.numpy()
    assert (argmax == 3).any(), "the background class won no pixel: nothing to check"
    np.testing.assert_array_equal(segmented.labels, np.where(argmax == 3, UNLABELED, argmax))
    assert predictor.model_version != model_version(segmenter, Prompts())


def test_mean_top_probability_in_bands_is_the_naive_mean(segmenter, astronaut):
    result = segmenter.predict(astronaut[::4, ::4], ["person", "sky; clouds", "rocket"])
    full = class_probs(result.logits, result.logit_scale, result.class_set.query_to_class)  # (C, H, W)
    naive = float(full.max(dim=0).values.double().mean())
    assert result.mean_top_probability(max_elements=3 * 4 * 128) == pytest.approx(naive, abs=1e-6)  # 32 bands
    assert result.mean_top_probability() == pytest.approx(naive, abs=1e-6)


def test_model_version_follows_the_settings(segmenter):
    assert model_version(segmenter, Prompts()) == model_version(segmenter, Prompts())
    other = segmenter.derive({"postprocess.prob_thd": 0.3})
    assert model_version(other, Prompts()) != model_version(segmenter, Prompts())
    assert model_version(segmenter, Prompts(ClassSet.parse("sky; clouds"))) != model_version(segmenter, Prompts())
    assert model_version(segmenter, Prompts()).startswith("dapseg-naclip-")


def test_setup_health_and_request_limits(segmenter, photos):
    root, _ = photos
    with _client(segmenter, root, max_body_bytes=4096) as client:
        assert client.get("/health").json()["status"] == "UP"
        assert client.get("/versions").json()["versions"] == [client.get("/").json()["model_version"]]
        setup = client.post("/setup", json={"project": "1.1", "schema": CONFIG})
        assert setup.status_code == 200 and setup.json()["model_version"].startswith("dapseg-naclip-")
        bad = client.post("/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$i'/></View>"})
        assert bad.status_code == 422 and "has no <BrushLabels>" in bad.json()["error"]
        big = client.post("/predict", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
        assert big.status_code == 413 and "more than the server's limit of 4,096" in big.json()["error"]
        assert client.post("/predict", content=b"not json").status_code == 400
        assert client.post("/predict", json={"tasks": {}, "label_config": CONFIG}).status_code == 400
        assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 200


def test_busy_and_basic_auth(segmenter, photos):
    root, _ = photos
    tasks = [{"id": i, "data": {"image": "/data/local-files/?d=a.png"}} for i in range(3)]
    with _client(segmenter, root, max_pending=2) as client:
        r = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
        assert r.status_code == 503 and "limit of 2 (--max-pending)" in r.json()["error"]
    with _client(segmenter, root, basic_auth=("ls", "secret")) as client:
        assert client.get("/health").status_code == 401
        assert client.get("/health", auth=("ls", "wrong")).status_code == 401
        assert client.get("/health", auth=("ls", "secret")).status_code == 200


def test_serve_refuses_bad_settings_before_loading_models(run_cli, tmp_path):
    r = run_cli("serve", "--random-weights", "--tiny", "--device", "cpu", "--local-files-root", str(tmp_path / "no"))
    assert r.returncode == 2 and "--local-files-root" in r.stderr and "is not a folder" in r.stderr
    with pytest.raises(ValueError, match="max-tasks must be >= 1, got 0"):
        ServiceLimits(max_tasks=0)
    with pytest.raises(ValueError, match="empty name"):
        Prompts.from_args(None, "a;")

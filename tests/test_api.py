"""POST /dreamartist/v1/train and GET /dreamartist/v1/pairs on the stand-in webui: status codes and results."""
from __future__ import annotations

import base64
import re

import pytest
import torch
from fakehost.checks import listing
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tabhelpers import load_extension, png_bytes, reference_image

B64_PNG = base64.b64encode(png_bytes(reference_image())).decode()
TINY = {"steps": 2, "width": 64, "height": 64, "reconstruction": False}


def api_client(host, api=True, **cmd_opts) -> TestClient:
    """The extension loaded, then as webui.py does: with --api the webui's own Api on the app (its error
    handlers answer for our routes too), then on_app_started."""
    load_extension(host)
    host.shared.cmd_opts.api = api
    for key, value in cmd_opts.items():
        setattr(host.shared.cmd_opts, key, value)
    app = FastAPI()
    if api:
        host.module("modules.api.api").Api(app, host.module("modules.call_queue").queue_lock)
    host.module("modules.script_callbacks").app_started_callback(None, app)
    assert host.module("modules.errors").reported == []
    return TestClient(app)


@pytest.fixture
def client(host_v1101):
    return api_client(host_v1101)


def test_trains_a_pair_and_returns_its_files(client, host_v1101):
    response = client.post("/dreamartist/v1/train", json={"image": "data:image/png;base64," + B64_PNG,
                                                           "name": "walle", **TINY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["negative_name"], body["steps"], body["stopped"]) == ("walle", "walle-neg", 2, "")
    assert isinstance(body["final_loss"], float)
    assert body["files"] == ["walle.pt", "walle-neg.pt"]  # names, never server paths
    assert all((host_v1101.embeddings_dir / f).is_file() for f in body["files"])
    assert client.get("/dreamartist/v1/pairs").json() == {"pairs": ["walle"]}
    assert host_v1101.shared.state.job == ""


def test_the_mask_reaches_training_cropped_like_the_image(client, monkeypatch):
    from PIL import Image

    from dreamartist.images import prepare_reference
    from extensions_builtin_compat import jobs

    mask_image = Image.new("L", reference_image().size, 0)
    mask_image.paste(255, (0, 0, mask_image.width // 2, mask_image.height))
    mask = base64.b64encode(png_bytes(mask_image)).decode()
    seen, original = [], jobs.run_training
    monkeypatch.setattr(jobs, "run_training", lambda config, refs, on_progress=None: seen.append(refs) or original(
        config, refs, on_progress))
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "mask": mask, "name": "masked", **TINY})
    assert response.status_code == 200, response.text
    expected = prepare_reference(reference_image(), 64, 64, mask=mask_image)
    (reference,) = seen[0]
    assert torch.equal(reference.weight, expected.weight) and torch.equal(reference.pixels, expected.pixels)
    black = base64.b64encode(png_bytes(Image.new("L", (64, 64), 0))).decode()
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "mask": black, "name": "dark", **TINY})
    assert response.status_code == 422 and "black everywhere" in response.json()["detail"]


@pytest.mark.parametrize("body, status, words", [
    ({"image": "not base64 at all!", "name": "walle"}, 422, "'image' is not valid base64"),
    ({"image": "data:image/png;base64", "name": "walle"}, 422, "not an image"),  # no comma, no data
    ({"image": base64.b64encode(b"GIF89a garbage").decode(), "name": "walle"}, 422, "not an image"),
    ({"name": "walle"}, 422, "'image' must be a base64-encoded image"),
    ({"image": B64_PNG, "name": "walle", "mask": "@@"}, 422, "'mask' is not valid base64"),
    ({"image": B64_PNG, "name": "../evil"}, 422, "path separators"),
    ({"image": B64_PNG, "name": "walle-neg"}, 422, "reserved for the negative partner"),
    ({"image": B64_PNG, "name": ""}, 422, "The name is empty"),
    ({"image": B64_PNG, "name": "walle", "steps": 0}, 422, "Steps must be between 1 and 100000"),
    ({"image": B64_PNG, "name": "walle", "width": 4096}, 422, "Width must be between 0 and 2048"),
    ({"image": B64_PNG, "name": "walle", "width": 32}, 422, "must be 0 (the model's own size) or at least 64"),
    ({"image": B64_PNG, "name": "walle", "lr": "fast"}, 422, "Learning rate must be a finite number"),
    ({"image": B64_PNG, "name": "walle", "stepz": 10}, 422, "Unknown option(s): stepz"),
    ({"image": B64_PNG, "name": "walle", "gamma": "__import__('os')"}, 422, "amma"),
    ({"image": B64_PNG, "name": 123}, 422, "Name must be text, not 123."),
    ({"image": B64_PNG, "name": "walle", "gamma": 1e15}, 422, "at most 30"),
    ({"image": B64_PNG, "name": "walle", "steps": "ten", "lr": None}, 422,
     "Learning rate must be a finite number, not None. Steps must be a whole number, not 'ten'."),
])
def test_bad_requests_are_4xx_with_one_clear_detail(client, host_v1101, body, status, words):
    response = client.post("/dreamartist/v1/train", json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert listing(host_v1101.embeddings_dir) == []


def test_resuming_a_pair_that_does_not_exist_is_one_sentence(client, host_v1101):
    """Seen in a real webui 1.6.0: the file loader's sentence and the advice came as two."""
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", "resume": True})
    detail = response.json()["detail"]
    assert response.status_code == 422 and "no pair walle to resume" in detail and "turn off Resume" in detail
    assert not re.search(r"[.!?]['\")]?\s+[A-Z]", detail) and detail.endswith(".")
    assert listing(host_v1101.embeddings_dir) == []


def test_a_body_that_is_not_an_object_is_4xx(client):
    response = client.post("/dreamartist/v1/train", json=["walle"])
    assert response.status_code == 422
    assert response.json()["detail"] == "The body must be a JSON object."
    response = client.post("/dreamartist/v1/train", content=b"{'name': walle", headers={"content-type": "text/plain"})
    assert response.status_code == 422 and response.json()["detail"].startswith("The body is not valid JSON (")


def test_gamma_may_be_a_number_as_in_the_tab(client):
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", "gamma": 5, **TINY})
    assert response.status_code == 200, response.text


def test_a_template_naming_a_server_file_is_never_read(client, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root password is [name] hunter2\n")
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", "template": str(secret),
                                                           **TINY})
    assert response.status_code == 422 and "hunter2" not in response.text and "[name]" in response.json()["detail"]


def test_images_too_large_are_refused_from_their_header_before_decoding(client, monkeypatch):
    from PIL import Image

    from dreamartist import images

    huge = base64.b64encode(png_bytes(Image.new("L", (10000, 6000)))).decode()  # 60 MP, a few KB compressed
    monkeypatch.setattr(images, "load_image", lambda *a, **k: pytest.fail("decoded"))
    response = client.post("/dreamartist/v1/train", json={"image": huge, "name": "walle", **TINY})
    assert response.status_code == 422 and "10000x6000 pixels; at most 50 megapixels" in response.json()["detail"]


def test_existing_name_is_409_and_untouched(client, host_v1101):
    existing = host_v1101.embeddings_dir / "walle-neg.safetensors"
    existing.write_bytes(b"someone else's file")
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "WALLE", **TINY})
    assert response.status_code == 409
    assert "'WALLE-neg' already exists" in response.json()["detail"]
    assert existing.read_bytes() == b"someone else's file"
    assert listing(host_v1101.embeddings_dir) == ["walle-neg.safetensors"]


def test_a_run_holding_the_name_is_409(client, host_v1101):
    from dreamartist.fileops import pair_lock

    with pair_lock(host_v1101.embeddings_dir, "walle"):  # e.g. the command line training into the same folder
        response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY})
    assert response.status_code == 409 and "Another training of walle" in response.json()["detail"]


def test_overwrite_replaces_an_existing_pair(client, host_v1101):
    first = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY})
    again = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY})
    replaced = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", "overwrite": True, **TINY})
    assert (first.status_code, again.status_code, replaced.status_code) == (200, 409, 200)


def test_unexpected_failure_is_500_never_200(client, monkeypatch):
    from extensions_builtin_compat import jobs

    def broken(config, references, on_progress=None):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(jobs, "run_training", broken)
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY})
    assert response.status_code == 500
    assert response.json()["detail"] == "Training failed: RuntimeError: CUDA error: device-side assert triggered"


def test_training_holds_the_webui_queue_lock(client, host_v1101, monkeypatch):
    from extensions_builtin_compat import jobs

    queue_lock = host_v1101.module("modules.call_queue").queue_lock
    original, seen = jobs.run_training, []

    def spy(config, references, on_progress=None):
        seen.append(not queue_lock.acquire(blocking=False))  # held (the webui's FIFOLock has no locked())
        return original(config, references, on_progress)

    monkeypatch.setattr(jobs, "run_training", spy)
    assert client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY}).status_code == 200
    assert seen == [True] and queue_lock.acquire(blocking=False)
    queue_lock.release()


def test_an_unusable_model_is_503(client, host_v1101):
    host_v1101.load_model("sdxl-refiner")
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY})
    assert response.status_code == 503 and "SDXL refiner" in response.json()["detail"]


def test_forge_trains_loading_its_model_as_a_generation_does(host_forge):
    client = api_client(host_forge)
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY})
    assert response.status_code == 200, response.text
    assert client.get("/dreamartist/v1/pairs").json() == {"pairs": ["walle"]}


def test_routes_exist_only_with_the_api_enabled(host_v160):
    client = api_client(host_v160, api=False)
    assert client.get("/dreamartist/v1/pairs").status_code == 404


def test_api_auth_protects_the_routes(host_v160):
    client = api_client(host_v160, api_auth="alice:secret,bob:pw")
    assert client.get("/dreamartist/v1/pairs").status_code == 401
    assert client.get("/dreamartist/v1/pairs", auth=("alice", "wrong")).status_code == 401
    assert client.get("/dreamartist/v1/pairs", auth=("bob", "pw")).status_code == 200
    assert client.get("/dreamartist/v1/pairs", auth=("alice", "sécret")).status_code == 401


def test_pairs_lists_a_pair_on_disk_before_the_first_generation(host_reforge):
    """The real reForge after a restart answered {"pairs": []}: it reads the embeddings folder at its first
    generation, not at model load as A1111 does."""
    from dreamartist import pairfiles

    host_reforge.load_model("sd1")
    vectors = {"clip_l": torch.ones(2, 32)}
    pairfiles.save_pair(host_reforge.embeddings_dir, "walle", vectors, vectors)
    assert api_client(host_reforge).get("/dreamartist/v1/pairs").json() == {"pairs": ["walle"]}

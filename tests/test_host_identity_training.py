"""Identity mode (Beyond Inserting) in the stand-in webui: the tab's identity side and POST /dreamartist/v1/train with
"mode": "identity" train into the identities folder (never the embeddings folder) and leave the model as it was;
hosts and models that cannot, and bad requests, are refused in one sentence."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import torch
from fakehost.checks import assert_same_state, class_forwards, graphs_left, listing, model_state
from PIL import Image, ImageDraw
from tabhelpers import build_tab, by_elem_id, click_handler, load_extension, plain_text, png_bytes, reference_image
from test_api import api_client
from test_ui_tab import click_args, descendants

from dreamartist.config import IdentityConfig

TINY = {"steps": 2, "width": 64, "height": 64}
FACE_PHOTO = Path(__file__).parent / "data" / "face.png"  # a real face (NASA portrait, public domain), 128 px
ID = "dreamartist_identity_"


def face_mask() -> Image.Image:
    """The red disc of reference_image(), painted white."""
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    return mask


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def one_sentence(text: str) -> bool:
    return text.endswith(".") and not re.search(r"[.!?]['\")]?\s+[A-Z]", text)


def identities_dir():
    """<models>/dreamartist-identities of the host installed now."""
    from extensions_builtin_compat import identities

    return identities.identities_dir()


def test_the_identity_side_has_one_control_per_option_and_the_consent_notice(host_v1101):
    load_extension(host_v1101)
    controls = by_elem_id(build_tab(host_v1101))
    folded = {b.elem_id for b in descendants(controls[ID + "advanced"])}
    for field in IdentityConfig.__dataclass_fields__.values():
        control = controls[ID + field.name]
        assert (control.value, control.label) == (field.default, field.metadata["label"]), field.name
        assert (control.elem_id in folded) == field.metadata["advanced"], field.name
    assert "agreed" in controls[ID + "consent"].value and controls[ID + "train"].interactive is not False
    assert "dreamartist_train" in controls and ID + "notice" not in controls  # the pair side is still there


def test_no_two_controls_share_a_key_of_the_webuis_ui_config(host_v1101):
    """ui_loadsave keys each control by tab and label: two saved controls with one key would get one value (a real
    1.10.1 gave the identity side the pair side's lr 0.0025 and template "object")."""
    import gradio as gr

    load_extension(host_v1101)
    tab = build_tab(host_v1101)
    tracked = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown)
    keys = [f"dreamartist/{b.label}" for b in descendants(tab) if type(b) in tracked and b.label is not None
            and not getattr(b, "do_not_save_to_config", False)]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    controls = by_elem_id(tab)
    assert controls[ID + "lr"].value == 0.005 and controls[ID + "template"].value == "a photo of the face of [name]"


def test_the_tab_trains_an_identity_into_its_folder_and_leaves_the_model_as_it_was(host):
    from modules import processing

    load_extension(host)
    tab = build_tab(host)
    model = host.shared.sd_model
    before, forwards = model_state(model), class_forwards()
    assert all(p.requires_grad for p in model.model.parameters())
    processing.StableDiffusionProcessing.cached_c[:] = ["stale key", "stale cond"]
    train, dep = click_handler(tab, ID + "train")
    args = click_args(tab, dep, **{ID + "task_id": "task(identity)", ID + "reference": reference_image(),
                                   ID + "mask": face_mask(), ID + "name": "zqv", ID + "steps": 2, ID + "width": 64,
                                   ID + "height": 64, ID + "preview_every": 2})

    gallery, loss, result = train(*args)

    text = plain_text(result)
    assert "Type zqv in your prompt to use the identity." in text, text
    assert "Trained 2 steps" in text and "Saved: zqv.identity.safetensors." in text
    assert len(gallery) == 1 and "<polyline" in loss
    assert (identities_dir() / "zqv.identity.safetensors").is_file()
    assert listing(host.embeddings_dir) == []
    assert_same_state(before, model_state(model))
    assert class_forwards() == forwards
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert host.shared.state.job == ""

    controls = by_elem_id(tab)
    refresh, _ = click_handler(tab, ID + "resume_refresh")
    assert refresh()["choices"] == ["zqv"]
    pick = next(fn.fn for fn, d in zip(tab.fns, tab.dependencies, strict=True)
                if controls[ID + "resume_identity"]._id in d["targets"] and d["trigger"] == "change")
    names = [f.name for f in sorted(IdentityConfig.__dataclass_fields__.values(), key=lambda f: f.metadata["advanced"])]
    updates = dict(zip(names, pick("zqv"), strict=True))
    assert (updates["name"]["value"], updates["resume"]["value"], updates["steps"]["value"]) == ("zqv", True, 2)


@pytest.mark.parametrize("values, message", [
    ({ID + "mask": None}, "No face was found in the picture; paint the face white in the face region mask."),
    ({ID + "reference": None}, "Upload a photo of the face"),
    ({ID + "mask": Image.new("L", (64, 64), 0)}, "The face mask has no white area"),
    ({ID + "class_word": "two words"}, "The class word must be one word"),
])
def test_bad_identity_input_is_one_line_and_writes_nothing(host_v160, values, message):
    load_extension(host_v160)
    tab = build_tab(host_v160)
    train, dep = click_handler(tab, ID + "train")
    values = {ID + "task_id": "task(bad)", ID + "reference": reference_image(), ID + "mask": face_mask(),
              ID + "name": "zqv", **TINY, **values}
    result = train(*click_args(tab, dep, **values))[2]
    error = plain_text(re.search(r"<p class='dreamartist-error'>(.*?)</p>", result).group(1))  # not the timing
    assert message in error and one_sentence(error), error
    assert not identities_dir().exists() and listing(host_v160.embeddings_dir) == []


def test_the_api_trains_an_identity_and_lists_it(host):
    client = api_client(host)
    model = host.shared.sd_model
    before = model_state(model)
    response = client.post("/dreamartist/v1/train", json={"mode": "identity", "image": b64(reference_image()),
                                                           "mask": b64(face_mask()), "name": "zqv", **TINY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["identity"], body["steps"]) == ("zqv", "zqv.identity.safetensors", 2)
    assert body["files"] == ["zqv.identity.safetensors"] and isinstance(body["final_loss"], float)
    assert (identities_dir() / body["identity"]).is_file() and listing(host.embeddings_dir) == []
    assert client.get("/dreamartist/v1/identities").json() == {"identities": ["zqv"]}
    assert client.get("/dreamartist/v1/pairs").json() == {"pairs": []}
    assert_same_state(before, model_state(model))
    assert host.shared.state.job == ""


def test_an_identity_name_is_taken_by_an_embedding_or_an_identity_unless_overwritten(host_v1101):
    from modules.textual_inversion.textual_inversion import Embedding

    client = api_client(host_v1101)
    Embedding(torch.ones(1, 32), "walle").save(str(host_v1101.embeddings_dir / "walle.pt"))
    request = {"mode": "identity", "image": b64(reference_image()), "mask": b64(face_mask()), **TINY}
    taken = client.post("/dreamartist/v1/train", json={**request, "name": "walle"})
    assert taken.status_code == 409 and "'walle' already exists" in taken.json()["detail"]
    assert listing(host_v1101.embeddings_dir) == ["walle.pt"]
    statuses = [client.post("/dreamartist/v1/train", json={**request, "name": "zqv", **extra}).status_code
                for extra in ({}, {}, {"overwrite": True})]
    assert statuses == [200, 409, 200]


def test_a_pair_cannot_take_an_identitys_name_and_the_export_goes_where_the_webui_reads_it(host_v1101):
    client = api_client(host_v1101)
    request = {"mode": "identity", "image": b64(reference_image()), "mask": b64(face_mask()), **TINY}
    assert client.post("/dreamartist/v1/train", json={**request, "name": "zqv", "export_embedding": True}
                       ).status_code == 200
    assert listing(host_v1101.embeddings_dir) == ["zqv-identity.pt"]  # the webui loads it without the extension
    pair = client.post("/dreamartist/v1/train", json={"image": b64(reference_image()), "name": "zqv", **TINY})
    assert pair.status_code == 409 and "'zqv' already exists" in pair.json()["detail"]


@pytest.mark.parametrize("body, words", [
    ({"name": "zqv"}, "No face was found in the picture; paint the face white"),
    ({"name": "zqv", "mask": "@@"}, "'mask' is not valid base64"),
    ({"name": "zqv", "mask": "FACE", "gamma": "3"}, "Unknown option(s): gamma;"),
    ({"name": "zqv", "mask": "FACE", "stepz": 3}, "Unknown option(s): stepz;"),
    ({"name": "zqv", "mask": "FACE", "attention_layers": "8x8"}, "Attention loss layers must be one of"),
    ({"name": "zqv", "mask": "FACE", "mode": "face"}, "'mode' must be pair or identity; got 'face'."),
    ({"name": "zqv", "mask": "FACE", "mode": ["identity"]}, "'mode' must be pair or identity; got ['identity']."),
])
def test_bad_identity_requests_are_422_with_one_sentence(host_v1101, body, words):
    client = api_client(host_v1101)
    body = {"mode": "identity", "image": b64(reference_image()), **body}
    if body.get("mask") == "FACE":
        body["mask"] = b64(face_mask())
    response = client.post("/dreamartist/v1/train", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert words in detail and one_sentence(detail), detail
    assert not identities_dir().exists()


def test_without_a_mask_the_face_found_in_the_photo_frames_the_identity(host_v1101):
    """The webui's OpenCV finds the face of a real photo (tests/data/face.png, 128 px) when no mask is painted: the
    reference is framed around it exactly as around a mask painting that face's box; the tab does the same."""
    from dreamartist.images import face_reference
    from extensions_builtin_compat import api, face_detection, ui_tab

    photo = Image.open(FACE_PHOTO).convert("RGB")
    found = face_detection.face_mask(photo)
    left, top, right, bottom = found.getbbox()
    assert 25 <= left <= 45 and 20 <= top <= 40 and 40 <= right - left <= 64  # the face, not the suit or the flag
    expected = face_reference(photo, found, 64, 64)
    for references in (api._references(IdentityConfig(name="zqv", **TINY), png_bytes(photo), None),
                       ui_tab.face_references(IdentityConfig(name="zqv", **TINY), photo, None)):
        assert torch.equal(references[0].pixels, expected.pixels)
    response = api_client(host_v1101).post("/dreamartist/v1/train", json={
        "mode": "identity", "image": b64(photo), "name": "zqv", **TINY})
    assert response.status_code == 200, response.text
    assert (identities_dir() / "zqv.identity.safetensors").is_file()


def test_without_opencv_a_missing_mask_is_one_sentence(host_v1101, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # an import of it fails
    response = api_client(host_v1101).post("/dreamartist/v1/train", json={
        "mode": "identity", "image": b64(Image.open(FACE_PHOTO)), "name": "zqv", **TINY})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "no face detector" in detail and one_sentence(detail), detail
    assert not identities_dir().exists()


def test_an_identity_trains_on_sdxl_with_both_encoders_tokens_and_leaves_the_model_as_it_was(host_v1101):
    """Stage tokens for CLIP-L and CLIP-G at their widths, the export as the webui's SDXL embedding layout."""
    from dreamartist import identityfiles
    from extensions_builtin_compat.host_backend import _fixes, text_encoders

    client = api_client(host_v1101)
    model = host_v1101.load_model("sdxl")
    before, forwards = model_state(model), class_forwards()
    response = client.post("/dreamartist/v1/train", json={"mode": "identity", "image": b64(reference_image()),
                                                           "mask": b64(face_mask()), "name": "zqv", **TINY,
                                                           "export_embedding": True})
    assert response.status_code == 200, response.text
    saved = identityfiles.load_identity(identities_dir() / "zqv.identity.safetensors")
    widths = {key: _fixes(encoder).wrapped.weight.shape[1] for key, encoder in text_encoders(model).items()}
    assert {key: tuple(t.shape) for key, t in saved.tokens.tokens.items()} == {
        "clip_l": (5, 2, widths["clip_l"]), "clip_g": (5, 2, widths["clip_g"])}
    exported = torch.load(host_v1101.embeddings_dir / "zqv-identity.pt", map_location="cpu", weights_only=True)
    assert {key: tuple(t.shape) for key, t in exported.items()} == {"clip_l": (1, widths["clip_l"]),
                                                                     "clip_g": (1, widths["clip_g"])}
    assert_same_state(before, model_state(model))
    assert class_forwards() == forwards


@pytest.mark.parametrize("webui", ["host_reforge", "host_classic", "host_neo", "host_forge"])
def test_the_forge_family_trains_an_identity_and_leaves_the_model_as_it_was(request, webui):
    """reForge and Classic: the webui's model object over ldm_patched's UNet (Classic's blocks add residuals in place;
    both load weights inside inference mode at a generation); Neo and the original Forge: their backend's text
    engines, and every weight an inference tensor. The identity trains through the API after a generation."""
    from test_host_neo import assert_same_parts, parts_state

    host = request.getfixturevalue(webui)
    client = api_client(host)
    host.process_images(host.txt2img(prompt="a photo"))  # loads Neo's model; transformers hooks its encoders
    from extensions_builtin_compat.host import runs_forge_engine

    model = host.shared.sd_model
    state, same = (parts_state, assert_same_parts) if runs_forge_engine(model) else (model_state, assert_same_state)
    before = state(model)
    response = client.post("/dreamartist/v1/train", json={"mode": "identity", "image": b64(reference_image()),
                                                           "mask": b64(face_mask()), "name": "zqv", **TINY})
    assert response.status_code == 200, response.text
    assert (identities_dir() / "zqv.identity.safetensors").is_file()
    same(before, state(model))
    controls = by_elem_id(build_tab(host))
    assert controls[ID + "train"].interactive is not False and ID + "notice" not in controls


@pytest.mark.parametrize("webui", ["host_v1101", "host_reforge", "host_classic", "host_neo"])
def test_an_sdxl_identity_run_leaves_no_graph_behind(request, webui):
    """reForge's, Classic's and Neo's CLIP-G hangs its pooled output on the hidden state the encoder's next layer
    saved for backward; the V variants' pooled outputs never go through backward, so each of their graphs would hold
    itself, and the identity's block with it, out of reach of Python's collector (1 GB of tensors in a real Forge
    Classic). Neo's engines also keep their last output in their emphasis object."""
    host = request.getfixturevalue(webui)
    host.load_model("sdxl")
    response = api_client(host).post("/dreamartist/v1/train", json={
        "mode": "identity", "image": b64(reference_image()), "mask": b64(face_mask()), "name": "zqv", **TINY})
    assert response.status_code == 200, response.text
    assert graphs_left() == []


@pytest.mark.parametrize("webui", ["host_v1101", "host_reforge", "host_classic"])
def test_an_sd2_model_trains_an_identity_for_its_openclip_encoder(request, webui):
    """Also where the host calls an SD 2.x model SD1: reForge and Forge Classic set ``is_sd2`` after wrapping its
    prompt encoder in a class without the ``model`` they look for, so their SD 2.x models say ``is_sd1``."""
    from dreamartist import identityfiles

    host = request.getfixturevalue(webui)
    model = host.load_model("sd2")
    assert model.is_sd2 != (webui != "host_v1101")  # as the real hosts set it
    client = api_client(host)
    response = client.post("/dreamartist/v1/train", json={"mode": "identity", "image": b64(reference_image()),
                                                           "mask": b64(face_mask()), "name": "zqv", **TINY})
    assert response.status_code == 200, response.text
    saved = identityfiles.load_identity(identities_dir() / "zqv.identity.safetensors")
    assert list(saved.tokens.tokens) == ["clip_h"] and saved.tokens.stages == 5


def test_previews_sample_with_the_identity_in_the_webui(host_v1101):
    from dreamartist.images import face_reference
    from extensions_builtin_compat import jobs

    config = IdentityConfig(name="zqv", preview_every=1, **TINY)
    seen = []
    result = jobs.run_training(config, [face_reference(reference_image(), face_mask(), 64, 64)],
                               on_progress=lambda progress: seen.append(progress.preview))
    assert result.step == 2 and all(p is not None and p.size == (64, 64) for p in seen)
    unet = host_v1101.shared.sd_model.model.diffusion_model
    assert all("forward" not in m.__dict__ for m in unet.modules())  # the previews' control is gone too

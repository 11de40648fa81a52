"""Identity mode (Beyond Inserting) on the tiny random SD1 model: the stage rule, K and V from different contexts in
exactly the rows that use the identity, the face-wise attention loss against hand-computed values, gradients that
reach the module and nothing else, the file format, resume, the augmentation and the face framing, and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamartist import augment as augment_module
from dreamartist import identityfiles
from dreamartist.attention_control import CROSS, Site, controlled
from dreamartist.config import IdentityConfig
from dreamartist.errors import InputError, NameTaken
from dreamartist.identity import IdentityModule, IdentityTokens, K, V, as_tokens, stage_bounds, stage_of
from dreamartist.identity_control import IdentityControl
from dreamartist.identity_training import GROUP, IdentityTrainer
from dreamartist.images import face_reference, prepare_reference
from dreamartist.sampling import StagedConditioning, sample


def _config(**changes) -> IdentityConfig:
    return IdentityConfig(**{"name": "zqv", "class_word": "person", "template": "a photo of [name]", "steps": 3,
                             "width": 64, "height": 64, **changes})


@pytest.fixture
def face():
    image = Image.new("RGB", (64, 64), (40, 120, 200))
    image.paste((220, 180, 150), (20, 16, 44, 44))
    return prepare_reference(image, 64, 64)


# -- the stage rule and the module --------------------------------------------------------------------------
@pytest.mark.parametrize("t, stages, expected", [(0, 5, 0), (199, 5, 0), (200, 5, 1), (799, 5, 3), (800, 5, 4),
                                                 (999, 5, 4), (333, 3, 0), (334, 3, 1), (999, 1, 0)])
def test_the_stage_is_floor_of_t_times_s_over_1000(t, stages, expected):
    assert int(stage_of(t, stages)) == expected


def test_the_files_name_each_stage_by_its_first_timestep():
    assert stage_bounds(5) == (0, 200, 400, 600, 800, 1000)
    assert stage_bounds(3) == (0, 334, 667, 1000)  # stage_of(334, 3) is the first timestep of stage 1


def test_the_module_maps_its_fixed_input_to_stage_pairs_and_trains_only_its_block():
    init = {"clip_l": torch.randn(1, 32)}
    module = IdentityModule(init, outputs=10)
    out = module()
    assert out["clip_l"].shape == (10, 32)
    assert "initial" not in dict(module.named_parameters())  # the class word's embedding stays fixed
    tokens = as_tokens(out, stages=5, kv_split=True)
    assert torch.equal(tokens.tokens["clip_l"][2, K], out["clip_l"][4])
    assert torch.equal(tokens.tokens["clip_l"][2, V], out["clip_l"][5])
    shared = as_tokens({"clip_l": out["clip_l"][:5]}, stages=5, kv_split=False)
    assert torch.equal(shared.tokens["clip_l"][:, K], shared.tokens["clip_l"][:, V])


# -- the controller: K/V split and the attention loss -------------------------------------------------------
class _Layer(torch.nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.to_k = torch.nn.Linear(dim, dim, bias=False)


def _site(level=1, module=None):
    return Site("down_blocks.1.attentions.0.transformer_blocks.0.attn2", CROSS, -1, (), level, module)


def test_keys_come_from_the_context_and_values_from_the_parked_value_contexts():
    control = IdentityControl()
    key_context, values = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with control.call(values=values):
        k, v = control.contexts(_site(), key_context, key_context)
    assert k is key_context and torch.equal(v, values)
    k, v = control.contexts(_site(), key_context, key_context)  # after the call: nothing parked, nothing changed
    assert v is key_context


def test_the_attention_loss_is_the_squared_difference_of_head_mean_maps_summed_over_pixels_and_tokens():
    layer = _Layer()
    query = torch.randn(1, 2, 3, 4)  # rows, heads, pixels, head_dim
    reference = torch.randn(1, 5, 8)
    control = IdentityControl(levels=frozenset({1}))
    probs = torch.softmax(torch.randn(1, 2, 3, 5), -1)
    with control.call(reference=reference):
        assert control.wants_probabilities(_site(1, layer)) and not control.wants_probabilities(_site(0, layer))
        control.keys_values(_site(1, layer), query, None, None)
        control.probabilities(_site(1, layer), probs)
        loss = control.take_loss()
    ref_keys = (reference @ layer.to_k.weight.T).reshape(1, 5, 2, 4).transpose(1, 2)
    target = torch.softmax(query @ ref_keys.transpose(-1, -2) / 2.0, -1).mean(1)  # head_dim 4: scale 1/2
    expected = (probs.mean(1) - target).square().sum()
    torch.testing.assert_close(loss, expected.detach().reshape(1))


# -- in the model: rows, stages, gradients ---------------------------------------------------------------------
class _Recorder(IdentityControl):
    """Records, per cross-attention call, which rows read their values from another context than their keys."""

    def __init__(self):
        super().__init__()
        self.split_rows = []

    def contexts(self, site, key_context, value_context):
        k, v = super().contexts(site, key_context, value_context)
        if site.kind == CROSS:
            self.split_rows.append(tuple(bool((k[i] != v[i]).any()) for i in range(k.shape[0])))
        return k, v


def _tokens(backend, stages=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dim = backend.embedding_dims["clip_l"]
    return IdentityTokens({"clip_l": torch.randn(stages, 2, dim, generator=generator)})


def test_k_and_v_differ_in_every_cross_attention_of_the_rows_naming_the_identity_and_in_no_other(random_backend):
    tokens = _tokens(random_backend)
    texts = ["", "a photo of zqv", "a red cube"]
    staged = StagedConditioning(random_backend, texts, {"zqv": tokens.vectors(0, K)}, (), {"zqv": tokens})
    recorder = _Recorder()
    cond, values = staged.at(500)
    with torch.no_grad(), controlled(random_backend, recorder), recorder.call(values=values):
        random_backend.unet(torch.randn(3, 4, 8, 8), torch.full((3,), 500), cond)
    assert recorder.split_rows and all(rows == (False, True, False) for rows in recorder.split_rows)


@pytest.mark.parametrize("t", [0, 199, 200, 650, 999])
def test_each_call_uses_the_tokens_of_the_stage_its_timestep_falls_in(random_backend, t):
    tokens = _tokens(random_backend)
    staged = StagedConditioning(random_backend, ["a photo of zqv"], {}, (), {"zqv": tokens})
    cond, values = staged.at(t)
    s = int(stage_of(t, 5))
    with torch.no_grad():
        expected_k = random_backend.encode(["a photo of zqv"], {"zqv": tokens.vectors(s, K)}).context
        expected_v = random_backend.encode(["a photo of zqv"], {"zqv": tokens.vectors(s, V)}).context
        other = random_backend.encode(["a photo of zqv"], {"zqv": tokens.vectors((s + 1) % 5, K)}).context
    torch.testing.assert_close(cond.context, expected_k)
    torch.testing.assert_close(values, expected_v)
    assert not torch.allclose(cond.context, other)


def test_sampling_with_an_identity_changes_the_image_only_through_its_tokens(random_backend):
    tokens = _tokens(random_backend)
    kw = dict(steps=3, width=64, height=64, seed=1)
    plain = sample(random_backend, "a red cube", **kw)[0]
    unused = sample(random_backend, "a red cube", identities={"zqv": tokens}, **kw)[0]
    used = sample(random_backend, "a photo of zqv", identities={"zqv": tokens}, **kw)[0]
    other = sample(random_backend, "a photo of zqv", identities={"zqv": _tokens(random_backend, seed=5)}, **kw)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(unused))
    assert not np.array_equal(np.asarray(used), np.asarray(other))


def test_the_attention_loss_gradient_reaches_the_module_and_only_the_module(random_backend, face, tmp_path):
    trainer = IdentityTrainer(random_backend, _config(), [face], tmp_path)
    model = [p for m in random_backend.modules for p in m.parameters()]
    with controlled(random_backend, trainer.objective.control), random_backend.training():
        trainer._start()
        objective = trainer.objective
        tokens = objective.tokens(trainer.params, dropout_seed=0)
        line = objective.templates[0]
        cond = random_backend.encode(["a photo of zqv"], {"zqv": tokens.vectors(2, K)})
        values = random_backend.encode(["a photo of zqv"], {"zqv": tokens.vectors(2, V)}).context
        with objective.control.call(values=values, reference=objective.reference(line)):
            random_backend.unet(torch.randn(1, 4, 8, 8), torch.full((1,), 450), cond)
            attention = objective.control.take_loss().sum()
        attention.backward()
    grads = [p.grad for p in trainer.params[GROUP].values()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model)


@pytest.mark.parametrize("weight, maps_formed", [(0.0, False), (0.003, True)])
def test_the_attention_maps_are_formed_only_with_the_attention_loss(random_backend, face, tmp_path, monkeypatch,
                                                                    weight, maps_formed):
    formed = []
    probabilities = IdentityControl.probabilities
    monkeypatch.setattr(IdentityControl, "probabilities",
                        lambda self, site, probs: formed.append(site.layer) or probabilities(self, site, probs))
    trainer = IdentityTrainer(random_backend, _config(attention_weight=weight), [face], tmp_path)
    trainer.run()
    assert bool(formed) is maps_formed  # no explicit softmax (and no extra cost) without the loss
    assert (trainer.objective.last_terms[1] > 0) is maps_formed


# -- the run, the files, resume ------------------------------------------------------------------------------
def test_a_run_writes_an_identity_file_that_resume_continues_to_the_same_tokens(random_backend, face, tmp_path):
    straight = IdentityTrainer(random_backend, _config(steps=4), [face], tmp_path / "a").run()
    IdentityTrainer(random_backend, _config(steps=2), [face], tmp_path / "b").run()
    resumed = IdentityTrainer(random_backend, _config(steps=4, resume=True), [face], tmp_path / "b").run()
    assert straight.step == resumed.step == 4
    a = identityfiles.load_identity(tmp_path / "a" / "zqv.identity.safetensors")
    b = identityfiles.load_identity(tmp_path / "b" / "zqv.identity.safetensors")
    torch.testing.assert_close(a.tokens.tokens["clip_l"], b.tokens.tokens["clip_l"])
    assert a.meta["stage_bounds"] == "0,200,400,600,800,1000" and a.meta["kv_split"] == "true"
    assert a.meta["step"] == "4" and a.tokens.tokens["clip_l"].shape == (5, 2, random_backend.embedding_dims["clip_l"])


def test_a_resumed_run_holds_one_copy_of_the_block(random_backend, face, tmp_path, monkeypatch):
    """An SDXL block with Adam's moments is 2.5 GB: a resumed run reads its state once, and the objective keeps
    only the block's shapes (its values are the trainer's leaves)."""
    from dreamartist import pairfiles

    IdentityTrainer(random_backend, _config(steps=2), [face], tmp_path).run()
    reads, read = [], pairfiles.load_state
    monkeypatch.setattr(pairfiles, "load_state", lambda *a: reads.append(a) or read(*a))
    trainer = IdentityTrainer(random_backend, _config(steps=3, resume=True), [face], tmp_path)
    assert trainer.run().step == 3 and len(reads) == 1
    assert {p.device.type for p in trainer.objective.module.parameters()} == {"meta"}
    assert trainer.objective.module.initial.device.type == "cpu"


def test_the_block_is_kept_in_the_resume_state_only_and_resume_needs_it(random_backend, face, tmp_path):
    """The identity file holds the stage tokens (what generation needs), not the trained block; resume reads the
    block from the state beside it, or from an identity file that still holds one, and says so without either."""
    from safetensors import safe_open

    from dreamartist import pairfiles

    IdentityTrainer(random_backend, _config(steps=2), [face], tmp_path).run()
    path = tmp_path / "zqv.identity.safetensors"
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["kv_tokens.clip_l"]
    state = pairfiles.load_state(tmp_path, "zqv")
    block = state["groups"]["identity"]["live"]
    saved = identityfiles.load_identity(path)
    identityfiles.save_identity(tmp_path, "zqv", saved.tokens, block, saved.meta)  # the older layout, no state
    (tmp_path / f"zqv{pairfiles.STATE_SUFFIX}").unlink()
    assert IdentityTrainer(random_backend, _config(steps=3, resume=True), [face], tmp_path).run().step == 3
    identityfiles.save_identity(tmp_path, "zqv", identityfiles.load_identity(path).tokens, {}, saved.meta)
    (tmp_path / f"zqv{pairfiles.STATE_SUFFIX}").unlink()
    with pytest.raises(InputError, match="which is missing or of another step") as missing:
        IdentityTrainer(random_backend, _config(steps=4, resume=True), [face], tmp_path).run()
    assert str(missing.value).count(". ") == 0


def test_the_ablations_write_one_pair_or_shared_tokens(random_backend, face, tmp_path):
    IdentityTrainer(random_backend, _config(stages=1), [face], tmp_path / "one").run()
    IdentityTrainer(random_backend, _config(kv_split=False), [face], tmp_path / "shared").run()
    one = identityfiles.load_identity(tmp_path / "one" / "zqv.identity.safetensors").tokens.tokens["clip_l"]
    shared = identityfiles.load_identity(tmp_path / "shared" / "zqv.identity.safetensors").tokens.tokens["clip_l"]
    assert one.shape[0] == 1 and shared.shape[0] == 5
    assert torch.equal(shared[:, K], shared[:, V])


def test_the_optional_export_is_an_ordinary_one_vector_embedding_of_the_mean_key(random_backend, face, tmp_path):
    IdentityTrainer(random_backend, _config(export_embedding=True), [face], tmp_path).run()
    identity = identityfiles.load_identity(tmp_path / "zqv.identity.safetensors")
    exported = torch.load(tmp_path / "zqv-identity.pt", weights_only=True)  # as the webui reads an embedding
    assert exported["name"] == "zqv-identity" and list(exported["string_to_param"]) == ["*"]
    torch.testing.assert_close(exported["string_to_param"]["*"], identity.tokens.tokens["clip_l"][:, K].mean(0, True))


def test_names_taken_and_missing_identities_are_one_sentence(random_backend, face, tmp_path):
    IdentityTrainer(random_backend, _config(), [face], tmp_path).run()
    with pytest.raises(NameTaken, match="already exists"):
        IdentityTrainer(random_backend, _config(), [face], tmp_path).run()
    with pytest.raises(InputError, match="no identity other to resume"):
        IdentityTrainer(random_backend, _config(name="other", resume=True), [face], tmp_path).run()
    with pytest.raises(InputError, match="not one token"):
        IdentityTrainer(random_backend, _config(class_word="zqxjkvbw"), [face], tmp_path)
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, 4)}, str(tmp_path / "plain.identity.safetensors"))
    with pytest.raises(InputError, match="not a DreamArtist identity"):
        identityfiles.load_identity(tmp_path / "plain.identity.safetensors")


# -- augmentation and framing -----------------------------------------------------------------------------------
def test_augmentation_is_the_identity_at_unit_factors_and_an_exact_flip_when_flipped(monkeypatch):
    pixels = torch.rand(3, 16, 16) * 2 - 1
    monkeypatch.setattr(augment_module, "SCALE", (1.0, 1.0))
    monkeypatch.setattr(augment_module, "JITTER", 0.0)
    monkeypatch.setattr(augment_module, "FLIP_P", 0.0)
    torch.testing.assert_close(augment_module.augment(pixels, torch.Generator()), pixels, atol=1e-5, rtol=0)
    monkeypatch.setattr(augment_module, "FLIP_P", 1.0)
    torch.testing.assert_close(augment_module.augment(pixels, torch.Generator()), pixels.flip(-1), atol=1e-5, rtol=0)


def test_the_face_is_framed_by_a_square_around_the_mask(tmp_path):
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (120, 30, 160, 70))  # the face: 40 x 40 at (120, 30)
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (120, 30, 160, 70))
    ref = face_reference(image, mask, 64, 64)
    # a 64 px square (1.6 x 40) centred on the face: the face spans 40/64 of the frame, red in the middle
    red = (ref.pixels[0] > 0.5) & (ref.pixels[2] < -0.5)
    assert red[32, 32] and 0.55 < float(red.float().mean().sqrt()) < 0.7
    with pytest.raises(InputError, match="no white"):
        face_reference(image, Image.new("L", (200, 100), 0), 64, 64)


# -- the command line --------------------------------------------------------------------------------------------
def _toy_face(tmp_path):
    from dreamartist.toyworld.render import coverage, layout, render
    from dreamartist.toyworld.world import Scene

    scene = Scene("star", "purple", "green", "plain")
    render(scene, 0).save(tmp_path / "star.png")
    Image.fromarray(((coverage("star", layout(scene, 0)) > 0.5) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return tmp_path / "star.png", tmp_path / "mask.png"


def test_the_cli_trains_an_identity_and_generate_applies_it_from_the_same_folder(tmp_path, capsys):
    from dreamartist.cli import main

    image, mask = _toy_face(tmp_path)
    out = tmp_path / "emb"
    code = main(["train", "--mode", "identity", "--image", str(image), "--mask", str(mask), "--name", "zqv",
                 "--out", str(out), "--class-word", "circle", "--template", "a photo of a [name]", "--steps", "2",
                 "--previews", str(tmp_path / "previews"), "--no-final-preview"])
    assert code == 0 and (out / "zqv.identity.safetensors").is_file()
    capsys.readouterr()
    for prompt, used in (("a photo of a zqv", True), ("a photo of a star", False)):
        output = tmp_path / f"{used}.png"
        assert main(["generate", "--prompt", prompt, "--embeddings", str(out), "--steps", "2",
                     "--output", str(output)]) == 0
        assert ("DreamArtist: zqv" in Image.open(output).info["parameters"]) is used


@pytest.mark.parametrize("args, fragment", [
    (["--gamma", "3"], "--gamma is not an option of --mode identity"),
    ([], "needs the face region: give --mask"),
    (["--stages", "0"], "Stages must be between 1 and 10"),
    (["--class-word", "two words"], "one word"),
])
def test_bad_identity_options_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, args, fragment):
    from dreamartist.cli import main

    image, mask = _toy_face(tmp_path)
    monkeypatch.setattr("dreamartist.cli._load_backend", lambda *a: pytest.fail("the model was loaded"))
    mask_args = ["--mask", str(mask)] if fragment != "needs the face region: give --mask" else []
    code = main(["train", "--mode", "identity", "--image", str(image), "--name", "zqv", "--out",
                 str(tmp_path / "emb"), *mask_args, *args])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "emb").exists()


def test_an_sdxl_identity_has_stage_tokens_for_both_encoders_and_its_k_variant_gives_the_pooled_output(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_sdxl

    from dreamartist.backend import POOLED

    xl = tiny_sdxl.backend(seed=0)
    face = prepare_reference(Image.new("RGB", (64, 64), (200, 30, 30)), 64, 64)
    result = IdentityTrainer(xl, _config(), [face], tmp_path).run()
    tokens = identityfiles.load_identity(result.files[0]).tokens
    assert {k: tuple(t.shape) for k, t in tokens.tokens.items()} == {
        "clip_l": (5, 2, tiny_sdxl.L_WIDTH), "clip_g": (5, 2, tiny_sdxl.G_WIDTH)}
    staged = StagedConditioning(xl, ["a photo of zqv"], {}, (), {"zqv": tokens})
    cond, values = staged.at(700)
    with torch.no_grad():
        k = xl.encode(["a photo of zqv"], {"zqv": tokens.vectors(3, K)})
        v = xl.encode(["a photo of zqv"], {"zqv": tokens.vectors(3, V)})
    torch.testing.assert_close(cond.context, k.context)
    torch.testing.assert_close(cond.extras[POOLED], k.extras[POOLED])
    torch.testing.assert_close(values, v.context)

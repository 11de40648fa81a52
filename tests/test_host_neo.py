"""Forge Neo on the stand-in host: no modules.sd_hijack nor modules.lowvram, a part-less placeholder model until the
first generation, the embeddings in models/embeddings read by each text engine. Each test reproduces what the
real Neo (tests/real_webui) showed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakehost.checks import write_pair
from test_host_reforge import config

from dreamartist import pairfiles

REPO = Path(__file__).resolve().parents[1]


def generate(host, enabled=True, **fields):
    p = host.txt2img(script_args={"dreamartist": [enabled]}, **fields)
    return p, host.process_images(p)


def test_the_neo_host_has_no_hijack_modules(host_neo):
    """The real Neo: "ImportError: cannot import name 'sd_hijack' from 'modules'" when the extension loaded."""
    with pytest.raises(ImportError, match="sd_hijack"):
        from modules import sd_hijack  # noqa: F401
    for name in ("modules.lowvram", "modules.sd_hijack_checkpoint"):
        with pytest.raises(ImportError):
            host_neo.module(name)
    assert host_neo.embeddings_dir == host_neo.root / "models" / "embeddings"
    assert host_neo.shared.cmd_opts.embeddings_dir == str(host_neo.embeddings_dir)


def test_extension_loads_without_errors(host_neo):
    host_neo.load_extension(REPO)
    assert host_neo.module("modules.errors").reported == []
    scripts = host_neo.module("modules.scripts")
    assert [d.script_class.__name__ for d in scripts.scripts_data] == ["BaretEditScript", "DreamArtistScript"]


def test_the_placeholder_model_counts_as_no_model(host_neo):
    from extensions_builtin_compat import embeddings, host_pairing
    from extensions_builtin_compat import host as probes

    assert host_neo.module("modules.sd_models").model_data.sd_model is not None  # Neo's FakeInitialModel
    assert probes.loaded_model() is None and host_pairing.prompt_encoder() is None
    assert embeddings.databases() == [] and embeddings.pairs() == []
    assert not probes.has_embedding_db() and probes.training_unavailable_reason() is None


def parts(model) -> dict[str, torch.nn.Module]:
    objects = model.forge_objects
    return {"unet": objects.unet.model, "te": objects.clip.cond_stage_model, "vae": objects.vae.first_stage_model}


def parts_state(model) -> dict:
    """Every tensor object of the model's parts with its values, flags and the parts' hooks."""
    state = {}
    for part, module in parts(model).items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            state[f"{part}.{name}"] = (tensor, tensor.detach().clone(), tensor.requires_grad, tensor.is_inference())
        state[f"{part}.hooks"] = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules()]
    return state


def assert_same_parts(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if key.endswith(".hooks"):
            assert old == new, key
            continue
        assert new[0] is old[0] and torch.equal(new[1], old[1]) and new[2:] == old[2:], key


def test_training_from_neos_placeholder_loads_the_model_as_a_generation_does(host_neo, references):
    from extensions_builtin_compat import host as probes
    from extensions_builtin_compat import jobs

    assert probes.loaded_model() is None
    assert jobs.run_training(config(), references).step == 2 and probes.loaded_model() is not None


def test_neo_trains_a_pair_on_its_own_model_and_leaves_it_as_it_was(host_neo, references, capsys):
    """Neo builds every weight inside inference mode, its blocks add residuals in place, its engine prints each
    embedding it uses and notes it for the next infotext (the real Neo's log had a line per step, through its own
    print, which no stdout redirect silences): the run trains through all of that and leaves none."""
    from backend import memory_management
    from backend.args import dynamic_args
    from modules import sd_models

    from extensions_builtin_compat import embeddings, jobs

    sd_models.forge_model_reload()  # as a generation (or the run itself, from Neo's placeholder) loads it
    model = sd_models.model_data.sd_model
    engine = model.text_processing_engine
    with torch.inference_mode():  # a generation's prompt (transformers installs its output hooks at the first call)
        engine(["a photo"])
    before, words = parts_state(model), dict(engine.embeddings.word_embeddings)
    assert all(entry[3] for key, entry in before.items() if not key.endswith(".hooks"))  # inference tensors

    result = jobs.run_training(config(), references)

    assert [f.name for f in result.files] == ["walle.pt", "walle-neg.pt"] and result.step == 2
    load = memory_management.calls[-1]  # the parts loaded whole, inside inference mode as Neo's own loads are
    assert load["inference_mode"] and load["force_full_load"] and len(load["models"]) == 3
    assert_same_parts(before, parts_state(model))
    assert "TI" not in dynamic_args.last_extra_generation_params
    assert "Used Embedding" not in capsys.readouterr().out
    pos, neg = pairfiles.load_pair(host_neo.embeddings_dir, "walle")
    init = {k: v for k, v in pos.vectors.items()}
    assert not torch.equal(pos.vectors["clip_l"], neg.vectors["clip_l"]) and init["clip_l"].shape == (3, 32)
    assert set(engine.embeddings.word_embeddings) == set(words) | {"walle", "walle-neg"}  # read back by the engine
    assert embeddings.pairs() == ["walle"]


def test_a_training_step_reaches_the_vectors_through_neos_engine(host_neo):
    """The gradient reaches the learned vectors through Forge's splice (torch.cat of ``vec``), the UNet's in-place
    residuals and the VAE decode, and nothing else."""
    from extensions_builtin_compat.host_backend_forge import ForgeBackend

    model = host_neo.load_model("sd1")
    backend = ForgeBackend()
    word = torch.randn(2, 32, requires_grad=True)
    with backend.training():
        cond = backend.encode(["a photo of walle"], {"walle": {"clip_l": word}})
        latents = torch.randn(1, 4, 8, 8)
        out = backend.unet(latents, torch.tensor([500]), cond)
        (out.square().mean() + backend.vae_decode(out).square().mean()).backward()
        assert all(p.grad is None for module in parts(model).values() for p in module.parameters())
        with torch.no_grad():
            plain = backend.encode(["a photo of walle"]).context
    assert word.grad is not None and word.grad.abs().sum() > 0
    assert not torch.equal(plain, cond.context.detach())  # the word was spliced in


def test_the_vae_encode_is_the_posterior_mean_not_a_sample(host_neo):
    from extensions_builtin_compat.host_backend_forge import ForgeBackend

    host_neo.load_model("sd1")
    backend = ForgeBackend()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(backend.vae_encode(pixels), backend.vae_encode(pixels))


def test_pairs_from_models_embeddings_bring_their_partner(host_neo):
    write_pair(host_neo.embeddings_dir, "walle", width=32)
    host_neo.load_extension(REPO)
    p, processed = generate(host_neo, prompt="a photo of (walle:1.2)", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, (walle-neg:1.2)"]
    assert "\nNegative prompt: blurry, (walle-neg:1.2)\n" in processed.infotexts[0]
    assert "DreamArtist: walle" in processed.infotexts[0]


def test_sdxl_pairs_are_found_by_the_clip_l_engine(host_neo):
    from extensions_builtin_compat import embeddings

    pos = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}  # the stand-in SDXL's widths
    pairfiles.save_pair(host_neo.embeddings_dir, "walle", pos, {k: -v for k, v in pos.items()})
    host_neo.load_extension(REPO)
    host_neo.load_model("sdxl")
    assert len(embeddings.databases()) == 2 and embeddings.pairs() == ["walle"]
    p, _ = generate(host_neo, prompt="walle at dusk", negative_prompt="")
    assert p.all_negative_prompts == ["walle-neg"]


def test_pairing_can_be_turned_off(host_neo):
    write_pair(host_neo.embeddings_dir, "walle", width=32)
    host_neo.load_extension(REPO)
    p, processed = generate(host_neo, enabled=False, prompt="walle", negative_prompt="")
    assert p.all_negative_prompts == [""] and "DreamArtist: off" in processed.infotexts[0]


def test_neo_trains_an_sdxl_pair_with_adapters_on_its_own_model(host_neo, references):
    """Neo's SDXL: both engines' states side by side and a "vector" of CLIP-G's pooled output and the embedded
    sizes; the pair in the webui's SDXL layout, its adapters on both encoders; the model as it was."""
    from modules import sd_models

    from extensions_builtin_compat import jobs

    model = host_neo.load_model("sdxl")
    assert sd_models.model_data.sd_model is model
    with torch.inference_mode():
        model.get_learned_conditioning(["a photo"])  # transformers installs its output hooks at the first call
    before = parts_state(model)
    result = jobs.run_training(config(adapters=True, unet_lr_pos=0.01, text_lr=0.01), references)
    assert result.step == 2
    pos, neg = pairfiles.load_pair(host_neo.embeddings_dir, "walle")
    assert {k: v.shape[1] for k, v in pos.vectors.items()} == {"clip_l": 32, "clip_g": 48}
    groups = pairfiles.load_adapters(host_neo.embeddings_dir, "walle")
    assert any(name.startswith("clip_l.") for name in groups["te_pos"]) and any(
        name.startswith("clip_g.") for name in groups["te_pos"])
    assert_same_parts(before, parts_state(model))


def test_inference_weights_are_swapped_for_normal_ones_without_holding_the_model_twice(host_neo):
    """A real Neo with an fp32 SDXL was killed for memory when the run held a normal copy of every inference weight:
    the run's normal tensors alias the originals' memory, and the original objects come back after."""
    from extensions_builtin_compat.host_backend import normal_weights

    with torch.inference_mode():
        shared = torch.nn.Linear(3, 3)
        model = torch.nn.Sequential(shared, torch.nn.Linear(3, 3), shared)
    originals = [(p, p.detach().clone()) for p in model.parameters()]
    with normal_weights(model):
        now = list(model.parameters())
        assert not any(p.is_inference() for p in now)
        assert [p.data_ptr() for p in now] == [p.data_ptr() for p, _ in originals]  # nothing held twice
        assert model[0].weight is model[2].weight  # a shared weight stays shared
        model(torch.ones(1, 3, requires_grad=True)).sum().backward()
    for (p, values), now in zip(originals, model.parameters(), strict=True):
        assert now is p and p.is_inference() and torch.equal(p, values)

"""Training through the webui stand-in: the pair lands in the embeddings folder, the webui sees it, and the
host is left exactly as it was (weights, flags, hooks, class-level patches, caches, job state)."""
from __future__ import annotations

import threading

import pytest
import torch
from fakehost.checks import assert_same_state, class_forwards, listing, model_state
from PIL import Image

from dreamartist.config import TrainConfig
from dreamartist.errors import ModelError
from dreamartist.images import prepare_reference
from dreamartist.pairfiles import load_embedding
from dreamartist.trainer import train


@pytest.fixture
def references():
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    image.paste((30, 60, 200), (16, 8, 48, 40))
    return [prepare_reference(image, 64, 64, caption="orange box")]


# The webui's reentrant checkpointing warns for the blocks before the first cross-attention (no input there needs
# a gradient); those blocks have nothing to train, so the warning is expected.
REENTRANT_WARNING = "ignore:None of the inputs have requires_grad=True:UserWarning"


ADAPTERS = dict(adapters=True, adapter_dropout=0.5, unet_lr_pos=0.05, unet_lr_neg=0.05, text_lr=0.05)


def config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(name="walle", steps=3, width=64, height=64, init_words="robot"), **changes})


@pytest.mark.filterwarnings(REENTRANT_WARNING)
def test_training_writes_the_pair_and_leaves_the_host_as_it_was(host, references):
    from modules import processing
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    from extensions_builtin_compat import embeddings, jobs

    Embedding(torch.ones(1, 32), "other").save(str(host.embeddings_dir / "other.pt"))
    model = host.shared.sd_model
    before, forwards = model_state(model), class_forwards()
    assert forwards["CrossAttention"] is not None and all(p.requires_grad for p in model.model.parameters())
    processing.StableDiffusionProcessing.cached_c[:] = ["stale key", "stale cond"]

    result = jobs.run_training(config(gradient_checkpointing=True), references)

    assert [f.name for f in result.files] == ["walle.pt", "walle-neg.pt"] and result.step == 3
    assert_same_state(before, model_state(model))
    assert class_forwards() == forwards and model_hijack.optimization_method == "sdp"
    db = model_hijack.embedding_db
    assert set(db.word_embeddings) == {"other", "walle", "walle-neg"}
    for path in result.files:
        assert torch.equal(db.word_embeddings[path.stem].vec, load_embedding(path).vectors["clip_l"])
    assert embeddings.pairs() == ["walle"]
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert host.shared.state.job == ""


def test_training_through_the_webui_equals_standalone_training(host, references, tmp_path):
    from ldm.standin import build

    from dreamartist.standalone import StandaloneBackend
    from extensions_builtin_compat import jobs

    host.shared.opts.training_xattention_optimizations = True  # both runs use the same attention kernel
    through_webui = jobs.run_training(config(), references)
    fresh = build("sd1")  # the same seeded weights, never hijacked
    for block in fresh.modules():  # diffusers' own blocks do not checkpoint unless asked
        for flag in ("checkpoint", "use_checkpoint"):
            if flag in block.__dict__:
                setattr(block, flag, False)
    standalone = StandaloneBackend(
        family="sd1", unet=fresh.model.diffusion_model.unet, vae=fresh.first_stage_model.vae,
        text_encoder=fresh.cond_stage_model.transformer, tokenizer=fresh.cond_stage_model.tokenizer,
        alphas_cumprod=fresh.alphas_cumprod, device="cpu")
    alone = train(standalone, config(), references, tmp_path / "standalone")
    assert torch.allclose(torch.tensor(through_webui.losses), torch.tensor(alone.losses), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(through_webui.files, alone.files, strict=True):
        assert torch.allclose(load_embedding(ours).vectors["clip_l"], load_embedding(theirs).vectors["clip_l"],
                              rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_optimizations", [False, True])
def test_attention_optimisation_follows_the_webui_training_setting(host, references, use_optimizations):
    from ldm.models import CrossAttention

    from extensions_builtin_compat import jobs

    host.shared.opts.training_xattention_optimizations = use_optimizations
    host.load_model()
    optimised = CrossAttention.__dict__["forward"]
    seen = []
    jobs.run_training(config(steps=2), references,
                      on_progress=lambda p: seen.append(CrossAttention.__dict__.get("forward")))
    assert seen == [optimised if use_optimizations else None] * 2
    assert CrossAttention.__dict__["forward"] is optimised


@pytest.mark.parametrize("options", [{}, ADAPTERS], ids=["pair", "with adapters"])
def test_gradient_checkpointing_changes_memory_not_results(host, references, options):
    """With adapters, the recomputed blocks draw the same dropout masks as the first forward pass."""
    from ldm.models import BasicTransformerBlock, ResBlock

    from extensions_builtin_compat import jobs

    blocks = [m for m in host.shared.sd_model.modules() if isinstance(m, (BasicTransformerBlock, ResBlock))]
    forwards = {cls: cls.__dict__["forward"] for cls in (BasicTransformerBlock, ResBlock)}
    wrapped = []
    plain = jobs.run_training(config(**options), references)
    checkpointed = jobs.run_training(config(gradient_checkpointing=True, overwrite=True, **options), references,
                                     on_progress=lambda p: wrapped.append(sum("forward" in b.__dict__ for b in blocks)))
    assert wrapped == [len(blocks)] * 3 and not any("forward" in b.__dict__ for b in blocks)
    assert {cls: cls.__dict__["forward"] for cls in forwards} == forwards  # no class was patched
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(checkpointed.losses), rtol=1e-5)


def test_the_models_own_checkpointing_is_switched_off_for_training_and_restored(host_v160, references):
    """webui 1.6.0 loads SD1 with use_checkpoint: True; ldm's checkpoint then differentiates the frozen weights
    ("One of the differentiated Tensors does not require grad") unless training switches it off."""
    from ldm.models import BasicTransformerBlock, ResBlock

    from extensions_builtin_compat import jobs

    blocks = [m for m in host_v160.shared.sd_model.modules() if isinstance(m, (BasicTransformerBlock, ResBlock))]
    flags = lambda: [b.__dict__.get("checkpoint", b.__dict__.get("use_checkpoint")) for b in blocks]  # noqa: E731
    assert blocks and all(flags())
    seen = []
    result = jobs.run_training(config(steps=2), references, on_progress=lambda p: seen.append(any(flags())))
    assert result.step == 2 and seen == [False, False] and all(flags())


def lora_deltas(model) -> dict:
    linears = [name for name, m in model.network_layer_mapping.items() if isinstance(m, torch.nn.Linear)]
    generator = torch.Generator().manual_seed(3)
    return {name: torch.randn(model.network_layer_mapping[name].weight.shape, generator=generator) * 0.5
            for name in linears[:: max(len(linears) // 6, 1)]}


def test_a_lora_merged_by_an_earlier_generation_does_not_leak_into_training(host, references):
    from extensions_builtin_compat import jobs

    model = host.shared.sd_model
    clean = jobs.run_training(config(), references)
    host.lora.register_network("style", lora_deltas(model))
    prompt = dict(prompt="<lora:style:1> a photo", seed=5)
    clean_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with_lora = host.process_images(host.txt2img(**prompt)).images[0]
    assert any(not torch.equal(clean_weights[k], v) for k, v in model.state_dict().items())  # merged now

    again = jobs.run_training(config(overwrite=True), references)

    assert again.losses == clean.losses
    assert host.lora.loaded_networks == []
    after = host.process_images(host.txt2img(**prompt)).images[0]
    assert after.tobytes() == with_lora.tobytes()


def test_a_lora_the_settings_add_to_every_prompt_is_refused_with_the_way_out(host, references):
    from extensions_builtin_compat import jobs

    host.lora.register_network("style", lora_deltas(host.shared.sd_model))
    host.shared.opts.sd_lora = "style"  # Settings > "Add network to prompt"
    host.process_images(host.txt2img(prompt="a photo", seed=5))
    assert [n.name for n in host.lora.loaded_networks] == ["style"]
    with pytest.raises(ModelError, match="Add network to prompt"):
        jobs.run_training(config(), references)
    assert listing(host.embeddings_dir) == []


def test_interrupt_stops_after_the_current_step_and_keeps_it(host, references):
    from extensions_builtin_compat import jobs

    result = jobs.run_training(config(steps=5), references, on_progress=lambda p: jobs.interrupt())
    assert (result.stopped, result.step) == ("interrupted", 1)
    assert [f.exists() for f in result.files] == [True, True]


def test_inside_a_running_job_the_job_is_kept_and_previews_are_shown(host, references):
    from extensions_builtin_compat import jobs

    state = host.shared.state
    state.begin(job="task(abc)")
    jobs.run_training(config(steps=2, preview_every=2), references)
    assert (state.job, state.job_no, state.job_count) == ("task(abc)", 2, 2)
    assert "loss" in state.textinfo
    assert state.id_live_preview == 1 and isinstance(state.current_image, Image.Image)


def test_a_second_training_waits_for_the_first(host, references, monkeypatch):
    from extensions_builtin_compat import jobs

    host.load_model()  # before the threads start
    real_lock, b_waiting, release_a, order = jobs._training, threading.Event(), threading.Event(), []

    class WatchedLock:
        def __enter__(self):
            if threading.current_thread().name == "b":
                b_waiting.set()
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

    monkeypatch.setattr(jobs, "_training", WatchedLock())

    def progress(label):
        def report(p):
            order.append((label, p.step))
            if label == "a" and p.step == 1:
                b_waiting.wait(30)
                release_a.wait(30)
        return report

    a, b = (threading.Thread(target=jobs.run_training, name=label,
                             args=(config(name=f"pair{label}", steps=2), references, progress(label)))
            for label in ("a", "b"))
    a.start()
    b.start()
    assert b_waiting.wait(30)
    release_a.set()
    a.join(60)
    b.join(60)
    assert order == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


def test_original_forge_trains_sd1_with_and_without_adapters(host_forge, references):
    from extensions_builtin_compat import jobs

    assert jobs.run_training(config(), references).step == config().steps
    assert jobs.run_training(config(name="eve", adapters=True), references).step == config().steps
    assert (host_forge.embeddings_dir / "eve.dreamartist-lora").is_file()


def test_a_half_precision_vae_decodes_in_float32_for_training_and_is_restored(host, references, monkeypatch):
    """An fp16 decode of the rough z0 estimate of eq. 5 can overflow: training runs the VAE in float32."""
    from extensions_builtin_compat import jobs

    model = host.shared.sd_model
    vae = model.first_stage_model
    vae.half()
    before = model_state(model)
    seen, original = [], type(vae).decode

    def decode(self, z):
        seen.append((z.dtype, next(self.parameters()).dtype))
        return original(self, z)

    monkeypatch.setattr(type(vae), "decode", decode)
    jobs.run_training(config(steps=2, reconstruction=True), references)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert {p.dtype for p in vae.parameters()} == {torch.float16}
    assert_same_state(before, model_state(model))

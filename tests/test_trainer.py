"""The trainer on the tiny random model: gradients, host unchanged, learning, reproducibility, stops, resume."""
from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image

from dreamartist import losses
from dreamartist.config import TrainConfig
from dreamartist.errors import InputError, TrainingStopped
from dreamartist.images import prepare_reference
from dreamartist.objective import NEG, POS, joint_loss
from dreamartist.pairfiles import load_pair
from dreamartist.standalone import build_random_backend
from dreamartist.trainer import Trainer, train

SIZE = 64


@pytest.fixture(scope="module")
def backend():
    return build_random_backend(seed=0)


@pytest.fixture(scope="module")
def references():
    image = Image.new("RGB", (80, 64), (200, 120, 40))
    image.paste((30, 60, 200), (20, 10, 60, 50))
    return [prepare_reference(image, SIZE, SIZE, caption="orange box")]


def config(**changes) -> TrainConfig:
    values = dict(name="walle", steps=4, width=SIZE, height=SIZE, init_words="robot")
    return TrainConfig(**{**values, **changes})


def snapshot(backend):
    """Everything training must leave as it was: weights (bitwise), requires_grad flags, modes, hooks."""
    state = {}
    for index, module in enumerate(backend.modules):
        for name, tensor in module.state_dict().items():
            state[f"{index}.{name}"] = tensor.clone()
    flags = [p.requires_grad for m in backend.modules for p in m.parameters()]
    modes = [m.training for root in backend.modules for m in root.modules()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for root in backend.modules for m in root.modules()]
    return state, flags, modes, hooks


def assert_same(before, after):
    state_a, *rest_a = before
    state_b, *rest_b = after
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert rest_a == rest_b


@contextlib.contextmanager
def ready(trainer: Trainer):
    """The trainer as ``run`` leaves it before the first step: parameters, optimiser and latents in place."""
    trainer._start()
    with trainer.backend.training():
        trainer.latents = [trainer.backend.vae_encode(r.pixels.unsqueeze(0)) for r in trainer.references]
        yield trainer


def test_gradients_reach_only_the_pseudo_words(backend, references, tmp_path):
    trainer = Trainer(backend, config(reconstruction=False), references, tmp_path)
    with ready(trainer):
        joint_loss([trainer.part()])[0].backward()
        model_grads = [p for m in backend.modules for p in m.parameters() if p.grad is not None]
    assert not model_grads
    for vectors in (trainer.params[POS], trainer.params[NEG]):
        for tensor in vectors.values():
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_reconstruction_term_alone_gives_gradient_to_both_words(backend, references, tmp_path):
    trainer = Trainer(backend, config(reconstruction=True, rec_weight=1.0), references, tmp_path)
    with ready(trainer):
        z0 = trainer.latents[0]
        t = torch.tensor([500])
        abar = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = losses.add_noise(z0, torch.randn_like(z0), abar)
        cond = backend.encode(["a photo of walle-neg", "a photo of walle"], trainer.objective.words(trainer.params))
        out_neg, out_pos = backend.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), cond).chunk(2)
        z0_hat = losses.predict_z0("epsilon", losses.guide(out_neg, out_pos, torch.tensor([3.0])), z_t, abar)
        losses.reconstruction_loss(backend.vae_decode(z0_hat), references[0].pixels.unsqueeze(0)).backward()
    for vectors in trainer.params.values():
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())


def test_model_is_bit_identical_after_training(backend, references, tmp_path):
    before = snapshot(backend)
    result = train(backend, config(steps=3, gradient_checkpointing=True), references, tmp_path)
    assert result.step == 3 and len(result.files) == 2
    assert_same(before, snapshot(backend))


def test_model_is_restored_after_a_failing_run(backend, references, tmp_path, monkeypatch):
    before = snapshot(backend)
    calls = {"n": 0}
    original = type(backend).unet

    def failing_unet(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(self, *args)

    monkeypatch.setattr(type(backend), "unet", failing_unet)
    with pytest.raises(RuntimeError, match="boom"):
        train(backend, config(), references, tmp_path)
    assert_same(before, snapshot(backend))


def probe_loss(backend, trainer, probes) -> float:
    """L_da on fixed (t, noise) pairs, so that runs can be compared."""
    total = 0.0
    words = trainer.objective.words(trainer.params)
    z0 = backend.vae_encode(trainer.references[0].pixels.unsqueeze(0))
    with torch.no_grad():
        cond = backend.encode(["a photo of a walle-neg", "a photo of a walle"], words)
        for t, noise in probes:
            abar = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
            z_t = losses.add_noise(z0, noise, abar)
            out_neg, out_pos = backend.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), cond).chunk(2)
            total += losses.da_loss(losses.guide(out_neg, out_pos, torch.tensor([3.0])), noise).item()
    return total / len(probes)


def test_a_few_dozen_steps_lower_the_loss_on_a_fixed_probe(backend, references, tmp_path):
    generator = torch.Generator().manual_seed(123)
    probes = [(torch.tensor([t]), torch.randn((1, 4, 8, 8), generator=generator)) for t in range(25, 1000, 50)]
    # The tiny model is random and its text pathway weak: eight images a step keep the gradient noise below
    # the improvement, which is small but systematic (about 0.7% on this probe).
    trainer = Trainer(backend, config(steps=40, lr=0.01, batch_size=8, reconstruction=False,
                                      template="a photo of a [name]"), references, tmp_path)
    trainer._start()
    before = probe_loss(backend, trainer, probes)
    trainer.run()  # starts again from the same seeded initial vectors
    after = probe_loss(backend, trainer, probes)
    assert after < before * 0.996, (before, after)


def test_same_seed_same_pair(backend, references, tmp_path):
    train(backend, config(seed=7), references, tmp_path / "a")
    train(backend, config(seed=7), references, tmp_path / "b")
    train(backend, config(seed=8), references, tmp_path / "c")
    a, b, c = (load_pair(tmp_path / d, "walle") for d in "abc")
    for x, y, z in zip(a, b, c):
        assert all(torch.equal(x.vectors[k], y.vectors[k]) for k in x.vectors)
        assert not all(torch.equal(x.vectors[k], z.vectors[k]) for k in x.vectors)


def test_resume_continues_exactly_where_it_stopped(backend, references, tmp_path):
    train(backend, config(steps=6, seed=3, ema_pos=0.9), references, tmp_path / "straight")
    train(backend, config(steps=3, seed=3, ema_pos=0.9), references, tmp_path / "split")
    result = train(backend, config(steps=6, seed=3, ema_pos=0.9, resume=True), references, tmp_path / "split")
    assert result.step == 6 and len(result.losses) == 6
    for x, y in zip(load_pair(tmp_path / "straight", "walle"), load_pair(tmp_path / "split", "walle")):
        assert x.step == y.step == 6
        assert all(torch.allclose(x.vectors[k], y.vectors[k], atol=1e-6) for k in x.vectors)


def test_gradient_accumulation_averages_every_micro_batch(backend, references, tmp_path, monkeypatch):
    trainer = Trainer(backend, config(grad_accum=3, batch_size=2, reconstruction=False), references, tmp_path)
    with ready(trainer):
        state = trainer.generator.get_state()
        expected = [torch.zeros_like(p) for p in trainer.optimizer.param_groups[0]["params"]]
        for _ in range(3):
            loss = joint_loss([trainer.part()])[0]
            grads = torch.autograd.grad(loss, trainer.optimizer.param_groups[0]["params"])
            expected = [e + g / 3 for e, g in zip(expected, grads)]
        trainer.generator.set_state(state)
        seen = {}
        monkeypatch.setattr(trainer.optimizer, "step", lambda: seen.update(
            grads=[p.grad.clone() for p in trainer.optimizer.param_groups[0]["params"]]))
        trainer._optimizer_step()
    assert all(torch.allclose(e, s, atol=1e-6) for e, s in zip(expected, seen["grads"]))


def test_nan_loss_stops_and_keeps_the_last_good_pair(backend, references, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = type(backend).unet

    def unet_going_nan(self, latents, t, cond):
        calls["n"] += 1
        out = original(self, latents, t, cond)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(type(backend), "unet", unet_going_nan)
    with pytest.raises(TrainingStopped, match=r"nan at step 3.*last good pair \(step 2\)"):
        train(backend, config(steps=5, reconstruction=False), references, tmp_path)
    pos, neg = load_pair(tmp_path, "walle")
    assert pos.step == 2
    assert all(torch.isfinite(v).all() for f in (pos, neg) for v in f.vectors.values())


def test_stop_flag_ends_the_run_and_writes_the_pair(backend, references, tmp_path):
    seen = []
    result = train(backend, config(steps=10), references, tmp_path, on_progress=seen.append,
                   should_stop=lambda: len(seen) >= 2)
    assert result.stopped == "interrupted" and result.step == 2
    assert [f.name for f in result.files] == ["walle.pt", "walle-neg.pt"]
    assert seen[-1].step == 2 and seen[-1].total == 10 and seen[-1].eta_seconds >= 0


def test_previews_are_images_at_the_training_size(backend, references, tmp_path):
    seen = []
    train(backend, config(steps=2, preview_every=2, gamma="1.5-3.0:cos"), references, tmp_path,
          on_progress=seen.append)
    assert seen[0].preview is None and seen[1].preview is not None
    assert seen[1].preview.size == (2 * SIZE, 2 * SIZE)  # the first four template lines, in a 2x2 grid


def test_existing_embedding_is_never_overwritten(backend, references, tmp_path):
    (tmp_path / "walle-neg.safetensors").write_bytes(b"precious")
    with pytest.raises(InputError, match="already has an embedding named walle or walle-neg"):
        train(backend, config(), references, tmp_path)
    with pytest.raises(InputError, match="'walle' already exists"):
        train(backend, config(), references, tmp_path / "other", existing_names=["Walle"])
    assert (tmp_path / "walle-neg.safetensors").read_bytes() == b"precious"
    assert not (tmp_path / "walle.pt").exists()


def test_v_prediction_model_trains_against_v(references, tmp_path, monkeypatch):
    backend = build_random_backend(seed=1)
    backend.prediction_type = "v_prediction"
    seen = {}
    original = losses.target

    def spy(prediction_type, *args):
        seen["type"] = prediction_type
        return original(prediction_type, *args)

    monkeypatch.setattr(losses, "target", spy)
    result = train(backend, config(steps=2), references, tmp_path)
    assert seen["type"] == "v_prediction" and result.final_loss is not None


class _InfiniteGradient(torch.autograd.Function):
    """The value passes unchanged; the gradient comes back infinite, as an fp16 overflow does."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_with_loss_scaling_overflowing_gradients_stop_the_run_too(backend, references, tmp_path, monkeypatch):
    """fp16 loss scaling skips a step whose gradients overflowed and lowers the scale; when every step overflows
    the same guard as without scaling stops the run, keeping the last good pair."""
    from dreamartist import trainer as trainer_module

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -15)
    monkeypatch.setattr(trainer_module, "_grad_scaler", lambda device: scaler)
    real, calls = trainer_module.joint_loss, []

    def overflowing(parts):
        calls.append(1)
        losses = real(parts)
        return [_InfiniteGradient.apply(loss) for loss in losses] if len(calls) > 2 else losses

    monkeypatch.setattr(trainer_module, "joint_loss", overflowing)
    with pytest.raises(TrainingStopped, match=r"^The gradients overflowed at every loss scale at step 4; training "
                                              r"stopped\. The last good pair \(step 3\)"):
        train(backend, config(steps=10, reconstruction=False, save_every=1), references, tmp_path)
    pos, _ = load_pair(tmp_path, "walle")  # step 3 was skipped by the scaler: the values of step 2, finite
    assert pos.step == 3 and all(torch.isfinite(v).all() for v in pos.vectors.values())


def test_runs_stepped_together_give_the_pairs_each_gives_alone(backend, references, tmp_path):
    """One text-encoder and one UNet call for several runs (different gammas, the reconstruction loss on and off,
    adapters on one) change no run's result: each pair, adapters included, is the one it trains alone."""
    from dreamartist.pairfiles import load_adapters
    from dreamartist.trainer import train_together

    configs = [config(name="walle", gamma="3"),
               config(name="eve", gamma="1", reconstruction=False, pos_len=1, lr=0.005),
               config(name="mo", gamma="5", adapters=True, adapter_dropout=0.0, seed=3)]
    alone = [train(backend, c, references, tmp_path / "alone" / c.name) for c in configs]
    before = snapshot(backend)
    together = train_together([Trainer(backend, c, references, tmp_path / "together" / c.name) for c in configs])
    assert_same(before, snapshot(backend))
    for c, one, joint in zip(configs, alone, together):
        assert joint.step == one.step == 4
        assert joint.losses == pytest.approx(one.losses, rel=1e-4)
        for file_alone, file_joint in zip(load_pair(tmp_path / "alone" / c.name, c.name),
                                          load_pair(tmp_path / "together" / c.name, c.name)):
            for key, vectors in file_alone.vectors.items():
                torch.testing.assert_close(file_joint.vectors[key], vectors, rtol=1e-4, atol=1e-6)
    adapters_alone, adapters_joint = (load_adapters(tmp_path / where / "mo", "mo") for where in ("alone", "together"))
    assert adapters_alone.keys() == adapters_joint.keys() and adapters_alone
    for group, tensors in adapters_alone.items():
        for key, value in tensors.items():
            torch.testing.assert_close(adapters_joint[group][key], value, rtol=1e-4, atol=1e-6)


def test_runs_stepped_together_need_distinct_names(backend, references, tmp_path):
    from dreamartist.trainer import train_together

    with pytest.raises(ValueError, match="distinct names"):
        train_together([Trainer(backend, config(), references, tmp_path / str(i)) for i in range(2)])


def test_resuming_a_pair_that_does_not_exist_leaves_no_folder_or_lock(backend, references, tmp_path):
    with pytest.raises(InputError, match="no pair walle to resume"):
        train(backend, config(resume=True), references, tmp_path / "emb")
    assert not (tmp_path / "emb").exists()

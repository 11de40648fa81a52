"""PN adapters (DreamArtist++): each branch's LoRA acts on its own rows only, in the UNet and the text encoder,
in value and in gradient; they train with the pair, are saved beside it, and leave the model as it was."""
from __future__ import annotations

import collections

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from dreamartist import adapters, recomputed_linear, seeded_dropout
from dreamartist.adapters import Lora, installed, row_labels
from dreamartist.backend import Conditioning
from dreamartist.config import TrainConfig
from dreamartist.images import prepare_reference
from dreamartist.layer_names import text_name, unet_name
from dreamartist.pairfiles import load_adapters, load_pair
from dreamartist.trainer import train


def random_adapter(layers, rank: int, seed: int) -> dict[str, Lora]:
    """Non-identity adapters (up is not zero), so that every test can see them act."""
    g = torch.Generator().manual_seed(seed)
    return {name: Lora(torch.randn(rank, m.in_features, generator=g) * 0.2,
                       torch.randn(m.out_features, rank, generator=g) * 0.2, alpha=float(rank))
            for name, m in layers.items()}


@pytest.fixture
def pn(random_backend):
    layers = random_backend.adapter_layers()
    return {part: {"pos": random_adapter(layers[part], 2, 1), "neg": random_adapter(layers[part], 2, 2)}
            for part in (adapters.UNET, adapters.TEXT)}


def patches(pn, branches=("pos", "neg"), strength=1.0):
    return {part: {b: (pn[part][b], strength) for b in branches} for part in pn}


def test_a_batched_unet_call_equals_each_row_with_only_its_own_adapter(random_backend, pn):
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([300, 300])
    with torch.no_grad(), random_backend.patched(patches(pn)):
        batched = random_backend.unet(latents, t, Conditioning(context, branches=("neg", "pos")))
    with torch.no_grad():
        with random_backend.patched(patches(pn, ("neg",))):
            neg = random_backend.unet(latents[:1], t[:1], Conditioning(context[:1], branches=("neg",)))
        with random_backend.patched(patches(pn, ("pos",))):
            pos = random_backend.unet(latents[1:], t[1:], Conditioning(context[1:], branches=("pos",)))
        plain = random_backend.unet(latents, t, Conditioning(context))
    torch.testing.assert_close(batched, torch.cat([neg, pos]), atol=1e-5, rtol=0)
    assert (batched - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # both rows changed by their adapter


def test_a_batched_text_encoder_call_equals_each_prompt_with_only_its_own_adapter(random_backend, pn):
    prompts = ["a photo of a cat", "a dog on the moon"]
    with torch.no_grad(), random_backend.patched(patches(pn)):
        batched = random_backend.encode(prompts, branches=("neg", "pos")).context
        neg = random_backend.encode(prompts[:1], branches=("neg",)).context
        pos = random_backend.encode(prompts[1:], branches=("pos",)).context
    with torch.no_grad():
        plain = random_backend.encode(prompts).context
    torch.testing.assert_close(batched, torch.cat([neg, pos]), atol=1e-5, rtol=0)
    assert (batched - plain).abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("loss_rows, still", [(slice(1, 2), "neg"), (slice(0, 1), "pos")])
def test_an_adapter_gets_exactly_zero_gradient_from_the_other_branchs_rows(random_backend, pn, loss_rows, still):
    for part in pn.values():
        for adapter in part.values():
            for lora in adapter.values():
                lora.down.requires_grad_(True)
                lora.up.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with random_backend.patched(patches(pn)):
        cond = random_backend.encode(["a photo of a cat", "a photo of a cat"], branches=("neg", "pos"))
        out = random_backend.unet(latents, torch.tensor([500, 500]), cond)
    out[loss_rows].square().mean().backward()
    acting = "pos" if still == "neg" else "neg"
    for part in pn.values():
        for lora in part[still].values():
            assert torch.count_nonzero(lora.up.grad) == 0 and torch.count_nonzero(lora.down.grad) == 0
        assert any(torch.count_nonzero(lora.up.grad) for lora in part[acting].values())


def test_hooks_leave_with_the_block_and_unlabelled_calls_are_untouched(random_backend, pn):
    layers = random_backend.adapter_layers()
    modules = [m for part in layers.values() for m in part.values()]
    with random_backend.patched(patches(pn)):
        assert all(len(m._forward_hooks) == 1 for m in modules)
        with torch.no_grad():
            labelled_off = random_backend.encode(["a cat"]).context  # no branches: no adapter acts
    assert all(not m._forward_hooks for m in modules)
    with torch.no_grad():
        torch.testing.assert_close(labelled_off, random_backend.encode(["a cat"]).context, atol=0, rtol=0)


def test_strength_scales_the_delta_and_labels_may_name_several_adapters():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    a = Lora(torch.randn(1, 4), torch.randn(3, 1), alpha=2.0)  # scale alpha / rank = 2
    b = Lora(torch.randn(1, 4), torch.randn(3, 1), alpha=1.0)
    with installed({"l": layer}, {"a": ({"l": a}, 0.5), "b": ({"l": b}, 1.0)}), \
            row_labels([frozenset({"a", "b"}), "b"]), torch.no_grad():
        out = layer(x)
    base = x @ layer.weight.T + layer.bias
    expected = base + torch.stack([0.5 * 2 * (x[0] @ a.down.T @ a.up.T) + x[0] @ b.down.T @ b.up.T,
                                   x[1] @ b.down.T @ b.up.T])
    torch.testing.assert_close(out, expected)


def test_dropout_drops_elements_of_the_update_not_of_the_input():
    """HCP-Diffusion's LoraLayer: dropout(up(down(x))). Each output element is then either 0 or the whole update
    divided by 1 - p; dropout on the input would mix kept and dropped inputs into every element."""
    layer, x = torch.nn.Linear(8, 6), torch.randn(4, 8)
    lora = Lora(torch.randn(2, 8), torch.randn(6, 2), alpha=2.0)
    with installed({"l": layer}, {"a": ({"l": lora}, 1.0)}, dropout=0.5, training=True), \
            row_labels(["a", "", "a", ""]), torch.no_grad():
        torch.manual_seed(0)
        update = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
    full = (x @ lora.down.T @ lora.up.T) / 0.5
    kept = (update - full).abs() < 1e-5
    assert (kept | (update.abs() < 1e-6)).all()
    assert kept[[0, 2]].any() and (~kept[[0, 2]]).any() and (update[[1, 3]] == 0).all()


def test_dropout_keeps_its_share_of_elements_and_scales_by_exactly_that_share():
    """p = 0.1 resolves to a kept share of 58982 / 65536 (16 random bits per element); the kept elements are the
    update divided by exactly that share, and about that share of them is kept (4 standard deviations)."""
    layer, x = torch.nn.Linear(8, 4096), torch.randn(16, 8)
    lora = Lora(torch.randn(2, 8), torch.randn(4096, 2), alpha=2.0)
    torch.manual_seed(3)
    with installed({"l": layer}, {"a": ({"l": lora}, 1.0)}, dropout=0.1, training=True), \
            row_labels(["a"] * 16), torch.no_grad():
        update = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
    keep = 58982 / 65536
    kept = update != 0
    torch.testing.assert_close(update[kept], ((x @ lora.down.T @ lora.up.T) / keep)[kept])
    n = kept.numel()
    assert abs(kept.sum().item() - keep * n) < 4 * (n * keep * (1 - keep)) ** 0.5


def test_training_keeps_no_copy_of_a_layers_input_for_the_adapters():
    """The rows are picked after the rank-r projection: of the input's width, autograd keeps only the input itself
    and the weights, never a copy of some of its rows (nor of the weights); of the output's width, nothing (no
    update, no mask)."""
    layer, x = torch.nn.Linear(64, 48), torch.randn(4, 64, requires_grad=True)
    pn = {branch: Lora(torch.randn(1, 64, requires_grad=True), torch.randn(48, 1, requires_grad=True), 1.0)
          for branch in ("pos", "neg")}
    saved = []
    with installed({"l": layer}, {b: ({"l": pn[b]}, 1.0) for b in pn}, dropout=0.1, training=True), \
            row_labels(["neg", "neg", "pos", "pos"]), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    own = {t.untyped_storage().data_ptr() for t in (x, layer.weight, *(t for lora in pn.values()
                                                                       for t in (lora.down, lora.up)))}
    kept = [t for t in saved if t.untyped_storage().data_ptr() not in own]
    assert not [tuple(t.shape) for t in kept if t.shape[-1] in (64, 48)]
    assert pn["pos"].down.grad.abs().sum() > 0 and pn["neg"].up.grad.abs().sum() > 0


def test_training_in_a_lower_precision_keeps_no_cast_of_the_adapters_weights():
    """A float16 model trains float32 adapters: the node casts their stacks for its matmuls and makes them again in
    the backward pass, so autograd keeps nothing of the weights' size in the model's dtype through the step (on
    SD 1.5 that was 76 MiB at a step's peak); the gradients are those of the weights kept."""
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    pn = {branch: Lora(torch.randn(3, 64, generator=g).requires_grad_(True),
                       torch.randn(48, 3, generator=g).requires_grad_(True), 3.0) for branch in ("neg", "pos")}
    saved = []
    with installed({"l": layer}, {b: ({"l": pn[b]}, 1.0) for b in pn}), row_labels(["neg", "neg", "pos", "pos"]), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.float().sum().backward()
    assert not [tuple(t.shape) for t in saved if t.dtype == torch.bfloat16 and t.shape[-2:] in ((3, 64), (48, 3))]
    for branch, rows in (("neg", slice(0, 2)), ("pos", slice(2, 4))):
        lora = pn[branch]
        ones = torch.ones(2, 48)
        h = x[rows].float() @ lora.down.detach().to(torch.bfloat16).float().T
        torch.testing.assert_close(lora.up.grad, ones.T @ h, rtol=2e-2, atol=2e-2)


def transformer_block(kind: str):
    """A transformer block of the real libraries (SD's UNet, CLIP's text encoder), a call of it, its adapted
    layers by name, and the modules whose outputs are adapted layers' inputs: LayerNorms and the activation that
    multiplies (GEGLU, quick GELU)."""
    if kind == "unet":
        from diffusers.models.attention import BasicTransformerBlock
        block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12)
        context = torch.randn(4, 3, 12)
        call = lambda x: block(x, encoder_hidden_states=context)  # noqa: E731
        feeding = [block.norm1, block.norm3, block.ff.net[0]]
    else:
        from transformers import CLIPTextConfig
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer
        block = CLIPEncoderLayer(CLIPTextConfig(hidden_size=16, intermediate_size=64, num_attention_heads=2,
                                                hidden_act="quick_gelu"))
        call = lambda x: block(x, None)  # noqa: E731
        feeding = [block.layer_norm1, block.layer_norm2, block.mlp.activation_fn]
    layers = {name: m for name, m in block.named_modules() if adapters.TARGETS[adapters.UNET if kind == "unet"
                                                                               else adapters.TEXT].search("." + name)}
    return block.requires_grad_(False), call, layers, feeding


def adapter_run(call, layers, x, pn, autocast: bool = False):
    """The gradients of a training step with ``pn`` on ``layers``, and the tensors autograd kept."""
    saved = []
    torch.manual_seed(1)
    with installed(layers, {b: (pn[b], 1.0) for b in pn}, dropout=0.1, training=True), \
            row_labels(["neg", "neg", "pos", "pos"]), torch.autocast("cpu", torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = call(x)
    out.float().sin().sum().backward()
    tensors = [t for adapter in pn.values() for lora in adapter.values() for t in (lora.down, lora.up)] + [x]
    grads = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return grads, saved


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["unet", "text_encoder"])
def test_adapted_layers_inputs_are_recomputed_from_what_autograd_keeps_not_kept(kind, autocast, monkeypatch):
    """A LayerNorm's output (attention's and the feed-forward's input) and the feed-forward's product (GEGLU's
    h * gelu(g), CLIP's h * sigmoid(1.702 h)) are made again in the adapters' backward pass from what their own
    operations keep: the gradients are those of the plain F.linear path, also under autocast."""
    torch.manual_seed(0)
    block, call, layers, feeding = transformer_block(kind)
    assert len(layers) == 6
    x = torch.randn(4, 5, 16, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    pn = {branch: {name: Lora(torch.randn(2, m.in_features, generator=g).requires_grad_(),
                              torch.randn(m.out_features, 2, generator=g).requires_grad_(), 2.0)
                   for name, m in layers.items()} for branch in ("pos", "neg")}
    fed = []  # the outputs themselves, so that no kept tensor can take their memory over
    for module in feeding:
        module.register_forward_hook(lambda module, inputs, output: fed.append(output))

    def inputs_kept():
        fed.clear()
        grads, saved = adapter_run(call, layers, x, pn, autocast)
        assert len(fed) == len(feeding)
        storages = {t.untyped_storage().data_ptr() for t in saved}
        return grads, [t for t in fed if t.untyped_storage().data_ptr() in storages]

    grads, kept = inputs_kept()
    with monkeypatch.context() as plain:
        plain.setattr(recomputed_linear, "_recipe", lambda x: None)
        plain_grads, plain_kept = inputs_kept()
    # autocast's F.linear keeps its bfloat16 copies of the float32 norm outputs instead of them
    assert not kept and len(plain_kept) == (1 if autocast else len(feeding))
    for got, expected in zip(grads, plain_grads):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **({"rtol": 2e-2, "atol": 2e-2} if autocast else {}))


def test_adapters_from_files_are_cast_to_the_layer_input_once_per_install_not_on_every_call():
    """Generation's adapters come from files (CPU tensors, float32 or float16): each is moved to where the layer's
    input is on its first call only, not copied to the GPU again for every layer and step."""
    layer, x = torch.nn.Linear(8, 8).double(), torch.randn(3, 8, dtype=torch.float64)
    lora = Lora(torch.randn(2, 8), torch.randn(8, 2), alpha=2.0)  # float32 against the float64 input

    def copies_in(call):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            out = call()
        return out, sum(event.count for event in profile.key_averages() if event.key == "aten::_to_copy")

    with installed({"l": layer}, {"a": ({"l": lora}, 0.5)}), row_labels(["a"] * 3), torch.no_grad():
        (first, first_copies), (second, second_copies) = copies_in(lambda: layer(x)), copies_in(lambda: layer(x))
    assert (first_copies, second_copies) == (2, 0)
    update = 0.5 * x @ lora.down.double().T @ lora.up.double().T  # strength 0.5, alpha / rank 1
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias) + update
    torch.testing.assert_close(second, expected)
    torch.testing.assert_close(first, expected)


@pytest.mark.parametrize("dim, dtype", [(0, torch.float64), (1, torch.float64), (0, torch.float32)])
def test_generation_adds_each_update_into_its_rows_as_the_training_path_computes_it(dim, dtype):
    """In place into the output (rows along dimension 0 fused into addmm; sequence-first rows along 1; an output
    in another dtype than the input, as under autocast): the same update as the differentiable path."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    lora = Lora(down, up, alpha=4.0)
    x = torch.randn(4, 4, 8, generator=g, dtype=torch.float64)
    output = torch.randn(4, 4, 6, generator=g, dtype=torch.float64).to(dtype)
    run = (1, 3)
    expected = output.clone()
    expected.narrow(dim, 1, 2).add_(lora.delta(x, [run], dim, strength=0.7)[0])
    lora.add_to(output, x, run, dim, strength=0.7)
    torch.testing.assert_close(output, expected)
    assert output.narrow(dim, 0, 1).equal(expected.narrow(dim, 0, 1))


def test_dropout_backward_uses_the_forward_mask_and_keeps_none():
    """The gradient reaching the adapter passes through exactly the elements the forward kept (scaled by 1 / (1 - p)),
    and autograd keeps nothing as large as the output: the mask is drawn again from its seed."""
    layer, x = torch.nn.Linear(16, 32), torch.randn(3, 16)
    lora = Lora(torch.randn(2, 16), torch.randn(32, 2, requires_grad=True), alpha=2.0)
    weights = torch.randn(3, 32)
    saved = []
    torch.manual_seed(1)
    with installed({"l": layer}, {"a": ({"l": lora}, 1.0)}, dropout=0.25, training=True), row_labels(["a"] * 3):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = layer(x)
        update = out - torch.nn.functional.linear(x, layer.weight, layer.bias).detach()
        (update * weights).sum().backward()
    kept = (update.detach() != 0).float() / 0.75
    assert 0 < kept.count_nonzero() < kept.numel()
    torch.testing.assert_close(lora.up.grad, (kept * weights).T @ (x @ lora.down.T))
    assert not [tuple(t.shape) for t in saved if t.numel() >= update.numel()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's mask: needs CUDA")
def test_a_gpu_draws_the_dropout_mask_in_one_kernel_with_its_share_and_again_from_its_seed():
    like = torch.empty(2, 4096, 64, device="cuda")
    with KernelOps() as counted:
        mask = seeded_dropout.kept(like, 58982, seed=5)
    assert dict(counted.ops) == {"bernoulli_": 1} and mask.dtype == torch.bool
    assert mask.equal(seeded_dropout.kept(like, 58982, seed=5)) and not mask.equal(seeded_dropout.kept(like, 58982, 6))
    keep, n = 58982 / 65536, mask.numel()
    assert abs(mask.sum().item() - keep * n) < 4 * (n * keep * (1 - keep)) ** 0.5


class KernelOps(TorchDispatchMode):
    """The operations dispatched inside the block that compute something (views and allocations left out): what a
    GPU launches a kernel for."""
    METADATA = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unbind", "detach",
                "alias", "empty", "new_empty", "_local_scalar_dense", "unsqueeze", "randint"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.METADATA:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def normed_layer_step(adapter_labels: dict[str, list[int]], generating: bool = False):
    """A LayerNorm-fed Linear (as attention and feed-forward layers are) in float64 with an adapter per label
    acting on its rows; its output, the gradients and the kernel operations of the forward pass (and, training,
    the backward pass)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    norm, layer = torch.nn.LayerNorm(16).double(), torch.nn.Linear(16, 24).double().requires_grad_(False)
    x = torch.randn(4, 5, 16, generator=g, dtype=torch.float64, requires_grad=not generating)
    labels = [""] * 4
    pn = {}
    for label, rows in adapter_labels.items():
        pn[label] = Lora(torch.randn(2, 16, generator=g, dtype=torch.float64).requires_grad_(not generating),
                         torch.randn(24, 2, generator=g, dtype=torch.float64).requires_grad_(not generating), 2.0)
        for row in rows:
            labels[row] = label
    with installed({"l": layer}, {b: ({"l": pn[b]}, 0.7) for b in pn}), row_labels(labels), \
            torch.set_grad_enabled(not generating):
        layer(norm(x))  # generation stacks the adapters on the first call
        with KernelOps() as counted:
            out = layer(norm(x))
            if not generating:
                out.sin().sum().backward()
    grads = [t.grad for t in (x, *(w for lora in pn.values() for w in (lora.down, lora.up)))]
    return out, grads, counted.ops


@pytest.mark.parametrize("generating", [False, True])
def test_branches_on_equal_blocks_of_rows_cost_the_kernels_of_one_adapter_and_match_the_per_adapter_path(
        generating, monkeypatch):
    """A training call's [S^n; S^p] rows and a CFG call's [cond; uncond] rows: each step of the LoRA is one batched
    matmul over both branches, so two adapters launch exactly the kernels one adapter on all rows does; the
    values and gradients are those of the per-adapter path."""
    pn_rows = {"neg": [0, 1], "pos": [2, 3]}
    out, grads, ops = normed_layer_step(pn_rows, generating)
    _, _, one_adapter_ops = normed_layer_step({"a": [0, 1, 2, 3]}, generating)
    assert ops == one_adapter_ops
    assert ops["bmm"] + ops["baddbmm"] + ops["baddbmm_"] == (2 if generating else 6)
    with monkeypatch.context() as per_adapter:
        per_adapter.setattr(adapters, "_blocks", lambda runs, rows: None)
        expected, expected_grads, per_adapter_ops = normed_layer_step(pn_rows, generating)
    assert sum(per_adapter_ops.values()) > sum(ops.values())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_generation_batches_the_branches_under_autocast_where_the_input_is_a_float32_norm_output(monkeypatch):
    """Under autocast a LayerNorm's output stays float32 and the layer's output is bfloat16: both branches still
    take one batched matmul pair (after one cast of the input), adding what the per-adapter path adds."""
    torch.manual_seed(0)
    norm, layer = torch.nn.LayerNorm(16), torch.nn.Linear(16, 24).requires_grad_(False)
    x = torch.randn(4, 5, 16)
    pn = {b: {"l": Lora(torch.randn(2, 16), torch.randn(24, 2), 2.0)} for b in ("pos", "neg")}

    def generate():
        with installed({"l": layer}, {b: (pn[b], 0.8) for b in pn}), row_labels(["pos", "pos", "neg", "neg"]), \
                torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            layer(norm(x))
            with KernelOps() as counted:
                return layer(norm(x)), counted.ops

    out, ops = generate()
    assert out.dtype == torch.bfloat16 and ops["bmm"] == ops["baddbmm_"] == 1
    with monkeypatch.context() as per_adapter:
        per_adapter.setattr(adapters, "_blocks", lambda runs, rows: None)
        expected, per_adapter_ops = generate()
    assert per_adapter_ops["bmm"] == 0
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path, name", [
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("input_blocks.8.1.transformer_blocks.0.ff.net.2", "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2"),
    ("middle_block.1.transformer_blocks.0.attn2.to_v", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"),
    ("output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
     "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
     "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("input_blocks.1.0.in_layers.2", None),
])
def test_unet_names_are_the_same_for_ldm_and_diffusers_modules(path, name):
    assert unet_name(path) == name


@pytest.mark.parametrize("path, name", [
    ("wrapped.transformer.text_model.encoder.layers.3.self_attn.k_proj",
     "text_model.encoder.layers.3.self_attn.k_proj"),
    ("encoder.layers.0.mlp.fc2", "text_model.encoder.layers.0.mlp.fc2"),  # transformers 5: no text_model level
    ("wrapped.model.transformer.resblocks.22.mlp.c_fc", "text_model.encoder.layers.22.mlp.fc1"),
    ("wrapped.model.transformer.resblocks.0.attn.out_proj", "text_model.encoder.layers.0.self_attn.out_proj"),
    ("wrapped.model.transformer.resblocks.0.attn", None),
])
def test_text_encoder_names_are_the_same_for_transformers_and_openclip(path, name):
    assert text_name(path) == name


def test_training_with_adapters_writes_them_beside_the_pair_and_leaves_the_model(random_backend, tmp_path):
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    references = [prepare_reference(image, 64, 64)]
    before = {k: v.clone() for m in random_backend.modules for k, v in m.state_dict().items()}
    config = TrainConfig(name="walle", steps=3, width=64, height=64, adapters=True, reconstruction=False,
                         unet_lr_pos=1e-2, unet_lr_neg=1e-2, text_lr=1e-2)
    result = train(random_backend, config, references, tmp_path)
    assert [f.name for f in result.files] == ["walle.pt", "walle-neg.pt"]
    saved = load_adapters(tmp_path, "walle")
    layers = random_backend.adapter_layers()
    for part in (adapters.UNET, adapters.TEXT):
        for branch in ("pos", "neg"):
            group = saved[f"{part}_{branch}"]
            assert {key.rsplit(".", 1)[0] for key in group} == set(layers[part])
            assert any(v.abs().sum() > 0 for k, v in group.items() if k.endswith("lora_up"))  # it learned
    ranks = {k.rsplit(".", 1)[0]: v.shape[0] for k, v in saved["unet_pos"].items() if k.endswith("lora_down")}
    assert ranks == {name: max(1, round(0.01875 * m.out_features)) for name, m in layers[adapters.UNET].items()}
    assert all(v.shape[0] == 2 for k, v in saved["te_pos"].items() if k.endswith("lora_down"))
    after = {k: v for m in random_backend.modules for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in random_backend.modules for m in m.modules())
    assert load_pair(tmp_path, "walle")[0].step == 3


def test_gradient_checkpointing_gives_the_same_run_with_adapters_and_dropout(tmp_path):
    """The checkpointed blocks recompute with the adapters and the dropout masks of the first pass (the backward
    pass runs after the adapters' block has ended), and the masks follow the run's seed."""
    from dreamartist.standalone import build_random_backend

    references = [prepare_reference(Image.new("RGB", (64, 64), (200, 120, 40)), 64, 64)]
    runs = []
    for checkpointing in (False, True):
        config = TrainConfig(name=f"walle{int(checkpointing)}", steps=3, width=64, height=64, adapters=True,
                             reconstruction=False, adapter_dropout=0.5, unet_lr_pos=5e-2, unet_lr_neg=5e-2,
                             text_lr=5e-2, gradient_checkpointing=checkpointing)
        runs.append(train(build_random_backend(seed=3), config, references, tmp_path).losses)
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]))

"""Attention control on a diffusers UNet: a pass-through changes nothing, every site is reported with its layer,
kind, step and rows, an injection replaces exactly the rows, layers and steps it names, and the UNet's own
processors come back whatever ends the block."""
from __future__ import annotations

import pytest
import torch

from dreamartist.attention_control import (
    CROSS,
    LAYER_SCOPES,
    SELF,
    Controller,
    Injection,
    RowInjection,
    Site,
    controlled,
    step_window,
)
from dreamartist.backend import Conditioning
from dreamartist.errors import ModelError

ROWS = ("a", "b", "c")


def _inputs(backend, rows: int = 3):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, 4, 8, 8, generator=generator)
    cond = backend.encode(["a red cube", "a blue ball", "a green tree"][:rows])
    return latents, torch.full((rows,), 500), cond


def _attention_layers(backend) -> list[str]:
    return [path.removesuffix(".processor") for path in backend.unet_model.attn_processors]


class Probe(Controller):
    """Records every site; optionally asks for the probabilities everywhere and hands them back unchanged."""

    def __init__(self, probabilities: bool = False):
        self.sites, self.explicit = [], probabilities

    def keys_values(self, site, query, key, value):
        self.sites.append(site)
        return key, value

    def wants_probabilities(self, site):
        return self.explicit


@pytest.mark.parametrize("explicit", [False, True])
def test_a_pass_through_controller_leaves_the_unet_output_unchanged(random_backend, explicit):
    latents, t, cond = _inputs(random_backend)
    with torch.no_grad():
        plain = random_backend.unet(latents, t, cond)
        with controlled(random_backend, Probe(explicit)) as calls, calls.at(0, ROWS):
            watched = random_backend.unet(latents, t, cond)
    torch.testing.assert_close(watched, plain, atol=1e-5, rtol=1e-5)


def test_every_site_is_reported_once_per_call_with_layer_kind_step_rows_and_level(random_backend):
    latents, t, cond = _inputs(random_backend)
    probe = Probe()
    with torch.no_grad(), controlled(random_backend, probe) as calls:
        for step in (0, 7):
            with calls.at(step, ROWS):
                random_backend.unet(latents, t, cond)
        random_backend.unet(latents, t, cond)  # unlabelled: no step, no rows
    layers = _attention_layers(random_backend)
    assert len(probe.sites) == 3 * len(layers)
    first, second, unlabelled = (probe.sites[i * len(layers):(i + 1) * len(layers)] for i in range(3))
    assert sorted(site.layer for site in first) == sorted(layers)
    assert all(site.kind == (SELF if site.layer.endswith("attn1") else CROSS) for site in first)
    assert {(site.step, site.rows) for site in first} == {(0, ROWS)}
    assert {(site.step, site.rows) for site in second} == {(7, ROWS)}
    assert {(site.step, site.rows) for site in unlabelled} == {(-1, ())}
    levels = {site.layer.split(".attentions")[0]: site.level for site in first}
    assert levels == {"down_blocks.0": 0, "mid_block": 1, "up_blocks.1": 0}


class ChangeProbe(RowInjection):
    """A RowInjection that records, per site, which rows its replacement changed and whether each came from the
    row the injection names."""

    def __init__(self, injections):
        super().__init__(injections)
        self.changed: dict[tuple, set] = {}
        self.explicit: list = []

    def _record(self, site, before, after, pairs):
        rows = {site.rows[i] for i in range(before.shape[0]) if not torch.equal(before[i], after[i])}
        self.changed.setdefault((site.layer, site.kind, site.step), set()).update(rows)
        for dst, src in pairs:
            assert torch.equal(after[site.row(dst)], before[site.row(src)])

    def keys_values(self, site, query, key, value):
        new_key, new_value = super().keys_values(site, query, key, value)
        pairs = [p for i in self._applying(site, (SELF,)) for p in i.pairs]
        self._record(site, key, new_key, pairs)
        self._record(site, value, new_value, pairs)
        return new_key, new_value

    def probabilities(self, site, probs):
        self.explicit.append((site.layer, site.step))
        new = super().probabilities(site, probs)
        self._record(site, probs, new, [p for i in self._applying(site, (CROSS,)) for p in i.pairs])
        return new


def test_an_injection_replaces_exactly_the_rows_layers_and_steps_it_names(random_backend):
    latents, t, cond = _inputs(random_backend)
    decoder = lambda site: site.layer.startswith("up_blocks.")  # noqa: E731
    probe = ChangeProbe([Injection(SELF, (("c", "a"),), range(1, 2), decoder),
                         Injection(CROSS, (("b", "a"),), range(0, 1))])
    outputs = []
    with torch.no_grad():
        plain = random_backend.unet(latents, t, cond)
        with controlled(random_backend, probe) as calls:
            for step in range(3):
                with calls.at(step, ROWS):
                    outputs.append(random_backend.unet(latents, t, cond))
    layers = _attention_layers(random_backend)
    for layer in layers:
        kind = SELF if layer.endswith("attn1") else CROSS
        for step in range(3):
            expected = set()
            if kind == CROSS and step == 0:
                expected = {"b"}
            if kind == SELF and step == 1 and layer.startswith("up_blocks."):
                expected = {"c"}
            assert probe.changed.get((layer, kind, step), set()) == expected, (layer, step)
    # probabilities are formed only where a map is injected: every cross-attention layer at step 0
    assert sorted(probe.explicit) == sorted((layer, 0) for layer in layers if layer.endswith("attn2"))
    # rows no injection names keep the plain output; the named ones change; step 2 is untouched
    torch.testing.assert_close(outputs[0][[0, 2]], plain[[0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[0][1], plain[1], atol=1e-4)
    torch.testing.assert_close(outputs[1][:2], plain[:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[1][2], plain[2], atol=1e-4)
    torch.testing.assert_close(outputs[2], plain, atol=1e-5, rtol=1e-5)


def test_processors_and_hooks_come_back_after_exit_error_and_interrupt(random_backend):
    unet = random_backend.unet_model
    before, hooks = dict(unet.attn_processors), dict(unet._forward_pre_hooks)
    latents, t, cond = _inputs(random_backend, rows=1)

    def unchanged() -> bool:
        after = unet.attn_processors
        return after.keys() == before.keys() and all(after[k] is before[k] for k in before) \
            and dict(unet._forward_pre_hooks) == hooks

    with controlled(random_backend, Probe()):
        assert not unchanged()
    assert unchanged()
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)), torch.no_grad(), controlled(random_backend, Probe()) as calls:
            with calls.at(0, ("a",)):
                random_backend.unet(latents, t, cond)
            raise error
        assert unchanged()


def test_row_labels_must_match_the_batch_and_name_known_rows(random_backend):
    latents, t, cond = _inputs(random_backend, rows=2)
    with torch.no_grad(), controlled(random_backend, Probe()) as calls:
        with pytest.raises(ValueError, match="2 row labels for a batch of 1"):
            with calls.at(0, ("a", "b")):
                random_backend.unet(latents[:1], t[:1], Conditioning(cond.context[:1]))
    missing = RowInjection([Injection(SELF, (("z", "a"),), range(0, 1))])
    with torch.no_grad(), controlled(random_backend, missing) as calls, calls.at(0, ("a", "b")):
        with pytest.raises(ValueError, match="no row labelled 'z'"):
            random_backend.unet(latents, t, cond)


def test_step_windows_and_layer_scopes():
    assert step_window(0.0, 0.3, 50) == range(0, 15) and step_window(0.0, 0.6, 50) == range(0, 30)
    assert step_window(0.2, 1.0, 10) == range(2, 10) and step_window(0.0, 0.0, 10) == range(0, 0)
    assert list(step_window(0.0, 0.3, 4)) == [0, 1]  # the first ceil(0.3 * 4) steps

    def site(layer, level):
        return Site(layer, SELF, 0, (), level)
    assert LAYER_SCOPES["decoder"](site("up_blocks.3.attentions.0.transformer_blocks.0.attn1", 0))
    assert not LAYER_SCOPES["decoder"](site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", 2))
    assert not LAYER_SCOPES["decoder"](site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", 0))
    assert LAYER_SCOPES["coarse"](site("down_blocks.1.attentions.0.transformer_blocks.0.attn1", 1))
    assert not LAYER_SCOPES["coarse"](site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", 0))


def test_a_backend_without_attention_control_is_refused_in_one_sentence():
    from tiny_backend import TinyBackend

    with pytest.raises(ModelError, match=r"^The model tiny does not let its attention be controlled, which this "
                                         r"method needs\.$"):
        with controlled(TinyBackend(), Controller()):
            pass

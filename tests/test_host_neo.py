"""Forge Neo on the stand-in host: no modules.sd_hijack nor modules.lowvram, a part-less placeholder model until the
first generation, the embeddings in models/embeddings read by each text engine. Each test reproduces what the
real Neo (tests/real_webui) showed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakehost.checks import write_pair

from dreamartist import pairfiles
from dreamartist.errors import ModelError

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
    assert [d.script_class.__name__ for d in scripts.scripts_data] == ["DreamArtistScript"]


def test_the_placeholder_model_counts_as_no_model(host_neo):
    from extensions_builtin_compat import embeddings, host_pairing
    from extensions_builtin_compat import host as probes

    assert host_neo.module("modules.sd_models").model_data.sd_model is not None  # Neo's FakeInitialModel
    assert probes.loaded_model() is None and host_pairing.prompt_encoder() is None
    assert embeddings.databases() == [] and embeddings.pairs() == []
    assert not probes.has_embedding_db() and probes.host_unsupported_reason().startswith("Training in Forge is not")


def test_training_is_refused_with_one_sentence_before_and_after_the_model_loads(host_neo):
    from extensions_builtin_compat import host as probes
    from extensions_builtin_compat.host_backend_sdxl import backend_for

    reason = probes.training_unavailable_reason()
    assert "Forge" in reason and str(host_neo.embeddings_dir) in reason and reason.count(". ") == 0
    host_neo.load_model("sd1")
    assert probes.training_unavailable_reason() == reason
    with pytest.raises(ModelError, match="Forge"):
        backend_for()


def test_pairs_from_models_embeddings_bring_their_partner(host_neo):
    write_pair(host_neo.embeddings_dir, "walle", width=768)
    host_neo.load_extension(REPO)
    p, processed = generate(host_neo, prompt="a photo of (walle:1.2)", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, (walle-neg:1.2)"]
    assert "\nNegative prompt: blurry, (walle-neg:1.2)\n" in processed.infotexts[0]
    assert "DreamArtist: walle" in processed.infotexts[0]


def test_sdxl_pairs_are_found_by_the_clip_l_engine(host_neo):
    from extensions_builtin_compat import embeddings

    pos = {"clip_l": torch.randn(2, 2048), "clip_g": torch.randn(2, 2048)}  # the stand-in engines' width
    pairfiles.save_pair(host_neo.embeddings_dir, "walle", pos, {k: -v for k, v in pos.items()})
    host_neo.load_extension(REPO)
    host_neo.load_model("sdxl")
    assert len(embeddings.databases()) == 2 and embeddings.pairs() == ["walle"]
    p, _ = generate(host_neo, prompt="walle at dusk", negative_prompt="")
    assert p.all_negative_prompts == ["walle-neg"]


def test_pairing_can_be_turned_off(host_neo):
    write_pair(host_neo.embeddings_dir, "walle", width=768)
    host_neo.load_extension(REPO)
    p, processed = generate(host_neo, enabled=False, prompt="walle", negative_prompt="")
    assert p.all_negative_prompts == [""] and "DreamArtist: off" in processed.infotexts[0]


@pytest.mark.parametrize("forge_host", ["host_neo", "host_forge"])
def test_adapters_stay_off_without_errors(request, forge_host):
    """A pair that carries PN adapters pairs as usual; its adapters are not applied (the Forge family samples
    through its own backend) and nothing in the infotext claims they were."""
    host_neo = request.getfixturevalue(forge_host)
    write_pair(host_neo.embeddings_dir, "walle", width=768)
    pos, neg = pairfiles.load_pair(host_neo.embeddings_dir, "walle")
    groups = {"unet_pos": {"some.layer.down": torch.zeros(2, 4)}, "unet_neg": {"some.layer.down": torch.zeros(2, 4)}}
    pairfiles.save_pair(host_neo.embeddings_dir, "walle", pos.vectors, neg.vectors, overwrite=True, adapters=groups)
    host_neo.load_extension(REPO)
    for mode in ("pair", "DA++"):
        p = host_neo.txt2img(prompt="walle", negative_prompt="", script_args={"dreamartist": [True, mode, 0.8, 0.65]})
        processed = host_neo.process_images(p)
        assert p.all_negative_prompts == ["walle-neg"], mode  # DA++ without adapters keeps S^n
        assert "DreamArtist adapters" not in processed.infotexts[0]
    from extensions_builtin_compat import adapter_hook

    assert adapter_hook.current() is None

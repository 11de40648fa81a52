"""The webui's embeddings folder and database as the compat layer sees them: pairs, names, refresh."""
from __future__ import annotations

import pytest
import torch
from fakehost.checks import write_pair


def save_webui_embedding(folder, name, width=32, value=1.0):
    from modules.textual_inversion.textual_inversion import Embedding

    Embedding(torch.full((1, width), value), name).save(str(folder / f"{name}.pt"))


def test_pairs_are_the_loaded_names_with_a_loaded_partner(host):
    from extensions_builtin_compat import embeddings

    write_pair(host.embeddings_dir, "walle")
    for name in ("old", "old-neg", "solo", "stray-neg"):  # e.g. files of the earlier extension, dropped by hand
        save_webui_embedding(host.embeddings_dir, name)
    host.load_model()
    assert embeddings.pairs() == ["old", "walle"]
    assert embeddings.partners() == {"old": "old-neg", "walle": "walle-neg"}


def test_existing_names_cover_loaded_skipped_and_not_yet_loaded_files(host):
    from extensions_builtin_compat import embeddings

    save_webui_embedding(host.embeddings_dir, "loaded")
    save_webui_embedding(host.embeddings_dir, "sd15-style", width=768)  # skipped: SD1-wide on this model
    host.load_model()
    (host.embeddings_dir / "sub").mkdir()
    save_webui_embedding(host.embeddings_dir / "sub", "later")
    assert embeddings.known_names() == ["loaded"]
    assert {"loaded", "sd15-style", "later"} <= embeddings.existing_names()
    assert embeddings.embeddings_dir() == host.embeddings_dir


def test_refresh_sees_a_file_overwritten_in_place(host):
    from modules.sd_hijack import model_hijack

    from extensions_builtin_compat import embeddings

    save_webui_embedding(host.embeddings_dir, "walle", value=1.0)
    db = model_hijack.embedding_db
    host.load_model()
    target = host.embeddings_dir / "walle.pt"
    replacement = host.embeddings_dir.parent / "replacement.pt"
    save_webui_embedding(host.embeddings_dir.parent, "replacement", value=2.0)
    target.write_bytes(replacement.read_bytes())  # same directory entry: the folder's mtime does not move
    db.load_textual_inversion_embeddings()
    assert db.word_embeddings["walle"].vec[0, 0] == 1.0  # the webui's own check misses it
    embeddings.refresh()
    assert db.word_embeddings["walle"].vec[0, 0] == 2.0


def test_forge_lists_pairs_from_the_engine_once_the_model_is_loaded(host_forge):
    from extensions_builtin_compat import embeddings

    write_pair(host_forge.embeddings_dir, "walle", width=768)
    assert embeddings.databases() == [] and embeddings.pairs() == []
    host_forge.load_model("sd1")
    assert embeddings.pairs() == ["walle"]
    write_pair(host_forge.embeddings_dir, "robo", width=768)
    embeddings.refresh()
    assert embeddings.pairs() == ["robo", "walle"]


@pytest.mark.parametrize("kind, key, width", [("sd1", "clip_l", 32), ("sd2", "clip_h", 48)])
def test_a_pair_written_for_the_model_is_loaded(host, kind, key, width):
    from extensions_builtin_compat import embeddings

    host.load_model(kind)
    write_pair(host.embeddings_dir, "walle", width=width, key=key)
    embeddings.refresh()
    assert embeddings.pairs() == ["walle"]

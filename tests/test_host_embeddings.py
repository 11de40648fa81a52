"""The webui's embeddings folder and database as the compat layer sees them: pairs, names, refresh."""
from __future__ import annotations

import re

import pytest
import torch
from fakehost.checks import listing, write_pair

from dreamartist import pairfiles
from dreamartist.errors import InputError


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


def test_forge_lists_pairs_from_the_folder_then_from_the_engine_once_the_model_is_loaded(host_forge):
    """The real Neo after a restart answered {"pairs": []}: its engines exist only once a generation loads the model."""
    from extensions_builtin_compat import embeddings

    write_pair(host_forge.embeddings_dir, "walle", width=32)
    assert embeddings.databases() == [] and embeddings.pairs() == ["walle"]
    host_forge.load_model("sd1")
    assert embeddings.pairs() == ["walle"]
    write_pair(host_forge.embeddings_dir, "robo", width=32)
    embeddings.refresh()
    assert embeddings.pairs() == ["robo", "walle"]


@pytest.mark.parametrize("kind, key, width", [("sd1", "clip_l", 32), ("sd2", "clip_h", 48)])
def test_a_pair_written_for_the_model_is_loaded(host, kind, key, width):
    from extensions_builtin_compat import embeddings

    host.load_model(kind)
    write_pair(host.embeddings_dir, "walle", width=width, key=key)
    embeddings.refresh()
    assert embeddings.pairs() == ["walle"]


def test_the_webuis_safe_loader_reads_a_file_object_from_where_its_check_stopped(host):
    """The stand-in keeps the real loader's behaviour that broke an in-memory check on 1.10.1: given a file
    object, the check reads it and the load then starts where the check left off."""
    import io

    buffer = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buffer)
    for payload in (buffer.getvalue(), pairfiles._torch_bytes({"x": torch.ones(2)})):
        try:
            loaded = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception:  # the real one raises from the unpickler ("Unsupported operand ...")
            loaded = None
        assert loaded is None


@pytest.mark.parametrize("state", [{"step": 3, "generator": torch.Generator().get_state(), "betas": (0.9, 0.99)}])
def test_every_file_a_save_writes_is_read_back_through_the_webuis_loader(host, tmp_path, state):
    """The pair and its resume state are checked by the route that reads them later (torch.load, replaced by
    the webui's safe loader), so nothing the webui would refuse is ever committed."""
    write_pair(host.embeddings_dir, "walle")
    pairfiles.save_pair(host.embeddings_dir, "walle", {"clip_l": torch.ones(2, 32)}, {"clip_l": torch.ones(2, 32)},
                        overwrite=True, state=state)
    assert pairfiles.load_state(host.embeddings_dir, "walle")["step"] == 3


def test_a_file_the_webui_would_refuse_is_never_committed(host, monkeypatch):
    from modules import errors

    write_pair(host.embeddings_dir, "walle")
    before = {p.name: p.read_bytes() for p in host.embeddings_dir.iterdir() if p.is_file()}
    monkeypatch.setattr(pairfiles, "_WEBUI_ZIP_RECORDS", re.compile("."))  # newer torch's extra records kept
    with pytest.raises(InputError, match="refused by the webui's safe loader"):
        pairfiles.save_pair(host.embeddings_dir, "walle", {"clip_l": torch.ones(2, 32)},
                            {"clip_l": torch.ones(2, 32)}, overwrite=True, state={"step": 1})
    after = {p.name: p.read_bytes() for p in host.embeddings_dir.iterdir() if p.is_file()}
    assert after == before and "bad file inside" in errors.reported[-1]
    assert listing(host.embeddings_dir) == sorted(before)  # no temporary file left

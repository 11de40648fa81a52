"""scripts/dreamartist.py and scripts/baret_edit.py loaded as each stand-in webui loads them, and install.py run as
the launcher runs it."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import gradio as gr
import pytest
from fastapi import FastAPI
from tabhelpers import REPO, load_extension

OUR_PACKAGES = ("dreamartist", "extensions_builtin_compat")
CATEGORIES = {"ui_tabs": "tab", "ui_settings": "settings", "app_started": "api", "infotext_pasted": "infotext"}


@pytest.fixture(params=["host_v160", "host_v1101", "host_forge", "host_neo"])
def any_host(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def repo_off_path(monkeypatch):
    """Neither the repository on sys.path nor our packages imported: as in a webui, where only the loader
    puts the extension root on sys.path (A1111: while the script file runs)."""
    def is_repo(entry: str) -> bool:
        return Path(entry or os.getcwd()).resolve() == REPO

    monkeypatch.setattr(sys, "path", [p for p in sys.path if not is_repo(p)])
    for name in list(sys.modules):
        if name.split(".")[0] in OUR_PACKAGES:
            monkeypatch.delitem(sys.modules, name)


def ours(host, category: str) -> list:
    callbacks = host.module("modules.script_callbacks").callback_map[f"callbacks_{category}"]
    return [c for c in callbacks if c.script == str(REPO / "scripts" / "dreamartist.py")]


def test_loads_like_the_webui_and_registers_its_callbacks(any_host, repo_off_path):
    modules = load_extension(any_host)
    assert [m.__name__ for m in modules] == ["baret_edit.py", "dreamartist.py"]
    assert "dreamartist.py" not in sys.modules and "baret_edit.py" not in sys.modules
    assert (str(REPO) in sys.path) == any_host.flags.forge  # A1111 drops the root again after the load
    for category, name in CATEGORIES.items():
        (callback,) = ours(any_host, category)
        if any_host.flags.callback_name_kw:
            assert callback.name.endswith(f"/dreamartist.py/{category}/{name}")
        else:
            assert callback.name is None  # 1.6 has no name= (passing it raises TypeError there)
    scripts = any_host.module("modules.scripts")
    assert [d.script_class.__name__ for d in scripts.scripts_data] == ["BaretEditScript", "DreamArtistScript"]


def test_callbacks_work_after_the_load_without_the_root_on_sys_path(any_host, repo_off_path):
    load_extension(any_host)
    callbacks = any_host.module("modules.script_callbacks")
    callbacks.ui_settings_callback()
    assert any_host.shared.opts.dreamartist_auto_negative is True
    assert "dreamartist_auto_negative" in any_host.shared.opts.data_labels
    # 1.6 keeps an unchanged option out of opts.data: reads must fall back to the label's default
    assert ("dreamartist_auto_negative" in any_host.shared.opts.data) == any_host.flags.option_categories
    (tab, title, tab_id), = callbacks.ui_tabs_callback()
    assert isinstance(tab, gr.Blocks) and (title, tab_id) == ("DreamArtist", "dreamartist")
    any_host.shared.cmd_opts.api = True
    app = FastAPI()
    callbacks.app_started_callback(None, app)
    assert {"/dreamartist/v1/train", "/dreamartist/v1/pairs"} <= {route.path for route in app.routes}
    assert any_host.module("modules.errors").reported == []


def test_reloading_the_ui_does_not_stack_callbacks(host_v1101):
    load_extension(host_v1101)
    callbacks = host_v1101.module("modules.script_callbacks")
    callbacks.app_reload_callback()
    callbacks.script_unloaded_callback()
    callbacks.clear_callbacks()  # what initialize_rest(reload_script_modules=True) does before reloading
    load_extension(host_v1101)
    assert all(len(ours(host_v1101, category)) == 1 for category in CATEGORIES)


def test_the_script_adds_the_partner_to_the_negative_prompt(host_v1101):
    load_extension(host_v1101)
    from tabhelpers import reference_image

    from extensions_builtin_compat import jobs
    from extensions_builtin_compat.ui_tab import collect_references, config_from_values

    config = config_from_values({"name": "walle", "steps": 1, "width": 64, "height": 64, "reconstruction": False})
    jobs.run_training(config, collect_references(config, reference_image(), "", None))
    p = host_v1101.txt2img(prompt="a photo of walle", negative_prompt="blurry", steps=2, width=64, height=64)
    host_v1101.process_images(p)
    assert p.all_negative_prompts == ["blurry, walle-neg"]
    assert host_v1101.module("modules.errors").reported == []


def run_install(env_path: list[str]) -> subprocess.CompletedProcess:
    """install.py as the launcher runs it: a subprocess of the webui's python, webui root on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(env_path)}
    return subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_install_does_nothing_and_says_nothing_when_the_webui_has_everything(tmp_path):
    result = run_install([str(tmp_path)])
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_install_uses_the_launcher_for_what_is_missing(monkeypatch):
    launch = types.ModuleType("launch")
    launch.calls = []
    launch.run_pip = lambda command, desc=None: launch.calls.append((command, desc))
    monkeypatch.setitem(sys.modules, "launch", launch)
    import importlib.util

    spec = importlib.util.spec_from_file_location("dreamartist_install", REPO / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None if name == "safetensors" else object())
    missing = install.missing_packages()
    assert missing == ["safetensors"]
    install.install(missing)
    assert launch.calls == [("install safetensors", "safetensors for DreamArtist")]  # no version pins


def test_loading_finishes_a_save_that_a_dying_run_left_half_done(any_host):
    """Scripts load before the model (and so before the webui first reads the embeddings folder)."""
    import json

    import torch
    from fakehost.checks import write_pair

    from dreamartist import fileops, pairfiles

    folder = any_host.embeddings_dir
    write_pair(folder, "walle", seed=1)
    new_neg = fileops.write_temp(folder, "walle", pairfiles._torch_bytes({"emb_params": torch.ones(2, 32)}))
    journal = fileops.work_dir(folder) / "walle.commit"
    journal.write_text(json.dumps({"moves": [[new_neg.name, "walle-neg.pt"]], "removals": []}))
    load_extension(any_host)
    assert not journal.exists() and not new_neg.exists()
    assert torch.equal(torch.load(folder / "walle-neg.pt", weights_only=True)["emb_params"], torch.ones(2, 32))

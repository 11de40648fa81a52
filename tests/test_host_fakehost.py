"""The stand-in webui behaves as the webui does where the compat layer depends on it."""
from __future__ import annotations

import sys

import pytest
import torch
from fakehost import FakeHost


def test_callback_name_keyword_exists_only_from_1_9(host):
    from modules import script_callbacks

    if host.flags.callback_name_kw:
        script_callbacks.on_ui_tabs(lambda: [], name="tab")
        assert script_callbacks.callback_map["callbacks_ui_tabs"][0].name.endswith("/ui_tabs/tab")
    else:
        with pytest.raises(TypeError):
            script_callbacks.on_ui_tabs(lambda: [], name="tab")


def test_callback_errors_are_reported_not_raised(host):
    from modules import errors, script_callbacks

    def broken(infotext, params):
        raise ValueError("boom")

    script_callbacks.on_infotext_pasted(broken)
    script_callbacks.infotext_pasted_callback("", {})
    assert "boom" in errors.reported[-1]


def extension(tmp_path):
    root = tmp_path / "ext"
    (root / "scripts" / "sub").mkdir(parents=True)
    (root / "ext_helpers").mkdir()
    (root / "ext_helpers" / "__init__.py").write_text("VALUE = 7\n")
    (root / "scripts" / "main.py").write_text(
        "import sys\nfrom modules import scripts\nimport ext_helpers\n"
        "LOAD_PATH = list(sys.path)\nBASEDIR = scripts.basedir()\n"
        "class Mine(scripts.Script):\n    def show(self, is_img2img):\n        return scripts.AlwaysVisible\n")
    (root / "scripts" / "sub" / "never.py").write_text("raise SystemExit('subfolders are not loaded')\n")
    return root


@pytest.mark.parametrize("variant", ["v1.6.0", "v1.10.1", "forge"])
def test_scripts_load_as_the_webui_loads_them(tmp_path, variant):
    host = FakeHost(variant, tmp_path / "webui")
    host.install()
    try:
        root = extension(tmp_path)
        [module] = host.load_extension(root)
        from modules import scripts

        assert module.__name__ == "main.py" and "main.py" not in sys.modules
        assert module.LOAD_PATH[0] == str(root) and module.BASEDIR == str(root)
        assert (str(root) in sys.path) == host.flags.forge  # A1111 restores sys.path after the load
        assert [type(s).__name__ for s in scripts.scripts_txt2img.alwayson_scripts] == ["Mine"]
    finally:
        host.uninstall()
    assert str(root) not in sys.path and "ext_helpers" in sys.modules
    del sys.modules["ext_helpers"]


def test_infotext_utils_exists_from_1_8_and_keeps_the_old_name(host):
    from modules import generation_parameters_copypaste

    assert generation_parameters_copypaste.quote("a, b") == '"a, b"'
    if host.flags.infotext_utils:
        from modules import infotext_utils

        assert infotext_utils.parse_generation_parameters is generation_parameters_copypaste.parse_generation_parameters
    else:
        with pytest.raises(ImportError):
            import modules.infotext_utils  # noqa: F401


def test_uninstall_removes_the_host_and_its_patches(tmp_path):
    linear, conv = torch.nn.Linear.forward, torch.nn.Conv2d.forward
    host = FakeHost("v1.6.0", tmp_path / "webui")
    host.install()
    host.load_model()
    from ldm.models import CrossAttention

    assert torch.nn.Linear.forward is not linear and "forward" in CrossAttention.__dict__
    host.uninstall()
    assert (torch.nn.Linear.forward, torch.nn.Conv2d.forward) == (linear, conv)
    assert "forward" not in CrossAttention.__dict__
    assert not [name for name in sys.modules if name.split(".")[0] in ("modules", "ldm", "networks")]


def test_prompt_encoder_chunks_and_emphasis(host):
    clip = host.shared.sd_model.cond_stage_model
    chunks, count = clip.tokenize_line("a (photo:1.5) of " + "x " * 80)
    assert count == 83 and len(chunks) == 2
    assert chunks[0].tokens[0] == clip.id_start and chunks[0].tokens[-1] == clip.id_end
    assert chunks[0].multipliers[2] == 1.5 and len(chunks[1].tokens) == 77
    from modules import prompt_parser

    assert prompt_parser.parse_prompt_attention("a (b) [c] (d:0.5) \\(e\\)") == [
        ["a ", 1.0], ["b", 1.1], [" ", 1.0], ["c", pytest.approx(1 / 1.1)], [" ", 1.0], ["d", 0.5], [" (e)", 1.0]]

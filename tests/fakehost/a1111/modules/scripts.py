"""modules.scripts: Script, AlwaysVisible, script loading as the webui does it, and the AlwaysVisible runner."""
from __future__ import annotations

import os
import sys
from collections import namedtuple
from pathlib import Path

from modules import errors, paths_internal, script_loading
from modules._variant import FLAGS

AlwaysVisible = object()
ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

scripts_data: list[ScriptClassData] = []
current_basedir = paths_internal.script_path


def basedir() -> str:
    """The extension root of the script file being loaded right now."""
    return current_basedir


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None
    if FLAGS.forge:
        sorting_priority = 0

    def title(self):
        return type(self).__name__

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def run(self, p, *args):
        return None

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    if FLAGS.before_every_sampling:
        def process_before_every_sampling(self, p, *args, **kwargs):
            pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def elem_id(self, item_id):
        tab = "img2img_" if self.is_img2img else "txt2img_"
        title = "".join(c if c.isalnum() else "_" for c in self.title().lower())
        return f"script_{tab}{title}_{item_id}"


def _script_files(roots: list[Path]) -> list[ScriptFile]:
    files = []
    for root in sorted(roots, key=lambda r: r.name):
        folder = root / "scripts"
        if folder.is_dir():
            for name in sorted(os.listdir(folder)):
                path = folder / name
                if path.is_file() and os.path.splitext(name)[1].lower() == ".py":
                    files.append(ScriptFile(str(root), name, str(path)))
    return files


def load_scripts(extension_roots: list[Path]) -> list:
    """Load every extension's top-level scripts/*.py and register each Script subclass in its namespace."""
    global current_basedir
    scripts_data.clear()
    files = _script_files(extension_roots)
    syspath = sys.path
    if FLAGS.forge:  # Forge puts every extension root on sys.path first and keeps it there
        syspath = [f.basedir for f in files] + sys.path
        sys.path = syspath
    modules = []
    for script_file in files:
        try:
            if script_file.basedir != paths_internal.script_path:
                sys.path = [script_file.basedir] + sys.path
            current_basedir = script_file.basedir
            module = script_loading.load_module(script_file.path)
            modules.append(module)
            for value in module.__dict__.values():
                if isinstance(value, type) and issubclass(value, Script):
                    scripts_data.append(ScriptClassData(value, script_file.path, script_file.basedir, module))
        except Exception:
            errors.report(f"Error loading script: {script_file.filename}", exc_info=True)
        finally:
            sys.path = syspath
            current_basedir = paths_internal.script_path
    global scripts_txt2img, scripts_img2img
    scripts_txt2img, scripts_img2img = ScriptRunner(), ScriptRunner()
    scripts_txt2img.initialize_scripts(is_img2img=False)
    scripts_img2img.initialize_scripts(is_img2img=True)
    return modules


class ScriptRunner:
    """The part of the webui's ScriptRunner that runs AlwaysVisible hooks with each script's slice of args."""

    def __init__(self):
        self.scripts, self.alwayson_scripts, self.selectable_scripts = [], [], []

    def initialize_scripts(self, is_img2img: bool) -> None:
        for data in scripts_data:
            script = data.script_class()
            script.filename, script.is_img2img, script.is_txt2img = data.path, is_img2img, not is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            script.name = script.title().lower()
            visibility = script.show(is_img2img)
            if visibility is AlwaysVisible:
                script.alwayson = True
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def build_args(self, args_by_title: dict, selected: str | None = None) -> list:
        """script_args as the API builds them: index 0 is 1 + the index of the ``selected`` dropdown script (0: none),
        then each script's slice (AlwaysVisible ones first): its given values by lowercased title, else each
        control's value. As the API's slice assignment, a script given fewer values than it has controls gets
        only those."""
        import gradio as gr

        titles = [script.title().lower() for script in self.selectable_scripts]
        args = [titles.index(selected.lower()) + 1 if selected else 0]
        for script in self.alwayson_scripts + self.selectable_scripts:
            values = args_by_title.get(script.title().lower())
            if values is None:
                with gr.Blocks():
                    values = [getattr(c, "value", None) for c in (script.ui(script.is_img2img) or [])]
            script.args_from, script.args_to = len(args), len(args) + len(values)
            args.extend(values)
        return args

    def run(self, p, *args):
        """The selected dropdown script's run() with its slice of the args; None when none is selected."""
        index = args[0]
        if not index:
            return None
        script = self.selectable_scripts[index - 1]
        return script.run(p, *args[script.args_from:script.args_to])

    def _run(self, hook: str, p, *extra, **kwargs) -> None:
        for script in self.alwayson_scripts:
            try:
                args = p.script_args[script.args_from:script.args_to]
                getattr(script, hook)(p, *extra, *args, **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def setup_scrips(self, p, *, is_ui=True):
        self._run("setup", p)

    def before_process(self, p):
        self._run("before_process", p)

    def process(self, p):
        self._run("process", p)

    def before_process_batch(self, p, **kwargs):
        self._run("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._run("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._run("process_batch", p, **kwargs)

    if FLAGS.before_every_sampling:
        def process_before_every_sampling(self, p, **kwargs):
            self._run("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._run("postprocess_batch", p, images=images, **kwargs)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)

    def before_hr(self, p):
        self._run("before_hr", p)


scripts_txt2img = ScriptRunner()
scripts_img2img = ScriptRunner()

"""FakeHost: installs the stand-in webui packages into sys.modules for one test and removes them after."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

from .variants import VARIANTS

HERE = Path(__file__).resolve().parent
HOST_PACKAGES = ("modules", "ldm", "ldm_patched", "backend", "modules_forge", "networks",
                 "extensions_builtin_compat")
NEO_DROPPED = ("modules.sd_hijack", "modules.lowvram")  # and every modules.sd_hijack_*: Forge Neo has none of them


class _Dropped(importlib.abc.MetaPathFinder):
    """Makes the modules a host variant does not have unimportable, whatever the shared A1111 layer holds: ``from
    modules import sd_hijack`` then fails as in Forge Neo ("cannot import name 'sd_hijack' from 'modules'")."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names or fullname.startswith("modules.sd_hijack_"):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def _purge() -> None:
    """Drop every host module and every module that may hold references to one."""
    for name in list(sys.modules):
        if name.split(".")[0] in HOST_PACKAGES:
            del sys.modules[name]


def _package(name: str, paths: list[Path]) -> types.ModuleType:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(p) for p in paths]
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    return package


class FakeHost:
    """One stand-in webui (A1111 v1.6.0 / v1.10.1, Forge or Forge Neo) rooted in a temporary folder."""

    def __init__(self, variant: str, root: Path):
        self.variant = variant
        self.flags = VARIANTS[variant]
        self.root = Path(root)
        self.embeddings_dir = self.root / ("models/embeddings" if self.flags.models_embeddings_dir else "embeddings")
        self.lora = None
        self._dropped = None if self.flags.hijack_modules else _Dropped(NEO_DROPPED)

    # ---- lifecycle -------------------------------------------------------------------------------
    def install(self) -> None:
        self._saved_path = (sys.path, list(sys.path))  # script loading rebinds sys.path, as the webui does
        _purge()
        self.embeddings_dir.mkdir(parents=True, exist_ok=True)
        if self._dropped is not None:
            sys.meta_path.insert(0, self._dropped)
        (self.root / "extensions").mkdir(exist_ok=True)
        # Earlier folders win: Forge replacements, then modules that exist only from 1.8 on, then the A1111 base.
        layers = (["forge"] if self.flags.forge else []) + (["since_1_8"] if self.flags.infotext_utils else [])
        package = _package("modules", [HERE / layer / "modules" for layer in layers] + [HERE / "a1111" / "modules"])
        variant = types.ModuleType("modules._variant")
        variant.FLAGS, variant.ROOT = self.flags, self.root
        sys.modules["modules._variant"] = package._variant = variant
        if self.flags.forge:
            _package("backend", [HERE / "forge" / "backend"])
            _package("modules_forge", [HERE / "forge" / "modules_forge"])
        else:
            _package("ldm", [HERE / "a1111" / "ldm"])
        if self.flags.webui_model_on_forge_backend:  # reForge: A1111's modules and ldm over Forge's backend
            _package("ldm_patched", [HERE / "reforge" / "ldm_patched"])
            _package("modules_forge", [HERE / "reforge" / "modules_forge"])
        if not self.flags.forge:
            importlib.import_module("modules.safe").install()  # the webui replaces torch.load at start-up
        shared = importlib.import_module("modules.shared")
        shared.cmd_opts.embeddings_dir = str(self.embeddings_dir)
        shared.cmd_opts.data_dir = str(self.root)
        sd_models = importlib.import_module("modules.sd_models")
        sd_models.model_data.loader = lambda: self._build("sd1")
        if not self.flags.forge:
            self.lora = self._load_lora()

    def uninstall(self) -> None:
        try:
            safe = sys.modules.get("modules.safe")
            if safe is not None:
                safe.uninstall()
            if self.lora is not None:
                self.lora.originals.undo()
            hijack = sys.modules.get("modules.sd_hijack")
            if hijack is not None and hasattr(hijack, "undo_optimizations"):
                hijack.undo_optimizations()
            checkpoint = sys.modules.get("modules.sd_hijack_checkpoint")
            if checkpoint is not None and hasattr(checkpoint, "remove"):
                checkpoint.remove()
        finally:
            if self._dropped in sys.meta_path:
                sys.meta_path.remove(self._dropped)
            _purge()
            original, entries = self._saved_path
            original[:] = entries
            sys.path = original

    def _load_lora(self) -> types.ModuleType:
        """Import the built-in Lora extension's `networks` module as its script does: top-level, patched in."""
        spec = importlib.util.spec_from_file_location("networks", HERE / "a1111" / "lora" / "networks.py")
        networks = importlib.util.module_from_spec(spec)
        sys.modules["networks"] = networks
        spec.loader.exec_module(networks)
        networks.install()
        return networks

    # ---- conveniences ------------------------------------------------------------------------------
    @property
    def shared(self) -> types.ModuleType:
        return importlib.import_module("modules.shared")

    def module(self, name: str) -> types.ModuleType:
        return importlib.import_module(name)

    def _build(self, kind: str):
        return self.module("backend.standin" if self.flags.forge else "ldm.standin").build(kind)

    def load_model(self, kind: str = "sd1", half: bool = False):
        """Build a tiny model of ``kind`` ("sd1", "sd2", "sdxl"), load it like sd_models.load_model, return it."""
        sd_models = self.module("modules.sd_models")
        return sd_models.load_model(self._build(kind), half=half)

    def load_extension(self, path: Path) -> list[types.ModuleType]:
        """Load ``path/scripts/*.py`` as the webui loads an extension's scripts; return the script modules."""
        return self.module("modules.scripts").load_scripts([Path(path)])

    def txt2img(self, **fields):
        """A txt2img processing object with the loaded AlwaysVisible scripts attached (``script_args`` by title)."""
        processing = self.module("modules.processing")
        scripts = self.module("modules.scripts")
        args_by_title = fields.pop("script_args", {})
        p = processing.StableDiffusionProcessingTxt2Img(**fields)
        runner = scripts.scripts_txt2img
        if runner.alwayson_scripts:
            p.scripts = runner
            p.script_args = runner.build_args(args_by_title)  # the setter runs every script's setup()
        return p

    def img2img(self, init_image, script: str | None = None, **fields):
        """An img2img processing object as the webui's img2img() builds it: the loaded scripts attached, the dropdown
        ``script`` (a title) selected, ``script_args`` by title; saving into <root>/outputs/img2img-images."""
        processing = self.module("modules.processing")
        scripts = self.module("modules.scripts")
        args_by_title = fields.pop("script_args", {})
        p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image], **fields)
        p.scripts = scripts.scripts_img2img
        p.script_args = p.scripts.build_args(args_by_title, selected=script)
        return p

    def run_img2img(self, p):
        """What the webui's img2img button (or /sdapi/v1/img2img) does with ``p``: the job begins, the selected script
        runs (else process_images), the job ends."""
        shared = self.shared
        shared.state.begin(job="img2img")
        try:
            processed = p.scripts.run(p, *p.script_args)
            return processed if processed is not None else self.process_images(p)
        finally:
            shared.state.end()

    def process_images(self, p):
        return self.module("modules.processing").process_images(p)

"""A real webui (AUTOMATIC1111, or Forge Neo) from the harness named by DREAMARTIST_WEBUI_HARNESS: install this
extension into it, start it, talk to its HTTP API, read its log, stop it and leave its folder as it was.

Only the standard library is imported here, so that the folder is skipped in an instant where no harness exists.
"""
from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

ENV_HARNESS = "DREAMARTIST_WEBUI_HARNESS"  # the harness folder (required; without it everything here is skipped)
ENV_VERSIONS = "DREAMARTIST_WEBUI_VERSIONS"  # comma-separated, default: every version below
ENV_INSTALL = "DREAMARTIST_WEBUI_INSTALL"  # "clone" (default: git clone, as a user does) or "copy" (the working tree)
ENV_SOURCE = "DREAMARTIST_WEBUI_SOURCE"  # what "clone" clones: a path or URL (default: this repository)
ENV_REF = "DREAMARTIST_WEBUI_REF"  # the commit, branch or tag "clone" checks out (default: the source's HEAD)
ENV_OUTPUT = "DREAMARTIST_WEBUI_OUTPUT"  # screenshots, webui logs and timings (default: a new temporary folder)
ENV_SDXL = "DREAMARTIST_WEBUI_SDXL"  # an SDXL checkpoint for test_webui_models.py (default: its SDXL tests are skipped)
ENV_SD2 = "DREAMARTIST_WEBUI_SD2"  # an SD 2.x checkpoint for test_webui_models.py (default: its SD 2.x tests skipped)

# version -> the webui's folder in the harness (its start.sh names its venv and port)
VERSIONS = {"1.10.1": "a1111", "1.6.0": "a1111-v160", "neo": "forge-neo", "reforge": "reforge", "classic": "forge"}
# Hosts whose text engines read the embeddings folder only when the model loads (Forge's own backend): the pairs
# copied in by hand need a reload there, tested in test_webui_forge.py.
FORGE_ENGINE = {"neo"}
# where a host reads embeddings, relative to its folder
EMBEDDINGS_DIR = {"neo": "models/embeddings", "classic": "models/embeddings"}
# Forge-family hosts and the A1111 version each follows.
FORGE_FAMILY = {"reforge": "1.10.1", "classic": "1.10.1", "neo": "1.10.1"}
# Hosts without a textual-inversion training of their own to compare with, and why
NO_WEBUI_TI = {
    "reforge": "its Train tab and /sdapi/v1/train/embedding fail with the default settings (modules.sd_hijack has no "
               "undo_optimizations: the webui's bug)",
    "classic": "it removed the Train tab",
    "neo": "it removed the Train tab",
}
FOLLOWS = FORGE_FAMILY  # a Forge-family host -> the A1111 version it follows
EXTENSION_DIR = "sd-webui-dreamartist"  # the folder name under <webui>/extensions
PROBE_DIR = "dreamartist-probe"  # the test-only extension that records adapter row labels (tests/real_webui/probe)
READY_LINE = "Model loaded in"
READY = re.compile(r"^Model (\S.* \[\w+\] )?loaded in", re.MULTILINE)  # reForge: "Model NAME [HASH] loaded in"
START_TIMEOUT = 900  # seconds; start-up takes 40-90 s on two idle cores, much longer on busy ones
TRAIN_TIMEOUT = 1800
# Files the webui itself rewrites while it runs (settings, component defaults, hash caches): put back at the end.
BOOKKEEPING = ("ui-config.json", "config.json", "cache.json", "params.txt", "styles.csv", "cache")
SNAPSHOT_SKIP = {"__pycache__", ".mplconfig"}  # rebuilt by Python / matplotlib at will; never ours
RUN_FILES = {"webui.log", "webui.pid"}  # start.sh's own
PAIR = "da_api"  # the pair trained through the API and used by the generation, resume and restart tests
BASELINE = dict(prompt="a red disc on a blue ground", seed=4321)  # txt2img before any training, and after


def selected_versions() -> list[str]:
    chosen = [v.strip().lstrip("v") for v in os.environ.get(ENV_VERSIONS, ",".join(VERSIONS)).split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VERSIONS]
    if unknown:
        raise pytest.UsageError(f"{ENV_VERSIONS}: unknown webui version(s) {', '.join(unknown)}; "
                                f"known: {', '.join(VERSIONS)}")
    return chosen


def harness_root() -> Path | None:
    value = os.environ.get(ENV_HARNESS, "").strip()
    return Path(value).expanduser() if value else None


def webui_folder(version: str) -> Path | None:
    root = harness_root()
    return root / VERSIONS[version] if root is not None else None


def skip_reason() -> str | None:
    """Why the whole folder is skipped (no harness), or None."""
    root = harness_root()
    if root is None:
        return (f"end-to-end tests against real webuis: set {ENV_HARNESS} to the webui harness folder "
                "(see tests/real_webui/README.md)")
    if not any((root / VERSIONS[v] / "start.sh").is_file() for v in selected_versions()):
        return f"{ENV_HARNESS}={root} holds none of the webuis {', '.join(selected_versions())} (no start.sh)"
    return None


def skip_without_harness() -> None:
    """Skip the calling test module when there is no harness (one message for the whole folder)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)


# -- HTTP -----------------------------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    body: bytes
    seconds: float

    def json(self):
        return json.loads(self.body)

    @property
    def detail(self):
        try:
            return self.json().get("detail")
        except (ValueError, AttributeError):
            return None

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.body[:3000].decode(errors='replace')}"


def http(method: str, url: str, payload=None, raw: bytes | None = None, timeout: float = 600) -> Response:
    """One request; JSON ``payload`` or ``raw`` bytes sent as application/json. Never raises: status 0 when no
    HTTP answer came."""
    data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Response(reply.status, reply.read(), time.monotonic() - started)
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read(), time.monotonic() - started)
    except (urllib.error.URLError, OSError) as e:  # nothing listening (yet), connection reset, timeout
        return Response(0, f"no HTTP answer: {e}".encode(), time.monotonic() - started)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


# -- the webui --------------------------------------------------------------------------------------------------------

def _walk(root: Path) -> tuple[set[str], set[str]]:
    """Relative paths of the files and folders under ``root``, leaving out SNAPSHOT_SKIP folders."""
    files, folders = set(), set()
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in SNAPSHOT_SKIP]
        rel = Path(folder).relative_to(root)
        folders.update(str(rel / s) for s in subfolders)
        files.update(str(rel / n) for n in names)
    return files, folders


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class WebUI:
    """One harness webui with this extension installed; ``start``/``stop``/``restart`` it, ``cleanup`` at the end."""

    version: str
    folder: Path
    output: Path
    port: int = 0
    venv: Path = field(init=False)
    extension: Path = field(init=False)
    logs: list[str] = field(default_factory=list)  # the logs of earlier runs of this session
    install_output: str = ""
    install_rc: int | None = None
    packages_before: list[str] = field(default_factory=list)
    packages_after: list[str] = field(default_factory=list)
    baseline: bytes = b""  # a txt2img PNG generated before any training
    _backup: Path | None = None
    _files: set[str] = field(default_factory=set)
    _folders: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        script = (self.folder / "start.sh").read_text()
        port = re.search(r"--port\s+(\d+)", script) or re.search(r"^port=(\d+)$", script, re.MULTILINE)
        venv = re.search(r"^venv=\$web/(\S+)$", script, re.MULTILINE)
        if not port or not venv:
            raise RuntimeError(f"{self.folder / 'start.sh'}: cannot find its --port and venv")
        self.port = int(port.group(1))
        self.venv = (self.folder / venv.group(1)).resolve()
        self.extension = self.folder / "extensions" / EXTENSION_DIR
        self.probe = self.folder / "extensions" / PROBE_DIR

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def embeddings(self) -> Path:
        return self.folder / EMBEDDINGS_DIR.get(self.version, "embeddings")

    @property
    def reads_embeddings_at_load(self) -> bool:
        """Whether the host's text engines read the embeddings folder only when the model loads (Forge Neo)."""
        return self.version in FORGE_ENGINE

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def tag(self) -> str:
        return self.version if self.version in FOLLOWS else f"v{self.version}"

    def version_at_least(self, *parts: int) -> bool:
        """The A1111 version (for Forge Neo: the one whose processing and API it follows) is at least ``parts``."""
        version = FOLLOWS.get(self.version, self.version)
        return tuple(int(p) for p in version.split(".")) >= parts

    # -- http ---------------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 60) -> Response:
        return http("GET", self.url + path, timeout=timeout)

    def post(self, path: str, payload=None, raw: bytes | None = None, timeout: float = TRAIN_TIMEOUT) -> Response:
        return http("POST", self.url + path, payload, raw, timeout)

    # -- set up -------------------------------------------------------------------------------------------------------
    def running_pid(self) -> int | None:
        pid_file = self.folder / "webui.pid"
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def prepare(self) -> None:
        """Remember the folder as it is, then install the extension and run its install.py as the launcher does."""
        if self.running_pid():
            raise RuntimeError(f"the webui in {self.folder} is already running (pid {self.running_pid()}); "
                               "stop it with its stop.sh first")
        for folder in (self.extension, self.probe):
            if folder.exists():
                raise RuntimeError(f"{folder} exists already; remove it first (left over from another run?)")
        others = sorted(p.parent.parent.name for p in self.extension.parent.glob("*/scripts/dreamartist.py"))
        if others:
            raise RuntimeError(f"another copy of the extension is installed in {self.extension.parent}: "
                               f"{', '.join(others)}; the webui would load both")
        self._files, self._folders = _walk(self.folder)
        self._backup = Path(tempfile.mkdtemp(prefix=f"dreamartist-webui-{self.version}-"))
        for name in BOOKKEEPING:
            source = self.folder / name
            if source.is_dir():
                shutil.copytree(source, self._backup / name, symlinks=True)
            elif source.exists():
                shutil.copy2(source, self._backup / name)
        self.install_extension()
        self.packages_before = self.installed_packages()
        self.run_install_script()
        self.packages_after = self.installed_packages()

    def install_extension(self) -> None:
        mode = os.environ.get(ENV_INSTALL, "clone").strip() or "clone"
        if mode == "clone":
            source = os.environ.get(ENV_SOURCE, "").strip() or str(REPO)
            _git("clone", "--quiet", source, str(self.extension))
            ref = os.environ.get(ENV_REF, "").strip()
            if ref:
                _git("-C", str(self.extension), "checkout", "--quiet", ref)
        elif mode == "copy":  # tracked and untracked files that git does not ignore: uncommitted work included
            listed = _git("-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard")
            for rel in filter(None, listed.split("\0")):
                source = REPO / rel
                if source.is_file():
                    target = self.extension / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
        else:
            raise pytest.UsageError(f"{ENV_INSTALL} must be 'clone' or 'copy', not {mode!r}")
        shutil.copytree(Path(__file__).parent / "probe", self.probe)

    def installed_revision(self) -> str:
        """The commit installed ("+ working tree" for a copy)."""
        if (self.extension / ".git").exists():
            return _git("-C", str(self.extension), "rev-parse", "--short", "HEAD").strip()
        return _git("-C", str(REPO), "rev-parse", "--short", "HEAD").strip() + " + working tree"

    def installed_packages(self) -> list[str]:
        return sorted(p.name for p in self.venv.glob("lib/python*/site-packages/*.dist-info"))

    def run_install_script(self) -> None:
        """The webui launcher's own run_extension_installer, as at start-up (the harness's start.sh skips it)."""
        code = ("import sys; from modules import launch_utils; "
                "launch_utils.run_extension_installer(sys.argv.pop())")
        done = subprocess.run([str(self.python), "-c", code, str(self.extension)], cwd=self.folder,
                              capture_output=True, text=True, timeout=300)
        self.install_rc = done.returncode
        self.install_output = (done.stdout + done.stderr).strip()

    # -- run --------------------------------------------------------------------------------------------------------
    def start(self, *launch_args: str) -> None:
        """Start the webui (``launch_args`` go to launch.py) and wait until its model is loaded."""
        subprocess.run(["bash", str(self.folder / "start.sh"), "--bg", *launch_args], check=True, capture_output=True)
        log = self.folder / "webui.log"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if READY.search(text) and self.get("/dreamartist/v1/pairs", timeout=30).status != 0:
                return
            if self.running_pid() is None:
                raise RuntimeError(f"webui {self.version} exited during start-up; log:\n{text[-5000:]}")
            time.sleep(1)
        raise RuntimeError(f"webui {self.version}: no {READY_LINE!r} after {START_TIMEOUT} s")

    def stop(self) -> None:
        subprocess.run(["bash", str(self.folder / "stop.sh")], check=False, capture_output=True)
        log = self.folder / "webui.log"
        if log.exists():
            text = log.read_text(errors="replace")
            self.logs.append(text)
            logs = self.output / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"webui-{self.tag}-run{len(self.logs)}.log").write_text(text)

    def restart(self, *launch_args: str) -> None:
        self.stop()
        self.start(*launch_args)

    def log_text(self) -> str:
        """Every log line of this session so far: earlier runs, then the running one."""
        log = self.folder / "webui.log"
        current = log.read_text(errors="replace") if log.exists() and self.running_pid() else ""
        return "\n".join([*self.logs, current])

    def cleanup(self) -> list[str]:
        """Remove the extension and every file created since ``prepare``; put the webui's bookkeeping back.
        Returns the paths removed, relative to the webui folder."""
        _remove(self.extension)
        _remove(self.probe)
        files, folders = _walk(self.folder)
        new = sorted(files - self._files - RUN_FILES) + sorted(folders - self._folders, key=len, reverse=True)
        removed = [rel for rel in new if rel.split("/")[0] not in BOOKKEEPING]  # those are put back below
        for rel in removed:
            _remove(self.folder / rel)
        if self._backup is not None:
            for name in BOOKKEEPING:
                target, saved = self.folder / name, self._backup / name
                _remove(target)
                if saved.is_dir():
                    shutil.copytree(saved, target, symlinks=True)
                elif saved.exists():
                    shutil.copy2(saved, target)
            shutil.rmtree(self._backup, ignore_errors=True)
        return removed

    # -- generation -------------------------------------------------------------------------------------------------
    def payload(self, prompt: str, negative: str = "", steps: int = 3, seed: int = 1234, **extra) -> dict:
        """A txt2img (or, with init_images, img2img) request: 64 px, Euler, a fixed seed."""
        payload = {"prompt": prompt, "negative_prompt": negative, "steps": steps, "seed": seed, "width": 64,
                   "height": 64, "sampler_name": "Euler", "cfg_scale": 7, "batch_size": 1, "n_iter": 1}
        if self.version_at_least(1, 9):  # the scheduler field exists from 1.9; without it 1.10 logs a warning
            payload["scheduler"] = "Automatic"
        payload.update(extra)
        return payload

    def generate(self, kind: str, payload: dict) -> Generation:
        """One generation; options it overrides are set back afterwards: the webui restores only those already in
        its config.json (processing's stored_opts), so a default-valued one would keep the override."""
        overridden = payload.get("override_settings") or {}
        before = {key: value for key, value in self.get("/sdapi/v1/options").json().items() if key in overridden}
        try:
            reply = self.post(f"/sdapi/v1/{kind}", payload, timeout=600)
        finally:
            if before:
                self.post("/sdapi/v1/options", before)
        assert reply.status == 200, f"{kind}: {reply}"
        body = reply.json()
        return Generation(images=[base64.b64decode(image) for image in body["images"]], info=json.loads(body["info"]))

    def parameters_of(self, source: str, function: str) -> list[str]:
        """The parameter names of a top-level function in the webui's source (read, not imported)."""
        tree = ast.parse((self.folder / source).read_text())
        found = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
        return [arg.arg for arg in found.args.args]

    # -- the host's prompt parser ------------------------------------------------------------------------------------
    def prompt_schedules(self, texts: list[str], steps: int) -> list[list[tuple[int, list[tuple[str, float]]]]]:
        """For each text: [(last step, [(text, attention weight), ...]), ...] as the webui's own prompt_parser
        schedules and weighs it (extra-network tags such as <lora:...> removed first, as the webui does)."""
        code = ("import json, sys\n"
                "sys.path.insert(0, sys.argv[1])\n"
                "from modules.prompt_parser import get_learned_conditioning_prompt_schedules as schedules, "
                "parse_prompt_attention as attention\n"
                "request = json.load(sys.stdin)\n"
                "result = [[[end, attention(part)] for end, part in schedules([text], request['steps'])[0]] "
                "for text in request['texts']]\n"
                "json.dump(result, sys.stdout)\n")
        stripped = [re.sub(r"<\w+:[^>]+>", "", text) for text in texts]
        done = subprocess.run([str(self.python), "-c", code, str(self.folder)], input=json.dumps(
            {"texts": stripped, "steps": steps}), capture_output=True, text=True, check=True, timeout=120)
        return [[(end, [(part, weight) for part, weight in pieces]) for end, pieces in schedule]
                for schedule in json.loads(done.stdout)]


@dataclass
class Generation:
    images: list[bytes]
    info: dict

    @property
    def infotext(self) -> str:
        return self.info["infotexts"][0]

    def png_parameters(self) -> str | None:
        """The "parameters" text chunk of the first image (the infotext the webui embeds in the PNG)."""
        from PIL import Image

        with Image.open(io.BytesIO(self.images[0])) as image:
            return image.info.get("parameters")


# -- infotexts --------------------------------------------------------------------------------------------------------

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # "Key: value" as infotexts write it


@dataclass
class Infotext:
    prompt: str
    negative: str
    params: dict[str, str]


def parse_infotext(text: str) -> Infotext:
    """Split an infotext into its prompt, its "Negative prompt:" and the parameters of its last line."""
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {}
    for match in _PARAM.finditer(last):
        key, value = match.group(1).strip(), match.group(2).strip()
        params[key] = json.loads(value) if value.startswith('"') else value
    return Infotext("\n".join(prompt), "\n".join(negative), params)


def word_pattern(word: str) -> re.Pattern:
    """``word`` as a whole word, in any case ('-' counts as part of a word: NAME does not match NAME-neg)."""
    return re.compile(rf"(?<![\w\-]){re.escape(word)}(?![\w\-])", re.IGNORECASE)


def weights_per_step(schedule: list[tuple[int, list[tuple[str, float]]]], word: str, steps: int) -> list[list[float]]:
    """For each sampling step, the attention weights of every occurrence of ``word`` in the scheduled text; the
    step picks the first schedule entry whose last step is not before it, as the webui's samplers do."""
    pattern = word_pattern(word)
    result = []
    for step in range(steps):
        pieces = next(pieces for end, pieces in schedule if step <= end)
        result.append(sorted(round(weight, 4) for part, weight in pieces for _ in pattern.findall(part)))
    return result


def one_sentence(text) -> bool:
    """A one-sentence message: one line, ends in '.', '!' or '?', no second sentence after it."""
    return (isinstance(text, str) and "\n" not in text and text.strip() == text and text[-1:] in ".!?"
            and not re.search(r"[.!?]['\")]?\s+[A-Z]", text))

"""`python -m dreamartist`: train a pair headless, sample with pairs, edit a real image (BARET), inspect pair files.

Every training option comes from TrainConfig, so the CLI, the tab and the API accept the same values. Everything
that can be checked is checked before the model loads; user errors print one line on stderr and exit with status
2; nothing half-written is left behind. The first Ctrl-C stops training after the current step and saves the
pair; a second one stops at once (the last saved pair stays).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from . import config as config_module
from .errors import DreamArtistError, InputError
from .families import FAMILIES

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TOY_MODEL_NOTICE = ("No --ckpt given: using the built-in toy-world model (64x64 coloured shapes on patterned "
                    "backgrounds; dreamartist/toyworld/MODEL_CARD.md).")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise InputError(f"{message} (see --help)")


def _with_default(text: str, default: object) -> str:
    return text if default in ("", None) else f"{text} (default: {default})"


TRAIN_MODES = {"pair": config_module.TrainConfig, "identity": config_module.IdentityConfig}


def _add_config_options(parser: argparse.ArgumentParser, fields=None, required: tuple[str, ...] = ("name",),
                        modes: dict | None = None) -> None:
    """One option per config field (TrainConfig's unless ``fields`` are given), from its metadata. With ``modes``
    (mode -> config class) the union of their fields, each unset unless given (the mode's class fills its default)."""
    if modes:
        fields = list({f.name: f for cls in modes.values() for f in dataclasses.fields(cls)}.values())
    for f in fields or config_module.fields():
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        help_text = meta["help"] or meta["label"]
        if f.name == "template":
            help_text = "'object', 'style', or a text file with one prompt per line, each with [name]"
        default = f.default
        if modes:
            defaults = {mode: field.default for mode, cls in modes.items() for field in dataclasses.fields(cls)
                        if field.name == f.name}
            help_text += " (" + "; ".join(f"{mode}: {_shown(value)}" for mode, value in defaults.items()) + ")"
            default = None
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text if modes else _with_default(help_text, "on" if f.default else "off"))
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=default, choices=meta["choices"] or None,
                                required=f.name in required,
                                help=help_text if modes else _with_default(help_text, f.default or None))


def _shown(value: object) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else repr(value) if value == "" else str(value)


def _mode_values(args: argparse.Namespace) -> dict:
    """The options given on the command line for ``args.mode``'s config; an option of the other mode is an error."""
    cls = TRAIN_MODES[args.mode]
    own = {f.name for f in dataclasses.fields(cls)}
    every = {f.name for c in TRAIN_MODES.values() for f in dataclasses.fields(c)}
    given = {name: getattr(args, name) for name in every if getattr(args, name, None) is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise InputError(f"{flags} {'is not an option' if len(foreign) == 1 else 'are not options'} of --mode "
                         f"{args.mode}.")
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dreamartist", description="DreamArtist one-shot pair training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train NAME and NAME-neg from one image (or a folder); with --mode "
                                              "identity, an identity from one face")
    train.add_argument("--mode", choices=tuple(TRAIN_MODES), default="pair",
                       help="pair: DreamArtist's NAME / NAME-neg; identity: Beyond Inserting's per-stage K/V tokens "
                            "from one face image and its --mask (default: pair)")
    train.add_argument("--image", required=True, help="reference image file, or a folder of images")
    train.add_argument("--mask", help="pair: loss-weight mask for the image (greyscale: black 0x, mid-grey 1x, white "
                                      "5x); identity: the face region, white (required)")
    train.add_argument("--out", default="embeddings", help="folder for the pair or identity (default: ./embeddings)")
    train.add_argument("--ckpt", help="SD 1.x / 2.x / SDXL checkpoint (.safetensors, .ckpt); default: the built-in "
                                      "toy-world model")
    _add_prediction_option(train)
    train.add_argument("--previews", default="previews",
                       help="folder for preview images, kept apart from --out, where the webui would read PNG files "
                            "as embeddings (default: ./previews)")
    train.add_argument("--final-preview", action=argparse.BooleanOptionalAction, default=True,
                       help="sample a preview grid after the last step (default: on)")
    _add_config_options(train, modes=TRAIN_MODES)
    generate = commands.add_parser("generate", help="sample with pairs: NAME-neg joins the negative prompt")
    generate.add_argument("--prompt", required=True, help="the prompt; (word:1.2), [word] and BREAK as in the webui")
    generate.add_argument("--negative", default="", help="negative prompt")
    generate.add_argument("--ckpt", help="SD 1.x / 2.x / SDXL checkpoint; default: the built-in toy-world model")
    _add_prediction_option(generate)
    generate.add_argument("--embeddings", help="folder of embeddings and pairs (subfolders too)")
    generate.add_argument("--cfg", default="7", help="guidance scale: a number or a schedule like 1.5-3.0:cos "
                                                     "(default: 7)")
    generate.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    generate.add_argument("--width", type=int, default=0, help="image width, a multiple of 8; 0: the model's own "
                                                                 "size, 512 for SD1/SD2, 1024 for SDXL (default: 0)")
    generate.add_argument("--height", type=int, default=0, help="image height, a multiple of 8; 0: the model's own "
                                                                  "size (default: 0)")
    generate.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    generate.add_argument("--batch", type=int, default=1, help="images to sample, tiled in a grid (default: 1)")
    generate.add_argument("--adapters", choices=("pair", "DA++", "off"), default="pair",
                          help="PN adapters of the pairs in the prompt that have them: pair (S^n and phi^n on the "
                               "negative side), DA++ (phi^n alone there, no S^n) or off (default: pair)")
    generate.add_argument("--strengths", type=float, nargs=2, default=(0.8, 0.65), metavar=("POS", "NEG"),
                          help="strengths of phi^p and phi^n (default: 0.8 0.65)")
    generate.add_argument("--output", default="generated.png",
                          help="image file to write: .png, .jpg or .webp; a PNG carries the parameters as the webui's "
                               "do (default: generated.png)")
    _add_edit_parser(commands)
    export = commands.add_parser("export-lora", help="write a pair's positive adapter as a standard LoRA file")
    export.add_argument("--name", required=True, help="the pair's name (NAME of NAME / NAME-neg)")
    export.add_argument("--embeddings", default="embeddings", help="folder that holds the pair (default: ./embeddings)")
    export.add_argument("--output", required=True, help="the LoRA file to write (.safetensors)")
    info = commands.add_parser("info", help="show what an embedding file holds")
    info.add_argument("file", help="a .pt, .bin or .safetensors embedding")
    return parser


def _add_edit_parser(commands) -> None:
    from . import edit_config

    edit = commands.add_parser("edit", help="edit a real image toward a target text (BARET): no caption, no "
                                            "fine-tuning of the model")
    edit.add_argument("--image", required=True, help="the image to edit")
    edit.add_argument("--output", default="edited.png",
                      help="image file to write: .png, .jpg or .webp; a PNG carries the parameters (default: "
                           "edited.png)")
    edit.add_argument("--save-branches", action="store_true",
                      help="also write the reconstruction and transition images beside the output, as "
                           "NAME-reconstruction and NAME-transition")
    edit.add_argument("--ckpt", help="SD 1.x / 2.x / SDXL checkpoint; default: the built-in toy-world model")
    _add_prediction_option(edit)
    edit.add_argument("--width", type=int, default=0,
                      help="scale and centre-crop the image to this width first, a multiple of 8; 0: the image's own "
                           "width (default: 0)")
    edit.add_argument("--height", type=int, default=0,
                      help="scale and centre-crop the image to this height first; 0: the image's own height "
                           "(default: 0)")
    _add_config_options(edit, edit_config.fields(), required=("target",))


PRECISIONS = ("auto", "fp16", "bf16", "fp32")


def _add_prediction_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        help="what the checkpoint's UNet predicts, when the file does not say (v_pred key, model spec, "
                             "a .yaml beside it); default: detected")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the UNet's and text encoders' dtype (the VAE stays float32): auto is fp16 on a GPU and "
                             "fp32 on the CPU (default: auto)")


def _load_backend(ckpt: str | None, prediction_type: str | None = None, precision: str = "auto"):
    import torch

    from .standalone import load_checkpoint  # diffusers is imported only here
    from .toyworld import load_backend

    if ckpt:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(precision)
        return load_checkpoint(ckpt, prediction_type=prediction_type, dtype=dtype)
    print(TOY_MODEL_NOTICE)
    # The toy model's operations are too small to gain from a thread pool, and on a busy machine the pool's
    # spin-waiting made a training step about 70 times slower (10 s against 0.15 s, two cores).
    torch.set_num_threads(1)
    return load_backend()


@contextlib.contextmanager
def _soft_interrupt() -> Iterator[list[bool]]:
    """The first Ctrl-C sets a flag the trainer checks between steps; the second raises KeyboardInterrupt."""
    flag = [False]

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: keep Python's own handling
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_train(args: argparse.Namespace) -> int:
    from . import fileops, pairfiles
    from .images import load_references
    from .templates import read_template_file
    from .trainer import Trainer, resumable_pair

    values = _mode_values(args)
    if args.mode == "identity":
        return cmd_train_identity(args, values)
    if "template" in values:
        values["template"] = read_template_file(values["template"])
    config = config_module.TrainConfig(**values)
    if args.mask and not Path(args.mask).exists():
        raise InputError(f"The mask {args.mask} does not exist.")
    size = config.size_for(FAMILIES["sd1"].size)  # checked now; read again at the model's own size once it is known
    references = load_references(args.image, *size, mask_path=args.mask)
    out, previews = Path(args.out), Path(args.previews)
    if previews.resolve().is_relative_to(out.resolve()):
        raise InputError(f"--previews {previews} is inside --out {out}: the webui would try to load the preview "
                         "images as embeddings; choose a folder outside it.")
    if config.resume:
        resumable_pair(out, config.name)  # before anything is made in a folder that may not exist
    fileops.check_writable(out, 1 << 20)
    fileops.recover_folder(out)  # a run that died mid-save left its journal: finish that first
    if not config.resume:
        pairfiles.check_can_save(out, config.name, config.overwrite)
    if config.preview_every or args.final_preview:
        fileops.make_folder(previews)
    backend = _load_backend(args.ckpt, args.prediction_type, args.precision)
    # again at the model's own size and latent grid (a mask is averaged down to the latents' cells)
    references = load_references(args.image, *config.size_for(backend.image_size), mask_path=args.mask,
                                 vae_scale=backend.vae_scale)

    return _run(Trainer, backend, config, references, out, previews, args.final_preview,
                f"Use it: put {config.name} in the prompt; {config.name}-neg goes to the negative prompt (the webui "
                "extension does this for you).")


def cmd_train_identity(args: argparse.Namespace, values: dict) -> int:
    from . import fileops, identityfiles
    from .identity_training import IdentityTrainer
    from .images import face_reference
    from .templates import read_template_file

    if "template" in values and "[name]" not in values["template"]:
        values["template"] = read_template_file(values["template"])
    config = config_module.IdentityConfig(**values)
    if not args.mask:
        raise InputError("Identity mode needs the face region: give --mask, an image white on the face and black "
                         "elsewhere (the same size as --image).")
    face_reference(args.image, args.mask, *config.size_for(FAMILIES["sd1"].size))  # checked before the model loads
    out, previews = Path(args.out), Path(args.previews)
    if config.resume and not identityfiles.path_of(out, config.name).is_file():
        raise InputError(f"There is no identity {config.name} to resume in {out}; leave out --resume to train a new "
                         "one.")
    fileops.check_writable(out, 1 << 20)
    fileops.recover_folder(out)
    if config.preview_every or args.final_preview:
        fileops.make_folder(previews)
    backend = _load_backend(args.ckpt, args.prediction_type, args.precision)
    references = [face_reference(args.image, args.mask, *config.size_for(backend.image_size), backend.vae_scale)]
    return _run(IdentityTrainer, backend, config, references, out, previews, args.final_preview,
                f"Use it: put {config.name} in a prompt and generate with --embeddings {out} (the webui extension "
                "applies it in txt2img and img2img).")


def _run(trainer_class, backend, config, references, out: Path, previews: Path, final_preview: bool,
         usage: str) -> int:
    """One run with a progress bar, previews saved as they come and Ctrl-C handled, then what it wrote and ``usage``;
    returns the exit status."""
    from tqdm import tqdm

    bar = None

    def progress(p) -> None:
        nonlocal bar
        if bar is None:  # made at the first step, so that errors before it print alone
            bar = tqdm(total=config.steps, initial=p.step - 1, desc=config.name, unit="step")
        bar.update(p.step - bar.n)
        bar.set_postfix(loss=f"{p.loss:.4f}")
        if p.preview is not None:
            p.preview.save(previews / f"{config.name}-step{p.step:05d}.png")

    with _soft_interrupt() as stop:
        trainer = trainer_class(backend, config, references, out, on_progress=progress, should_stop=lambda: stop[0])
        try:
            result = trainer.run()
        finally:
            if bar is not None:
                bar.close()
    for note in result.notes:
        print(note)
    if not result.files:
        print("Stopped before the first step; nothing was written.")
        return EXIT_INTERRUPTED
    written = [str(f) for f in result.files]
    if final_preview and not result.stopped:
        written.append(str(_final_preview(trainer, previews / f"{config.name}-final.png")))
    print(f"{'stopped early' if result.stopped else 'done'}: step {result.step}, loss {result.final_loss:.4f}")
    print(f"wrote {', '.join(written)} (and {config.name}.dreamartist-state, the optimiser state for --resume)")
    print(usage)
    return EXIT_INTERRUPTED if result.stopped else 0


def _final_preview(trainer, path: Path) -> Path:
    from tqdm import tqdm

    from .trainer import PREVIEW_STEPS

    count = min(len(trainer.config.template_lines), 4)
    with tqdm(total=count * PREVIEW_STEPS, desc="preview", unit="step") as bar:
        trainer.preview(on_step=lambda: bar.update(1)).save(path)
    return path


def _check_generate_args(args: argparse.Namespace) -> None:
    from .gamma import parse_gamma

    if args.steps <= 0 or args.batch <= 0:
        raise InputError("--steps and --batch must be at least 1.")
    if args.steps > 1000 or args.batch > 64:
        raise InputError("--steps must be at most 1000 and --batch at most 64.")
    if any(side % 8 or not (side == 0 or 64 <= side <= 2048) for side in (args.width, args.height)):
        raise InputError("--width and --height must be 0 (the model's own size) or multiples of 8 between 64 and "
                         "2048.")
    if not 0 <= args.seed < 2**32:
        raise InputError("--seed must be between 0 and 4294967295.")
    parse_gamma(args.cfg)
    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"--output {output.name} must end in {', '.join(IMAGE_SUFFIXES)}.")
    from .fileops import make_folder

    make_folder(output.parent)
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise InputError(f"--embeddings {args.embeddings} is not a folder.")
    if not all(0 <= s <= 2 for s in args.strengths):
        raise InputError("--strengths must be between 0 and 2.")


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import fileops, identityfiles, pairfiles
    from .fileops import walk_files
    from .identity import IdentityTokens
    from .images import parameters_png_info
    from .pairing import add_partners
    from .prompts import WordFinder, words_used
    from .sampling import grid, sample

    _check_generate_args(args)
    folder = Path(args.embeddings) if args.embeddings else None
    if folder:
        fileops.recover_folder(folder)
    files: dict[str, list[Path]] = {}
    for path in walk_files(folder) if folder else ():
        if path.suffix.lower() in pairfiles.LOADABLE_EXTS and not path.name.endswith(identityfiles.SUFFIX):
            files.setdefault(path.stem, []).append(path)
    identity_files = identityfiles.list_identities(folder) if folder else {}
    backend = _load_backend(args.ckpt, args.prediction_type, args.precision)
    args.width, args.height = (side or backend.image_size for side in (args.width, args.height))
    tokenize, ids = backend.token_ids, backend.special_ids
    for note in _skip_other_families(files, args.prompt + "\n" + args.negative, backend):
        print(note)
    partners = {name: partner for name, partner in (pairfiles.list_pairs(folder) if folder else {}).items()
                if name in files}
    with_adapters = _pairs_with_adapters(args, folder, partners, tokenize, ids)
    if args.adapters == "DA++":  # phi^n replaces S^n for the pairs that have adapters
        partners = {name: partner for name, partner in partners.items() if name not in with_adapters}
    negative, added = add_partners(args.prompt, args.negative, partners, tokenize, **ids)
    finder = WordFinder({name: 1 for name in [*files, *identity_files]}, tokenize)
    words, identities = {}, {}
    for name, _ in words_used(args.prompt, tokenize, finder, **ids) + words_used(negative, tokenize, finder, **ids):
        if name in words:
            continue
        if name in identity_files and name not in files:
            identity = identityfiles.load_identity(identity_files[name])
            identityfiles.check_compatible(identity, backend.embedding_dims)
            identities[name] = IdentityTokens(
                {k: v.to(backend.device) for k, v in identity.tokens.tokens.items()})
            words[name] = identities[name].vectors(0, 0)  # a carrier: each step puts its stage's tokens there
            continue
        if len(files[name]) > 1:
            raise InputError(f"Several files are named {name}: {', '.join(map(str, files[name]))}; keep one.")
        embedding = pairfiles.load_embedding(files[name][0])
        pairfiles.check_compatible(embedding.vectors, backend.embedding_dims, embedding.path)
        words[name] = {k: v.to(backend.device) for k, v in embedding.vectors.items()}
    if negative != args.negative:
        print(f"negative prompt: {negative}")
    patches, labels = _adapter_patches(with_adapters, args.strengths)
    with tqdm(total=args.steps, desc="sampling", unit="step") as bar:
        images = sample(backend, args.prompt, negative, words, guidance=args.cfg, steps=args.steps, width=args.width,
                        height=args.height, seed=args.seed, batch=args.batch, on_step=lambda i, n: bar.update(1),
                        patches=patches, labels=labels, identities=identities)
    used = list(dict.fromkeys(added + sorted(with_adapters) + sorted(identities)))
    parameters = (f"{args.prompt}\nNegative prompt: {negative}\nSteps: {args.steps}, Sampler: DDIM, CFG scale: "
                  f"{args.cfg}, Seed: {args.seed}, Size: {args.width}x{args.height}, Model hash: "
                  f"{backend.model_hash}, Model: {backend.model_name}"
                  + (f", DreamArtist: {', '.join(used)}" if used else "")
                  + (f", DreamArtist adapters: \"{args.adapters}, {args.strengths[0]:g}, {args.strengths[1]:g}\""
                     if with_adapters else ""))
    png = args.output.lower().endswith(".png")
    try:
        grid(images).save(args.output, pnginfo=parameters_png_info(parameters) if png else None)
    except OSError as e:
        raise InputError(f"Could not write {args.output} ({e.strerror or e}).") from None
    print(f"wrote {args.output}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import edit_config, fileops
    from .baret import decode, edit
    from .images import load_image
    from .inversion import EditStopped

    config = edit_config.EditConfig(**{f.name: getattr(args, f.name) for f in edit_config.fields()})
    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"--output {output.name} must end in {', '.join(IMAGE_SUFFIXES)}.")
    if any(side % 8 or not (side == 0 or 64 <= side <= 2048) for side in (args.width, args.height)):
        raise InputError("--width and --height must be 0 (the image's own size) or multiples of 8 between 64 and "
                         "2048.")
    image = load_image(args.image)
    fileops.make_folder(output.parent)
    backend = _load_backend(args.ckpt, args.prediction_type, args.precision)
    pixels = _edit_pixels(image, args.width, args.height, backend.vae_scale, args.image)
    latents = backend.vae_encode(pixels.unsqueeze(0))
    with tqdm(total=3 * config.steps, desc="editing", unit="step") as bar, _soft_interrupt() as stop:
        def progress(p) -> None:
            bar.update(1)
            bar.set_description(p.phase)
            if p.loss is not None:
                bar.set_postfix(loss=f"{p.loss:.2e}")

        try:
            result = edit(backend, latents, config, branch_images=args.save_branches, on_progress=progress,
                          should_stop=lambda: stop[0])
        except EditStopped:
            print("Stopped before the edit finished; nothing was written.")
            return EXIT_INTERRUPTED
    height, width = pixels.shape[-2:]
    parameters = (f"{config.target}\nNegative prompt: {config.negative}\nSteps: {config.steps}, Sampler: DDIM, "
                  f"CFG scale: {config.cfg:g}, Size: {width}x{height}, Model hash: {backend.model_hash}, "
                  f"Model: {backend.model_name}, BARET: \"alpha {config.alpha_start:g}-{config.alpha_end:g}"
                  f"{' rigid' if config.rigid else ''}, tau_SA {config.tau_sa:g}, tau_CA {config.tau_ca:g}\"")
    images = decode(backend, result, branches=args.save_branches)
    paths = {name: output if name == "edited" else output.with_name(f"{output.stem}-{name}{output.suffix}")
             for name in images}
    _write_images({paths[name]: image for name, image in reversed(images.items())}, parameters)  # the output last
    print(f"wrote {', '.join(str(paths[name]) for name in images)}")
    return 0


def _edit_pixels(image, width: int, height: int, vae_scale: int, label: str):
    """The image as pixels (3, H, W) in [-1, 1]: its own size, or scaled and centre-cropped to width x height; an
    InputError when the model cannot take that size."""
    from .images import prepare_reference

    width, height = width or image.width, height or image.height
    if width % vae_scale or height % vae_scale or not (64 <= min(width, height) and max(width, height) <= 2048):
        raise InputError(f"{label} is {width}x{height} pixels; this model edits sides that are multiples of "
                         f"{vae_scale} between 64 and 2048, so give --width and --height to scale it.")
    return prepare_reference(image, width, height, vae_scale=vae_scale).pixels


def _write_images(images: dict, parameters: str) -> None:
    """Write each image (path -> PIL image) whole or not at all; when one cannot be written, none written here is
    left."""
    import io

    from . import fileops
    from .images import parameters_png_info

    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
    written = []
    try:
        for path, image in images.items():
            buffer = io.BytesIO()
            png = path.suffix.lower() == ".png"
            image.save(buffer, format=formats[path.suffix.lower()], pnginfo=parameters_png_info(parameters) if png
                       else None)
            fileops.write_file(path, buffer.getvalue())
            written.append(path)
    except OSError as e:
        for path in written:
            fileops.remove_quietly(path)
        raise InputError(f"Could not write {path} ({e.strerror or e}).") from None


def _skip_other_families(files: dict[str, list[Path]], text: str, backend) -> list[str]:
    """Drop from ``files`` the embeddings ``text`` names that were trained for another model family (an SD1 pair in
    an SDXL prompt, or the other way round), as the webui skips embeddings of another shape; a line for each."""
    from . import pairfiles
    from .families import describe
    from .prompts import WordFinder, words_used

    finder = WordFinder(dict.fromkeys(files, 1), backend.token_ids)
    notes = []
    for name in dict.fromkeys(name for name, _ in words_used(text, backend.token_ids, finder, **backend.special_ids)):
        if len(files[name]) == 1:
            dims = {k: int(v.shape[-1]) for k, v in pairfiles.load_embedding(files[name][0]).vectors.items()}
            if dims != dict(backend.embedding_dims):
                del files[name]
                notes.append(f"skipped {name}: it was trained for {describe(dims)}, the loaded model is "
                             f"{describe(backend.embedding_dims)}")
    return notes


def _pairs_with_adapters(args, folder: Path | None, partners: dict, tokenize, ids: dict) -> dict[str, dict]:
    """The pairs the prompt uses that have adapters (name -> adapter groups), unless adapters are off."""
    from . import pairfiles
    from .prompts import WordFinder, words_used

    if args.adapters == "off" or folder is None:
        return {}
    used = {name for name, _ in words_used(args.prompt, tokenize, WordFinder(dict.fromkeys(partners, 1), tokenize),
                                           **ids)}
    found = {}
    for name in sorted(used):
        groups = pairfiles.load_adapters(folder, name)
        if groups:
            found[name] = groups
    return found


def _adapter_patches(pairs: dict[str, dict], strengths) -> tuple[dict, tuple]:
    """What ``sample`` installs: each pair's phi^p on the prompt's rows and phi^n on the negative prompt's."""
    from .adapters import TEXT, UNET, unflatten

    patches = {part: {f"{name}:{branch}": (unflatten(groups[f"{part}_{branch}"]), strength)
                      for name, groups in pairs.items()
                      for branch, strength in zip(("pos", "neg"), strengths, strict=True)
                      if f"{part}_{branch}" in groups}
               for part in (UNET, TEXT)}
    labels = tuple(frozenset(f"{name}:{branch}" for name in pairs) for branch in ("neg", "pos"))
    return patches, labels


def cmd_export_lora(args: argparse.Namespace) -> int:
    from safetensors.torch import save

    from . import fileops, pairfiles
    from .export import kohya_lora
    from .families import family_of

    output = Path(args.output)
    if output.suffix.lower() != ".safetensors":
        raise InputError(f"--output {output.name} must end in .safetensors.")
    pos, _ = pairfiles.load_pair(args.embeddings, args.name)
    groups = pairfiles.load_adapters(Path(pos.path).parent, pos.name)
    if not groups:
        raise InputError(f"{args.name} has no adapters; train it with --adapters to export phi^p.")
    tensors, metadata = kohya_lora(groups, family_of(pos.vectors).key, args.name)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fileops.write_file(output, save(tensors, metadata=metadata))
    except OSError as e:
        raise InputError(f"Could not write {output} ({e.strerror or e}).") from None
    print(f"wrote {output}: phi^p of {args.name} ({len(tensors) // 3} layers). Put it in the webui's models/Lora and "
          f"use it with the embedding: <lora:{output.stem}:1> {args.name}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import pairfiles
    from .families import describe

    embedding = pairfiles.load_embedding(args.file)
    dims = {k: int(v.shape[-1]) for k, v in embedding.vectors.items()}
    vectors = max(int(v.shape[0]) for v in embedding.vectors.values())
    print(f"{embedding.name}: {vectors} vectors for {describe(dims)}, step {embedding.step}, "
          f"{embedding.layout} layout")
    if embedding.pair:
        pair = embedding.pair
        print(f"DreamArtist {pair.role} word; partner {pair.partner}; gamma {pair.gamma}; "
              f"S^p {pair.pos_len} / S^n {pair.neg_len} vectors; step {pair.step} of {pair.total_steps}; "
              f"base model {pair.base_model_name or '?'} [{pair.base_model_hash or '?'}]")
    else:
        print("Not a DreamArtist pair file (a plain textual-inversion embedding).")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        commands = {"train": cmd_train, "generate": cmd_generate, "edit": cmd_edit, "export-lora": cmd_export_lora,
                    "info": cmd_info}
        return commands[args.command](args)
    except DreamArtistError as error:
        print(f"dreamartist: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dreamartist: interrupted; the last saved pair (if any) is unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED

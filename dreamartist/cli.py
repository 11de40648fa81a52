"""`python -m dreamartist`: train a pair headless, sample with pairs, inspect pair files.

Every training option comes from TrainConfig, so the CLI, the tab and the API accept the same parameters.
User errors print one line on stderr and exit with status 2; nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config as config_module
from .errors import DreamArtistError, InputError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise InputError(f"{message} (see --help)")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in config_module.fields():
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        help_text = (meta["help"] or meta["label"]) + f" (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text,
                                choices=meta["choices"] or None, required=f.name == "name")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dreamartist", description="DreamArtist one-shot pair training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train NAME and NAME-neg from one image (or a folder)")
    train.add_argument("--image", required=True, help="reference image file, or a folder of images")
    train.add_argument("--mask", help="optional loss-weight mask (greyscale: 0 ignores, 0.5 normal, 1 = 5x)")
    train.add_argument("--out", default="embeddings", help="folder for the pair (default: ./embeddings)")
    train.add_argument("--ckpt", help="SD 1.x / 2.x checkpoint (.safetensors, .ckpt); default: the demo model")
    _add_config_options(train)
    generate = commands.add_parser("generate", help="sample with pairs: NAME-neg joins the negative prompt")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative", default="", help="negative prompt")
    generate.add_argument("--ckpt", help="checkpoint; default: the demo model")
    generate.add_argument("--embeddings", default="embeddings", help="folder of embeddings (default: ./embeddings)")
    generate.add_argument("--cfg", default="7", help="guidance scale (a number or a gamma schedule)")
    generate.add_argument("--steps", type=int, default=20)
    generate.add_argument("--width", type=int, default=512)
    generate.add_argument("--height", type=int, default=512)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--batch", type=int, default=1)
    generate.add_argument("--output", default="generated.png", help="image file to write")
    info = commands.add_parser("info", help="show what an embedding file holds")
    info.add_argument("file")
    return parser


def _load_backend(ckpt: str | None):
    from .standalone import build_demo_backend, load_checkpoint  # diffusers is imported only here

    if ckpt:
        return load_checkpoint(ckpt)
    print("No --ckpt given: using the built-in demo model (tiny, random weights; for trying the tool).")
    return build_demo_backend()


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .images import load_references
    from .trainer import Trainer

    values = {f.name: getattr(args, f.name) for f in config_module.fields()}
    config = config_module.TrainConfig(**values)
    if not Path(args.image).exists():
        raise InputError(f"The image {args.image} does not exist.")
    if args.mask and not Path(args.mask).exists():
        raise InputError(f"The mask {args.mask} does not exist.")
    references = load_references(args.image, config.width, config.height, mask_path=args.mask)
    backend = _load_backend(args.ckpt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(backend, config, references, out, on_progress=lambda p: _advance(bar, p))
    bar = tqdm(total=config.steps, initial=trainer.step, desc=config.name, unit="step")
    result = trainer.run()
    bar.close()
    if not result.files:
        print("Stopped before the first step; nothing was written.")
        return 1
    written = [str(f) for f in result.files]
    if not result.stopped:  # an interrupted run ends at once; sampling a preview can take minutes on a CPU
        preview_path = out / f"{config.name}-preview.png"
        trainer.preview().save(preview_path)
        written.append(str(preview_path))
    state = "stopped early" if result.stopped else "done"
    print(f"{state}: step {result.step}, loss {result.final_loss:.4f}")
    print(f"wrote {', '.join(written)}")
    print(f"Use it: put {config.name} in the prompt; {config.name}-neg goes to the negative prompt "
          "(the webui extension does this for you).")
    return 130 if result.stopped else 0


def _advance(bar, progress) -> None:
    bar.update(progress.step - bar.n)
    bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.lr:.2g}")


def cmd_generate(args: argparse.Namespace) -> int:
    from . import pairfiles
    from .fileops import walk_files
    from .pairing import add_partners, words_in
    from .sampling import grid, sample

    if args.steps <= 0 or args.batch <= 0:
        raise InputError("--steps and --batch must be at least 1.")
    if args.width % 8 or args.height % 8 or min(args.width, args.height) < 64:
        raise InputError("--width and --height must be multiples of 8, at least 64.")
    if not 0 <= args.seed < 2**32:
        raise InputError("--seed must be between 0 and 4294967295.")
    backend = _load_backend(args.ckpt)
    folder = Path(args.embeddings)
    files: dict[str, list[Path]] = {}
    for path in walk_files(folder):
        if path.suffix.lower() in pairfiles.LOADABLE_EXTS:
            files.setdefault(path.stem, []).append(path)
    partners = pairfiles.list_pairs(folder) if folder.is_dir() else {}
    negative, added = add_partners(args.prompt, args.negative, partners)
    wanted = words_in(args.prompt + " , " + negative, {name: name for name in files})
    words = {}
    for name in wanted:
        if len(files[name]) > 1:
            raise InputError(f"Several files are named {name}: {', '.join(map(str, files[name]))}; keep one.")
        embedding = pairfiles.load_embedding(files[name][0])
        pairfiles.check_compatible(embedding.vectors, backend.embedding_dims, embedding.path)
        words[name] = {k: v.to(backend.device) for k, v in embedding.vectors.items()}
    if added:
        print(f"negative prompt: {negative}")
    images = sample(backend, args.prompt, negative, words, guidance=args.cfg, steps=args.steps,
                    width=args.width, height=args.height, seed=args.seed, batch=args.batch)
    grid(images).save(args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import pairfiles

    embedding = pairfiles.load_embedding(args.file)
    dims = {k: int(v.shape[-1]) for k, v in embedding.vectors.items()}
    vectors = max(int(v.shape[0]) for v in embedding.vectors.values())
    print(f"{embedding.name}: {vectors} vectors for {pairfiles.describe(dims)}, step {embedding.step}, "
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
        return {"train": cmd_train, "generate": cmd_generate, "info": cmd_info}[args.command](args)
    except DreamArtistError as error:
        print(f"dreamartist: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dreamartist: interrupted", file=sys.stderr)
        return 130

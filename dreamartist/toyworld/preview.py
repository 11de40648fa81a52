"""A labelled sheet of a trained pair in new contexts on the toy model (what `make demo` shows).

    python -m dreamartist.toyworld.preview --embeddings demo-output --name demo-star \
        [--reference examples/toy-reference.png] [--out demo-output/demo-star-contexts.png]

One row per prompt, the prompt written beside its samples; NAME-neg joins the negative prompt, as in the webui.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dreamartist.errors import DreamArtistError
from dreamartist.names import negative_name

CONTEXT_PROMPTS = ("{name}", "a {name} on a green background", "a {name} on a striped background", "a {name} in blue")
CELL = 128  # each 64x64 sample is shown at twice its size
LABEL_WIDTH = 300


def contexts_sheet(backend, name: str, words: dict, reference: Image.Image | None = None, samples: int = 4,
                   prompts: tuple[str, ...] = CONTEXT_PROMPTS, seed: int = 0) -> Image.Image:
    """Rows of samples, each labelled with its prompt; the reference first when given."""
    from .evaluate import generate

    rows: list[tuple[str, list[Image.Image]]] = []
    if reference is not None:
        rows.append(("reference (the one training image)", [reference.convert("RGB")]))
    for i, template in enumerate(prompts):
        prompt = template.format(name=name)
        images = generate(backend, prompt, negative_name(name), words, samples=samples, seed=seed + i)
        rows.append((f'"{prompt}"', images))
    sheet = Image.new("RGB", (LABEL_WIDTH + samples * CELL, len(rows) * CELL), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for r, (label, images) in enumerate(rows):
        draw.text((10, r * CELL + CELL // 2), label, fill="black", font=font, anchor="lm")
        for c, image in enumerate(images):
            sheet.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (LABEL_WIDTH + c * CELL, r * CELL))
    return sheet


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def main(argv: list[str] | None = None) -> int:
    from dreamartist import pairfiles
    from dreamartist.images import load_image

    from .models import load_backend

    parser = argparse.ArgumentParser(prog="python -m dreamartist.toyworld.preview", description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings", type=Path, required=True, help="folder holding NAME and NAME-neg")
    parser.add_argument("--name", required=True)
    parser.add_argument("--reference", type=Path, help="the training image, shown in the first row")
    parser.add_argument("--out", type=Path, help="image to write (default: EMBEDDINGS/NAME-contexts.png)")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        pos, neg = pairfiles.load_pair(args.embeddings, args.name)
        reference = load_image(args.reference) if args.reference else None
    except DreamArtistError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    words = {args.name: pos.vectors, negative_name(args.name): neg.vectors}
    out = args.out or args.embeddings / f"{args.name}-contexts.png"
    contexts_sheet(load_backend(), args.name, words, reference, args.samples).save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

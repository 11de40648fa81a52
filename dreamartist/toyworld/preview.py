"""A labelled sheet of a trained pair in new contexts on the toy model, and what it shows, read by the classifier
(what `make demo` shows).

    python -m dreamartist.toyworld.preview --embeddings demo-output --name demo-star \
        [--reference examples/toy-reference.png] [--out demo-output/demo-star-contexts.png]

One row per prompt, the prompt written beside its samples; NAME-neg joins the negative prompt, as in the webui,
and the samples use the pair's training gamma as their CFG scale. With ``--reference`` the shipped attribute
classifier reads the reference and every sample, and the sentences it prints (and writes beside the sheet, as
.md) say how many samples keep the concept and how many also follow the rest of the prompt, with the scores of
the quality benchmark (dreamartist.toyworld.metrics).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from dreamartist.errors import DreamArtistError
from dreamartist.names import negative_name

from .world import article

# The quality benchmark's kinds of prompt: the concept alone, then another background colour and pattern.
CONTEXT_PROMPTS = (("a photo of a {name}", None, None),
                   ("a photo of a {name} on a green background", "background", "green"),
                   ("a photo of a {name} on a striped background", "pattern", "striped"))
CELL = 128  # each 64x64 sample is shown at twice its size
LABEL_WIDTH = 440


def sample_contexts(backend, name: str, words: dict, guidance: float | str, samples: int = 4,
                    seed: int = 0) -> list[list[Image.Image]]:
    """``samples`` images for each of CONTEXT_PROMPTS, NAME-neg as the negative prompt."""
    from .evaluate import generate

    return [generate(backend, template.format(name=name), negative_name(name), words, guidance=guidance,
                     samples=samples, seed=seed + i) for i, (template, _, _) in enumerate(CONTEXT_PROMPTS)]


def contexts_sheet(name: str, rows: list[list[Image.Image]], reference: Image.Image | None = None) -> Image.Image:
    """Rows of samples, each labelled with its prompt; the reference first when given."""
    labelled = [(f'"{template.format(name=name)}"', images) for (template, _, _), images in zip(CONTEXT_PROMPTS, rows)]
    if reference is not None:
        labelled.insert(0, ("reference (the one training image)", [reference.convert("RGB")]))
    columns = max(len(images) for _, images in labelled)
    sheet = Image.new("RGB", (LABEL_WIDTH + columns * CELL, len(labelled) * CELL), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for r, (label, images) in enumerate(labelled):
        draw.text((10, r * CELL + CELL // 2), label, fill="black", font=font, anchor="lm")
        for c, image in enumerate(images):
            sheet.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (LABEL_WIDTH + c * CELL, r * CELL))
    return sheet


def reading(classifier, name: str, reference: Image.Image, rows: list[list[Image.Image]]) -> list[str]:
    """What the classifier reads in the samples, in sentences, scored as the quality benchmark scores: the concept
    (shape and colour) in each row, the asked attribute where a row asks for one, and which part of the concept the
    samples keep."""
    from .metrics import CONTROL_OK, FIDELITY_OK, edit_scores, faithful, share, shows
    from .world import ATTRIBUTES, VALUES, Scene

    read = classifier.predict([reference])[0]
    concept = Scene(**{a: VALUES[a][int(i)] for a, i in zip(ATTRIBUTES, read)})
    thing = f"{concept.colour} {concept.shape}"
    lines = [f"The classifier reads the reference as {article(concept.colour)} {thing} on "
             f"{article(concept.background)} {concept.background} background, {concept.pattern}."]
    fidelity, followed, shape, colour = [], [], [], []
    for (template, attribute, value), images in zip(CONTEXT_PROMPTS, rows):
        prompt, read = template.format(name=name), classifier.predict(images)
        row_shape = shows(read, "shape", concept.shape).tolist()
        row_colour = shows(read, "colour", concept.colour).tolist()
        shape, colour = shape + row_shape, colour + row_colour
        parts = f"{article(concept.shape)} {concept.shape} in {sum(row_shape)}, {concept.colour} in {sum(row_colour)}"
        if attribute is None:
            present = faithful(read, concept).tolist()
            fidelity += present
            lines.append(f'"{prompt}": the {thing} in {sum(present)} of {len(images)} samples ({parts}).')
            continue
        scores = edit_scores(read, concept, attribute, value)
        followed += scores["followed"]
        lines.append(f'"{prompt}": the {thing} with the {value} {attribute} in {sum(scores["followed"])} of '
                     f"{len(images)} samples ({parts}; the {value} {attribute} in {sum(scores['asked'])}).")
    usable = share(fidelity) >= FIDELITY_OK and share(followed) >= CONTROL_OK
    counts = {"shape": f"{article(concept.shape)} {concept.shape} in {sum(shape)} of {len(shape)} samples",
              "colour": f"{concept.colour} in {sum(colour)}"}
    kept = [a for a, flags in (("shape", shape), ("colour", colour)) if share(flags) >= FIDELITY_OK]
    lost = [a for a in counts if a not in kept]
    verdict = "usable" if usable else f"not usable (that needs fidelity >= {FIDELITY_OK} and control >= {CONTROL_OK})"
    keeps = " and ".join(f"the {a}" for a in kept) if kept else "neither the shape nor the colour"
    loses = f" and loses the {lost[0]}" if kept and lost else ""
    lines.append(f"Scored as the quality benchmark scores a pair (fidelity {share(fidelity):.2f}, control "
                 f"{share(followed):.2f}), this pair is {verdict}: it keeps {keeps}{loses} "
                 f"({counts['shape']}, {counts['colour']}).")
    return lines


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def main(argv: list[str] | None = None) -> int:
    from dreamartist import pairfiles
    from dreamartist.images import load_image

    from .classifier import load_classifier
    from .models import load_backend

    parser = argparse.ArgumentParser(prog="python -m dreamartist.toyworld.preview", description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings", type=Path, required=True, help="folder holding NAME and NAME-neg")
    parser.add_argument("--name", required=True)
    parser.add_argument("--reference", type=Path, help="the training image: shown first, and the samples are read "
                                                       "against it")
    parser.add_argument("--out", type=Path, help="image to write (default: EMBEDDINGS/NAME-contexts.png)")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        pos, neg = pairfiles.load_pair(args.embeddings, args.name)
        reference = load_image(args.reference) if args.reference else None
    except DreamArtistError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    words = {args.name: pos.vectors, negative_name(args.name): neg.vectors}
    guidance = pos.pair.gamma if pos.pair and pos.pair.gamma else "4"  # the pair's training gamma
    out = args.out or args.embeddings / f"{args.name}-contexts.png"
    torch.set_num_threads(1)  # as the command line does for the toy model (dreamartist.cli)
    rows = sample_contexts(load_backend(), args.name, words, guidance, args.samples)
    contexts_sheet(args.name, rows, reference).save(out)
    print(f"wrote {out} (CFG {guidance}, the pair's training gamma)")
    if reference is not None:
        lines = reading(load_classifier(), args.name, reference, rows)
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reference images: loading any common image file as RGB, cropping it to the training size, and masks.

A mask is a greyscale image: its grey level g in [0, 1] becomes a loss weight at latent resolution through
the original DreamArtist mapping, piecewise linear through g = 0, .25, .5, .75, 1 -> weight 0, .5, 1, 3, 5.
"""
from __future__ import annotations

import glob
import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import InputError

MIN_SIDE = 16
MAX_IMAGE_BYTES = 50 << 20  # an upload larger than this is refused before it is decoded
MAX_IMAGE_PIXELS = 50_000_000  # read from the header: a decompression bomb is refused before it costs memory
MASK_GREYS = (0.0, 0.25, 0.5, 0.75, 1.0)
MASK_WEIGHTS = (0.0, 0.5, 1.0, 3.0, 5.0)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_MASK_TAG = ".mask"


@dataclass
class Reference:
    """One training image, ready for the VAE."""

    pixels: torch.Tensor  # (3, H, W) float32 in [-1, 1], CPU
    caption: str = ""
    weight: torch.Tensor | None = None  # (1, H/8, W/8) loss weight per latent cell; None means all ones
    original_size: tuple[int, int] | None = None  # (height, width) before scaling (SDXL's size conditioning)
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop in the scaled image, in pixels


def load_image(source: str | Path | bytes | Image.Image, mask: bool = False) -> Image.Image:
    """Open, fully decode and return an RGB image, upright per its EXIF orientation.

    Transparent areas are composited over white; 16-bit and float greyscale are scaled to 8 bits.
    Raises InputError naming the file when it is not an image, is truncated or is smaller than 16 px, and, for a
    ``mask``, when it is transparent everywhere.
    """
    label = _label(source)
    if isinstance(source, Image.Image):
        rgb = _decoded(source, label, mask)
    else:
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            raise InputError(f"{label} is a folder, not an image file.")
        try:
            opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        except FileNotFoundError:
            raise InputError(f"{label} does not exist.") from None
        except UnidentifiedImageError:
            raise InputError(f"{label} is not an image file Pillow can read.") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{label} could not be opened as an image ({e}).") from None
        with opened:
            rgb = _decoded(opened, label, mask)
    if min(rgb.size) < MIN_SIDE:
        raise InputError(f"{label} is only {rgb.width}x{rgb.height} pixels; each side must be at least {MIN_SIDE}.")
    return rgb


def check_image_bytes(raw: bytes, what: str) -> None:
    """Refuse an encoded image that is too large, by its byte count and by the pixel count in its header,
    before any pixel is decoded."""
    if len(raw) > MAX_IMAGE_BYTES:
        raise InputError(f"{what} is {len(raw) >> 20} MB; at most {MAX_IMAGE_BYTES >> 20} MB is accepted.")
    try:
        with Image.open(io.BytesIO(raw)) as header:  # reads the header only
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InputError(f"{what} is not an image file Pillow can read.") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{what} is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels "
                         "are accepted (one reference is scaled to the training size anyway).")


def prepare_reference(image: Image.Image, width: int, height: int, mask: Image.Image | None = None,
                      caption: str = "", vae_scale: int = 8) -> Reference:
    """Scale ``image`` to cover width x height (Lanczos) and centre-crop it to exactly that size.

    The mask goes through the same crop box: a mask whose size differs from the image is first scaled to
    the image's size, then cropped and scaled exactly like the image, then averaged down to the latent grid
    (width/vae_scale x height/vae_scale) and mapped to weights. Its grey level is read after compositing any
    transparency over white.
    """
    if width <= 0 or height <= 0 or width % vae_scale or height % vae_scale:
        raise InputError(f"The training size {width}x{height} must be positive multiples of {vae_scale}.")
    image = load_image(image)
    box = _cover_box(image.size, width, height)
    cropped = image.resize((width, height), Image.Resampling.LANCZOS, box=box)
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    weight = None
    if mask is not None:
        grey = load_image(mask, mask=True).convert("L").convert("F")  # float grey 0..255, no rounding while resizing
        if grey.size != image.size:
            grey = grey.resize(image.size, Image.Resampling.BICUBIC)
        grey = grey.resize((width, height), Image.Resampling.LANCZOS, box=box)
        grey = grey.resize((width // vae_scale, height // vae_scale), Image.Resampling.BOX)
        g = np.clip(np.asarray(grey, dtype=np.float64) / 255.0, 0.0, 1.0)
        weight = torch.from_numpy(mask_weights(g)).float().unsqueeze(0)  # (1, h, w)
    scale = width / (box[2] - box[0])  # the cover-resize factor, the same on both axes
    return Reference(pixels=pixels, caption=caption, weight=weight, original_size=(image.height, image.width),
                     crop_top_left=(round(box[1] * scale), round(box[0] * scale)))


FACE_MARGIN = 1.6  # the framed square's side over the face region's longer side: a face photo's framing


def face_reference(image: str | Path | bytes | Image.Image, mask: str | Path | bytes | Image.Image, width: int,
                   height: int, vae_scale: int = 8) -> Reference:
    """Identity mode's reference: the face region (the white of ``mask``) framed as the paper's face photos, the
    square of FACE_MARGIN times the region's longer side centred on it (kept inside the image), then scaled."""
    image = load_image(image)
    grey = load_image(mask, mask=True).convert("L")
    if grey.size != image.size:
        grey = grey.resize(image.size, Image.Resampling.BILINEAR)
    rows, columns = np.nonzero(np.asarray(grey) > 127)
    if rows.size == 0:
        raise InputError("The face mask has no white area; paint the face white and leave the rest black.")
    side = min(max(np.ptp(columns) + 1, np.ptp(rows) + 1) * FACE_MARGIN, *image.size)
    left = float(np.clip((columns.min() + columns.max() + 1 - side) / 2, 0, image.width - side))
    top = float(np.clip((rows.min() + rows.max() + 1 - side) / 2, 0, image.height - side))
    framed = image.crop((round(left), round(top), round(left + side), round(top + side)))
    return prepare_reference(framed, width, height, vae_scale=vae_scale)


def parameters_png_info(parameters: str) -> PngInfo:
    """A PNG "parameters" text chunk, where the webui writes (and its PNG Info tab reads) generation settings."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info


def mask_weights(grey: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] -> loss weights, piecewise linear through (0,0) (.25,.5) (.5,1) (.75,3) (1,5)."""
    return np.interp(grey, MASK_GREYS, MASK_WEIGHTS)


def load_references(path: str | Path, width: int, height: int, mask_path: str | Path | None = None,
                    vae_scale: int = 8) -> list[Reference]:
    """Load one image file, or every image in a folder (not its subfolders, sorted by name).

    Captions come from a ``<stem>.txt`` next to the image, else from the file name. ``mask_path`` applies
    to a single image; in a folder (or next to a single image given without ``mask_path``) a file named
    ``<stem>.mask.<ext>`` is that image's mask and is not itself a reference. In a folder, files that are not
    images are skipped; an image that is damaged or too small is an error.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if path.is_dir():
        if mask_path is not None:
            raise InputError(f"A mask file applies to a single image, but {path} is a folder; "
                             "put <image name>.mask.png next to each image instead.")
        files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.name)
        masks = {p.stem[: -len(_MASK_TAG)].lower(): p for p in files if _is_mask(p)}
        images = [p for p in files if not _is_mask(p) and p.suffix.lower() != ".txt" and _is_image(p)]
        if not images:
            raise InputError(f"The folder {path} holds no readable image.")
        return [_reference(p, masks.get(p.stem.lower()), width, height, vae_scale) for p in images]
    if mask_path is None:
        mask_path = next((p for p in sorted(path.parent.glob(f"{glob.escape(path.stem)}{_MASK_TAG}.*"))
                          if _is_mask(p)), None)
    return [_reference(path, Path(mask_path) if mask_path is not None else None, width, height, vae_scale)]


def caption_for(image_path: Path) -> str:
    """The caption in ``<stem>.txt`` if present, else the file stem with digits and punctuation as spaces."""
    sidecar = image_path.with_suffix(".txt")
    if sidecar.is_file():
        try:
            text = sidecar.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"The caption file {sidecar} could not be read as UTF-8 text ({e}).") from None
        return " ".join(text.split())
    return " ".join(re.sub(r"[\W\d_]+", " ", image_path.stem).split())


def _reference(image_path: Path, mask_path: Path | None, width: int, height: int, vae_scale: int) -> Reference:
    image = load_image(image_path)
    mask = load_image(mask_path, mask=True) if mask_path is not None else None
    return prepare_reference(image, width, height, mask=mask, caption=caption_for(image_path), vae_scale=vae_scale)


def _is_mask(p: Path) -> bool:
    return p.stem.lower().endswith(_MASK_TAG)


def _is_image(p: Path) -> bool:
    """True when Pillow recognises the file's header (the pixels are not decoded here)."""
    try:
        with Image.open(p):
            return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False


def _decoded(img: Image.Image, label: str, mask: bool = False) -> Image.Image:
    try:
        img.load()  # decode every pixel now so a truncated file fails here, not mid-training
        if mask and _invisible(img):
            raise InputError(f"{label} (the mask) is transparent everywhere, so it marks no pixel; paint the concept "
                             "white or grey on black, without transparency.")
        return _to_rgb(_upright(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{label} is damaged or truncated and could not be decoded ({e}).") from None


def _invisible(img: Image.Image) -> bool:
    """Transparent everywhere: over white it would read as a white mask, the weight of the concept itself."""
    if img.mode not in _WITH_ALPHA and "transparency" not in img.info:
        return False
    return img.convert("RGBA").getchannel("A").getextrema()[1] == 0


def _label(source: object) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return "The uploaded image" if isinstance(source, bytes) else "The given image"


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (KeyError, TypeError, ValueError, SyntaxError, OSError, struct.error):
        return img  # unreadable EXIF only loses the rotation hint; the pixels are fine


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        img = _to_eight_bit(img)
    if img.mode in _WITH_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale (0..65535) or float greyscale ([0, 1], or [0, 255] when larger) -> 8-bit 'L'."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
    else:
        values = values / 257.0  # 65535 -> 255 exactly
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _cover_box(size: tuple[int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """The centred source box with the target's aspect ratio that a cover-resize followed by a crop keeps."""
    src_w, src_h = size
    scale = max(width / src_w, height / src_h)
    box_w, box_h = width / scale, height / scale
    left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
    return (left, top, left + box_w, top + box_h)

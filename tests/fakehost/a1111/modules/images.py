"""modules.images: the webui's resize_image (its three resize modes) and save_image (numbered files in a folder)."""
from __future__ import annotations

import os

from PIL import Image

LANCZOS = Image.Resampling.LANCZOS


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    """0: just resize; 1: crop and resize (scale to cover, centre crop); 2: resize and fill (scale to fit, the
    borders filled with the stretched edges, here a plain pad)."""
    if resize_mode == 0:
        return im.resize((width, height), resample=LANCZOS)
    ratio, source = width / height, im.width / im.height
    if resize_mode == 1:
        w, h = (width, round(width / source)) if ratio > source else (round(height * source), height)
        resized = im.resize((w, h), resample=LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    w, h = (round(height * source), height) if ratio > source else (width, round(width / source))
    filled = Image.new("RGB", (width, height))
    filled.paste(im.resize((w, h), resample=LANCZOS), ((width - w) // 2, (height - h) // 2))
    return filled


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    """Write ``image`` as <path>/<number>-<seed><suffix>.<extension>; returns (the file, None)."""
    from PIL import PngImagePlugin

    os.makedirs(path, exist_ok=True)
    number = len(os.listdir(path))
    filename = os.path.join(path, f"{forced_filename or f'{number:05}-{seed}'}{suffix}.{extension}")
    pnginfo = PngImagePlugin.PngInfo()
    if info is not None:
        pnginfo.add_text(pnginfo_section_name, info)
    image.save(filename, pnginfo=pnginfo)
    return filename, None

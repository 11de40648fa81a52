"""Reference images: decoding and colour conversion, crop and mask alignment, folders and captions."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dreamartist.errors import InputError
from dreamartist.images import load_image, load_references, mask_weights, prepare_reference


def _png_bytes(img: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_cmyk_becomes_rgb(tmp_path):
    path = tmp_path / "print.tif"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path)
    assert _pixel(load_image(path)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.full((32, 32), 65535, dtype=np.uint16)
    values[:, 16:] = 128 * 257  # mid grey: clipping to 8 bits would make it white
    path = tmp_path / "scan.png"
    Image.fromarray(values).save(path)
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (255, 255, 255)
    assert _pixel(img, (20, 0)) == (128, 128, 128)


def test_32_bit_and_float_grey():
    as_int = Image.fromarray(np.full((16, 16), 257 * 64, dtype=np.int32), mode="I")
    assert _pixel(load_image(as_int)) == (64, 64, 64)
    as_float = Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), mode="F")
    assert _pixel(load_image(as_float)) == (128, 128, 128)


def test_rgba_transparency_becomes_white_not_black():
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    img.putpixel((2, 2), (255, 0, 0, 128))
    rgb = load_image(_png_bytes(img))
    assert _pixel(rgb, (0, 0)) == (255, 255, 255)
    assert _pixel(rgb, (1, 1)) == (255, 0, 0)
    r, g, b = _pixel(rgb, (2, 2))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_palette_with_transparency_becomes_white():
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((5, 5), 1)
    rgb = load_image(_png_bytes(img, transparency=0))
    assert _pixel(rgb, (0, 0)) == (255, 255, 255)
    assert _pixel(rgb, (5, 5)) == (255, 0, 0)


def test_grey_with_alpha_and_plain_modes():
    la = Image.new("LA", (32, 32), (0, 0))
    la.putpixel((3, 3), (0, 255))
    rgb = load_image(_png_bytes(la))
    assert _pixel(rgb, (0, 0)) == (255, 255, 255) and _pixel(rgb, (3, 3)) == (0, 0, 0)
    assert _pixel(load_image(Image.new("L", (16, 16), 77))) == (77, 77, 77)
    assert _pixel(load_image(Image.new("1", (16, 16), 1))) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    upright = load_image(_png_bytes(img, exif=exif))
    assert upright.size == (20, 40)
    assert _pixel(upright, (10, 5)) == (255, 0, 0) and _pixel(upright, (10, 35)) == (0, 0, 255)


def test_truncated_png_is_rejected_naming_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png"):
        load_image(path)


def test_text_named_png_and_missing_file_and_folder_are_rejected(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(InputError, match="fake.png is not an image"):
        load_image(fake)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "nothing.png")
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path)


def test_tiny_image_is_rejected():
    with pytest.raises(InputError, match="1x1 pixels"):
        load_image(_png_bytes(Image.new("RGB", (1, 1))))
    with pytest.raises(InputError, match="15x40"):
        load_image(Image.new("RGB", (15, 40)))


def test_mask_mapping_hand_values():
    grey = np.array([0, 64, 127, 128, 191, 255]) / 255.0
    expected = [0.0, 0.5, 1.0, 1.0, 3.0, 5.0]
    np.testing.assert_allclose(mask_weights(grey), expected, atol=0.02)
    np.testing.assert_allclose(mask_weights(np.array([0.25, 0.5, 0.75, 0.625])), [0.5, 1.0, 3.0, 2.0])


def test_uniform_mask_gives_uniform_weight():
    ref = prepare_reference(Image.new("RGB", (50, 30)), 32, 24, mask=Image.new("L", (50, 30), 191))
    assert ref.weight.shape == (1, 3, 4) and ref.weight.dtype == torch.float32
    torch.testing.assert_close(ref.weight, torch.full((1, 3, 4), 1 + (191 / 255 - 0.5) * 8), atol=1e-4, rtol=0)


def _wide_scene() -> tuple[Image.Image, Image.Image]:
    """A 128x64 image and mask; a 64x64 crop keeps x in [32, 96) at scale 1."""
    image = Image.new("RGB", (128, 64), (0, 0, 255))
    image.paste((255, 0, 0), (32, 0, 48, 64))  # the crop's left 16 columns are red
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 48, 64))  # white left of x=48, also outside the crop
    mask.paste(255, (0, 0, 128, 16))  # and the top 16 rows
    return image, mask


def test_mask_is_cropped_like_the_image():
    image, mask = _wide_scene()
    ref = prepare_reference(image, 64, 64, mask=mask, caption="robot")
    assert ref.caption == "robot"
    assert ref.pixels.shape == (3, 64, 64) and ref.pixels.dtype == torch.float32
    assert ref.pixels.min() >= -1 and ref.pixels.max() <= 1
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(ref.pixels[:, :, :16], red.expand(3, 64, 16))
    torch.testing.assert_close(ref.pixels[:, :, 16:], blue.expand(3, 64, 48))
    expected = torch.zeros(1, 8, 8)
    expected[:, :, :2] = 5.0  # the red columns
    expected[:, :2, :] = 5.0  # the top rows
    torch.testing.assert_close(ref.weight, expected, atol=1e-4, rtol=0)


def test_mask_of_another_size_is_scaled_to_the_image_first():
    image, mask = _wide_scene()
    ref = prepare_reference(image, 64, 64, mask=mask.resize((64, 32), Image.Resampling.NEAREST))
    weight = ref.weight[0]
    assert weight[4, 0] == pytest.approx(5.0, abs=0.05)  # left columns, far from any edge
    assert weight[0, 5] == pytest.approx(5.0, abs=0.05)  # top rows
    assert weight[5, 5] == pytest.approx(0.0, abs=0.05)


def test_cover_resize_and_centre_crop():
    img = Image.new("RGB", (300, 100), (0, 255, 0))
    img.paste((255, 255, 255), (0, 0, 90, 100))  # outside the centred square crop [100, 200) and its filter
    ref = prepare_reference(img, 64, 64)
    assert ref.pixels.shape == (3, 64, 64) and ref.weight is None
    torch.testing.assert_close(ref.pixels, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 64, 64))
    tall = prepare_reference(Image.new("RGB", (40, 90)), 16, 32)
    assert tall.pixels.shape == (3, 32, 16)


def test_size_must_be_a_multiple_of_the_vae_scale():
    with pytest.raises(InputError, match="multiples of 8"):
        prepare_reference(Image.new("RGB", (64, 64)), 60, 64)


def test_folder_of_references(tmp_path):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("hello\n  world ", encoding="utf-8")
    Image.new("L", (32, 32), 255).save(tmp_path / "a.mask.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(tmp_path / "my_cat-02.jpg")
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "fake.png").write_text("not an image")  # unreadable files in a folder are skipped
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "sub" / "ignored.png")
    refs = load_references(tmp_path, 16, 16)
    assert [r.caption for r in refs] == ["hello world", "my cat"]
    torch.testing.assert_close(refs[0].weight, torch.full((1, 2, 2), 5.0))
    assert refs[1].weight is None
    assert refs[0].pixels[0].mean() == pytest.approx(1.0)


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    Image.new("L", (32, 32)).save(tmp_path / "x.mask.png")  # a mask alone is no reference
    with pytest.raises(InputError, match="holds no readable image"):
        load_references(tmp_path, 16, 16)


def test_damaged_image_in_a_folder_is_an_error(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "good.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="small.png"):
        load_references(tmp_path, 16, 16)


def test_single_file_with_mask_and_sidecar(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "walle 3.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "walle 3.mask.png")
    (ref,) = load_references(tmp_path / "walle 3.png", 16, 16)
    assert ref.caption == "walle"
    torch.testing.assert_close(ref.weight, torch.zeros(1, 2, 2))
    Image.new("L", (32, 32), 128).save(tmp_path / "other.png")
    (ref,) = load_references(tmp_path / "walle 3.png", 16, 16, mask_path=tmp_path / "other.png")
    assert ref.weight.mean() == pytest.approx(1.0, abs=0.02)


def test_mask_with_a_folder_is_an_error(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="single image"):
        load_references(tmp_path, 16, 16, mask_path=tmp_path / "a.png")
    with pytest.raises(InputError, match="does not exist"):
        load_references(tmp_path / "missing", 16, 16)


def test_exif_rotated_file_and_its_rotated_mask_stay_aligned(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # both stored sideways: upright, the left half is on top
    image = Image.new("RGB", (48, 24), (255, 0, 0))
    image.paste((0, 0, 255), (24, 0, 48, 24))
    image.save(tmp_path / "side.png", exif=exif)
    mask = Image.new("L", (48, 24), 0)
    mask.paste(255, (24, 0, 48, 24))
    mask.save(tmp_path / "side.mask.png", exif=exif)
    (ref,) = load_references(tmp_path / "side.png", 24, 48)
    assert ref.pixels.shape == (3, 48, 24)
    assert ref.pixels[:, 4, 12].tolist() == [1.0, -1.0, -1.0] and ref.pixels[:, 44, 12].tolist() == [-1.0, -1.0, 1.0]
    torch.testing.assert_close(ref.weight[0, :2], torch.zeros(2, 3))  # red half: weight 0
    torch.testing.assert_close(ref.weight[0, -2:], torch.full((2, 3), 5.0))  # blue half, white in the mask

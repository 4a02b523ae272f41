"""Image loading (modes, EXIF, errors) and CLIP preprocessing parity with transformers."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.images import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, ImageTransform,
                                   collate_images, from_hf_preprocessor_config, load_image)


def _blend_over_white(value, alpha):
    """Expected 8-bit result of compositing `value` with `alpha` over white."""
    return value * alpha / 255 + 255 * (1 - alpha / 255)


# --------------------------------------------------------------------------- modes


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    a = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (6, 4)
    out = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], a)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_over_white(tmp_path, mode):
    alphas = np.array([[0, 128, 255]], dtype=np.uint8)
    gray = np.full((1, 3), 40, dtype=np.uint8)
    if mode == "LA":
        arr = np.stack([gray, alphas], -1)
    else:
        arr = np.stack([gray, gray + 20, gray + 40, alphas], -1)
    Image.fromarray(arr, mode).save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")).astype(float)
    colour = arr[..., :1] if mode == "LA" else arr[..., :3]
    expected = _blend_over_white(colour.astype(float), alphas[..., None].astype(float))
    assert np.abs(out - np.broadcast_to(expected, out.shape)).max() <= 1.0
    assert (out[0, 0] == 255).all()  # fully transparent -> white, not black


def test_palette_with_transparency_index_is_white(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    img.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    img.save(tmp_path / "p.png", transparency=1)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = np.asarray(load_image(tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])  # the transparent index


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    Image.new("CMYK", (16, 8), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)  # pure cyan
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert out.shape == (8, 16, 3)
    assert np.abs(out - np.array([0, 255, 255])).max() <= 6


def test_16bit_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 300).astype(np.uint16).reshape(1, 300)
    ramp = np.repeat(ramp, 3, axis=0)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    out = np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0].astype(int)
    assert out.min() == 0 and out.max() == 255          # spans the range (clipping would give 255 almost everywhere)
    assert (np.diff(out) >= 0).all()                      # monotone
    np.testing.assert_array_equal(out, np.rint(ramp[0] / 257.0).astype(int))
    assert len(np.unique(out)) > 200                      # keeps the gradient's resolution


def test_exif_orientation_rotates_non_square_image(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)           # stored: 40 wide, 20 high
    arr[:5, :5] = (255, 0, 0)                            # red marker top-left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6                                      # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)                           # displayed: 20 wide, 40 high
    a = np.asarray(out).astype(int)
    assert a[1, -2, 0] > 200 and a[1, -2, 1] < 60        # top-left went to top-right
    assert a[1, 1, 0] < 60


# --------------------------------------------------------------------------- errors


def test_truncated_jpeg_raises_image_error_naming_file(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg") as e:
        load_image(tmp_path / "cut.jpg")
    assert "truncated" in str(e.value)


def test_missing_file_raises_image_error_naming_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png.*not found"):
        load_image(tmp_path / "nope.png")


def test_text_file_named_png_raises_image_error(tmp_path):
    (tmp_path / "fake.png").write_text("not an image at all")
    with pytest.raises(ImageError, match=r"fake\.png"):
        load_image(tmp_path / "fake.png")


# --------------------------------------------------------------------------- transform


def _random_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_processor(**kwargs):
    # transformers 5: CLIPImageProcessor is the torchvision backend (not installable here);
    # CLIPImageProcessorPil is the Pillow/numpy one with the same settings.
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessorPil(**kwargs)


SIZES = [(301, 200), (150, 257), (20, 13), (64, 64), (65, 97)]  # landscape, portrait, small, square, odd


@pytest.mark.parametrize("w,h", SIZES)
def test_matches_hf_clip_processor(w, h):
    S = 48
    hf = _hf_processor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    img = _random_image(w, h, seed=w * h)
    ref = hf(img, return_tensors="pt")["pixel_values"][0]
    ours = ImageTransform(S)(img)
    assert ours.shape == (3, S, S) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < 1e-2


def test_matches_hf_with_separate_resize_and_crop():
    hf = _hf_processor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    ours = from_hf_preprocessor_config(hf.to_dict())
    for w, h in SIZES:
        img = _random_image(w, h, seed=w + h)
        assert (ours(img) - hf(img, return_tensors="pt")["pixel_values"][0]).abs().max().item() < 1e-2


def test_squash_matches_hf_fixed_size_resize():
    hf = _hf_processor(size={"height": 32, "width": 32}, do_center_crop=False)
    ours = ImageTransform(32, resize="squash")
    for w, h in SIZES:
        img = _random_image(w, h, seed=3 * w + h)
        assert (ours(img) - hf(img, return_tensors="pt")["pixel_values"][0]).abs().max().item() < 1e-2


def test_shortest_side_rounding_follows_int():
    t = ImageTransform(64)
    assert t.output_size(301, 200) == (int(64 * 301 / 200), 64) == (96, 64)
    assert t.output_size(200, 301) == (64, 96)


def test_normalisation_of_a_flat_image():
    img = Image.new("RGB", (50, 30), (255, 128, 0))
    out = ImageTransform(16)(img)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((16, 16), expected[c]), atol=1e-5)


def test_non_square_size_covers_the_crop():
    out = ImageTransform((24, 40))(_random_image(50, 50, seed=1))
    assert out.shape == (3, 24, 40)


def test_path_input_uses_load_image(tmp_path):
    _random_image(40, 30, seed=2).save(tmp_path / "x.png")
    t = ImageTransform(16)
    assert torch.equal(t(tmp_path / "x.png"), t(Image.open(tmp_path / "x.png")))
    with pytest.raises(ImageError, match="y.png"):
        t(tmp_path / "y.png")


@pytest.mark.parametrize("kwargs", [dict(image_size=32), dict(image_size=32, resize="squash", crop=False),
                                    dict(image_size=24, resize_size=28, interpolation="bilinear",
                                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))])
def test_to_dict_from_dict_round_trip(kwargs):
    t = ImageTransform(**kwargs)
    d = json.loads(json.dumps(t.to_dict()))
    t2 = ImageTransform.from_dict(d)
    img = _random_image(53, 41, seed=5)
    assert torch.equal(t(img), t2(img))
    assert t2.to_dict() == d


def test_from_dict_names_unknown_keys():
    d = ImageTransform(32).to_dict() | {"sizee": 3}
    with pytest.raises(ValueError, match="sizee"):
        ImageTransform.from_dict(d)


def test_reads_hf_preprocessor_config_files(tmp_path):
    # an old-style HF CLIP config (int sizes, feature-extractor keys) written as users have it
    old = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
           "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": 32}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    t = from_hf_preprocessor_config(tmp_path)
    hf = _hf_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    img = _random_image(70, 45, seed=9)
    assert (t(img) - hf(img, return_tensors="pt")["pixel_values"][0]).abs().max().item() < 1e-2
    with pytest.raises(FileNotFoundError, match="missing"):
        from_hf_preprocessor_config(tmp_path / "missing")


def test_collate_images_stacks_and_checks_shapes():
    a, b = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    assert collate_images([a, b]).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="one shape"):
        collate_images([a, torch.zeros(3, 8, 9)])

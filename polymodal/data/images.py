"""Image loading and CLIP-style preprocessing with Pillow + numpy + torch (no torchvision).

`load_image` turns any file Pillow can read into an upright 8-bit RGB image, or raises
`ImageError` naming the file and the reason. Images over `max_pixels` (default
`DEFAULT_MAX_IMAGE_PIXELS`, the recipe key `data.max_image_pixels`) are refused from the header,
before any pixel is decoded. `ImageTransform` resizes, centre-crops and
normalises it into a float32 tensor (3, H, W), matching `transformers.CLIPImageProcessorPil`
(resize the shorter side with `int()` rounding of the longer one, crop offset `(size - crop) // 2`).
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Interpolation names <-> Pillow filters; the ints are what HF stores as `resample`.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_NAME_OF_RESAMPLE = {int(v): k for k, v in INTERPOLATIONS.items()}

# Largest width * height decoded by default: 40 Mpx is ~120 MB as RGB, bigger than any photo a
# training set needs; a 12000 x 12000 PNG (144 Mpx, ~0.4 GB decoded) is refused.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class ImageError(ValueError):
    """An image file is missing, unreadable, truncated or in a mode we cannot convert."""


# --------------------------------------------------------------------------- loading


def load_image(path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Read an image file as upright 8-bit RGB.

    Transparency (LA, RGBA, PA, palette or single-colour `transparency`) is alpha-composited over
    a white background, as HF's `convert_to_rgb` does, so transparent areas do not turn black.
    16-bit and 32-bit greyscale is scaled (not clipped) to 8 bits, see `to_rgb`. The EXIF
    orientation tag is applied (`PIL.ImageOps.exif_transpose`).

    Args:
        path: a file path (str or Path).
        max_pixels: refuse images whose width * height (read from the header, before decoding) is
            larger; None leaves only Pillow's own decompression-bomb guard (also an ImageError).
    Returns:
        A fully decoded `PIL.Image.Image` in mode "RGB".
    Raises:
        ImageError: the file is missing, not an image, truncated, too large or in an unsupported
            mode; the message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        reason = "is a directory, not an image file" if path.is_dir() else "file not found"
        raise ImageError(f"{path}: {reason}")
    return _decode(path, str(path), max_pixels)


def load_image_bytes(data: bytes, where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """`load_image` for an encoded image held in memory (e.g. a shard member).

    Args:
        data: the encoded file (PNG, JPEG ...).
        where: a name for error messages (shard and key).
        max_pixels: as in `load_image`.
    Returns:
        A fully decoded upright "RGB" image.
    Raises:
        ImageError: as in `load_image`, naming `where`.
    """
    return _decode(io.BytesIO(data), where, max_pixels)


def _decode(source, where: str, max_pixels: int | None) -> Image.Image:
    """Open lazily, check the pixel count from the header, then decode, rotate and convert."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS (and raises above twice that) at open(). With a
            # limit of our own that check has been made; without one, Pillow's warning becomes an error.
            warnings.simplefilter("ignore" if max_pixels is not None else "error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                check_pixels(img.size, where, max_pixels)
                img.load()  # decode now: truncated data only fails here, not at open()
                img = _exif_upright(img, where)
                return to_rgb(img, where=where)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not a readable image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{where}: refused by Pillow as a decompression bomb ({e}); resize the image "
                         f"(Pillow's limit is PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated"),
        # SyntaxError (broken headers) or ValueError/EOFError from some decoders.
        raise ImageError(f"{where}: cannot be decoded ({type(e).__name__}: {e})") from None


def check_pixels(size: tuple[int, int], where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise ImageError when an image of `size` = (width, height) has more than `max_pixels` pixels.

    Args:
        size: (width, height), e.g. `PIL.Image.open(f).size` (known before decoding).
        where: the file, for the message.
        max_pixels: the limit; None = no limit.
    Raises:
        ImageError: naming the file, its size, the limit and the setting that raises it.
    """
    if max_pixels is None:
        return
    w, h = size
    if w * h > max_pixels:
        raise ImageError(f"{where}: {w}x{h} = {w * h / 1e6:.1f} Mpx is over the limit of {max_pixels / 1e6:.1f} Mpx; "
                         f"downscale the image or raise data.max_image_pixels (decoding it needs about "
                         f"{w * h * 3 / 2**30:.2f} GiB)")


def _exif_upright(img: Image.Image, path) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block warns and leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - any EXIF parser failure: the pixels are still fine
        warnings.warn(f"{path}: ignoring unreadable EXIF orientation ({type(e).__name__}: {e})", stacklevel=4)
        return img


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """Convert a decoded PIL image of any common mode to 8-bit RGB.

    Args:
        img: the image (not EXIF-rotated here; `load_image` does that).
        where: a name for error messages (the file path).
    Returns:
        An "RGB" image. Rules: transparency -> composite over white; CMYK/YCbCr/L/1/P -> Pillow's
        conversion; "I;16*" -> value / 257 (full 16-bit range onto 0..255, rounded); "I" (32-bit)
        -> the same 16-bit scaling when all values lie in 0..65535, else min-max stretch;
        "F" -> x 255 when values lie in [0, 1], else min-max stretch.
    Raises:
        ImageError: a mode Pillow cannot convert to RGB (e.g. LAB without a colour profile).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img), mode="L").convert("RGB")
    has_alpha = "A" in img.getbands() or "a" in img.getbands() or img.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{where}: cannot convert image mode {mode!r} to RGB ({e})") from None


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16-bit, 32-bit integer or float greyscale image, scaled not clipped."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        # Nominal 16-bit range -> 8 bits: 65535 / 257 = 255 exactly, so black/white stay exact.
        return np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
    a = a.astype(np.float64)
    if img.mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# --------------------------------------------------------------------------- transform


def _pair(size, name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{name} must be an int or an (height, width) pair of ints, got {size!r}")


class ImageTransform:
    """PIL image (or path) -> normalised float32 tensor (3, H, W), CLIP preprocessing.

    Steps: RGB conversion; resize ("shortest": the shorter side becomes `resize_size` and the
    longer `int(resize_size * long / short)` as HF does; "squash": straight to the target size,
    aspect ratio ignored); centre crop to `image_size` (top/left offset `(size - crop) // 2`);
    scale to [0, 1]; subtract `mean` and divide by `std` per channel.

    Args:
        image_size: output size, an int S (S x S) or (height, width).
        mean: per-channel mean (RGB), in [0, 1] units.
        std: per-channel standard deviation (RGB).
        resize: "shortest" or "squash".
        interpolation: a Pillow filter name: bicubic, bilinear, nearest, lanczos, box, hamming.
        crop: centre-crop to `image_size` after the resize. With crop=False and "shortest" the
            output keeps the aspect ratio (its shorter side is `resize_size`).
        resize_size: size the resize step aims at, when it differs from the crop (e.g. resize to
            256 then crop 224); default `image_size`. For "shortest" with a non-square
            `image_size` and no `resize_size`, the image is scaled to just cover the crop.
        max_pixels: pixel limit for images given as paths (see `load_image`); not part of the saved
            preprocessing config.
    """

    def __init__(self, image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize: str = "shortest",
                 interpolation: str = "bicubic", crop: bool = True, resize_size=None,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if resize not in ("shortest", "squash"):
            raise ValueError(f"resize must be 'shortest' or 'squash', got {resize!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        self.image_size = _pair(image_size, "image_size")
        if resize_size is None and resize == "shortest" and self.image_size[0] != self.image_size[1]:
            self.resize_size = None  # non-square crop: scale so the image just covers it
        else:
            self.resize_size = self.image_size if resize_size is None else _pair(resize_size, "resize_size")
        if resize == "shortest" and self.resize_size and self.resize_size[0] != self.resize_size[1]:
            raise ValueError(f"resize='shortest' takes one size for the shorter side, got resize_size={resize_size!r}")
        if crop and self.resize_size and any(r < c for r, c in zip(self.resize_size, self.image_size)):
            raise ValueError(f"resize_size {self.resize_size} is smaller than the crop {self.image_size}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got mean={mean!r} std={std!r}")
        self.resize = resize
        self.interpolation = interpolation
        self.crop = bool(crop)
        self.max_pixels = max_pixels
        # (1, 1, 3) so they broadcast over an (H, W, 3) array
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 1, 3)
        self._inv_std = (1.0 / np.asarray(self.std, dtype=np.float64)).astype(np.float32).reshape(1, 1, 3)

    def __repr__(self) -> str:
        size = self.image_size[0] if self.image_size[0] == self.image_size[1] else self.image_size
        return (f"ImageTransform(image_size={size}, resize={self.resize!r}, interpolation={self.interpolation!r}, "
                f"crop={self.crop}, resize_size={self.resize_size}, mean={self.mean}, std={self.std})")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step for an input of (width, height)."""
        if self.resize == "squash":
            return self.resize_size[1], self.resize_size[0]
        if self.resize_size is None:
            ch, cw = self.image_size
            scale = max(ch / height, cw / width)
            return max(cw, int(width * scale)), max(ch, int(height * scale))
        short_target = self.resize_size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(short_target * long / short)  # int(), not round(): HF's rule
        return (short_target, new_long) if width <= height else (new_long, short_target)

    def __call__(self, image) -> torch.Tensor:
        """Preprocess one image.

        Args:
            image: a PIL image (any mode; no EXIF rotation is applied to it) or a path (loaded
                with `load_image`, which does rotate, under `max_pixels`).
        Returns:
            float32 tensor (3, H, W): (3, *image_size) when cropping or squashing.
        """
        if isinstance(image, (str, Path)):
            image = load_image(image, max_pixels=self.max_pixels)
        elif isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            raise TypeError(f"ImageTransform takes a PIL image or a path, got {type(image).__name__}")
        w, h = image.size
        new_w, new_h = self.output_size(w, h)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=INTERPOLATIONS[self.interpolation])
        if self.crop:
            ch, cw = self.image_size
            top, left = (new_h - ch) // 2, (new_w - cw) // 2
            if (ch, cw) != (new_h, new_w):
                image = image.crop((left, top, left + cw, top + ch))
        x = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)   # (H, W, 3) in [0, 1]
        x = (x - self._mean) * self._inv_std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)

    # ------------------------------------------------------------------ config round trip

    def to_dict(self) -> dict[str, Any]:
        """The preprocessing config in HF `preprocessor_config.json` keys (readable by
        `transformers.CLIPImageProcessor`) plus a `polymodal` block with our own names."""
        if self.resize_size is None:  # cover mode: HF has no equivalent; the nearest safe setting
            size = {"shortest_edge": max(self.image_size)}
        elif self.resize == "shortest":
            size = {"shortest_edge": self.resize_size[0]}
        else:
            size = {"height": self.resize_size[0], "width": self.resize_size[1]}
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": size,
            "resample": int(INTERPOLATIONS[self.interpolation]),
            "do_center_crop": self.crop,
            "crop_size": {"height": self.image_size[0], "width": self.image_size[1]},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "polymodal": {"resize": self.resize, "interpolation": self.interpolation,
                          "resize_size": None if self.resize_size is None else list(self.resize_size)},
        }

    # Keys HF writes that carry no information we need (or that we check separately).
    _HF_INFO_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class", "do_convert_rgb",
                     "default_to_square", "use_square_size", "do_pad", "pad_size", "data_format",
                     "input_data_format", "return_tensors", "device", "disable_grouping", "image_seq_length"}
    _KNOWN_KEYS = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                   "rescale_factor", "do_normalize", "image_mean", "image_std", "polymodal"} | _HF_INFO_KEYS

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "preprocessing config", strict: bool = True) -> "ImageTransform":
        """Build from `to_dict()` output or an HF CLIP preprocessor config dict.

        Args:
            d: the config dict.
            where: a name for error messages (the file path).
            strict: raise on keys we do not know; with False they are ignored with a warning.
        Returns:
            The ImageTransform.
        Raises:
            ValueError: unknown keys (strict), or settings this transform cannot reproduce
                (do_resize false, a rescale factor other than 1/255, longest_edge sizes ...).
        """
        unknown = sorted(set(d) - cls._KNOWN_KEYS)
        if unknown:
            msg = f"{where}: unknown keys {unknown}"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + " (ignored)", stacklevel=2)
        ours = d.get("polymodal", {})
        if not d.get("do_resize", True):
            raise ValueError(f"{where}: do_resize=false is not supported (the model needs a fixed input size)")
        if d.get("do_rescale", True) is False or abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise ValueError(f"{where}: only do_rescale=true with rescale_factor=1/255 is supported")
        if d.get("do_normalize", True):
            mean, std = d.get("image_mean", OPENAI_CLIP_MEAN), d.get("image_std", OPENAI_CLIP_STD)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if isinstance(mean, (int, float)):
            mean = (mean,) * 3
        if isinstance(std, (int, float)):
            std = (std,) * 3
        resample = int(d.get("resample", INTERPOLATIONS["bicubic"]))
        if resample not in _NAME_OF_RESAMPLE:
            raise ValueError(f"{where}: resample={resample} is not a Pillow filter id {sorted(_NAME_OF_RESAMPLE)}")
        interpolation = ours.get("interpolation", _NAME_OF_RESAMPLE[resample])

        size = d.get("size", 224)
        if isinstance(size, int):  # old HF configs: an int means the shorter side for CLIP
            size = {"shortest_edge": size}
        if not isinstance(size, dict):
            raise ValueError(f"{where}: size must be an int or a dict, got {size!r}")
        if "shortest_edge" in size and size.get("longest_edge") is None:
            resize, resize_size = "shortest", int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            resize, resize_size = "squash", (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(f"{where}: size {size} is not supported (use shortest_edge or height+width)")
        resize = ours.get("resize", resize)
        if "resize_size" in ours:  # ours is exact where HF keys cannot say it (cover mode)
            resize_size = None if ours["resize_size"] is None else tuple(ours["resize_size"])

        do_crop = bool(d.get("do_center_crop", resize == "shortest"))
        crop_size = d.get("crop_size")
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        elif isinstance(crop_size, dict):
            crop_size = (int(crop_size["height"]), int(crop_size["width"]))
        elif crop_size is None:
            crop_size = _pair(resize_size, "size") if resize_size is not None else None
        else:
            raise ValueError(f"{where}: crop_size must be an int or a dict, got {crop_size!r}")
        if not do_crop:
            # Without a crop the output is the resize target (exact only for squash).
            image_size = crop_size if resize == "shortest" else resize_size
            return cls(image_size, mean, std, resize, interpolation, crop=False, resize_size=resize_size)
        return cls(crop_size, mean, std, resize, interpolation, crop=True, resize_size=resize_size)


def from_hf_preprocessor_config(path_or_dict) -> ImageTransform:
    """Read an HF CLIP `preprocessor_config.json` (a file, its folder, or the parsed dict).

    Args:
        path_or_dict: path to the JSON file, to a folder holding `preprocessor_config.json`, or a dict.
    Returns:
        The equivalent ImageTransform; keys we do not use are ignored with a warning.
    Raises:
        FileNotFoundError: the file (or the folder's preprocessor_config.json) does not exist.
    """
    if isinstance(path_or_dict, dict):
        return ImageTransform.from_dict(path_or_dict, strict=False)
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no HF preprocessor config there")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    return ImageTransform.from_dict(d, where=str(path), strict=False)


def collate_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-image tensors (3, H, W) into a batch (B, 3, H, W); all must share one shape."""
    if not images:
        raise ValueError("collate_images got an empty list")
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise ValueError(f"collate_images needs one shape, got {sorted(shapes)}")
    return torch.stack(images)

"""Reading photos robustly: EXIF orientation, every common mode, reduced-size JPEG decoding, bombs refused."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from .errors import ImageError

#: Extensions treated as images when scanning a folder (lower case, with the dot).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm", ".pbm", ".pnm"}
)

#: Refuse images with more pixels than this (Pillow's own bomb check is a warning below 2x its limit).
MAX_PIXELS = 178_956_970

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never an image padded with grey


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes, path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Decode ``data`` (the bytes of ``path``) into an upright 8-bit RGB image.

    ``min_side``: the image will only be used at this resolution, so a JPEG may be decoded at a reduced
    scale (Pillow's draft mode, DCT scaling) as long as both sides stay >= ``min_side``. The upright size
    of the full image is kept in ``img.info["original_size"]`` (maps are returned at that size).
    Raises :class:`ImageError` with a one-line reason for anything that is not a complete, sane image.
    """
    if not data:
        raise ImageError(path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(path, f"refused: {w}x{h} pixels is more than {MAX_PIXELS} (decompression bomb?)")
            if getattr(img, "is_animated", False):
                img.seek(0)
            if img.format == "JPEG" and min_side:
                # Scale so that the smaller side stays >= min_side after EXIF rotation (both sides checked).
                scale = min(w, h) / float(min_side)
                if scale >= 2:
                    img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
            img.load()
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
            original = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            img = to_rgb(ImageOps.exif_transpose(img))
            img.info["original_size"] = original
            return img
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"refused: {e.args[0].split('.')[0] if e.args else 'decompression bomb'}") from None
    except Image.DecompressionBombWarning:
        raise ImageError(path, "refused: too many pixels (decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        msg = str(e).strip() or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            msg = "truncated image data"
        raise ImageError(path, f"cannot decode: {msg}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (CMYK, P with transparency, LA/RGBA, I;16, F, 1, L) to 8-bit RGB.

    Transparent regions are composited on white, the way a viewer shows them.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype("uint8")
        img = Image.fromarray(arr, "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Read and decode one image file (see :func:`decode_image`)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory") from None
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror or e}") from None
    return decode_image(data, path, min_side=min_side)

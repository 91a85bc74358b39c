"""Reading photos robustly: EXIF orientation, every common mode, reduced-size JPEG decoding, bounded memory.

Memory is bounded before anything large is allocated: a file larger than ``RETRIEVE_MAX_FILE_MB``
(200 MB by default) is refused before it is read, and an image whose header claims more than
``RETRIEVE_MAX_MEGAPIXELS`` (150 MP by default: a 100 MP photo passes) is refused before it is decoded.
Both checks are explicit comparisons, made in whichever thread decodes (no warnings filters involved).
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from retrieval.errors import ImageError, RetrieveError

#: Extensions treated as images when scanning a folder (lower case, with the dot).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm", ".pbm", ".pnm"}
)

#: Default limits; the environment variables RETRIEVE_MAX_FILE_MB and RETRIEVE_MAX_MEGAPIXELS override them.
MAX_FILE_MB = 200.0
MAX_MEGAPIXELS = 150.0

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never an image padded with grey
# Pillow's own guard warns (DecompressionBombWarning) above 89 MP — which would refuse a 100 MP photo only if
# a warnings filter turned the warning into an error, and warnings filters are process-wide and not
# thread-safe — and raises above 179 MP. decode_image compares the header's pixel count with its own,
# configurable limit before decoding instead, so Pillow's guard is switched off rather than half-relied on.
Image.MAX_IMAGE_PIXELS = None


def _limit(var: str, default: float, unit: str) -> float:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RetrieveError(f"{var}={raw!r}: not a positive number of {unit}")
    return value


def max_file_bytes() -> int:
    """The largest image file read, in bytes (``RETRIEVE_MAX_FILE_MB``, default 200)."""
    return int(_limit("RETRIEVE_MAX_FILE_MB", MAX_FILE_MB, "megabytes") * 1_000_000)


def max_pixels() -> int:
    """The most pixels an image may have to be decoded (``RETRIEVE_MAX_MEGAPIXELS``, default 150)."""
    return int(_limit("RETRIEVE_MAX_MEGAPIXELS", MAX_MEGAPIXELS, "megapixels") * 1_000_000)


def _too_large(path: str | os.PathLike, size: int, cap: int) -> ImageError:
    return ImageError(path, f"refused: the file is {size / 1e6:.1f} MB, more than the {cap / 1e6:g} MB limit "
                            "(RETRIEVE_MAX_FILE_MB)")


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes, path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Decode ``data`` (the bytes of ``path``) into an upright 8-bit RGB image.

    ``min_side``: the image will only be used at this resolution, so a JPEG may be decoded at a reduced
    scale (Pillow's draft mode, DCT scaling) as long as both sides stay >= ``min_side``. The upright size
    of the full image is kept in ``img.info["original_size"]`` (maps are returned at that size).
    Raises :class:`ImageError` with a one-line reason for anything that is not a complete, sane image,
    and for data over the size limit or a header claiming more pixels than the limit (see the module
    docstring; nothing is decoded then).
    """
    if not data:
        raise ImageError(path, "empty file")
    cap = max_file_bytes()
    if len(data) > cap:
        raise _too_large(path, len(data), cap)
    limit = max_pixels()
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > limit:
            raise ImageError(path, f"refused: {w}x{h} pixels ({w * h / 1e6:.0f} MP) is more than the "
                                   f"{limit / 1e6:g} MP limit (RETRIEVE_MAX_MEGAPIXELS; a decompression bomb?)")
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


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of one image file, refused before reading when it is larger than the limit (ImageError)."""
    cap = max_file_bytes()
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError
            if st.st_size > cap:
                raise _too_large(path, st.st_size, cap)
            data = f.read(st.st_size + 1)  # one byte more tells a file that grew since fstat
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory") from None
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror or e}") from None
    if len(data) > st.st_size:
        raise ImageError(path, "changed while it was read (still being written?)")
    return data


def load_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Read and decode one image file (see :func:`read_image_bytes` and :func:`decode_image`)."""
    return decode_image(read_image_bytes(path), path, min_side=min_side)

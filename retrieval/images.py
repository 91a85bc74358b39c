"""Reading photos robustly: EXIF orientation, every common mode, reduced-size JPEG decoding, bounded memory.

Memory is bounded before anything large is allocated: a file larger than ``RETRIEVE_MAX_FILE_MB``
(200 MB by default) is refused before it is read, and an image whose header claims more than
``RETRIEVE_MAX_MEGAPIXELS`` (150 MP by default: a 100 MP photo passes) is refused before it is decoded.
Both checks are explicit comparisons, made in whichever thread decodes (no warnings filters involved).

Phone photos: HEIC/HEIF through pillow-heif (libheif), registered with Pillow the first time a file in an ISO media
container (HEIF, AVIF) is decoded, so a search among JPEGs never imports it; AVIF through Pillow's own plugin (in its
wheels since 11.3), which reports the photo's rotation as its EXIF orientation. A HEIF's rotation (its ``irot``/``imir``
boxes) is applied by libheif, which then reports EXIF orientation 1. Either way the photo comes out upright once, as
a JPEG with an EXIF orientation does. Formats photographers keep that retrieve cannot decode (camera raw, JPEG XL)
are found by the scan and refused by name with the reason (:data:`NOT_DECODED`), rather than passed over in silence.
"""
from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from retrieval.errors import ImageError, RetrieveError

#: Extensions treated as images when scanning a folder (lower case, with the dot).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm", ".pbm", ".pnm",
     ".heic", ".heif", ".hif", ".avif"}
)
_RAW = "a camera raw file: not decoded (index the JPEG the camera wrote beside it, or an exported copy)"
#: Photo formats found when scanning but not decoded, with the reason each is refused (a TIFF-based raw file would
#: otherwise open as its small embedded preview).
NOT_DECODED = {
    ".jxl": "JPEG XL: not supported (index a JPEG, PNG, WebP, HEIC or AVIF copy)",
    **dict.fromkeys((".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
                     ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".iiq", ".rwl"), _RAW),
}
_HEIF = {".heic", ".heif", ".hif"}
_heif_lock = threading.Lock()
_heif_state: str | None = None  # None: not tried yet; "" registered; else why HEIF cannot be decoded

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
    """An extension the scan takes: a format retrieve decodes, or a photo format it names when refusing it."""
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in NOT_DECODED


def _heif_plugin() -> str:
    """Register pillow-heif's HEIF opener with Pillow (once, thread-safe); "" when registered, else the reason HEIC
    cannot be decoded. Its thumbnails, depth and auxiliary images are not read: only the primary image is used."""
    global _heif_state
    with _heif_lock:
        if _heif_state is None:
            try:
                import pillow_heif
            except ImportError:
                _heif_state = "HEIC/HEIF needs pillow-heif, which is not installed (pip install pillow-heif)"
            else:
                pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
                from PIL import features

                if not features.check("avif") and hasattr(pillow_heif, "register_avif_opener"):
                    pillow_heif.register_avif_opener(thumbnails=False, depth_images=False, aux_images=False)
                _heif_state = ""
        return _heif_state


def _unidentified(data: bytes, path: str | os.PathLike) -> str:
    """Why Pillow (and its plugins) could not identify ``data``, naming the format where the extension says it."""
    suffix = Path(os.fspath(path)).suffix.lower()
    if suffix in _HEIF and _heif_plugin():
        return _heif_plugin()
    if suffix == ".avif":
        from PIL import features

        if not features.check("avif"):
            return "AVIF: this Pillow was built without AVIF support (its wheels read AVIF since 11.3)"
    return "not a recognised image format"


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
    suffix = Path(os.fspath(path)).suffix.lower()
    if suffix in NOT_DECODED and suffix not in Image.registered_extensions():  # (unless a plugin installed reads it)
        raise ImageError(path, NOT_DECODED[suffix])
    cap = max_file_bytes()
    if len(data) > cap:
        raise _too_large(path, len(data), cap)
    limit = max_pixels()
    if data[4:8] == b"ftyp":  # an ISO media container (HEIF, AVIF): the HEIF opener is needed
        _heif_plugin()
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > limit:
            raise ImageError(path, f"refused: {w}x{h} pixels ({w * h / 1e6:.0f} MP) is more than the "
                                   f"{limit / 1e6:g} MP limit (RETRIEVE_MAX_MEGAPIXELS; a decompression bomb?)")
        if getattr(img, "is_animated", False) and img.format != "HEIF":  # a HEIF opens on its primary image
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
        raise ImageError(path, _unidentified(data, path)) from None
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


def own_size(img: Image.Image) -> tuple[int, int]:
    """(H, W) of the photo itself, also when it was decoded at reduced size (JPEG draft mode: ``original_size``)."""
    w, h = img.info.get("original_size", img.size)
    return int(h), int(w)

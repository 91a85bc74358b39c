"""Memory bounds: files over the size limit are not read, headers claiming too many pixels are not decoded,
a 100 MP photo is, and none of it depends on warnings filters (decoding runs in threads)."""
from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageDraw

from clitools import run
from retrieval.errors import ImageError, RetrieveError
from retrieval.images import decode_image, load_image, max_file_bytes, max_pixels


def png_header(w: int, h: int) -> bytes:
    """A valid PNG header claiming w×h RGB pixels, with almost no data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_defaults_pass_a_100_mp_photo_and_a_200_mb_file():
    assert max_pixels() == 150_000_000 and max_file_bytes() == 200_000_000


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate(300_000_000)  # sparse: 300 MB claimed, nothing on disk

    def load():
        with pytest.raises(ImageError, match=r"huge.jpg: refused: the file is 300.0 MB, more than the 200 MB limit "
                                             r"\(RETRIEVE_MAX_FILE_MB\)$"):
            load_image(big)

    t = time.perf_counter()
    assert _peak_bytes(load) < 1_000_000  # not read into memory
    assert time.perf_counter() - t < 1


def test_the_size_limit_is_configurable_and_indexing_skips_with_the_reason(tmp_path, monkeypatch, photo_dir):
    d = tmp_path / "photos"
    d.mkdir()
    small = d / "small.jpg"
    Image.open(photo_dir / "chelsea.jpg").resize((60, 40)).save(small, quality=80)
    (d / "big.jpg").write_bytes((photo_dir / "astronaut.jpg").read_bytes())
    size = (d / "big.jpg").stat().st_size
    assert small.stat().st_size < 50_000 < size
    monkeypatch.setenv("RETRIEVE_MAX_FILE_MB", "0.05")
    r = run("index", d, "--index", tmp_path / "idx", "--json")
    assert '"indexed": 1' in r.stdout and '"skipped": 1' in r.stdout
    assert r.stderr.strip() == (f"{d / 'big.jpg'}: refused: the file is {size / 1e6:.1f} MB, more than the 0.05 MB "
                                "limit (RETRIEVE_MAX_FILE_MB)")


def test_a_header_claiming_huge_dimensions_is_refused_fast_without_allocating(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))

    def load():
        with pytest.raises(ImageError, match=r"bomb.png: refused: 100000x100000 pixels \(10000 MP\) is more than the "
                                             r"150 MP limit \(RETRIEVE_MAX_MEGAPIXELS; a decompression bomb\?\)$"):
            load_image(bomb)

    t = time.perf_counter()
    assert _peak_bytes(load) < 1_000_000
    assert time.perf_counter() - t < 1


def test_the_pixel_limit_is_configurable(monkeypatch):
    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
        return buf.getvalue()

    monkeypatch.setenv("RETRIEVE_MAX_MEGAPIXELS", "0.01")
    assert decode_image(png(100, 100), "ok.png").size == (100, 100)
    with pytest.raises(ImageError, match=r"refused: 101x100 pixels .* the 0.01 MP limit"):
        decode_image(png(101, 100), "big.png")
    monkeypatch.setenv("RETRIEVE_MAX_MEGAPIXELS", "lots")
    with pytest.raises(RetrieveError, match=r"^RETRIEVE_MAX_MEGAPIXELS='lots': not a positive number of megapixels$"):
        decode_image(png(10, 10), "any.png")
    monkeypatch.setenv("RETRIEVE_MAX_FILE_MB", "-1")
    with pytest.raises(RetrieveError, match=r"^RETRIEVE_MAX_FILE_MB='-1': not a positive number of megabytes$"):
        max_file_bytes()


def test_a_100_mp_photo_is_decoded_at_reduced_size():
    # 10 000 × 10 000 is above Pillow's own warning threshold (89 MP), which used to refuse it as a "bomb".
    img = Image.new("L", (10_000, 10_000), 128)
    ImageDraw.Draw(img).ellipse((2000, 2000, 8000, 8000), fill=30)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    del img
    out = decode_image(buf.getvalue(), "big.jpg", min_side=224)
    assert out.info["original_size"] == (10_000, 10_000)
    assert out.mode == "RGB" and 224 <= min(out.size) <= 2 * 10_000 // 8  # DCT-scaled, not 100 MP in memory


def test_limits_hold_in_threads_without_warnings_filters(monkeypatch):
    def no_filters(*a, **k):
        raise AssertionError("decoding must not depend on warnings filters")

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, "PNG")
    good, bomb = buf.getvalue(), png_header(60_000, 60_000)
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        try:
            return decode_image(good if i % 2 else bomb, f"{i}.png").size
        except ImageError as e:
            return e.reason.split(":")[0]

    with monkeypatch.context() as m, ThreadPoolExecutor(8) as pool:  # undone before pytest reports
        m.setattr(warnings, "catch_warnings", no_filters)
        m.setattr(warnings, "simplefilter", no_filters)
        got = list(pool.map(work, range(64)))
    assert got == ["refused" if i % 2 == 0 else (64, 48) for i in range(64)]

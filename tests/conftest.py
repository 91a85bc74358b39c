"""Shared fixtures: real photos (scikit-image's bundled ones), the embedded backbone, temp index dirs."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep ONNX exports and default index locations out of the user's home."""
    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "RETRIEVE_INDEX")}
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data"))
    os.environ.pop("RETRIEVE_INDEX", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def skimage_photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    return Image.fromarray(arr).convert("RGB")


PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "hubble_deep_field", "horse")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A small real collection: eight scikit-image photos (JPEG/PNG) plus a cropped, flipped cat."""
    d = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        im = skimage_photo(name)
        (im.save(d / f"{name}.jpg", quality=92) if i % 2 == 0 else im.save(d / f"{name}.png"))
    cat = skimage_photo("chelsea")
    sub = d / "more"
    sub.mkdir()
    cat.crop((60, 0, 360, 260)).transpose(Image.FLIP_LEFT_RIGHT).save(sub / "cat_crop.jpg", quality=90)
    (d / "notes.txt").write_text("not an image, passed over silently")
    return d


@pytest.fixture
def photos(photo_dir, tmp_path) -> Path:
    """A private, writable copy of the collection (tests modify it)."""
    d = tmp_path / "photos"
    shutil.copytree(photo_dir, d)
    return d


@pytest.fixture(scope="session")
def lite0():
    from retrieval.models.loading import load_backbone

    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def pg():
    """A PostgreSQL server's URL (tests/pgserver.py: $RETRIEVE_TEST_PG_URL, else a throwaway cluster started here and
    stopped after the module); the test is skipped with the reason when there is none."""
    from pgserver import server

    url, why, cluster = server()
    if url is None:
        pytest.skip(why)
    yield url
    if cluster is not None:
        cluster.stop()

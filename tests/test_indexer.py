"""`retrieve index` on real photos: first run, incremental re-runs, modify/add/delete/move, bad files, settings."""
from __future__ import annotations

import json
import os
import shutil

import faiss
import numpy as np
from PIL import Image

from clitools import run, run_json
from conftest import skimage_photo
from retrieval.index.store import IndexStore

N_PHOTOS = 9  # eight photos + one crop in a sub-folder; notes.txt is not an image

REPORT_KEYS = {"indexed", "unchanged", "removed", "skipped", "total", "seconds"}


def consistent(index_dir) -> dict[str, int]:
    """Open the index and check SQLite and FAISS agree exactly; return path → id."""
    with IndexStore.open(index_dir) as store:
        with store.session() as s:
            from retrieval.index.schema import ImageRow
            from sqlalchemy import select

            rows = dict(s.execute(select(ImageRow.path, ImageRow.id)).all())
        index = store.faiss_index()
        ids = set(faiss.vector_to_array(index.id_map).tolist()) if index.ntotal else set()
        assert ids == set(rows.values()) and index.ntotal == len(rows)
        on_disk = faiss.read_index(str(store.directory / "vectors.faiss"))
        assert on_disk.ntotal == len(rows)  # the file itself was brought up to date
    return rows


def test_first_run_then_unchanged_rerun(photos, tmp_path):
    idx = tmp_path / "idx"
    first = run_json("index", photos, "--index", idx)
    assert REPORT_KEYS <= set(first)
    assert first["indexed"] == N_PHOTOS and first["total"] == N_PHOTOS and first["skipped"] == 0
    rows = consistent(idx)
    assert all(os.path.isabs(p) for p in rows) and not any(p.endswith(".txt") for p in rows)

    again = run_json("index", photos, "--index", idx)
    assert again["indexed"] == 0 and again["unchanged"] == N_PHOTOS and again["total"] == N_PHOTOS
    assert consistent(idx) == rows


def test_modify_add_delete_move(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    before = consistent(idx)

    # modified content → re-embedded; touched only (same bytes, new mtime) → not re-embedded
    skimage_photo("coffee").rotate(90, expand=True).save(photos / "coffee.png")
    os.utime(photos / "rocket.png", ns=(1, 1))
    # added
    skimage_photo("chelsea").resize((200, 133)).save(photos / "more" / "small_cat.png")
    # deleted
    os.remove(photos / "coins.png")
    # moved and renamed
    os.makedirs(photos / "moved")
    shutil.move(photos / "astronaut.jpg", photos / "moved" / "space person.jpg")

    r = run_json("index", photos, "--index", idx)
    assert r["indexed"] == 2  # coffee (changed) + small_cat (new)
    assert r["moved"] == 1 and r["removed"] == 1
    assert r["unchanged"] == N_PHOTOS - 3  # all but coffee, coins, astronaut (rocket's touch included)
    assert r["total"] == N_PHOTOS
    after = consistent(idx)
    assert after[str(photos / "moved" / "space person.jpg")] == before[str(photos / "astronaut.jpg")]
    assert after[str(photos / "coffee.png")] != before[str(photos / "coffee.png")]
    assert str(photos / "coins.png") not in after
    assert after[str(photos / "rocket.png")] == before[str(photos / "rocket.png")]


def test_copy_reuses_the_stored_vector(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    shutil.copy(photos / "horse.png", photos / "more" / "horse copy.png")
    r = run_json("index", photos, "--index", idx)
    assert r["indexed"] == 1 and r["total"] == N_PHOTOS + 1
    with IndexStore.open(idx) as store:
        a, b = store.row_by_path(str(photos / "horse.png")), store.row_by_path(str(photos / "more" / "horse copy.png"))
        assert a.id != b.id and a.vector == b.vector


def test_bad_files_are_skipped_reported_and_not_retried(photos, tmp_path):
    idx = tmp_path / "idx"
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("hello, I am not a PNG")
    data = (photos / "camera.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(data[: len(data) // 8])
    r = run("index", photos, "--index", idx, "--json")
    report = json.loads(r.stdout)
    assert report["skipped"] == 3 and report["indexed"] == N_PHOTOS and report["total"] == N_PHOTOS
    lines = sorted(r.stderr.strip().splitlines())
    assert len(lines) == 3
    assert lines[0].startswith(f"{photos / 'cut.jpg'}: ") and "truncated" in lines[0]
    assert lines[1] == f"{photos / 'empty.jpg'}: empty file"
    assert lines[2].startswith(f"{photos / 'text.png'}: ")

    again = run("index", photos, "--index", idx, "--json")
    rep2 = json.loads(again.stdout)
    assert rep2["skipped"] == 0 and rep2["skipped_before"] == 3 and rep2["indexed"] == 0
    assert again.stderr.strip() == ""

    skimage_photo("camera").save(photos / "text.png")  # the file is fixed: indexed next time
    rep3 = run_json("index", photos, "--index", idx)
    assert rep3["indexed"] == 1 and rep3["skipped_before"] == 2 and rep3["total"] == N_PHOTOS + 1
    consistent(idx)


def test_settings_mismatch_is_refused(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    r = run("index", photos, "--index", idx, "--metric", "l2", ok=False)
    assert r.exit_code == 1 and "metric cosine, not l2" in r.stderr and "Traceback" not in r.stderr
    r = run("index", photos, "--index", idx, "--model", "resnet18", ok=False)
    assert r.exit_code == 1 and "model efficientnet_lite0, not resnet18" in r.stderr
    assert consistent(idx)  # untouched


def test_missing_path_fails_the_command(tmp_path):
    r = run("index", tmp_path / "nowhere", "--index", tmp_path / "idx", ok=False)
    assert r.exit_code == 1 and "nowhere: no such file or directory" in r.stderr


def test_info(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx, "--metric", "l2")
    info = run_json("info", "--index", idx)
    assert info["images"] == N_PHOTOS and info["metric"] == "l2" and info["model"] == "efficientnet_lite0"
    assert info["index_type"] == "flat" and info["size_bytes"] > 0 and info["updated_at"]
    text = run("info", "--index", idx).stdout
    assert "efficientnet_lite0" in text and str(idx) in text


def test_index_dir_from_environment(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVE_INDEX", str(tmp_path / "env-idx"))
    r = run_json("index", photos / "more")
    assert r["total"] == 1 and r["index"] == str(tmp_path / "env-idx")


def test_mean_embedding_is_stored(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    with IndexStore.open(idx) as store:
        vecs = np.concatenate([v for _, v in store.iter_vectors()])
        np.testing.assert_allclose(store.mean, vecs.mean(0), rtol=1e-5, atol=1e-6)


def test_odd_images_are_indexed(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    cat = skimage_photo("chelsea")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one_pixel.png")
    cat.resize((4000, 60)).save(d / "panorama.jpg")
    cat.convert("CMYK").save(d / "cmyk.jpg")
    cat.convert("P", palette=Image.ADAPTIVE).save(d / "palette.gif")
    cat.convert("L").save(d / "grey.pgm")
    Image.fromarray((np.asarray(cat.convert("L"), np.uint16) * 257)).save(d / "sixteen.png")
    rgba = cat.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.webp")
    r = run_json("index", d, "--index", tmp_path / "idx")
    assert r["skipped"] == 0 and r["indexed"] == 7


def test_a_large_jpeg_is_recorded_at_its_own_size(tmp_path):
    """A JPEG is decoded at a reduced scale for the network (draft mode); the row still records the photo's own
    width and height (the keeper of a duplicates group is the largest photo; thumbnails and boxes use them)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    skimage_photo("chelsea").resize((1804, 1200)).save(photos / "big.jpg", quality=90)
    run("index", photos, "--index", tmp_path / "idx")
    with IndexStore.open(tmp_path / "idx") as store:
        assert [(r.width, r.height) for r in store.rows_by_ids(store.row_ids()).values()] == [(1804, 1200)]


def test_a_run_without_its_head_mirrors_the_vectors_once_at_its_end(photos, tmp_path, monkeypatch):
    """A run that starts before the index's head is fitted adds no vector to FAISS as it commits (every vector
    changes with the head it fits at its end: at 100 k rows the in-run mirror held 0.5 GB of raw 1280-d vectors
    only to throw them away); the vector file it writes holds every row through the head, also when the run is
    interrupted. Once the head exists, a run mirrors its rows as it commits."""
    import indexer.run as run_module
    from indexer.run import index_paths

    for i, name in enumerate(("astronaut.jpg", "coffee.png", "chelsea.jpg")):  # 12 photos: a head is fitted (≥ 10)
        Image.open(photos / name).rotate(90 * (i + 1), expand=True).save(photos / f"turned{i}.jpg", quality=90)
    seen = []
    real = run_module.commit_embedded

    def commit(store, batch, vecs, rows, report):
        real(store, batch, vecs, rows, report)
        seen.append((store.head is not None, store.faiss_index().ntotal, store.count()))

    monkeypatch.setattr(run_module, "commit_embedded", commit)
    idx = tmp_path / "idx"
    index_paths([photos], idx, batch_size=4)
    assert len(seen) == 3 and all(not head and ntotal == 0 for head, ntotal, _ in seen)  # nothing mirrored
    assert len(consistent(idx)) == 12
    with IndexStore.open(idx) as store:
        assert store.head is not None and store.faiss_index().d == store.vector_dim  # through the fitted head

    seen.clear()
    for i in range(2):
        Image.open(photos / "coffee.png").convert("RGB").crop((i * 40, 0, 500, 400)).save(photos / f"more{i}.jpg", quality=90)
    index_paths([photos], idx, batch_size=4)
    assert seen == [(True, 14, 14)]  # the head exists: mirrored as committed
    assert len(consistent(idx)) == 14

    def stopped(store, batch, vecs, rows, report):  # Ctrl-C after the first commit of a first run
        real(store, batch, vecs, rows, report)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "commit_embedded", stopped)
    idx2 = tmp_path / "idx2"
    report = index_paths([photos], idx2, batch_size=4)
    assert report.interrupted and len(consistent(idx2)) == 4  # what was committed, and FAISS equal to it

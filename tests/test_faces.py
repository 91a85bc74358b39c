"""--preset faces: the PyTorch port of dlib's face ResNet, per-face rows, search by face, maps on the faces.

Skipped (one line) without the faces extra. Photos: scikit-image's astronaut (one real face, plus one
low-scoring HOG detection on the suit that makes a convenient "different person") and a group photo made
here: the astronaut's face pasted three times (one mirrored, at three scales) onto the coffee photo.
"""
from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import run, run_process

HAVE_FACES = importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
pytestmark = pytest.mark.skipif(not HAVE_FACES, reason="faces extra not installed: pip install -e '.[faces]'")

GROUP_SIZE = (800, 533)
SPOTS = [(40, 60, 1.0, False), (470, 40, 0.8, True), (300, 300, 0.9, False)]  # x, y, scale, mirrored (180 px crop)


def _group(astronaut: Image.Image, coffee: Image.Image) -> Image.Image:
    face = astronaut.crop((130, 30, 310, 210))
    bg = coffee.resize(GROUP_SIZE)
    for x, y, s, mirror in SPOTS:
        f = face.resize((int(180 * s), int(180 * s)))
        bg.paste(f.transpose(Image.FLIP_LEFT_RIGHT) if mirror else f, (x, y))
    return bg


@pytest.fixture(scope="module")
def face_photos(tmp_path_factory) -> Path:
    from conftest import skimage_photo

    d = tmp_path_factory.mktemp("face_photos")
    astronaut, coffee = skimage_photo("astronaut"), skimage_photo("coffee")
    astronaut.save(d / "astronaut.png")
    coffee.save(d / "coffee.png")  # no face
    _group(astronaut, coffee).save(d / "group.png")
    return d


@pytest.fixture(scope="module")
def faces_index(face_photos, tmp_path_factory):
    idx = tmp_path_factory.mktemp("faces_index") / "idx"
    r = run_process("index", face_photos, "--preset", "faces", "--index", idx, "--json")
    assert r.returncode == 0, r.stderr
    return idx, json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def finder():
    from retrieval.faces.detect import FaceFinder

    return FaceFinder("hog")


def _rows(idx: Path) -> list[tuple]:
    with sqlite3.connect(idx / "index.db") as c:
        return c.execute("SELECT path, face, box, width, height FROM images ORDER BY path, face").fetchall()


def test_port_equals_dlib(face_photos, finder):
    """The port reads dlib's .dat itself and gives dlib's own descriptors (max |Δ| ≤ 1e-4) on real chips."""
    import dlib
    import torch

    from retrieval.faces.network import chip_tensor, load_net, model_file

    chips = [f.chip for name in ("astronaut.png", "group.png")
             for f in finder.faces(np.asarray(Image.open(face_photos / name).convert("RGB")))]
    assert len(chips) >= 4
    ref = dlib.face_recognition_model_v1(str(model_file("resnet")))
    want = np.array([np.array(ref.compute_face_descriptor(c)) for c in chips])
    net, _, _ = load_net()
    with torch.inference_mode():
        got = net.descriptor(chip_tensor(chips)).numpy()
    assert np.abs(got - want).max() <= 1e-4
    # and through the project's Backbone (its fast path, its preprocessing): GAP of the map = the descriptor
    from retrieval.faces.network import load_backbone

    bb = load_backbone(fast="eager")  # (the ONNX path is what the CLI tests below run)
    a, pooled = bb.embed(bb.preprocess.batch([Image.fromarray(c) for c in chips]))
    assert a.shape[1] == 128 and np.abs(pooled.numpy() - want).max() <= 1e-4


def test_alignment_transform_is_dlibs(face_photos, finder):
    """The chip → photo transform reproduces dlib's own chip when the photo is warped through it."""
    import cv2

    rgb = np.asarray(Image.open(face_photos / "group.png").convert("RGB"))
    for f in finder.faces(rgb):
        chip = cv2.warpAffine(rgb, f.to_photo, (150, 150), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        assert np.abs(chip.astype(float) - f.chip).mean() < 2.0


def test_group_photo_gives_one_row_per_face(faces_index, face_photos):
    idx, report, _ = faces_index
    rows = [r for r in _rows(idx) if r[0].endswith("group.png")]
    assert [r[1] for r in rows] == [0, 1, 2]
    w, h = GROUP_SIZE
    pasted = [(x, y, x + int(180 * s), y + int(180 * s)) for x, y, s, _ in SPOTS]
    for _, _, box, width, height in rows:
        x0, y0, x1, y1 = map(int, box.split(","))
        assert (width, height) == (w, h) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert any(px0 < cx < px1 and py0 < cy < py1 for px0, py0, px1, py1 in pasted)
    areas = [(int(b.split(",")[2]) - int(b.split(",")[0])) for _, _, b, _, _ in rows]
    assert areas == sorted(areas, reverse=True)  # face 0 is the largest
    assert report["faces"] == len(_rows(idx)) and report["indexed"] == 2


def test_photo_without_face_is_reported_and_counted(faces_index):
    idx, report, stderr = faces_index
    assert report["no_face"] == 1 and "coffee.png: no face found" in stderr
    assert not [r for r in _rows(idx) if r[0].endswith("coffee.png")]
    # remembered, not retried: a second run changes nothing
    r = run_process("index", _photos_of(idx), "--index", idx, "--json")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["faces"] == 0 and again["unchanged"] == 2 and again["skipped_before"] == 1


def _photos_of(idx: Path) -> str:
    with sqlite3.connect(idx / "index.db") as c:
        return str(Path(c.execute("SELECT path FROM images LIMIT 1").fetchone()[0]).parent)


def test_preset_recorded_in_index(faces_index):
    """A new faces index: cosine of descriptors centred on the shipped mean face (a fixed head, not fitted on the
    collection), the same-person threshold shipped with it, the faces' μ_tap for the maps."""
    idx, _, _ = faces_index
    from retrieval.faces.network import mean_face
    from retrieval.index.store import IndexStore

    mu, threshold = mean_face()
    with IndexStore.open(idx) as store:
        st = store.settings
        assert st.preset == "faces" and st.metric == "cosine" and st.model == "dlib_face_resnet"
        assert st.faces == {"detector": "hog", "upsample": 1, "threshold": threshold} and st.schema_version == 3
        assert store.head.proj is None and np.allclose(store.head.mean, mu) and st.head["fixed"]
        ref = store.get_value("faces_explain_reference")  # SFAM's μ_tap: the 8×8 layer's mean over the faces
        assert ref["tap"] == "net.units.9" and ref["sampled"] == ref["images"] == store.count()
        assert len(ref["mean_tap"]) == 128 and min(ref["mean_tap"]) >= 0  # after a ReLU
    assert json.loads(run("info", "--index", idx, "--json").stdout)["preset"] == "faces"


def test_same_person_rule():
    """At or above the threshold on the centred cosine; an index made before this score keeps dlib's rule on its
    stored -d² (a Euclidean distance under 0.6)."""
    from types import SimpleNamespace

    from retrieval.faces.search import same_person

    new = SimpleNamespace(metric="cosine", faces={"threshold": 0.5})
    assert same_person(0.5, new) and same_person(0.93, new) and not same_person(0.4999, new)
    old = SimpleNamespace(metric="l2", faces={"threshold": 0.6})
    assert same_person(-0.41 ** 2, old) and not same_person(-0.6 ** 2, old) and not same_person(-0.7 ** 2, old)


def test_search_by_face_with_maps_on_the_faces(faces_index, face_photos, tmp_path):
    idx, _, _ = faces_index
    out = tmp_path / "explain"
    r = run_process("search", face_photos / "group.png", "--face", "1", "--index", idx, "-k", "10", "--explain",
                    "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["face"] == 1 and d["faces_in_query"] == 3 and d["metric"] == "cosine"
    hits = d["results"]
    same = [h for h in hits if h["verdict"]["same_person"]]
    # the other two pasted faces and the astronaut's own face: the same person, at or above the threshold
    assert len(same) == 3 and {Path(h["path"]).name for h in same} == {"group.png", "astronaut.png"}
    assert all(h["score"] >= 0.5 and h["verdict"]["headline"] == "the same person" for h in same)
    assert all(h["score"] < 0.5 and h["verdict"]["headline"] == "not the same person"
               for h in hits if not h["verdict"]["same_person"])
    assert len(hits) == 4  # the query face itself is left out; the astronaut's suit detection is the one "different"
    for h in hits:  # the explanation's score and verdict are the search's
        assert abs(h["explanation"]["score"] - h["score"]) < 1e-5 and h["explanation"]["verdict"] == h["verdict"]
    for h in same:
        e = h["explanation"]
        x0, y0, x1, y1 = h["box"]
        m, s = np.load(out / e["result_map"]), e["result_map_scale"]  # saved at most 256 px, s of the photo's size
        photo = Image.open(h["path"])
        assert m.dtype == np.float16 and max(m.shape) <= 256
        assert abs(m.shape[0] - photo.height * s) <= 1 and abs(m.shape[1] - photo.width * s) <= 1
        yy, xx = (np.array(np.unravel_index(np.argmax(m), m.shape)) + 0.5) / s  # the peak in the photo's pixels
        g = (x1 - x0) // 8  # the peak on the face: the detector's tight box, brows and temples at its edge
        assert x0 - g <= xx < x1 + g and y0 - g <= yy < y1 + g
        assert e["energy_in_box"]["result"] > 0.5 and e["energy_in_box"]["query"] > 0.5
        assert abs(e["cis_sum"] - h["score"]) < 1e-5 and e["explained"]["exact"]  # Σ CIS = the search's score
    qm, s = np.load(out / same[0]["explanation"]["query_map"]), same[0]["explanation"]["query_map_scale"]
    qx0, qy0, qx1, qy1 = (np.array(d["box"]) * s).round().astype(int)
    pad = (qx1 - qx0) + 1  # nothing of the map lands farther than the aligned chip reaches from the box
    mask = np.zeros_like(qm, bool)
    mask[max(0, qy0 - pad):qy1 + pad, max(0, qx0 - pad):qx1 + pad] = True
    assert qm[~mask].max() == 0
    assert (out / "report.html").read_text().count("— the same person</h2>") == 3  # each one's heading


def test_face_number_out_of_range(faces_index, face_photos):
    idx, _, _ = faces_index
    r = run("search", face_photos / "group.png", "--face", "7", "--index", idx, ok=False)
    assert r.exit_code != 0
    assert "--face 7: the photo has 3 faces" in r.stderr and "Traceback" not in r.stderr


def test_schema2_index_upgrades_to_per_face_rows(tmp_path):
    """A schema-2 database (path unique alone, no face/box) gains the columns step by step on a writable open."""
    from sqlalchemy.exc import IntegrityError

    from retrieval.index.schema import ImageRow
    from retrieval.index.settings import IndexSettings
    from retrieval.index.store import IndexStore

    st = IndexSettings(model="efficientnet_lite0", weights_id="x", weights_source="x", preprocess={"size": 224},
                       metric="cosine", dim=4, index_type="flat", faiss_factory="Flat")
    IndexStore.create(tmp_path / "i", st).close()
    db = tmp_path / "i" / "index.db"
    with sqlite3.connect(db) as c:  # back to schema 2 as it was
        c.execute("DROP INDEX ux_images_path_face")
        c.execute("DROP INDEX ix_images_path")
        c.execute("ALTER TABLE images DROP COLUMN face")
        c.execute("ALTER TABLE images DROP COLUMN box")
        c.execute("CREATE UNIQUE INDEX ix_images_path ON images (path)")
        c.execute("UPDATE settings SET value='2' WHERE key='schema_version'")
        c.execute("INSERT INTO images (path,size,mtime_ns,sha256,width,height,vector,indexed_at) "
                  "VALUES ('a.jpg',1,1,'s',1,1,x'00000000',0)")
    with IndexStore.open(tmp_path / "i") as store:  # a reader of the old schema still reads it
        assert store.rows_by_ids([1])[1].path == "a.jpg"
    with IndexStore.open(tmp_path / "i", writable=True) as store:
        assert store.settings.schema_version == 3
        with store.session() as s, s.begin():
            for n in (0, 1):
                s.add(ImageRow(path="b.jpg", size=1, mtime_ns=1, sha256="s", width=1, height=1, vector=b"\0" * 16,
                               indexed_at=0, face=n, box="0,0,1,1"))
        with pytest.raises(IntegrityError), store.session() as s, s.begin():
            s.add(ImageRow(path="a.jpg", size=1, mtime_ns=1, sha256="s", width=1, height=1, vector=b"\0" * 16,
                           indexed_at=0))


def test_missing_extra_is_one_line(monkeypatch):
    import sys

    from retrieval.faces.network import need_dlib
    from retrieval.errors import RetrieveError

    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(RetrieveError, match=r"pip install -e '\.\[faces\]'"):
        need_dlib()


def test_chip_map_puts_cells_where_the_network_has_them():
    """The face ResNet pads none of its strided layers: the 8×8 cells sit at 15 + 16·l on the 150 px chip (not
    spread evenly over it), nothing lies beyond half a stride from the outer cells, and a one-cell map peaks
    on its cell's centre."""
    from explain.faces import chip_map

    m = chip_map(np.ones((8, 8)))
    assert m.shape == (150, 150)
    assert np.allclose(m[7:136, 7:136], 1) and m[:7].max() == 0 and m[136:].max() == 0 and m[:, :7].max() == 0
    for l, c in ((1, 6), (3, 5), (6, 2)):
        raw = np.zeros((8, 8))
        raw[l, c] = 1
        yy, xx = np.unravel_index(np.argmax(chip_map(raw)), (150, 150))
        assert (yy, xx) == (15 + 16 * l, 15 + 16 * c)
    assert chip_map(np.ones((5, 5))) is None  # another grid: the caller keeps its own upsampling


def test_explain_pair_on_a_faces_index(faces_index, face_photos, tmp_path):
    """retrieve explain A B --index FACES: the distance `search A` gives B's face, dlib's verdict, SFAM maps
    carried back onto both photos inside the face boxes."""
    idx, _, _ = faces_index
    s = json.loads(run("search", face_photos / "astronaut.png", "--index", idx, "-k", "10", "--json").stdout)
    hit = next(h for h in s["results"] if h["path"].endswith("group.png") and h["face"] == 1)
    out = tmp_path / "pair"
    r = run_process("explain", face_photos / "astronaut.png", face_photos / "group.png", "--face-b", "1",
                    "--index", idx, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["face_a"] == 0 and d["face_b"] == 1 and d["faces_in_b"] == 3 and d["box_b"] == hit["box"]
    assert abs(d["score"] - hit["score"]) < 1e-5 and d["verdict"] == hit["verdict"] and d["verdict"]["same_person"]
    assert abs(d["cis_sum"] - hit["score"]) < 1e-5 and d["explained"]["exact"]  # Σ CIS = the search's score
    assert "query_face" not in d and "box" not in d  # a pair's faces are face_a/face_b, box_a/box_b
    for side, name in (("a", "astronaut.png"), ("b", "group.png")):
        key = {"a": "query", "b": "result"}[side]
        m, s = np.load(d["files"][f"{key}_map"]), d[f"{key}_map_scale"]
        photo = Image.open(face_photos / name)
        assert abs(m.shape[0] - photo.height * s) <= 1 and abs(m.shape[1] - photo.width * s) <= 1
        x0, y0, x1, y1 = d[f"box_{side}"]
        yy, xx = (np.array(np.unravel_index(np.argmax(m), m.shape)) + 0.5) / s
        g = (x1 - x0) // 8
        assert x0 - g <= xx < x1 + g and y0 - g <= yy < y1 + g and d["energy_in_box"][key] > 0.8
    assert "the same person" in (out / "report.html").read_text().lower()
    text = run("explain", face_photos / "astronaut.png", face_photos / "group.png", "--index", idx, "--out",
               tmp_path / "t").stdout
    assert "The same person." in text and "face 0 of 3" in text and "score 1.0000" in text  # face 0: a pixel copy


def test_explain_pair_photo_without_face(faces_index, face_photos, tmp_path):
    idx, _, _ = faces_index
    r = run_process("explain", face_photos / "coffee.png", face_photos / "astronaut.png", "--index", idx,
                    "--out", tmp_path / "x")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "coffee.png: no face found" in lines[0]
    r = run("explain", face_photos / "astronaut.png", face_photos / "group.png", "--face-b", "5", "--index", idx,
            "--out", tmp_path / "y", ok=False)
    assert r.exit_code != 0 and "--face-b 5:" in r.stderr and "has 3 faces" in r.stderr

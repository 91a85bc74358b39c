"""`retrieve duplicates` through its entry point: the table, --json and --csv on a made set with known duplicates,
--move-to and --undo (every file back byte for byte, the index's answers unchanged), a move killed half-way and
finished or reversed from its journal, refusals (a file in the way, a file that reappeared), and --explain's report."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from clitools import ROOT, run, run_process
from conftest import skimage_photo

DISTINCT = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
            "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text", "clock")
# the known answer: tier -> groups of names (keeper first)
KNOWN = {"exact": [("trip/rocket.jpg", "phone/rocket copy.jpg"), ("trip/horse.jpg", "phone/old/horse.jpg")],
         "near": [("trip/coffee.jpg", "phone/edits/coffee_mirror.jpg"),
                  ("trip/chelsea.jpg", "phone/chelsea_small.jpg")]}
T0 = 1_600_000_000  # file times: the originals older than their copies


def make_set(d: Path) -> Path:
    """Eighteen different photos in trip/, and in phone/ two exact copies, a mirrored recompressed copy and a resized
    recompressed copy of four of them."""
    (d / "trip").mkdir(parents=True)
    (d / "phone" / "edits").mkdir(parents=True)
    for n in DISTINCT:
        skimage_photo(n).save(d / "trip" / f"{n}.jpg", quality=92)
    cat = skimage_photo("chelsea")
    cat.resize((cat.width * 3 // 4, cat.height * 3 // 4), Image.LANCZOS).save(d / "phone" / "chelsea_small.jpg",
                                                                             quality=75)
    ImageOps.mirror(skimage_photo("coffee")).save(d / "phone" / "edits" / "coffee_mirror.jpg", quality=85)
    shutil.copyfile(d / "trip" / "rocket.jpg", d / "phone" / "rocket copy.jpg")
    (d / "phone" / "old").mkdir()
    shutil.copyfile(d / "trip" / "horse.jpg", d / "phone" / "old" / "horse.jpg")
    for p in d.rglob("*.jpg"):
        t = T0 + (1000 if "phone" in p.parts else 0)
        os.utime(p, (t, t))
    return d


def index_set(tmp: Path) -> tuple[Path, Path]:
    photos = make_set(tmp / "photos")
    idx = tmp / "idx"
    run("index", photos, "--index", idx)
    return photos, idx


def tree(d: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``d``."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def groups_of(d: dict, photos: Path) -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list] = {}
    for g in d["groups"]:
        assert g["members"][0]["keeper"] and not any(m["keeper"] for m in g["members"][1:])
        out.setdefault(g["tier"], []).append(tuple(str(Path(m["path"]).relative_to(photos)) for m in g["members"]))
    return out


def found(idx: Path, photos: Path) -> tuple[list[str], list[str]]:
    """(keepers, non-keepers) of the groups the index shows now, relative to ``photos`` (the tests of moving use
    the groups found; the first test pins them to the known answer)."""
    d = json.loads(run("duplicates", "--index", idx, "--json").stdout)
    names = [[str(Path(m["path"]).relative_to(photos)) for m in g["members"]] for g in d["groups"]]
    assert names, "no groups found"
    return [n[0] for n in names], [x for n in names for x in n[1:]]


def searched(idx: Path, photos: Path) -> list:
    """The index's answers to three queries (ids, paths, scores), to compare before and after."""
    out = []
    for q in ("trip/chelsea.jpg", "trip/coffee.jpg", "trip/rocket.jpg"):
        d = json.loads(run("search", photos / q, "--index", idx, "-k", "30", "--json").stdout)
        out.append([(h["id"], h["path"], round(h["score"], 5)) for h in d["results"]])
    return out


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return index_set(tmp_path_factory.mktemp("dups"))


def test_json_table_and_csv_show_the_known_groups_and_move_nothing(indexed):
    photos, idx = indexed
    before = tree(photos)
    d = json.loads(run("duplicates", "--index", idx, "--json").stdout)
    assert d["photos"] == len(DISTINCT) + 4
    got = groups_of(d, photos)
    assert {t: sorted(g) for t, g in got.items()} == {t: sorted(g) for t, g in KNOWN.items()}
    assert [g["id"] for g in d["groups"]] == list(range(1, len(d["groups"]) + 1))
    for g in d["groups"]:
        keeper, *rest = g["members"]
        assert keeper["score"] is None and all(m["size"] > 0 and m["width"] > 0 for m in g["members"])
        if g["tier"] == "near":
            assert all(m["score"] is not None and m["agreement"] >= 0.8 for m in rest)

    table = run("duplicates", "--index", idx).stdout
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["group", "tier", "keep"]
    for g in d["groups"]:
        rows = [ln for ln in lines if ln[:5].strip() == str(g["id"])]  # the group column, right-aligned
        assert len(rows) == len(g["members"])
        assert "KEEP" in rows[0] and not any("KEEP" in r for r in rows[1:])
        assert rows[0].endswith(g["members"][0]["path"])
        assert ("near-duplicate" if g["tier"] == "near" else "exact copy") in rows[0]
    assert "640×427" in table  # W×H of the rocket
    assert "nothing was moved" in table and "--move-to DIR" in table

    rows = list(csv.DictReader(io.StringIO(run("duplicates", "--index", idx, "--csv").stdout)))
    assert list(rows[0]) == ["group", "tier", "keeper", "path", "size", "width", "height", "date", "score",
                             "percentile", "inliers", "agreement"]
    assert len(rows) == sum(len(g["members"]) for g in d["groups"])
    assert {r["path"] for r in rows if r["keeper"] == "1"} == {str(photos / g[0]) for gs in KNOWN.values()
                                                                for g in gs}
    assert all(r["date"] == "2020-09-13T12:26:40Z" for r in rows if r["keeper"] == "1")
    assert tree(photos) == before  # nothing moved by default
    assert not (idx / "duplicates").exists()

    r = run("duplicates", "--index", idx, "--json", "--csv", ok=False)
    assert r.exit_code == 2 and "--json or --csv" in r.stderr
    r = run("duplicates", "--index", idx, "--undo", "--move-to", idx.parent / "x", ok=False)
    assert r.exit_code == 2 and "--undo goes alone" in r.stderr


def test_move_to_then_undo_restores_every_file_byte_for_byte_and_the_same_answers(tmp_path):
    photos, idx = index_set(tmp_path)
    before, answers = tree(photos), searched(idx, photos)
    keepers, movable = found(idx, photos)
    dest = tmp_path / "dups"
    r = run("duplicates", "--index", idx, "--move-to", dest)
    assert f"moved {len(movable)} photos" in r.stdout
    undo_hint = next(ln for ln in r.stdout.splitlines() if "to put them back:" in ln).split(": ", 1)[1]
    after = tree(photos)
    for name in movable:  # gone from the collection, under DIR relative to the moved photos' common folder
        assert name not in after
        assert tree(dest)[str(Path(name).relative_to("phone"))] == before[name]
    assert all(k in after for k in keepers)  # keepers stay
    info = json.loads(run("info", "--index", idx, "--json").stdout)
    assert info["images"] == len(before) - len(movable)
    assert "consistent" in run("check", "--index", idx).stdout
    assert json.loads(run("duplicates", "--index", idx, "--json").stdout)["groups"] == []

    args = undo_hint.split()
    assert args[:2] == ["retrieve", "duplicates"]
    r = run(*args[1:])  # the hint, as printed
    assert f"restored {len(movable)} photos" in r.stdout
    assert tree(photos) == before
    assert not dest.exists()  # the folders the batch made are gone again
    assert searched(idx, photos) == answers
    assert "consistent" in run("check", "--index", idx).stdout
    r = run("duplicates", "--index", idx, "--undo")
    assert r.exit_code == 0 and "nothing to undo" in r.stdout
    assert tree(photos) == before


def test_a_second_undo_undoes_the_batch_before(tmp_path):
    photos, idx = index_set(tmp_path)
    before = tree(photos)
    _, movable = found(idx, photos)
    run("duplicates", "--index", idx, "--move-to", tmp_path / "first")
    shutil.copyfile(photos / "trip" / "coins.jpg", photos / "trip" / "coins again.jpg")  # a new copy (newer)
    run("index", photos, "--index", idx)
    d = json.loads(run("duplicates", "--index", idx, "--move-to", tmp_path / "second", "--json").stdout)
    assert d["moved"]["moved"] == 1 and d["moved"]["files"] == [
        {"source": str(photos / "trip" / "coins again.jpg"), "target": str(tmp_path / "second" / "coins again.jpg")}]
    r = run("duplicates", "--index", idx, "--undo")
    assert "restored 1 photos" in r.stdout and "1 earlier batch can be undone too" in r.stdout
    assert (photos / "trip" / "coins again.jpg").exists() and not (photos / movable[0]).exists()
    r = run("duplicates", "--index", idx, "--undo")
    assert f"restored {len(movable)} photos" in r.stdout
    assert tree(photos) == {**before, "trip/coins again.jpg": before["trip/coins.jpg"]}


CRASH = """
import os, sys
import retrieval.curate.moves as moves
where = os.environ["CRASH_AT"]
calls = []
if where == "after-first-move":  # the first file moved, the kill before its step is logged
    real = moves._transfer
    def transfer(src, dst, sha):
        real(src, dst, sha)
        os._exit(9)
    moves._transfer = transfer
else:  # copy-before-unlink: another file system (no hard link), killed with the copy made, the original still there
    import errno
    real_link, real_unlink = os.link, os.unlink
    def link(src, dst, **kw):
        if not str(src).endswith(moves.TEMP_SUFFIX):
            raise OSError(errno.EXDEV, "cross-device link")
        return real_link(src, dst, **kw)
    def unlink(p, **kw):
        if "/photos/" in str(p) and not str(p).endswith(moves.TEMP_SUFFIX):
            os._exit(9)
        return real_unlink(p, **kw)
    os.link, os.unlink = link, unlink
import cli
cli.main(sys.argv[1:], prog_name="retrieve")
"""


@pytest.mark.parametrize("crash, then", [("after-first-move", "undo"), ("copy-before-unlink", "re-run")])
def test_a_move_killed_half_way_loses_nothing(tmp_path, crash, then):
    photos, idx = index_set(tmp_path)
    before = tree(photos)
    _, movable = found(idx, photos)
    dest = tmp_path / "dups"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CRASH_AT": crash, "RETRIEVE_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CRASH, "duplicates", "--index", str(idx), "--move-to", str(dest)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 9, p.stderr
    moved_or_copied = tree(dest) if dest.exists() else {}
    assert len(moved_or_copied) == 1
    r = run("duplicates", "--index", idx)  # the interrupted batch is named, with both ways out
    assert "was interrupted" in r.stderr
    hints = {next(a for a in ("--undo", "--move-to") if a in h): shlex.split(h)[1:]
             for h in r.stderr.split("`")[1::2]}  # the two commands it prints, run as printed below
    assert set(hints) == {"--undo", "--move-to"} and hints["--move-to"][-1] == str(dest)
    if then == "undo":
        r = run(*hints["--undo"])
        assert tree(photos) == before
        assert not dest.exists() or tree(dest) == {}
        assert json.loads(run("info", "--index", idx, "--json").stdout)["images"] == len(before)
    else:
        r = run(*hints["--move-to"])
        assert "completed the interrupted batch" in r.stdout and "not moved" not in r.stderr
        assert set(tree(dest)) == {str(Path(n).relative_to("phone")) for n in movable}
        assert json.loads(run("info", "--index", idx, "--json").stdout)["images"] == len(before) - len(movable)
        run("duplicates", "--index", idx, "--undo")
        assert tree(photos) == before
    assert "consistent" in run("check", "--index", idx).stdout
    assert "was interrupted" not in run("duplicates", "--index", idx).stderr


def test_move_onto_an_existing_file_and_undo_over_a_reappeared_file_are_refused(tmp_path):
    photos, idx = index_set(tmp_path)
    before = tree(photos)
    _, movable = found(idx, photos)
    dest = tmp_path / "dups"
    obstacle = dest / Path(movable[-1]).relative_to("phone")
    obstacle.parent.mkdir(parents=True)
    obstacle.write_bytes(b"someone else's file")
    r = run("duplicates", "--index", idx, "--move-to", dest, ok=False)
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and str(obstacle) in err and "already there" in err
    assert tree(photos) == before and tree(dest) == {str(obstacle.relative_to(dest)): hashlib.sha256(
        b"someone else's file").hexdigest()}
    assert json.loads(run("info", "--index", idx, "--json").stdout)["images"] == len(before)

    obstacle.unlink()
    run("duplicates", "--index", idx, "--move-to", dest)
    back = photos / "phone" / "rocket copy.jpg"
    back.write_bytes(b"a new file at the old path")
    moved = tree(dest)
    r = run("duplicates", "--index", idx, "--undo", ok=False)
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and str(back) in err and "reappeared" in err
    assert tree(dest) == moved and back.read_bytes() == b"a new file at the old path"  # nothing moved
    back.unlink()
    os.replace(dest / "rocket copy.jpg", back)  # that photo put back by hand: the undo does the rest, its row too
    run("duplicates", "--index", idx, "--undo")
    assert tree(photos) == before
    assert json.loads(run("info", "--index", idx, "--json").stdout)["images"] == len(before)


def test_explain_writes_one_report_with_each_member_against_its_keeper(indexed, tmp_path):
    photos, idx = indexed
    out = tmp_path / "report"
    r = run("duplicates", "--index", idx, "--explain", "--out", out)
    assert f"report: {out / 'report.html'}" in r.stdout
    html = (out / "report.html").read_text()
    sections = html.split("<section>")[1:]
    d = json.loads(run("duplicates", "--index", idx, "--json").stdout)
    pairs = [(g["members"][0]["path"], m["path"]) for g in d["groups"] for m in g["members"][1:]]
    assert len(sections) == len(pairs)
    for keeper, member in pairs:
        (sec,) = [s for s in sections if f"{Path(member).name} against its keeper {Path(keeper).name}" in s]
        assert keeper in sec and member in sec and "heat map" in sec
    assert len(list(out.glob("g*_*.png"))) == len(pairs)

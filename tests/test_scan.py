"""Finding photos: deep trees, symbolic links (into, out of and around the tree), empty query folders."""
from __future__ import annotations

import json

import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from clitools import run, run_json
from retrieval.errors import RetrieveError
from retrieval.scan import scan_paths
from retrieval.match.search import expand_queries


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


@pytest.fixture
def deep(tmp_path):
    """``tmp_path/deep/d/d/…/d``, 1 100 folders deep (made and removed without recursion: os.makedirs and
    shutil.rmtree, pytest's clean-up of old temporary folders included, recurse and would fail on it)."""
    root = d = tmp_path / "deep"
    for _ in range(1100):
        d = d / "d"
        d.mkdir(parents=d.parent == root)
    yield d
    while d != tmp_path:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
        d = d.parent


def test_a_tree_1100_folders_deep_is_walked_without_recursion(tmp_path, deep):
    assert sys.getrecursionlimit() < 1100 * 2  # os.walk needs ~1 frame per level (Python 3.10/3.11 raise)
    bottom = _png(deep / "bottom.png")
    _png(tmp_path / "deep" / "top.png")
    paths = [e.path for e in scan_paths([tmp_path / "deep"])]
    assert paths == [str(tmp_path / "deep" / "top.png"), str(bottom)]  # a folder's files, then its folders


def test_index_and_search_a_tree_1100_folders_deep(tmp_path, photo_dir, deep):
    bottom = deep / "chelsea.jpg"
    shutil.copy(photo_dir / "chelsea.jpg", bottom)
    d = run_json("index", tmp_path / "deep", "--index", tmp_path / "idx")
    assert d["indexed"] == 1 and d["total"] == 1
    hits = run_json("search", tmp_path / "deep", "--index", tmp_path / "idx", "--include-self")
    assert hits["query"] == str(bottom) and hits["results"][0]["path"] == str(bottom)


def test_paths_are_real_paths_and_a_folder_through_a_link_counts_once(tmp_path):
    real = tmp_path / "real"
    a = _png(real / "a.png")
    (tmp_path / "alias").symlink_to(real)
    (real / "self").symlink_to(real)  # a link back into the tree
    (real / "a-again.png").symlink_to(a)  # a file link inside the tree: the file once, by its real path
    paths = [e.path for e in scan_paths([tmp_path / "alias", real, tmp_path / "alias" / "a.png"])]
    assert paths == [str(a)]


def test_index_through_a_link_then_directly_indexes_each_photo_once(tmp_path, photos):
    (tmp_path / "link").symlink_to(photos)
    first = run_json("index", tmp_path / "link", "--index", tmp_path / "idx")
    assert first["indexed"] == 9 and first["total"] == 9
    again = run_json("index", photos, "--index", tmp_path / "idx")
    assert again["unchanged"] == 9 and again["indexed"] == again["removed"] == 0 and again["total"] == 9
    both = run_json("index", photos, tmp_path / "link", "--index", tmp_path / "idx")
    assert both["unchanged"] == 9 and both["total"] == 9


def test_links_out_of_the_tree_are_not_followed(tmp_path):
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    inside = _png(tree / "in.png")
    _png(outside / "out.png")
    (tree / "to-root").symlink_to("/")  # would index the whole disk
    (tree / "to-outside").symlink_to(outside)
    (tree / "out-file.png").symlink_to(outside / "out.png")
    scan = scan_paths([tree])
    assert [e.path for e in scan] == [str(inside)]
    assert sorted(scan.links_not_followed) == sorted(str(tree / n) for n in ("out-file.png", "to-outside", "to-root"))


def test_follow_links_reaches_a_folder_outside_and_records_its_tree(tmp_path):
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    inside, out = _png(tree / "in.png"), _png(outside / "sub" / "out.png")
    (tree / "ext").symlink_to(outside)
    scan = scan_paths([tree], follow_links=True)
    assert [e.path for e in scan] == [str(inside), str(out)]  # real paths
    assert scan.trees == [str(tree), str(outside)] and scan.links_not_followed == []


@pytest.mark.parametrize("follow", [False, True])
def test_link_cycles_end(tmp_path, follow):
    a = _png(tmp_path / "a" / "b" / "x.png")
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a" / "loop2")
    (tmp_path / "a" / "loop2").symlink_to(tmp_path / "a" / "loop")  # a link loop: resolves to nothing
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "to-a").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "to-c").symlink_to(tmp_path / "c")  # a -> c -> a across two trees
    paths = [e.path for e in scan_paths([tmp_path / "a"], follow_links=follow)]
    assert paths == [str(a)]


def test_query_folders_with_a_cycle_end_and_empty_ones_are_named(tmp_path):
    a = _png(tmp_path / "q" / "a.png")
    (tmp_path / "q" / "again").symlink_to(tmp_path / "q")
    assert expand_queries([tmp_path / "q"]) == [str(a)]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no photo here")
    with pytest.raises(RetrieveError, match=f"no images in {tmp_path / 'empty'}$"):
        expand_queries([tmp_path / "empty"])


def test_search_of_an_empty_folder_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("search", tmp_path / "empty", "--index", tmp_path / "idx", ok=False)
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"Error: no images in {tmp_path / 'empty'}"]


def test_index_follows_links_out_of_the_folder_only_with_follow_links(tmp_path, photo_dir):
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    tree.mkdir()
    outside.mkdir()
    shutil.copy(photo_dir / "chelsea.jpg", tree / "chelsea.jpg")
    shutil.copy(photo_dir / "coffee.png", outside / "coffee.png")
    (tree / "elsewhere").symlink_to(outside)
    (tree / "root").symlink_to("/")
    first = run("index", tree, "--index", tmp_path / "idx", "--json")
    assert json.loads(first.stdout)["total"] == 1
    for link in ("elsewhere", "root"):  # each link left alone is named, with the option that follows it
        assert f"{tree / link}: a link out of the folders, not followed (retrieve index --follow-links" in first.stderr
    with_links = tmp_path / "idx-links"
    (tree / "root").unlink()  # --follow-links on a link to / would index the whole disk: what it is for
    assert run_json("index", tree, "--index", with_links, "--follow-links")["total"] == 2
    hits = run_json("search", tree / "chelsea.jpg", "--index", with_links)
    assert [h["path"] for h in hits["results"]] == [str(outside / "coffee.png")]  # stored by its real path

"""`retrieve search`: files and folders as queries, self-exclusion, JSON for both metrics, index types, deletion."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clitools import run, run_json
from retrieval.index.schema import ImageRow
from retrieval.index.settings import IndexSettings
from retrieval.index.store import IndexStore


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.strip().splitlines()]


@pytest.fixture
def indexed(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    return photos, idx


def test_file_query_finds_the_other_view_of_the_same_cat(indexed):
    photos, idx = indexed
    (res,) = jsonl(run("search", photos / "chelsea.jpg", "--index", idx, "--json").stdout)
    assert res["query"] == str(photos / "chelsea.jpg") and res["metric"] == "cosine"
    top = res["results"][0]
    assert top["path"] == str(photos / "more" / "cat_crop.jpg") and top["rank"] == 1
    assert set(top) == {"rank", "id", "path", "score"}
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 8  # k=10 but the query is left out


def test_self_is_excluded_unless_asked(indexed):
    photos, idx = indexed
    q = photos / "coffee.png"
    (res,) = jsonl(run("search", q, "--index", idx, "--json").stdout)
    assert str(q) not in [r["path"] for r in res["results"]]
    (res,) = jsonl(run("search", q, "--index", idx, "--json", "--include-self", "-k", "3").stdout)
    assert res["results"][0]["path"] == str(q) and res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(res["results"]) == 3


def test_folder_query_and_terminal_table(indexed):
    photos, idx = indexed
    out = jsonl(run("search", photos, "--index", idx, "--json", "-k", "2").stdout)
    assert len(out) == 9 and all(len(o["results"]) == 2 for o in out)
    text = run("search", photos / "more", "--index", idx, "-k", "1").stdout.splitlines()
    assert text[0] == str(photos / "more" / "cat_crop.jpg")
    rows = [line for line in text[1:] if line.split()[0] != "rank"]  # the column header, when there is one
    rank, score, path = rows[0].split(maxsplit=2)
    assert rank == "1" and 0 < float(score) <= 1 and path == str(photos / "chelsea.jpg")


def test_min_score(indexed):
    photos, idx = indexed
    (full,) = jsonl(run("search", photos / "chelsea.jpg", "--index", idx, "--json").stdout)
    cut = full["results"][2]["score"]
    (res,) = jsonl(run("search", photos / "chelsea.jpg", "--index", idx, "--json", "--min-score", cut).stdout)
    assert [r["path"] for r in res["results"]] == [r["path"] for r in full["results"][:3]]


def test_l2_json_gives_distance_and_negative_score(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx, "--metric", "l2")
    (res,) = jsonl(run("search", photos / "chelsea.jpg", "--index", idx, "--json").stdout)
    assert res["metric"] == "l2"
    hits = res["results"]
    assert all(set(h) == {"rank", "id", "path", "score", "distance"} for h in hits)
    assert all(h["score"] == pytest.approx(-h["distance"]) and h["distance"] >= 0 for h in hits)
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    with IndexStore.open(idx) as store:  # the distance is the squared Euclidean one between raw embeddings
        q = np.frombuffer(store.row_by_path(str(photos / "chelsea.jpg")).vector, np.float32)
        r = np.frombuffer(store.row_by_path(hits[0]["path"]).vector, np.float32)
        assert hits[0]["distance"] == pytest.approx(float(((q - r) ** 2).sum()), rel=1e-3)


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq"])
def test_every_index_type_is_exact_on_a_small_set_and_deletes(photos, tmp_path, index_type):
    ref_idx, idx = tmp_path / "flat", tmp_path / index_type
    run_json("index", photos, "--index", ref_idx)
    run_json("index", photos, "--index", idx, "--index-type", index_type)
    assert run_json("info", "--index", idx)["index_type"] == index_type
    q = photos / "astronaut.jpg"
    (ref,) = jsonl(run("search", q, "--index", ref_idx, "--json").stdout)
    (got,) = jsonl(run("search", q, "--index", idx, "--json").stdout)
    assert [h["path"] for h in got["results"]] == [h["path"] for h in ref["results"]]
    np.testing.assert_allclose([h["score"] for h in got["results"]], [h["score"] for h in ref["results"]], atol=1e-5)

    gone = got["results"][0]["path"]
    os.remove(gone)
    r = run_json("index", photos, "--index", idx)
    assert r["removed"] == 1 and r["total"] == 8
    (after,) = jsonl(run("search", q, "--index", idx, "--json").stdout)
    assert gone not in [h["path"] for h in after["results"]] and len(after["results"]) == 7


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_index_types_at_scale_train_delete_and_agree_with_exact(tmp_path, index_type):
    """Store level, synthetic vectors: IVF trains once enough exist; deletion works for every type."""
    rng = np.random.default_rng(0)
    dim, n = 64, 4000
    centers = rng.normal(size=(40, dim)).astype(np.float32)
    vecs = (centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    st = IndexSettings(model="synthetic", weights_id="x", weights_source="", preprocess={"size": 224},
                       metric="cosine", dim=dim, index_type=index_type, faiss_factory="")
    store = IndexStore.create(tmp_path / "idx", st)
    with store.session() as s, s.begin():
        s.add_all(ImageRow(path=f"/p/{i}.jpg", size=1, mtime_ns=1, sha256=str(i), width=1, height=1,
                           vector=v.tobytes(), indexed_at=0.0) for i, v in enumerate(vecs))
    index = store.rebuild_faiss()
    if index_type == "ivfpq":
        import faiss

        assert not isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)  # trained, not the fallback
    from retrieval.match.search import Searcher

    searcher = Searcher(store, backbone=None)
    queries = vecs[:50] + 0.05 * rng.normal(size=(50, dim)).astype(np.float32)
    got = searcher.search_vectors(queries, 10)
    normed = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(qn @ normed.T), axis=1)[:, :10] + 1  # ids start at 1
    recall = np.mean([len({h.id for h in g} & set(e.tolist())) / 10 for g, e in zip(got, exact)])
    assert recall >= (0.999 if index_type == "flat" else 0.8)

    from sqlalchemy import delete

    with store.session() as s, s.begin():
        s.execute(delete(ImageRow).where(ImageRow.id.in_([1, 2, 3])))
    store.apply([1, 2, 3])  # HNSW cannot remove: the ids stay in the graph, filtered out of every search
    assert store.faiss_index().ntotal - len(store.removed_ids()) == n - 3
    assert len(store.removed_ids()) == (3 if index_type == "hnsw" else 0)
    hits = Searcher(store, None).search_vectors(vecs[:1], 5)[0]
    assert 1 not in [h.id for h in hits] and len(hits) == 5
    store.close()


def test_undecodable_query_is_reported_and_others_answered(indexed, tmp_path):
    photos, idx = indexed
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    r = run("search", bad, photos / "chelsea.jpg", "--index", idx, ok=False)
    assert r.exit_code == 1
    assert f"{bad}: " in r.stderr and "Traceback" not in r.stderr
    assert str(photos / "more" / "cat_crop.jpg") in r.stdout  # the good query was still answered
    rj = run("search", bad, photos / "chelsea.jpg", "--index", idx, "--json", ok=False)
    lines = jsonl(rj.stdout)
    assert lines[0]["query"] == str(bad) and lines[0]["results"] == [] and "error" in lines[0]
    assert lines[1]["results"]

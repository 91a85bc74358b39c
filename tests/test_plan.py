"""indexer.plan.plan_changes: the indexer's change detection, without a model, a database or a file read."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

from indexer.plan import plan_changes
from retrieval.metric import METRICS, metric
from retrieval.scan import FileEntry

Row = namedtuple("Row", "id path size mtime_ns sha256")
Bad = namedtuple("Bad", "size mtime_ns")


def test_new_changed_unchanged_known_bad():
    rows = [Row(1, "/p/a.jpg", 10, 1, "ha"), Row(2, "/p/b.jpg", 20, 2, "hb")]
    files = [FileEntry("/p/a.jpg", 10, 1), FileEntry("/p/b.jpg", 20, 3), FileEntry("/p/c.jpg", 5, 5),
             FileEntry("/p/bad.jpg", 7, 7), FileEntry("/p/fixed.jpg", 8, 9)]
    plan = plan_changes(files, rows, {"/p/bad.jpg": Bad(7, 7), "/p/fixed.jpg": Bad(8, 8)}, ["/p"])
    assert [e.path for e in plan.unchanged] == ["/p/a.jpg"]
    assert [e.path for e in plan.changed] == ["/p/b.jpg"]  # another mtime: read and hashed
    assert [e.path for e in plan.new] == ["/p/c.jpg", "/p/fixed.jpg"]  # a bad file that changed is retried
    assert [e.path for e in plan.known_bad] == ["/p/bad.jpg"]
    assert [e.path for e in plan.todo] == ["/p/b.jpg", "/p/c.jpg", "/p/fixed.jpg"]  # scan order
    assert plan.removed() == []


def test_touched_moved_copied_removed():
    rows = [Row(1, "/p/a.jpg", 10, 1, "ha"), Row(2, "/p/b.jpg", 20, 2, "hb"), Row(3, "/p/gone.jpg", 30, 3, "hg"),
            Row(4, "/other/x.jpg", 40, 4, "hx")]
    files = [FileEntry("/p/a.jpg", 10, 9), FileEntry("/p/b.jpg", 20, 2), FileEntry("/p/sub/b2.jpg", 20, 2),
             FileEntry("/p/new/moved.jpg", 30, 3), FileEntry("/p/n.jpg", 1, 1)]
    plan = plan_changes(files, rows, trees=["/p"])
    assert plan.classify("/p/a.jpg", "ha") == ("touched", rows[0])  # same content, new mtime: no embedding
    assert plan.classify("/p/a.jpg", "changed") == ("embed", None)
    assert plan.classify("/p/new/moved.jpg", "hg") == ("moved", None)  # the content of a vanished row
    assert plan.classify("/p/sub/b2.jpg", "hb") == ("copied", 2)  # content indexed elsewhere: vector reused
    assert plan.classify("/p/n.jpg", "hn") == ("embed", None)
    # rows outside the scanned trees are never removed; a vanished row is removed unless claimed as moved
    assert [r.id for r in plan.removed()] == [3]
    assert plan.claim_move("hg").id == 3 and plan.claim_move("hg") is None
    assert plan.removed() == []
    assert plan_changes([], rows, trees=None).removed() == rows  # no trees given: every row not found vanished


def test_only_rows_under_the_trees_vanish():
    rows = [Row(1, "/photos/a.jpg", 1, 1, "h1"), Row(2, "/photos-old/b.jpg", 1, 1, "h2"), Row(3, "/photos", 1, 1, "h3")]
    plan = plan_changes([], rows, trees=["/photos"])
    assert sorted(r.id for r in plan.removed()) == [1, 3]  # /photos-old is another tree


@pytest.mark.parametrize("name", ["cosine", "l2"])
def test_metric_scores_and_order(name):
    m = metric(name)
    rng = np.random.default_rng(0)
    v, q = m.normalise(rng.normal(size=(5, 4))), m.normalise(rng.normal(size=4))
    raw = m.raw(v, q)
    order = m.best_first(raw)
    scores = [m.score(x)[0] for x in raw[order]]
    assert scores == sorted(scores, reverse=True)  # best first means the highest score first, for both
    if name == "cosine":
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-6)
        assert m.score(0.5) == (0.5, None)
    else:
        assert m.score(2.0) == (-2.0, 2.0)
    assert set(METRICS) == {"cosine", "l2"}

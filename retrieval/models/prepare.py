"""Indexing without torch: the graphs an index needs, made ahead in a short-lived child process.

``retrieve index`` embeds through the cached graphs (retrieval/models/graphs.py) -- the index's input shapes and the
two-output (feature map, stride-16 tap) graph the explain reference runs at the explain size -- so that it never
imports torch (~400 MiB of RSS before any work, bench/results/footprint.md). When a graph is not cached yet, a child
process (``python -m retrieval.models.prepare``) builds the backbone, exports, checks and records the graphs, and
exits: torch lives and dies there. Aspect-kept inputs (``resize="long"``) are prepared at the common photo shapes
(:meth:`Preprocess.common_shapes`); another shape, when first met, is checked by the backbone's own network.

A new index's identity (the model's weights hash, its preprocessing, its embedding size) also comes without torch:
from the manifest beside the graphs, else from the child (:func:`new_index_identity`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from retrieval.models.graphs import Manifest, folder, manifest_path, record_identity, safe_name
from retrieval.models.pooling import parse_pooling
from retrieval.models.preprocess import Preprocess
from retrieval.models.registry import DEFAULT_MODEL, REGISTRY, is_registry_name, model_kind, \
    unknown_model


def without_torch(model: str, pooling) -> bool:
    """Whether a backbone with these settings can run on cached graphs alone: a registry model with GAP or GeM
    pooling (R-MAC is pooled by the network's own path)."""
    return is_registry_name(str(model)) and str(pooling or "gap").partition(":")[0] in ("gap", "gem")


def ensure_graphs(bb, explain: tuple[int, str | None] | None) -> None:
    """Make the graphs ``bb`` (a backbone from an index's settings) needs for indexing -- its input shapes, and the
    explain reference's at ``explain`` = (size, tap layer) -- in a child process when any is missing, then read its
    manifest again. Nothing when they are all cached; a child that fails leaves the backbone to build its network.
    The common photo shapes are made first; the first photo of another shape has the child check every other
    (``bb.more_graphs``, :class:`EveryShape`), so that an index run never imports torch for it."""
    shapes = bb.preprocess.common_shapes()
    e = bb.at_size(int(explain[0])) if explain else None
    tap = explain[1] if explain else None
    bb.more_graphs = EveryShape(bb, explain)
    if all(bb.ready(hw) for hw in shapes) and (e is None or all(e.ready(hw, tap) for hw in e.preprocess.common_shapes())):
        return
    if run_in_child(_spec(bb, explain)) is not None:
        m = Manifest.load(bb.name, bb.weights_id)
        bb.manifest = m if m is not None and m.valid() else None
        bb._runners = {}
    else:  # the child failed: another would too (the backbone builds its network when it must)
        bb.more_graphs.done = True


class EveryShape:
    """Once, in a child process: check the graphs at every input shape of a backbone (an aspect-kept 448 px index
    has 27) and the explain reference's; then the manifest that records them (once per model, weights, input size
    and precision: the manifest keeps them). Shared by the backbone and its copy at
    the explain size. A catalogue's photos come in any shape (100 references had 84 sizes); checking each shape as
    first met imported torch into the index run and built the network there (977 MB of RSS for those 100)."""

    def __init__(self, bb, explain: tuple[int, str | None] | None):
        import threading

        self.spec = dict(_spec(bb, explain), every_shape=True)
        self.name, self.weights_id = bb.name, bb.weights_id
        self.lock, self.done = threading.Lock(), False

    def __call__(self) -> Manifest | None:
        with self.lock:
            if not self.done:
                self.done = True
                run_in_child(self.spec)  # (a child that fails: the backbone builds its network, as before)
            m = Manifest.load(self.name, self.weights_id)
            return m if m is not None and m.valid() else None


def _spec(bb, explain: tuple[int, str | None] | None) -> dict:
    """What :func:`prepare` needs to build ``bb`` in the child."""
    return {"model": bb.name, "weights": bb.weights_source if bb.weights_id != "random" else None,
            "weights_id": bb.weights_id, "input_size": bb.preprocess.size, "resize": bb.preprocess.resize,
            "pooling": str(bb.pooling), "precision": bb.precision,
            "explain": list(explain) if explain else None, "threads": os.environ.get("RETRIEVE_THREADS")}


def new_index_identity(model: str | None, weights: str | None, input_size: int | None, resize: str | None,
                       pooling: str | None, precision: str, explain_size: int | None = None) -> dict | None:
    """The settings a new index takes from its backbone (model, weights_id, weights_source, preprocess, dim, pooling)
    as :func:`retrieval.models.loading.load_backbone` would give them, without importing torch: from the manifest of
    the cached graphs, else from a child process that builds the backbone (and caches its graphs, with the explain
    reference's at ``explain_size``). None where indexing takes the torch path: a user's model, ONNX Runtime missing,
    or the child failed."""
    model = model or DEFAULT_MODEL
    if model_kind(model) == "unknown":
        raise unknown_model(model)
    if not without_torch(model, pooling):
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    if not weights:
        got = _identity_from_manifest(model, input_size, resize, pooling)
        if got is not None:
            return got
    from retrieval.models.registry import tap_layer

    return run_in_child({"model": model, "weights": str(Path(weights).expanduser().resolve()) if weights else None,
                         "input_size": input_size, "resize": resize, "pooling": pooling, "precision": precision,
                         "explain": [explain_size, tap_layer(model)] if explain_size else None,
                         "threads": os.environ.get("RETRIEVE_THREADS")})


def _identity_from_manifest(model: str, input_size: int | None, resize: str | None,
                            pooling: str | None = None) -> dict | None:
    """A registry model with its default weights: the identity recorded beside its graphs, when the weights file
    still has the recorded hash. Pooling (GAP or GeM, :func:`without_torch`) is applied to the graph's feature map
    outside it and leaves the embedding's size alone, so an instance index (GeM) is made without a child too."""
    where = folder()
    this_installation = manifest_path(where, model, "x" * 16).name.rsplit("-", 1)[1]
    for path in sorted(where.glob(f"{safe_name(model)}-*-{this_installation}")):
        try:
            m = Manifest(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        ident = m.doc.get("identity") or {}
        if ident.get("name") != model or not ident.get("default_weights") or not ident.get("preprocess") \
                or not m.valid():
            continue
        src = Path(ident.get("weights_source") or "")
        try:
            with open(src, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != ident.get("weights_id"):
                    continue
        except OSError:
            continue
        pre = Preprocess.from_dict(ident["preprocess"])
        if input_size is not None:
            pre = pre.replace(size=int(input_size))
        if resize is not None:
            pre = pre.replace(resize=resize)
        return {"model": model, "weights_id": ident["weights_id"], "weights_source": ident["weights_source"],
                "preprocess": pre.to_dict(), "dim": int(ident["dim"]), "pooling": str(parse_pooling(pooling))}
    return None


def run_in_child(spec: dict) -> dict | None:
    """Run :func:`prepare` in a short-lived child process (torch is imported there, never here); its answer (the
    backbone's identity, see there), or None when it failed (the caller then builds the backbone here, which reports
    the failure in its own words)."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    try:
        r = subprocess.run([sys.executable, "-m", "retrieval.models.prepare", json.dumps(spec)], capture_output=True,
                           text=True, env=env, timeout=1800)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def prepare(spec: dict) -> dict:
    """In the child: build the backbone ``spec`` describes, export, check and record its graphs at its common input
    shapes and the tap graph at ``explain`` ([size, layer]); record its identity; return the settings fields a new
    index takes from it (name, weights_id, weights_source, preprocess, dim, pooling)."""
    import torch

    from retrieval.models.loading import load_backbone

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    random = spec.get("weights_id") == "random"
    bb = load_backbone(spec["model"], spec.get("weights"), input_size=spec.get("input_size"),
                       resize=spec.get("resize"), pooling=spec.get("pooling"), random_weights=random,
                       expected_sha256=None if random else spec.get("weights_id"))
    bb.precision = spec.get("precision") or "fp32"
    shapes = (lambda pre: pre.every_shape()) if spec.get("every_shape") else (lambda pre: pre.common_shapes())
    for hw in shapes(bb.preprocess):
        bb._runner(hw)  # exports, checks against eager and records the graph (retrieval/models/graphs.py)
    if spec.get("explain"):
        size, tap = spec["explain"]
        e = bb.at_size(int(size))
        for hw in (shapes(e.preprocess) if tap else [e.preprocess.input_shape]):
            e._runner(hw, tap)  # the reference keeps the index's aspect policy
    if not spec.get("weights") and not random and bb.name in REGISTRY:  # found again by name (new_index_identity)
        record_identity(bb, {"name": bb.name, "weights_id": bb.weights_id, "weights_source": bb.weights_source,
                             "dim": int(bb.feature_dim), "default_weights": True,
                             "preprocess": REGISTRY[bb.name].preprocess.to_dict()})
    return {"model": bb.name, "weights_id": bb.weights_id, "weights_source": bb.weights_source,
            "preprocess": bb.preprocess.to_dict(), "dim": int(bb.feature_dim), "pooling": str(bb.pooling)}


if __name__ == "__main__":  # the child of run_in_child
    import sys

    print(json.dumps(prepare(json.loads(sys.argv[1]))))

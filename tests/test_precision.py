"""--precision: recorded when an index is created, enforced afterwards, int8 close to fp32; one ONNX graph for
several input shapes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clitools import run_process

# The smallest cosine between an int8 and the fp32 embedding of the same photo, measured on 40 Caltech-101
# photos (bench/results/precision.md: min 0.89, mean 0.97 at 224 px, 7-bit weights on this AVX2 CPU), less a margin.
INT8_COSINE_FLOOR = 0.85


@pytest.fixture(scope="module")
def int8_index(photo_dir, tmp_path_factory):
    src = tmp_path_factory.mktemp("p8photos")
    for name in ("chelsea.jpg", "coffee.png", "astronaut.jpg"):
        shutil.copy(photo_dir / name, src / name)
    idx = tmp_path_factory.mktemp("p8") / "idx"
    r = run_process("index", src, "--index", idx, "--precision", "int8", "--json", timeout=1200)  # exports + quantises
    assert r.returncode == 0, r.stderr
    return src, idx


def test_precision_recorded(int8_index):
    _, idx = int8_index
    r = run_process("info", "--index", idx, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["precision"] == "int8"


def test_other_precision_refused_and_index_kept(int8_index):
    src, idx = int8_index
    before = (idx / "index.db").read_bytes()
    r = run_process("index", src, "--index", idx, "--precision", "fp32")
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "precision int8, not fp32" in lines[0], r.stderr
    assert (idx / "index.db").read_bytes() == before


def test_bf16_refused_in_one_line(tmp_path, photo_dir):
    r = run_process("index", photo_dir, "--index", tmp_path / "idx", "--precision", "bf16")
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "bf16" in lines[0] and "--precision int8 or fp32" in lines[0], r.stderr
    assert not (tmp_path / "idx" / "index.db").exists()


def test_search_uses_the_recorded_precision(int8_index):
    src, idx = int8_index
    r = run_process("search", src / "chelsea.jpg", "--index", idx, "-k", "1", "--include-self", "--json")
    assert r.returncode == 0, r.stderr
    hit = json.loads(r.stdout.splitlines()[0])["results"][0]
    assert hit["path"].endswith("chelsea.jpg")
    assert hit["score"] > 0.999  # the query embedded at int8, as the index: the same vector (fp32 would be ~0.97)


def test_int8_embeddings_close_to_fp32(lite0, photo_dir, int8_index):
    from retrieval.images import load_image

    imgs = [load_image(p, min_side=224) for p in sorted(photo_dir.rglob("*")) if p.suffix in (".jpg", ".png")]
    b8 = lite0.replace(precision="int8")
    e8, e32 = b8.embed_images(imgs), lite0.embed_images(imgs)
    cos = (e8 * e32).sum(1) / np.linalg.norm(e8, axis=1) / np.linalg.norm(e32, axis=1)
    assert cos.min() >= INT8_COSINE_FLOOR, cos
    assert not np.allclose(e8, e32, atol=1e-4)  # really another graph: quantised
    graph = b8._runner((224, 224)).graph
    assert "int8" in graph.name


def test_int8_graph_stays_uint8_between_layers(lite0, int8_index):
    """The int8 graph is QOperator with its paddings folded (bench/results/int8-variants.md: 2x fp32 instead
    of 1.5x): one QuantizeLinear (the input), one DequantizeLinear (the output), and no Pad left. The fp32
    graph it is made from has its zero paddings folded into its convolutions too (retrieval/models/backbone.py
    _fold_pads: 1.2-1.7x faster), checked against eager like any graph."""
    import collections

    import onnx

    graph = lite0.replace(precision="int8")._runner((224, 224)).graph
    ops = collections.Counter(n.op_type for n in onnx.load(str(graph)).graph.node)
    assert ops["QLinearConv"] == 49 and ops["Conv"] == 0, ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops
    assert ops["Pad"] == 0, ops
    fp32 = lite0.replace()._runner((224, 224)).graph
    ops = collections.Counter(n.op_type for n in onnx.load(str(fp32)).graph.node)
    assert ops["Conv"] == 49 and ops["Pad"] == 0, ops


def _tiny_quantised_graph(pad_value: int, conv_pads: list[int]):
    """x (float) -> QuantizeLinear (zero point 128) -> Pad (0 before, 1 after on H and W; ``pad_value``) ->
    depthwise 3x3 QLinearConv stride 2 (``conv_pads``) -> DequantizeLinear -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "zp"),
            numpy_helper.from_array(np.array(pad_value, np.uint8), "pv"),
            numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
            numpy_helper.from_array(rng.integers(-60, 60, (4, 1, 3, 3)).astype(np.int8), "w"),
            numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
            numpy_helper.from_array(np.array(0.1, np.float32), "ys"),
            numpy_helper.from_array(np.array(100, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("Pad", ["xq", "pads", "pv"], ["xp"], mode="constant"),
             helper.make_node("QLinearConv", ["xp", "s", "zp", "w", "ws", "wz", "ys", "yz"], ["yq"],
                              kernel_shape=[3, 3], strides=[2, 2], group=4, pads=conv_pads),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("conv_pads", [[0, 0, 0, 0], [1, 0, 0, 1]])
def test_fold_pads_gives_the_same_output(conv_pads):
    """A Pad of the zero point folded into the convolution's pads: the same numbers, no Pad, asymmetric
    amounts added to the ones the convolution had."""
    import onnxruntime as ort

    from retrieval.models.precision import fold_pads

    x = np.random.default_rng(1).normal(0, 2, (1, 4, 9, 10)).astype(np.float32)

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    model = _tiny_quantised_graph(128, conv_pads)
    ref = run(model)
    assert fold_pads(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
    conv = model.graph.node[1]
    assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == \
        [conv_pads[0], conv_pads[1], conv_pads[2] + 1, conv_pads[3] + 1]
    got = run(model)
    assert got.shape == ref.shape and np.array_equal(got, ref)


def test_fold_pads_keeps_a_pad_of_another_value():
    """Padding with anything but the zero point is not what the convolution pads with: left as it is."""
    from retrieval.models.precision import fold_pads

    model = _tiny_quantised_graph(7, [0, 0, 0, 0])
    assert fold_pads(model) == 0
    assert [n.op_type for n in model.graph.node].count("Pad") == 1


def test_one_graph_serves_two_input_shapes(lite0):
    import torch

    square, wide = lite0._runner((224, 224)), lite0._runner((320, 448))
    assert square.graph == wide.graph and "-mod32-0x0" in square.graph.name
    x = torch.randn(1, 3, 320, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = lite0.net(x)
    got = lite0.features(x)
    assert got.shape == ref.shape == (1, lite0.feature_dim, 10, 14)
    assert float((got - ref).abs().max()) <= 1e-3 * float(ref.abs().max())


def test_search_without_torch_when_the_graph_is_cached(int8_index):
    """retrieve search loads ONNX Runtime alone (no torch) for an index whose graph is cached, with the same
    embeddings as the full backbone."""
    import subprocess
    import sys

    from clitools import ROOT
    from retrieval.images import load_image
    from retrieval.index.store import IndexStore
    from retrieval.models.loader import backbone_for_settings

    src, idx = int8_index
    with IndexStore.open(idx) as store:
        fb = backbone_for_settings(store.settings)
    assert fb.manifest is not None and fb.precision == "int8" and fb.ready((224, 224))
    assert fb._network.module is None  # the cached graph serves: no network built
    imgs = [load_image(src / "chelsea.jpg", min_side=224), load_image(src / "coffee.png", min_side=224)]
    got = fb.embed_images(imgs)
    assert fb._network.module is None
    full = fb.replace(manifest=None)  # the network's own path: the graph exported and checked in this process
    assert np.abs(got - full.embed_images(imgs)).max() <= 1e-5
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr))\n"
            "import cli\ncli.main(sys.argv[1:], prog_name='retrieve')\n")
    r = subprocess.run([sys.executable, "-c", code, "search", str(src / "chelsea.jpg"), "--index", str(idx), "-k", "1"],
                       capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False", r.stderr
    assert "chelsea.jpg" in r.stdout

"""The index folder is data, not code: user code named by an index needs --trust-model, weights are hashed
before they are parsed, and torch below 2.6 (CVE-2025-32434) is refused."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch
from torch import nn

from clitools import ROOT, run, run_json

EVIL = '''
import pathlib
import torch
import torch.nn as nn
pathlib.Path({marker!r}).write_text("imported")  # what any code named by an index could do
def build():
    torch.manual_seed(0)  # the same weights each time (the index records their hash)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), "1"
'''


@pytest.fixture
def two_photos(photo_dir, tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    for n in ("chelsea.jpg", "coffee.png"):
        shutil.copy(photo_dir / n, d / n)
    return d


def _one_error_line(r, *needles):
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_an_index_whose_model_is_python_code_needs_trust_model(tmp_path, monkeypatch, two_photos):
    code, marker = tmp_path / "code", tmp_path / "imported"
    code.mkdir()
    (code / "evil_model.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delenv("RETRIEVE_TRUST_MODEL", raising=False)
    idx, q = tmp_path / "idx", two_photos / "chelsea.jpg"
    assert run_json("index", two_photos, "--index", idx, "--model", "evil_model:build")["total"] == 2  # named: ok

    def fresh():
        sys.modules.pop("evil_model", None)
        marker.unlink(missing_ok=True)

    more = tmp_path / "more"  # a photo the index does not hold: indexing it runs the model
    more.mkdir()
    shutil.copy(two_photos / "chelsea.jpg", more / "again.jpg")
    (more / "again.jpg").write_bytes((more / "again.jpg").read_bytes() + b"\0")  # other bytes: embedded, not copied
    for cmd in (["search", q], ["explain", q, two_photos / "coffee.png", "--out", tmp_path / "x"],
                ["index", two_photos, more]):
        fresh()
        line = _one_error_line(run(*cmd, "--index", idx, ok=False), "'evil_model:build'", "module 'evil_model'",
                               "--trust-model", "RETRIEVE_TRUST_MODEL=1")
        assert not marker.exists(), cmd  # refused before anything was imported
        fresh()
        run(*cmd, "--index", idx, "--trust-model")  # the hint, followed, works
        assert marker.exists(), cmd
    assert "this index's model is the Python function 'evil_model:build'" in line
    fresh()
    monkeypatch.setenv("RETRIEVE_TRUST_MODEL", "1")
    assert run_json("search", q, "--index", idx)["results"]


def test_an_index_whose_model_is_torchscript_needs_trust_and_the_same_file(tmp_path, monkeypatch, two_photos):
    monkeypatch.delenv("RETRIEVE_TRUST_MODEL", raising=False)
    f, idx, q = tmp_path / "mine.pt", tmp_path / "idx", two_photos / "chelsea.jpg"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3, stride=8), nn.ReLU())).save(str(f))
    run("index", two_photos, "--index", idx, "--model", f)
    _one_error_line(run("search", q, "--index", idx, ok=False), f"TorchScript program {f}", "--trust-model")
    assert run_json("search", q, "--index", idx, "--trust-model")["results"]
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3, stride=8), nn.Tanh())).save(str(f))  # another program
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    _one_error_line(run("search", q, "--index", idx, "--trust-model", ok=False),
                    f"{f}: not the TorchScript file the index was built with (its sha256 differs); refused without "
                    "loading it")
    assert calls == []


def test_changed_weights_are_refused_by_hash_before_they_are_unpickled(tmp_path, monkeypatch, two_photos):
    import torchvision

    w, idx, q = tmp_path / "r18.pth", tmp_path / "idx", two_photos / "chelsea.jpg"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), w)
    run("index", two_photos, "--index", idx, "--model", "resnet18", "--weights", w)
    assert run_json("search", q, "--index", idx)["results"]  # a registry model with its file: no opt-in needed
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), w)  # other weights, same path
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    line = _one_error_line(run("search", q, "--index", idx, ok=False),
                           f"{w}: not the weights file the index was built with (its sha256 differs); refused "
                           "without loading it: restore that file, or index into another --index directory")
    assert calls == [] and "--trust-model" not in line


def test_torch_below_2_6_is_refused_for_weights_and_the_package_requires_2_6(tmp_path, monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    from retrieval.errors import WeightsUnavailable
    from retrieval.models.loading import load_backbone

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert "2.5.1" not in torch_req.specifier and "2.6.0" in torch_req.specifier
    assert torch.__version__.split("+")[0] in torch_req.specifier
    tv = next(Requirement(d) for d in deps if Requirement(d).name == "torchvision")
    import torchvision

    assert "0.20.1" not in tv.specifier and torchvision.__version__.split("+")[0] in tv.specifier

    f = tmp_path / "r18.pth"
    f.write_bytes(b"never read")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(WeightsUnavailable, match=r"^torch 2.5.1\+cpu cannot load weights files safely "
                                                 r"\(CVE-2025-32434.*pip install 'torch>=2.6'$"):
        load_backbone("resnet18", weights=f)

"""The CLI skeleton through its real entry point: help, version, models, and one-line errors."""
from __future__ import annotations

import json

from clitools import run, run_process


def test_help_and_version_through_the_installed_script():
    p = run_process("--help")
    assert p.returncode == 0 and "index" in p.stdout and "search" in p.stdout
    p = run_process("--version")
    assert p.returncode == 0 and p.stdout.startswith("retrieve, version ")


def test_models_lists_the_embedded_default_as_available_offline():
    rows = json.loads(run("models", "--json").stdout)
    by = {r["name"]: r for r in rows}
    assert by["efficientnet_lite0"]["available_offline"] is True
    assert by["efficientnet_lite0"]["embedding_dim"] == 1280
    assert by["efficientnet_lite0"]["feature_map"] == [1280, 7, 7]
    assert {"resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"} <= set(by)
    text = run("models").stdout
    assert "efficientnet_lite0" in text and "yes" in text


def test_user_errors_are_one_line_without_traceback(tmp_path):
    p = run_process("search", tmp_path / "nope.jpg", "--index", tmp_path / "no-index")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "nope.jpg" in lines[0]

    p = run_process("search", __file__, "--index", tmp_path / "no-index")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.startswith("Error: no index at")


def test_unknown_model_is_a_clean_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    r = run("index", tmp_path, "--index", tmp_path / "idx", "--model", "no_such_net", ok=False)
    assert r.exit_code == 1 and "unknown model 'no_such_net'" in r.stderr

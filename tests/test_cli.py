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


def _examples(command: str) -> list[list[str]]:
    """The example command lines in ``retrieve COMMAND --help`` (through the installed script)."""
    import shlex

    p = run_process(command, "--help")
    assert p.returncode == 0 and "Examples:" in p.stdout, p.stdout
    lines = p.stdout.split("Examples:", 1)[1].split("Options:", 1)[0].splitlines()
    return [shlex.split(line.split("#")[0])[1:] for line in lines if line.strip().startswith("retrieve ")]


def test_help_examples_of_index_info_check_and_models_work_as_printed(tmp_path, photo_dir, monkeypatch):
    import shutil

    pictures = tmp_path / "Pictures"
    pictures.mkdir()
    for n in ("chelsea.jpg", "coffee.png"):
        shutil.copy(photo_dir / n, pictures / n)
    where = {"~/Pictures": pictures, "~/Products": pictures, "~/products-index": tmp_path / "products-index"}
    monkeypatch.setenv("RETRIEVE_INDEX", str(tmp_path / "default-index"))  # "the default index"
    ran = []
    for command in ("index", "info", "check", "models"):
        examples = _examples(command)
        assert len(examples) >= 2 and all(e[0] == command for e in examples), examples
        for argv in examples:
            r = run(*[str(where.get(a, a)) for a in argv])
            if "--json" in argv:
                json.loads(r.stdout.splitlines()[-1])
            ran.append(argv)
    assert ["index", "~/Products", "--preset", "instance", "--index", "~/products-index"] in ran
    assert (tmp_path / "default-index").is_dir() and (tmp_path / "products-index").is_dir()

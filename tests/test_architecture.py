"""The shape of the code: dependencies point down (cli → web → explain, indexer → retrieval), no import circles between
the project's modules (function-level imports count), and no preset chosen by comparing its name outside the preset
definitions (retrieval/presets.py): the packages ask the preset object."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("retrieval", "indexer", "explain", "web")
# what each top-level package may import from the project (cli.py and bench/ sit on top of everything)
ALLOWED = {"retrieval": {"retrieval"}, "indexer": {"retrieval", "indexer"}, "explain": {"retrieval", "explain"},
           "web": {"retrieval", "explain", "web"}}


def _modules() -> dict[str, Path]:
    files = [p for d in PACKAGES for p in (ROOT / d).rglob("*.py")] + [ROOT / "cli.py"]

    def name(p: Path) -> str:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    return {name(p): p for p in files}


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module → the project modules it imports (anywhere in it: top level, functions, TYPE_CHECKING blocks)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):
                    graph[m].add(n)
    return graph


def test_no_import_circles():
    graph = _imports(_modules())

    def reach(a: str) -> set[str]:
        seen, todo = set(), [a]
        while todo:
            for b in graph[todo.pop()]:
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    circles = sorted({" ↔ ".join(sorted(x for x in graph if x in reach(m) and m in reach(x)))
                      for m in graph if m in reach(m)})
    assert not circles, circles


def test_dependencies_point_down():
    wrong = []
    for m, deps in _imports(_modules()).items():
        top = m.split(".")[0]
        if top == "cli":
            continue
        wrong += [f"{m} → {d}" for d in deps if d.split(".")[0] not in ALLOWED[top]]
    assert not wrong, wrong


def test_no_preset_is_chosen_by_its_name_outside_the_preset_definitions():
    pattern = re.compile(r"""preset\w*\s*[!=]=\s*["']|["'](general|instance|faces)["']\s*[!=]=\s*\w*preset""")
    found = []
    for m, p in _modules().items():
        if m == "retrieval.presets":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, found


def test_every_imported_project_name_exists():
    """Each ``from <project module> import name`` (function-level ones included, in the packages, cli.py, tests and
    bench/) names something that module has: a lazy import of a moved or removed name fails only when its code
    path runs, which is how a split rots."""
    import importlib

    files = [p for d in (*PACKAGES, "tests", "bench") for p in (ROOT / d).rglob("*.py")] + [ROOT / "cli.py"]
    top = {*PACKAGES, "cli"}
    missing = []
    for p in files:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        pkg = ".".join(parts[:-1])
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(up + ([mod] if mod else []))
            if mod.split(".")[0] not in top:
                continue
            try:
                m = importlib.import_module(mod)
            except ImportError as e:  # an extra that is not installed: not this test's business
                if (e.name or "").split(".")[0] in top:
                    missing.append(f"{p.relative_to(ROOT)}:{node.lineno}: {mod} ({e})")
                continue
            for a in node.names:
                if a.name == "*" or hasattr(m, a.name):
                    continue
                try:
                    importlib.import_module(f"{mod}.{a.name}")
                except ImportError:
                    missing.append(f"{p.relative_to(ROOT)}:{node.lineno}: {mod} has no {a.name}")
    assert not missing, "\n".join(missing)


def test_every_package_is_installed():
    """pyproject.toml lists packages one by one: a new sub-package missing there is absent from a non-editable
    install (retrieval.curate was)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for d in PACKAGES for p in (ROOT / d).rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)

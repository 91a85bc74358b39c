"""Running the CLI: in-process through click's CliRunner, or through the installed ``retrieve`` script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, ok: bool = True):
    """Invoke ``retrieve ARGS`` in-process; assert the exit code is 0 when ``ok``."""
    from cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def run_json(*args: str) -> dict:
    return json.loads(run(*args, "--json").stdout)


def entry_point() -> list[str]:
    """The installed console script, else ``python -m cli`` from the checkout."""
    script = Path(sys.executable).with_name("retrieve")
    if script.exists():
        return [str(script)]
    found = shutil.which("retrieve")
    return [found] if found else [sys.executable, "-m", "cli"]


def run_process(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(entry_point() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=kw.pop("cwd", ROOT), **kw)

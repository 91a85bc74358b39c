"""Running the CLI: in-process through click's CliRunner, or through the installed ``retrieve`` script."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
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


WATCH = ("import sys, atexit\n"
         "atexit.register(lambda: print('sqlalchemy' in sys.modules, 'torch' in sys.modules, file=sys.stderr))\n"
         "import cli\ncli.main(sys.argv[1:], prog_name='retrieve')\n")


def run_watching_imports(*args, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """``retrieve ARGS`` in a fresh process (``env`` added) whose last line of stderr says whether it imported
    SQLAlchemy and torch ("False False": neither)."""
    return subprocess.run([sys.executable, "-c", WATCH, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=timeout)


class Forker:
    """tests/forkrun.py: ``retrieve`` runs forked from one warm process, killed at will (output to ``log``)."""

    def __init__(self, log):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RETRIEVE_THREADS": "1", "RETRIEVE_LOG": str(log)}
        self.p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkrun.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        self.pending = False
        assert self._line(120) == "ready"

    def _line(self, timeout: float) -> str:
        import select

        if not select.select([self.p.stdout], [], [], timeout)[0]:
            self.p.kill()
            raise AssertionError(f"the forked run gave no answer within {timeout} s")
        return self.p.stdout.readline().strip()

    def _send(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def start(self, *args) -> int:
        self._send(json.dumps([str(a) for a in args]))
        kind, pid = self._line(60).split()
        assert kind == "pid"
        self.pending = True
        return int(pid)

    def wait(self, kill: bool = False, timeout: float = 300) -> tuple[int, float]:
        """(exit status or minus the signal, seconds the run lasted)."""
        self._send("kill" if kill else "wait")
        self.pending = False
        kind, code, seconds = self._line(timeout).split()
        assert kind == "exit"
        return int(code), float(seconds)

    def close(self) -> None:
        if self.p.poll() is None:
            if self.pending:  # a test failed with a run under way: end it
                self._send("kill")
            self.p.stdin.close()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def stop(proc: subprocess.Popen, wait: float = 10) -> None:
    """End a server started by a test: SIGTERM, then SIGKILL if it has not exited within ``wait`` seconds."""
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()


SERVING = re.compile(r" at (http://(?:[\d.]+|\[[0-9a-f:]+\]):\d+/)(?:\?token=(\S+))?")


def start_server(index, *args: str, env: dict | None = None, cwd=None, timeout: float = 180):
    """`retrieve serve --index INDEX --port 0 ARGS` as its own process, through the installed command: (the
    process, the root URL it printed, the token in that URL or None). End it with :func:`stop`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(entry_point() + ["serve", "--index", str(index), "--port", "0", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd or ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = SERVING.search(line)
        if m:
            return proc, m.group(1), m.group(2)
    stop(proc)
    raise AssertionError(f"retrieve serve printed no URL: {proc.stderr.read()}")

"""Private temporary folders (retrieval/scratch.py): a killed process's folder is removed by the next one made with
its prefix, a living process's never is; a search's word-index build and `retrieve serve`'s uploads use them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


from clitools import ROOT
from retrieval.scratch import MAKING, OWNER, UNLOCKED_GRACE_S, ScratchDir, sweep

HOLD = ("import sys, time; sys.path.insert(0, sys.argv[1]); from retrieval.scratch import ScratchDir; "
        "d = ScratchDir(sys.argv[2], sys.argv[3]); (d.path / 'part').write_bytes(b'x' * 4096); "
        "print(d.path, flush=True); time.sleep(600)")


def _holder(parent: Path, prefix: str) -> tuple[subprocess.Popen, Path]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), prefix, str(parent)], stdout=subprocess.PIPE,
                         text=True)
    return p, Path(p.stdout.readline().strip())


def test_a_killed_process_s_folder_goes_with_the_next_one_a_living_one_s_stays(tmp_path):
    killed, dead_dir = _holder(tmp_path, "retrieve-words.")
    alive, live_dir = _holder(tmp_path, "retrieve-words.")
    other, other_dir = _holder(tmp_path, "retrieve-serve-uploads-")
    try:
        assert dead_dir.is_dir() and live_dir.is_dir() and dead_dir != live_dir
        os.kill(killed.pid, signal.SIGKILL)  # no clean-up of its own
        killed.wait(30)
        assert (dead_dir / "part").exists()
        with ScratchDir("retrieve-words.", tmp_path) as mine:
            assert not dead_dir.exists()  # its lock went with it
            assert (live_dir / "part").exists() and (other_dir / "part").exists()  # locked, or another prefix
            assert (mine / OWNER).exists()
            assert sweep(tmp_path, "retrieve-words.") == 0  # this one is locked while it lives
        assert not mine.exists()
    finally:
        for p in (killed, alive, other):
            p.kill()
            p.wait(30)
            p.stdout.close()
    assert sweep(tmp_path, "retrieve-words.") == 1 and not live_dir.exists() and other_dir.exists()


def test_a_folder_whose_owner_file_was_never_named_goes_once_it_is_old_others_stay(tmp_path):
    """Killed between making its folder and naming its locked owner file: the folder goes after an hour. A folder
    with no owner file at all (an older version's, or made where flock fails) and a symbolic link are left alone."""
    young, old, legacy = (tmp_path / f"retrieve-words.{n}" for n in ("young", "old", "legacy"))
    victim = tmp_path / "victim"
    for d in (young, old, legacy, victim):
        d.mkdir()
        (d / "part").write_bytes(b"x")
    for d in (young, old, victim):
        (d / MAKING).write_bytes(b"")
    (tmp_path / "retrieve-words.link").symlink_to(victim, target_is_directory=True)
    past = time.time() - UNLOCKED_GRACE_S - 60
    for d in (old, legacy, victim):
        os.utime(d, (past, past))
    (tmp_path / "retrieve-words.file").write_bytes(b"not a folder")
    assert sweep(tmp_path, "retrieve-words.") == 1
    assert not old.exists()
    assert young.exists() and legacy.exists() and (victim / "part").exists() and (tmp_path / "retrieve-words.file").exists()


def test_where_flock_fails_the_folder_is_a_plain_one(tmp_path, monkeypatch):
    """Some network file systems refuse flock: the folder is made and removed as tempfile's would be, not swept."""
    import errno

    from retrieval import scratch

    def refuse(path, create):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(scratch, "_lock", refuse)
    with ScratchDir("retrieve-words.", tmp_path) as d:
        (d / "part").write_bytes(b"x")
        assert sorted(p.name for p in d.iterdir()) == ["part"]
        past = time.time() - UNLOCKED_GRACE_S - 60
        os.utime(d, (past, past))
        assert sweep(tmp_path, "retrieve-words.") == 0 and d.exists()
    assert not d.exists()


def test_a_search_s_word_build_leaves_no_folder_and_removes_a_killed_one_s(tmp_path, monkeypatch):
    """words.sync for a reader without the writer's lock builds under $TMPDIR: nothing stays after it, and the
    leftover of a search killed during its build is removed."""
    from test_wordfile import _Rows, _store, _vocab
    from retrieval.match import wordfile as B, words as W

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    killed, left = _holder(tmp, W.SCRATCH_PREFIX)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(30)
    killed.stdout.close()
    vocab = _vocab()
    rows = _Rows(vocab, range(8))
    verifier = SimpleNamespace(cache=None, max_side=640, n_features=2000)
    sig = W.signature(verifier)
    index = tmp_path / "index"
    index.mkdir()
    B.build(index, vocab, 8, sig, rows.rows, rows.features)
    rows.add(20, 0)
    monkeypatch.setattr(W, "_features", lambda v: rows.features)
    monkeypatch.setattr(W, "save_as_writer", lambda store, write: False)  # another process holds the lock
    wi = W.sync(_store(index, rows, writable=False), verifier)
    assert wi is not None and 20 in wi.shas
    assert list(tmp.iterdir()) == [] and not left.exists()

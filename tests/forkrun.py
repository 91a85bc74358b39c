"""Runs ``retrieve`` commands in forked children of one process that has imported everything already, so a
test can kill many runs at random moments without paying the interpreter's and torch's start-up each time.

Each child runs the CLI's entry point (``cli.main``) exactly as the installed ``retrieve`` script does.
Protocol, one line each: stdin gives a JSON list of arguments (``RETRIEVE_LOG``, from the environment, names
the file the children's stdout and stderr go to); the driver forks and prints ``pid N``; then stdin says
``kill`` (SIGKILL now: the child is alive, or a zombie not yet reaped) or ``wait``, and the driver prints
``exit S T`` once the child has ended: its exit status (or minus the signal that ended it) and how long it ran,
in seconds (a watcher notes the moment it ended without reaping it, so a kill never reaches another process).
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402  (the heavy imports happen here, once)
import indexer.run  # noqa: E402,F401
import retrieval.index.check  # noqa: E402,F401
import retrieval.models.registry  # noqa: E402,F401


def main() -> None:
    log = os.environ.get("RETRIEVE_LOG", os.devnull)
    print("ready", flush=True)
    for line in sys.stdin:
        args = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 70
            try:
                cli.main(args, prog_name="retrieve")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        started = time.monotonic()
        ended = []
        watcher = threading.Thread(target=lambda: (os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT),
                                                   ended.append(time.monotonic())), daemon=True)
        watcher.start()
        print(f"pid {pid}", flush=True)
        if sys.stdin.readline().strip() == "kill":
            os.kill(pid, 9)  # not reaped yet (WNOWAIT): still our child, alive or a zombie
        watcher.join()  # it has ended (a zombie until reaped here)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)} {ended[0] - started:.3f}", flush=True)


if __name__ == "__main__":
    main()

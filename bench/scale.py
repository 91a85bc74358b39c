"""Scale-out benchmarks (issue 12), one command: the three parts in turn, each saving its own table.

    python bench/scale.py [--quick]

1. ``bench/scale_ray.py``: the Ray engine vs the local engine on the same 1 000 photos (needs the ray extra
   and ../shared/data) → bench/results/scale-ray.md;
2. ``bench/scale_vectors.py``: where raw vectors live, then sharded IVF-PQ at 1 M × 1280-d and 10 M × 128-d
   (hours on two cores; ``--quick``: 100 k × 1280 and 1 M × 128) → bench/results/scale-vectors.md;
3. ``bench/scale_db.py``: PostgreSQL vs SQLite inserts and the unchanged-file re-scan of 1 M rows (needs the
   postgres extra and Debian's postgresql) → bench/results/scale-db.md.

A part that cannot run here says why in one line and the others go on; the exit status is non-zero when
any part failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller collections (minutes instead of hours)")
    args = ap.parse_args()
    big = [("100000", "1280"), ("1000000", "128")] if args.quick else [("1000000", "1280"), ("10000000", "128")]
    parts = [["scale_ray.py", "--count", "200" if args.quick else "1000"],
             ["scale_vectors.py", "storage", "--n", "20000"]]
    parts += [["scale_vectors.py", "run", "--n", n, "--dim", d] for n, d in big]
    parts += [["scale_vectors.py", "report"],
              ["scale_db.py", "--rows", "100000" if args.quick else "1000000"]]
    failed = []
    for part in parts:
        print(f"== python bench/{' '.join(part)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / part[0]), *part[1:]], cwd=HERE).returncode != 0:
            failed.append(part[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

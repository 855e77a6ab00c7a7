"""Run every tutorial (``tutorials/NN_*.py``) offline, each in a fresh interpreter.

    python tools/run_tutorials.py [PATTERN ...]

The project's budget is ``--budget`` seconds per tutorial (60): a tutorial over it is reported
as a warning, not a failure, since CI machines are slower and busier than the ones the budget
was measured on. Only ``--timeout`` (300 s, far beyond any measured time) kills a tutorial, as
a hung one. Outputs (figures) go to ``tutorials/_output/``. Exits non-zero when any tutorial
fails or hangs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("patterns", nargs="*", help="only tutorials whose file name contains one of these")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per tutorial; over it: a warning")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds after which a tutorial is killed")
    args = parser.parse_args()

    tutorials = sorted(p for p in (ROOT / "tutorials").glob("[0-9]*.py")
                       if not args.patterns or any(s in p.name for s in args.patterns))
    if not tutorials:
        print("no tutorials matched", file=sys.stderr)
        return 1
    out = ROOT / "tutorials" / "_output"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "TLM_TUTORIAL_OUT": str(out)}
    failures = []
    for path in tutorials:
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, timeout=args.timeout,
                                  capture_output=True, text=True)
            ok, detail = proc.returncode == 0, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            ok, detail = False, f"timed out after {args.timeout:.0f} s\n{exc.stdout or ''}"
        took = time.perf_counter() - start
        over = f"  (over the budget of {args.budget:.0f} s: a warning)" if ok and took > args.budget else ""
        print(f"{'ok  ' if ok else 'FAIL'} {path.name:40s} {took:6.1f} s{over}", flush=True)
        if not ok:
            failures.append(path.name)
            print(detail[-4000:], file=sys.stderr)
    if failures:
        print(f"{len(failures)} tutorial(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of ``tl-modular analyze --model gpt2`` per stage, on a GPT-2-small-shaped random model.

    python benchmarks/analyze_memory.py [--tokens 4096] [--cli-args "--circuits ioi"] [--tokenizer DIR] [--keep DIR]

Lays out an offline hub with random GPT-2-small weights (:func:`tl_modular.testing.write_offline_gpt2_hub`)
in a temporary ``HF_HOME``, writes a text file of English prose (the project's own docs, repeated to
``--tokens``), and runs the CLI at its defaults in a child process (``OMP_NUM_THREADS=1``). Each
stage's peak is the child's resident-set high-water mark (Linux ``VmHWM``), reset through
``/proc/PID/clear_refs`` when the CLI announces the next stage, so it is exact (no polling); "held"
is the resident set when the stage ends (what later stages start from). "load" is everything before
the first stage (imports, the model, the data); the last stage's row includes what follows it (the
summary and the page). ``--cli-args`` passes options on to ``analyze`` (``"--circuits ioi"`` adds
the circuit and feature-circuit stages, which need categories: none run at the defaults;
``"--circuits ioi --no-attribution"`` the circuits alone).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(pid: int, key: str) -> float:
    """``VmHWM``/``VmRSS`` of ``pid`` in GB (NaN once it has exited: a zombie has no memory lines)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key)), float("nan")) / 2 ** 20
    except FileNotFoundError:
        return float("nan")


class _LastPeak:
    """Polls the child's ``VmHWM`` so the last stage has a peak: the exit status's ``ru_maxrss`` is no
    use for it, since it also keeps the high-water marks recorded whenever a thread exited (reset by
    nothing), and a zombie's ``/proc`` has no memory lines. The mark only rises between resets, so the
    last poll misses at most the final ``interval`` (the interpreter's teardown, which frees)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.value = float("nan")
        self._pid, self._interval, self._stop = pid, interval, threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:   # a read between a reset and the value's would carry the old stage's mark over
                value = _status(self._pid, "VmHWM")
                if value == value:   # not NaN: the child still runs
                    self.value = value

    def reset(self) -> None:
        """Start the next stage: clear the child's mark and forget the last one read."""
        with self._lock:
            _reset_peak(self._pid)
            self.value = float("nan")

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.value


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _text(n_tokens: int) -> str:
    """Prose of about ``n_tokens`` GPT-2 tokens (~4 characters each) from the project's docs."""
    docs = [p.read_text(encoding="utf-8") for p in sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])]
    text = "\n\n".join(docs)
    while len(text) < 5 * n_tokens:
        text += "\n\n" + text
    return text[: 5 * n_tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    tokenizer = ROOT.parent / "shared" / "data" / "gpt2-tokenizer"
    parser.add_argument("--tokenizer", default=os.environ.get("TLM_GPT2_TOKENIZER", str(tokenizer)))
    parser.add_argument("--keep", default=None, help="write the report here (default: a temporary folder)")
    parser.add_argument("--cli-args", default="", help='more options for analyze, e.g. "--circuits ioi"')
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tlm-analyze-memory-"))
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", "import sys; from tl_modular.testing import write_offline_gpt2_hub; "
                    "write_offline_gpt2_hub(sys.argv[1])", args.tokenizer], env=env, check=True)
    data = work / "corpus.txt"
    data.write_text(_text(args.tokens), encoding="utf-8")
    out = Path(args.keep) if args.keep else work / "report"
    cmd = [sys.executable, "-m", "tl_modular", "analyze", "--model", "gpt2", "--data", str(data),
           "--tokens", str(args.tokens), "--out", str(out), *shlex.split(args.cli_args)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    last = _LastPeak(child.pid)
    rows: list[tuple[str, float, float, float]] = []
    stage, since = "load", start
    for line in child.stdout:
        print(line, end="", flush=True)
        if line.startswith("[tl-modular] ") and line.rstrip().endswith((" ...", ": reused")):
            now = time.perf_counter()
            rows.append((stage, _status(child.pid, "VmHWM"), _status(child.pid, "VmRSS"), now - since))
            last.reset()
            print(f"[analyze_memory] {stage}: peak {rows[-1][1]:.2f} GB, held {rows[-1][2]:.2f} GB, "
                  f"{rows[-1][3]:.0f} s", flush=True)   # also for a run stopped before its end
            stage, since = line.removeprefix("[tl-modular] ").rsplit(" ", 1)[0].rstrip(":"), now
    status = child.wait()
    rows.append((f"{stage} (and the page)", last.stop(), float("nan"), time.perf_counter() - since))
    if status != 0:
        sys.exit(f"analyze failed (exit status {status})")
    print(f"\n{' '.join(cmd[1:])}\n{args.tokens} tokens, {time.perf_counter() - start:.0f} s\n")
    print("| stage | peak RSS (GB) | held at its end (GB) | seconds |\n|---|---|---|---|")
    def gb(x: float) -> str:
        return "–" if x != x else f"{x:.2f}"
    for name, peak, held, seconds in rows:
        print(f"| {name} | {gb(peak)} | {gb(held)} | {seconds:.0f} |")
    print(f"| **whole run** | **{max((r[1] for r in rows if r[1] == r[1]), default=float('nan')):.2f}** | | |")


if __name__ == "__main__":
    main()

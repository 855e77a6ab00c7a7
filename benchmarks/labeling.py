"""Labeling 200 units through the OpenAI labeler against a slow local server, twice.

    python benchmarks/labeling.py [--units 200] [--latency 0.2] [--concurrency 16]

The bundled model's first ``--units`` neurons of layer 0 are labeled with ``tlm.OpenAILabeler`` —
the real ``openai`` client — against the loopback OpenAI-compatible server
(``tl_modular.labeling.testing_server``, in its own process unless ``--in-process``) answering
with ``offline_chat_model`` after
``--latency`` seconds per request: one explanation and one batched simulation request per unit,
plus 20 random-label baseline simulations. Prints the wall time of the first run (aim < 20 s at
200 units, 200 ms, concurrency 16), the requests it sent, and the second run's requests with the
same response cache (aim: zero). Evidence collection is timed separately.

    python benchmarks/labeling.py --gpt2 [--sequences 64]

Evidence (two streaming passes, virtual weights, unembedding) for all 3,072 neurons of layer 0 of a
GPT-2-small-shaped model with random weights, on ``--sequences`` random rows of 65 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[str]:
    """The loopback server's URL: in its own process (like a real server) or in this one."""
    from tl_modular import labeling
    from tl_modular.labeling.testing_server import ChatServer

    if args.in_process:
        with ChatServer(labeling.offline_chat_model, latency_s=args.latency) as server:
            yield server.url
        return
    proc = subprocess.Popen([sys.executable, "-m", "tl_modular.labeling.testing_server", "--latency",
                             str(args.latency)], stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-process", action="store_true",
                        help="run the server in this process (it then shares the interpreter lock with the client)")
    parser.add_argument("--gpt2", action="store_true", help="evidence for a GPT-2-small-shaped layer")
    parser.add_argument("--sequences", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpt2:
        return gpt2(args)

    import tl_modular as tlm
    from tl_modular import labeling, toy
    from tl_modular.labeling._client import ClientConfig

    model = toy.load_model()
    tokens, mask, _ = toy.mixed_tokens(n_per_task=96, seed=5, scored=True)
    units = labeling.neurons(model, 0, range(args.units))
    start = time.perf_counter()
    labeling.collect_evidence(units, model, tokens, attention_mask=mask, progress=False)
    t_evidence = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp, _server(args) as url:
        def run() -> tuple[float, labeling.Labels, int]:
            cfg = ClientConfig(model="stand-in", base_url=url, api_key="none", cache_dir=Path(tmp) / "cache",
                               max_concurrency=args.concurrency)
            start = time.perf_counter()
            labeler = tlm.OpenAILabeler(config=cfg)
            labels = tlm.label(units, model, tokens, attention_mask=mask, labeler=labeler, progress=False)
            return time.perf_counter() - start, labels, labeler.usage.requests

        t1, labels, sent1 = run()
        t2, again, sent2 = run()
    scores = [lab.score for lab in labels if lab.score is not None]
    print(f"{args.units} units, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}")
    print(f"evidence alone: {t_evidence:.1f} s")
    print(f"first run: {t1:.1f} s, {sent1} requests ({labels.usage.get('requests')} counted, "
          f"{labels.usage.get('retries', 0)} retries), {labels.usage.get('prompt_tokens')} prompt tokens")
    print(f"second run: {t2:.1f} s, {sent2} requests, {again.usage.get('cached', 0)} cached replies")
    print(f"median score {statistics.median(scores):.2f}, random-label baseline {labels.baseline['mean']:.2f}")
    print(f"| labeling {args.units} units via OpenAILabeler, local server with {args.latency * 1000:.0f} ms latency, "
          f"concurrency {args.concurrency} | first run **{t1:.1f} s** ({sent1} requests, evidence {t_evidence:.1f} s "
          f"of it); second run {t2:.1f} s, **{sent2} requests** | `python benchmarks/labeling.py` |")


def gpt2(args: argparse.Namespace) -> None:
    from tl_modular import labeling
    from tl_modular.testing import gpt2_small_model

    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, 50257, (args.sequences, 65), generator=torch.Generator().manual_seed(0))
    units = labeling.neurons(model, 0)
    start = time.perf_counter()
    labeling.collect_evidence(units, model, tokens, config=labeling.EvidenceConfig(batch_size=16), progress=False)
    t = time.perf_counter() - start
    print(f"| labeling evidence for all {len(units)} neurons of a GPT-2-small-shaped layer, {args.sequences} x 65 "
          f"tokens | **{t:.1f} s** | `python benchmarks/labeling.py --gpt2` |")


if __name__ == "__main__":
    main()

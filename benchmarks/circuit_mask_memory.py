"""Peak memory and time of the circuit search's learnt mask (``graph.circuits``' ``search="mask"``,
the default: forward and backward passes with every route partially patched) on a GPT-2-small-shaped
model, ``--prompts`` prompts of ``--pos`` random tokens in batches of ``--batch`` (``analyze``'s
32), ``--steps`` steps of the mask, each batch in passes of at most ``--rows`` prompts (default:
``circuits.mask_rows``, within ``circuits.MASK_MEMORY``; ``--rows`` = ``--batch``: one pass, as
before the bound).

    python benchmarks/circuit_mask_memory.py [--prompts 32] [--batch 32] [--pos 16] [--steps 3] [--rows N]

Prints the peak (the process's resident set from the start of the mask, Linux: VmHWM reset through
/proc/self/clear_refs; the model, compression and graph included: the "base"), the time and a
digest of the learnt mask ``θ`` (its float64 bytes), so that runs of two versions of tl_modular can be
compared bitwise: run it once more with ``PYTHONPATH`` at a checkout of an older commit (e.g.
``git worktree add /tmp/before 0291861``: there the mask kept a stack of every sender's delta per
hook point, ~0.25 GB each at 32 prompts of 16 tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from _peak import peak_gb, reset_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=None, help="prompts per pass (default: circuits.mask_rows)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular import circuits
    from tl_modular.graph import routes
    from tl_modular.segmentation import segment
    from tl_modular.testing import gpt2_small_model

    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, 50257, (args.prompts, args.pos), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, batch_size=8, progress=False)
    graph = tlm.build_graph(comp, model=model)
    channels = segment(model)
    all_routes = sorted(graph.routes("static"))
    writers = {w.name: w for w in routes.writers(comp, channels)}
    cat = circuits._category("all", tokens, model, channels, sorted({w for w, _ in all_routes}), writers, "mean")
    clean = circuits._patched_metric(model, channels, cat, [], args.batch)
    empty = circuits._patched_metric(model, channels, cat, all_routes, args.batch)
    checks = []

    def faithful(kept):   # the mask's verification by patching, counted (its result does not steer θ)
        checks.append(len(kept))
        m = circuits._patched_metric(model, channels, cat, [r for r in all_routes if r not in set(kept)], args.batch)
        return circuits._ratio(m - empty, clean - empty), m

    base = reset_peak()
    start = time.perf_counter()
    theta, _ = circuits._learn_mask(model, channels, cat, all_routes, clean, empty, 0.9, faithful,
                                    steps=args.steps, batch_size=args.batch, rows=args.rows)
    rows = args.rows or circuits.mask_rows(model, len({w for w, _ in all_routes}), args.pos)
    seconds = time.perf_counter() - start
    digest = hashlib.blake2b(theta.tobytes(), digest_size=8).hexdigest()
    print(f"{len(all_routes)} routes, {args.prompts} prompts x {args.pos} tokens, batch {args.batch} in passes of "
          f"<= {rows}, {args.steps} "
          f"steps: {seconds:.1f} s, peak {peak_gb():.2f} GB (base {base:.2f} GB); theta digest {digest}, "
          f"sum {theta.sum():.12e}", flush=True)


if __name__ == "__main__":
    main()

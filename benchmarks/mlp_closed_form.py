"""Closed-form MLP Jacobian moments vs per-token brute-force Jacobians at GPT-2-small size.

    python benchmarks/mlp_closed_form.py [--tokens 2048] [--threads 2]

One GPT-2-sized MLP (d_model 768, d_mlp 3072, gelu_new) behind a LayerNorm, random weights.
Both methods compute the read- and write-side moments E[J Jᵀ] and E[Jᵀ J] over the same tokens:
the closed form through ``tl_modular.statistics`` (one pass, the MLP channel only), the brute
force by materialising every token's Jacobian with ``torch.func.vmap(jacrev)`` in chunks.
Prints the median of 3 timings of each, the speed ratio and the relative difference.
"""

from __future__ import annotations

import argparse
import statistics as stats
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tl_modular.compression.statistics import collect_statistics
    from tl_modular.testing import tiny_model

    model = tiny_model("gpt2", n_layers=1, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=1000,
                       n_ctx=129, noise=0.02)
    seq = 129  # position 0 is excluded from statistics: 128 scored tokens per row
    tokens = torch.randint(0, 1000, (args.tokens // (seq - 1), seq), generator=torch.Generator().manual_seed(0))
    mlp, ln = model.blocks[0].mlp, model.blocks[0].ln2

    def closed_form():
        s = collect_statistics(model, tokens, names=["L0.MLP"], batch_size=4, progress=False)
        return s.reads["L0.MLP"]["in"].jacobian, s.writes["L0.MLP"].jacobian

    def brute_force():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.ln2.hook_normalized")
        ys = cache["blocks.0.ln2.hook_normalized"][:, 1:].reshape(-1, 768)
        jac = torch.func.vmap(torch.func.jacrev(lambda y: mlp((y * ln.w + ln.b)[None, None])[0, 0]))
        read = torch.zeros(768, 768, dtype=torch.float64)
        write = torch.zeros(768, 768, dtype=torch.float64)
        with torch.no_grad():
            for chunk in ys.split(64):
                J = jac(chunk).to(torch.float64)                     # [t, out, in]
                read += torch.einsum("toi,toj->ij", J, J)
                write += torch.einsum("toi,tpi->op", J, J)
        return read / len(ys), write / len(ys)

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return stats.median(times), out

    t_closed, (r1, w1) = timed(closed_form)
    t_brute, (r2, w2) = timed(brute_force)
    err = max(float((r1 - r2).norm() / r2.norm()), float((w1 - w2).norm() / w2.norm()))
    print(f"tokens={len(tokens) * (seq - 1)} threads={args.threads}")
    print(f"closed form (incl. forward): {t_closed:.2f} s   brute force: {t_brute:.2f} s   "
          f"speed-up: {t_brute / t_closed:.0f}x   max relative difference: {err:.1e}")


if __name__ == "__main__":
    main()

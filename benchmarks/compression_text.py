"""Compression on real text: CE increase and KL against dimensions kept, for every method.

    python benchmarks/compression_text.py [--fit-tokens 16384] [--eval-tokens 8192] [--threads 2]
        [--fractions 0.1,0.2,0.35,0.5,0.7] [--methods pca,whitened,jacobian,fisher] [--refine-steps 0]
        [--refine-tokens 245760] [--refine-lr 3e-3] [--refine-batch-size 8] [--refine-positions 0.25]
        [--refine-warmup N] [--eval-split heldout,train] [--count port] [--json out.json]

The bundled real-text GPT-2 (``tlm.textlm``): statistics are fitted on its training text
(Python documentation and source) and every point is scored on held-out text (NetworkX's
source, which the model never saw): the CE increase over the clean model and the mean KL from
the clean to the compressed next-token distribution (CE alone flatters: a compressed model can
even lower it). ``--eval-split train`` scores on the training sample's last rows instead, past
every token the statistics and the refinement read — text of the training sources but not unseen:
the model trained on it for ~14 epochs (clean CE 1.6 there against 2.5 on NetworkX, 0.75 on the
rows right after the first 16k tokens); ``heldout,train`` scores both. Each point keeps the same fraction of the
read dimensions and of the write dimensions (separate budgets), so "35%" means at most 35% of
each; read dimensions are counted per port (a head's q, k and v separately, max 3 × d_head), or
with ``--count channel`` as a share of ``d_model`` per channel (the looser count of a read space
shared by q, k and v: 35% then allows 1.75× the read dimensions).

Methods:
- ``pca``: the baseline — PCA of each channel's output (write) and of each read port's output
  (for a linear port that is ``read="whitened"``: the input directions that best reproduce the
  port's value), ranks from a per-side energy threshold, one for the reads and one for the
  writes, each chosen to meet the fraction;
- ``whitened``, ``jacobian``: ``tlm.compress(read=..., write="output")`` (the former default is
  ``whitened``), budgets by relative spectra;
- ``fisher``: ``read="fisher", write="fisher"``: bases and rank allocation from the Fisher of the
  model's own predictions (``tlm.fisher``), budgets by absolute spectra (marginal KL);
- ``fisher+refine``: the same, then encoders/decoders fitted end to end against the clean
  model's KL for ``--refine-steps`` steps (``Compression.refined``; ``--refine-lr``,
  ``--refine-batch-size`` rows and ``--refine-positions`` of their positions per step,
  ``--refine-warmup`` steps of warm-up; its defaults unless given) on ``--refine-tokens``
  training tokens (many: on few, the fit does not carry over to held-out text).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch


def _fractions_budget(comp, frac: float, count: str = "port") -> dict[str, int]:
    """Dimensions ``frac`` allows: of every side's maximum rank; with ``count="channel"`` the reads
    are counted as each channel's read subspace of the residual stream (``frac`` of ``d_model`` per
    channel, one space for a head's q, k and v), capped at every port at full rank."""
    read = sum(s.max_rank for (n, k), s in comp.sides().items() if k != "write")
    write = sum(s.max_rank for (n, k), s in comp.sides().items() if k == "write")
    if count == "channel":
        d_model = next(s for (n, k), s in comp.sides().items() if k == "write").full_decoder.shape[0]
        return {"read": min(read, int(frac * len(comp.channels) * d_model)), "write": int(frac * write)}
    return {"read": int(frac * read), "write": int(frac * write)}


def _energy_for(comp, frac: float, count: str = "port"):
    """Output PCA at ``frac``: per-side energy thresholds, one for the reads and one for the writes,
    each the highest whose ranks keep at most ``frac`` of that role's dims. (One threshold for both
    let the tighter role decide: at 35% it spent 688 of the 1,073 read dims allowed.)"""
    target = _fractions_budget(comp, frac, count)
    chosen = {}
    for role in ("read", "write"):
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            if _role_dims(comp.truncated(energy=max(mid, 1e-9)))[role] <= target[role]:
                lo = mid
            else:
                hi = mid
        chosen[role] = comp.truncated(energy=max(lo, 1e-9))
    reads, writes = chosen["read"], chosen["write"]
    return replace(reads, channels={n: replace(c, write=writes.channels[n].write) for n, c in reads.channels.items()})


def _role_dims(comp) -> dict[str, int]:
    out = {"read": 0, "write": 0}
    for (_, k), s in comp.sides().items():
        out["write" if k == "write" else "read"] += s.rank
    return out


def _eval_sets(textlm, splits: str, n_tokens: int, seq_len: int, used: int) -> dict[str, torch.Tensor]:
    """The scoring text by split: ``heldout`` (NetworkX) or ``train``, the last rows of the training
    sample (the same rows whatever the fit and refinement read, as long as they end before them)."""
    out = {}
    for split in splits.split(","):
        if split == "heldout":
            out[split] = textlm.tokens("heldout", n_tokens, seq_len)
        elif split == "train":
            offset = len(textlm.token_stream("train")) - n_tokens // seq_len * (seq_len - 1)
            if offset < used:
                raise SystemExit(f"--eval-split train: the training sample's last {n_tokens} tokens overlap the {used} "
                                 f"the fit and refinement read; lower --eval-tokens or --refine-tokens")
            out[split] = textlm.tokens("train", n_tokens, seq_len, offset=offset)
        else:
            raise SystemExit(f"--eval-split: unknown split {split!r}; use heldout, train or heldout,train")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--fit-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fractions", default="0.1,0.2,0.35,0.5,0.7")
    parser.add_argument("--methods", default="pca,whitened,jacobian,fisher")
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--refine-tokens", type=int, default=245760)
    parser.add_argument("--refine-lr", type=float, default=None)
    parser.add_argument("--refine-batch-size", type=int, default=None)
    parser.add_argument("--refine-positions", type=float, default=None)
    parser.add_argument("--refine-warmup", type=int, default=None)
    parser.add_argument("--eval-split", default="heldout",
                        help="heldout (NetworkX source), train (the training sample's unused tail), or both")
    parser.add_argument("--count", choices=("port", "channel"), default="port",
                        help="read dims per port (max 3 × d_head for a head) or per channel (of d_model)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular.compression.fidelity import _Reference
    from tl_modular.compression.fisher import collect_fisher
    from tl_modular.compression.statistics import collect_statistics

    model = tlm.textlm.load_model()
    fit = tlm.textlm.tokens("train", args.fit_tokens, args.seq_len)
    refine_fit = tlm.textlm.tokens("train", args.refine_tokens, args.seq_len) if args.refine_steps else None
    used = max(fit.shape[0], 0 if refine_fit is None else refine_fit.shape[0]) * (args.seq_len - 1)
    evals = _eval_sets(tlm.textlm, args.eval_split, args.eval_tokens, args.seq_len, used)
    refine_kwargs = {k: v for k, v in (("lr", args.refine_lr), ("batch_size", args.refine_batch_size),
                                       ("positions", args.refine_positions), ("warmup", args.refine_warmup))
                     if v is not None}
    times = {}
    start = time.perf_counter()
    stats = collect_statistics(model, fit, progress=False)
    times["statistics"] = time.perf_counter() - start
    start = time.perf_counter()
    fisher = collect_fisher(model, fit, progress=False)
    times["fisher"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for rows in fit.split(16):
            model(rows)
    times["forward"] = time.perf_counter() - start
    print("passes over the fit tokens (s):", {k: round(v, 1) for k, v in times.items()}, flush=True)

    fractions = [float(f) for f in args.fractions.split(",")]
    base = tlm.compress(model, statistics=stats, read="whitened", write="output")
    refs = {}
    for split, toks in evals.items():
        refs[split] = _Reference(model, base, toks, 16, None, None)
        print(f"clean CE on {split} text {refs[split].clean_loss:.4f}; all channels mean-ablated "
              f"{refs[split].ablated_loss:.4f}")
    rows = []
    for method in args.methods.split(","):
        if method == "pca":
            comp = tlm.compress(model, statistics=stats, read="whitened", write="output")
        elif method in ("whitened", "jacobian"):
            comp = tlm.compress(model, statistics=stats, read=method, write="output")
        elif method == "fisher":
            comp = tlm.compress(model, statistics=stats, fisher=fisher, read="fisher", write="fisher")
        else:
            raise SystemExit(f"unknown method {method!r}")
        for frac in fractions:
            start = time.perf_counter()
            kept = (_energy_for(comp, frac, args.count) if method == "pca"
                    else comp.truncated(budget=_fractions_budget(comp, frac, args.count)))
            variants = [(method, kept)]
            if method == "fisher" and args.refine_steps:
                variants.append(("fisher+refine", kept.refined(model, refine_fit, steps=args.refine_steps,
                                                               progress=False, **refine_kwargs)))
            seconds = round(time.perf_counter() - start, 1)
            for label, c in variants:
                dims = _role_dims(c)
                for split, ref in refs.items():
                    score = ref.score(c)
                    row = {"method": label, "fraction": frac, "eval_split": split, "read_dims": dims["read"],
                           "write_dims": dims["write"], "ce_increase": score["compressed_loss"] - score["clean_loss"],
                           "kl": score["kl"], "seconds": seconds}
                    rows.append(row)
                    print(f"{label:14s} {frac:4.0%}  read {dims['read']:5d}  write {dims['write']:5d}  {split:7s}  "
                          f"CE +{row['ce_increase']:.4f}  KL {row['kl']:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": times, "clean_loss": {s: r.clean_loss for s, r in refs.items()}, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()

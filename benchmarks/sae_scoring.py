"""SAE training throughput and polysemanticity scoring time: bundled model and GPT-2-small shape.

    python benchmarks/sae_scoring.py [--threads 2] [--gpt2-tokens 65536] [--score-tokens 16384]

Per model, in one run: training tokens per second of ``tlm.sae.train_sae`` (sae-lens' trainer fed
by the streaming activation buffer, model forward passes included) next to the plain forward
passes' tokens per second over the same data, and the time of ``tlm.sae.score_model`` over every
neuron reading the SAE's hook (plus, on the bundled model, every read direction of the
compression). GPT-2-small shape: random weights and random tokens (the architecture sets the
cost), SAE at ``blocks.6.hook_resid_mid`` with 8 × 768 features.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tl_modular as tlm
from tl_modular import sae as S
from tl_modular.testing import gpt2_small_model


def forward_rate(model, tokens, mask=None, batch_size=32) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            kw = {} if mask is None else {"attention_mask": mask[i:i + batch_size]}
            model(tokens[i:i + batch_size], return_type=None, **kw)
    n = int(tokens[:, 1:].numel() if mask is None else mask[:, 1:].sum())
    return n / (time.perf_counter() - start)


def run(name, model, tokens, mask, hook, d_sae, n_tokens, score_tokens, comp=None) -> dict:
    fwd = forward_rate(model, tokens, mask)
    cfg = S.SAETrainConfig(d_sae=d_sae, n_tokens=n_tokens, batch_size=1024, l1_coefficient=5.0)
    start = time.perf_counter()
    sae = S.train_sae(model, tokens, hook, cfg, attention_mask=mask)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    table = S.score_model(model, [sae], tokens, comp=comp, attention_mask=mask, max_tokens=score_tokens)
    score_s = time.perf_counter() - start
    units = sum(len(g.names) for g in table.groups)
    out = {"model": name, "hook": hook, "d_sae": d_sae, "train_tokens": n_tokens,
           "train_tokens_per_s": round(n_tokens / train_s), "forward_tokens_per_s": round(fwd),
           "train_s": round(train_s, 1), "score_units": units, "score_tokens": table.n_tokens,
           "score_s": round(score_s, 1)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpt2-tokens", type=int, default=65_536, help="SAE training tokens on GPT-2 shape")
    parser.add_argument("--score-tokens", type=int, default=16_384)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tlm.toy.load_model()
    tokens, mask = tlm.toy.mixed_tokens(n_per_task=2048, seed=0)
    comp = tlm.compress(model, tokens[:1024], attention_mask=mask[:1024])
    run("bundled", model, tokens, mask, "blocks.1.hook_resid_mid", 512, 300_000, args.score_tokens, comp)

    gpt2 = gpt2_small_model()
    g_tokens = torch.randint(0, 50257, (max(64, args.gpt2_tokens // 128 // 2), 128),
                             generator=torch.Generator().manual_seed(0))
    run("gpt2-small shape", gpt2, g_tokens, None, "blocks.6.hook_resid_mid", 8 * 768, args.gpt2_tokens,
        args.score_tokens)


if __name__ == "__main__":
    main()

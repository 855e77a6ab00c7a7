"""Train the SAEs shipped with the bundled model (``tl_modular/sae/bundled/``).

    python tools/train_toy_saes.py [--n-tokens 1200000] [--d-sae 512] [--out DIR]

One sae-lens SAE (ReLU + L1, activations normalized) per hook: the residual stream where the
channels read (``hook_resid_pre`` and ``hook_resid_mid`` of both layers) and the MLP outputs.
Trained on the bundled model's four tasks (``tlm.toy.mixed_tokens``), evaluated on fresh prompts
(FVU, L0, dead features, loss recovered at the scored positions). About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tl_modular as tlm
from tl_modular import sae as S

HOOKS = [f"blocks.{layer}.{h}" for layer in (0, 1) for h in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n-tokens", type=int, default=1_200_000)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--l1", type=float, default=3.0)
    parser.add_argument("--out", default=str(S.BUNDLED_DIR))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tlm.toy.load_model()
    tokens, mask = tlm.toy.mixed_tokens(n_per_task=2048, seed=0)
    ev, evm, evs = tlm.toy.mixed_tokens(n_per_task=256, seed=1, scored=True)
    report = {}
    for hook in HOOKS:
        start = time.perf_counter()
        cfg = S.SAETrainConfig(d_sae=args.d_sae, n_tokens=args.n_tokens, l1_coefficient=args.l1, lr=1e-3)
        sae = S.train_sae(model, tokens, hook, cfg, attention_mask=mask)
        took = time.perf_counter() - start
        sae.cfg.metadata.model_name = "tl_modular.toy"
        S.save_atomic(sae, f"{args.out}/{hook}")
        q = S.quality(model, sae, ev, attention_mask=evm, loss_mask=evs)
        report[hook] = {"seconds": round(took, 1), "tokens_per_second": round(args.n_tokens / took),
                        **{k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}}
        print(hook, json.dumps(report[hook]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

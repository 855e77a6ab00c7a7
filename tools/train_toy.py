"""Train the bundled workbench model, verify its ground truth, and write the shipped checkpoint.

    python tools/train_toy.py [--steps 6000] [--seed 0] [--out tl_modular/toy/checkpoint]

About 20-30 minutes on 2 CPU cores. Writes ``model.safetensors``, ``config.json`` (with the
measured facts under ``info``) and the toy tokenizer's files. Fails (exit 1) without writing
into ``--out`` when an accuracy bar or a ground-truth fact does not hold; retrain with another
seed then.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from tl_modular import toy
from tl_modular.patching import channel_effect
from tl_modular.toy import ground_truth as gt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=toy.BUNDLED_DIR)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("runs/toy"),
                        help="resumable training state (an interrupted run continues from here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    result = toy.train(steps=args.steps, seed=args.seed, checkpoint_dir=args.checkpoint_dir)
    model = result.model
    minutes = (time.perf_counter() - start) / 60

    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer comes with a saved checkpoint
        toy.save_model(model, tmp)
        model = toy.load_model(tmp)
        accuracy = toy.evaluate(model, toy.eval_tasks(n=2048, seed=50_000))
        scores = gt.head_scores(model)
        heads = gt.known_heads(model, scores)
        fraction = gt.induction_route_fraction(model, heads)
        composition = gt.key_composition_fraction(model, heads)
        ind_heads = gt.induction_heads(model, scores)
        path = gt.induction_path_fraction(model, heads["previous_token"], ind_heads) if ind_heads else 0.0
        prev_effect = channel_effect(model, toy.induction(512, seed=123), [heads["previous_token"]]).fraction
        ablation = gt.ablation_accuracy(model)
    facts = {
        "steps": args.steps, "seed": args.seed, "train_minutes": round(minutes, 1),
        "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "heads": heads,
        "head_scores": {k: [[round(x, 3) for x in row] for row in v.tolist()] for k, v in scores.items()},
        "induction_route_fraction": round(fraction, 3),
        "key_composition_fraction": round(composition, 3),
        "induction_heads": ind_heads,
        "induction_path_fraction": round(path, 3),
        "previous_token_head_effect": round(prev_effect, 3),
        "ablation_accuracy": {c: {t: round(a, 3) for t, a in row.items()} for c, row in ablation.items()},
    }
    print(f"trained {args.steps} steps in {minutes:.1f} min")
    print("accuracy:", facts["accuracy"])
    print("heads:", heads, "scores:", {k: round(float(v.max()), 3) for k, v in scores.items()})
    print("of the induction logit difference: previous-token head (all paths)", round(prev_effect, 3),
          "| its writes into later keys, directly and via its layer's MLP", round(composition, 3),
          "| the path into the induction heads' keys (MLP recomputed)", round(path, 3),
          "| the direct route to the induction head's key alone", round(fraction, 3))
    problems = [f"{t} accuracy {a:.3f} < 0.95" for t, a in accuracy.items() if a < 0.95]
    problems += [f"{k} head score {float(scores[k].max()):.3f} < 0.5" for k in scores if scores[k].max() < 0.5]
    if path < 0.5:
        problems.append(f"previous-token -> induction keys path fraction {path:.3f} < 0.5")
    if problems:
        print("NOT written:", "; ".join(problems), file=sys.stderr)
        return 1
    toy.save_model(model, args.out, info=facts)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

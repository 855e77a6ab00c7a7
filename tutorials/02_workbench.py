# %% [markdown]
# # 2. The ground-truth workbench
#
# tl_modular ships a small transformer trained on four tasks whose algorithms are known, so
# that every analysis can be checked against ground truth — with no download.
#
# | task | example | algorithm |
# |---|---|---|
# | induction | `IND 4 9 ... 12 7 3 ... 12 7 3` | previous-token head + induction head |
# | modular addition | `ADD 3 + 30 = 2` | a + b mod 31 (30% of pairs never seen in training) |
# | brackets | `BRK ( ( ) ( = 2` | depth = #open − #close |
# | sorting | `SRT 9 2 7 1 5 > 1 2 5 7 9` | ascending order |

# %%
import copy
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from tl_modular import toy
from tl_modular.toy import ground_truth as gt

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)

model = toy.load_model()          # a HookedTransformer, offline, in well under a second
print(model.cfg.n_layers, "layers,", model.cfg.n_heads, "heads per layer, d_model", model.cfg.d_model)
print(model.to_str_tokens("SRT 9 2 7 1 5 > 1 2 5 7 9"))

# %% [markdown]
# Every task generator returns a `Task`: clean and corrupted tokens, scored positions, answers,
# the corrupted prompts' answers, and a metric (logit difference; `accuracy` too).

# %%
task = toy.sorting(4, seed=0)
for clean, bad in zip(toy.decode(task.clean), toy.decode(task.corrupted), strict=True):
    print(f"{clean:35s} | corrupted: {bad}")
print("logit difference:", task.metric(model(task.clean)).item())

accuracy = toy.evaluate(model)    # modular addition also on every held-out pair
for name, acc in accuracy.items():
    print(f"{name:26s} {acc:.3f}")

# %% [markdown]
# ## The known heads
# TransformerLens' head detector finds a previous-token head in layer 0 and induction heads in
# layer 1. Path patching (as in Wang et al.: the attention heads in between stay clean, the MLP in
# between is recomputed as part of the path) shows the path from the previous-token head into the
# induction heads' *keys* carries most of the induction task's logit difference. The single
# direct edge into the top induction head's key carries little: this model spreads induction
# over four heads and relays the previous token through MLP0 as well.

# %%
scores = gt.head_scores(model)
heads = gt.known_heads(model, scores)
induction_heads = gt.induction_heads(model, scores)
print(heads, "induction heads:", induction_heads)
print("previous-token head -> induction heads' keys (path patching) carries",
      f"{gt.induction_path_fraction(model, heads['previous_token'], induction_heads):.0%} of the logit difference;",
      f"the direct edge to {heads['induction']}:k alone {gt.induction_route_fraction(model, heads):.0%}")

fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
for ax, (kind, s) in zip(axes, scores.items(), strict=True):
    im = ax.imshow(s.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_title(f"{kind} score")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
fig.colorbar(im, ax=axes)
fig.savefig(out / "02_head_scores.png", dpi=120)

# %% [markdown]
# ## Which components each task needs
# Mean-ablate each head and MLP in turn and measure accuracy per task.

# %%
table = gt.ablation_accuracy(model, n=256)
names = [n for n in table if n != "none"]
grid = torch.tensor([[table[n][t] for t in table["none"]] for n in names])
fig, ax = plt.subplots(figsize=(5, 6))
ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
ax.set_yticks(range(len(names)), names, fontsize=7)
ax.set_xticks(range(len(table["none"])), list(table["none"]), rotation=30, fontsize=8)
ax.set_title("accuracy with one channel mean-ablated")
fig.tight_layout()
fig.savefig(out / "02_ablation.png", dpi=120)
for t in table["none"]:
    needed = [n for n in names if table[n][t] < table["none"][t] - 0.1]
    print(f"{t:18s} needs {needed}")

# %% [markdown]
# ## Continuing training
# `toy.train` trains from scratch (`toy.train(steps=6000)`, ~25 min on 2 cores; the shipped
# checkpoint came from `python tools/train_toy.py`) or continues a model on chosen data — here
# a few steps on sorting only. Later tools (model diffing, modularity training) reuse this loop.

# %%
tuned = toy.train(copy.deepcopy(model), toy.sorting(2000, seed=5), steps=20, batch_size=32,
                  eval_every=10, progress=False)
print([(r["step"], round(r["accuracy"]["sorting"], 3)) for r in tuned.history])

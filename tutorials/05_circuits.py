# %% [markdown]
# # 5. Circuits per kind of input
#
# Which routes of the channel graph does each kind of input use? `graph.circuits` scores every
# route per example by attribution patching through the compressed subspaces, learns which routes
# each category needs jointly (a relaxed mask over routes trained by gradient descent, as in edge
# pruning), and verifies the circuit by real route patching (everything outside the circuit is
# patched to the category's corrupted run): the smallest verified prefix of the learnt order, then
# pruned route by route. Faithfulness and completeness come with bootstrap intervals and a
# comparison with random circuits of the same size.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import tl_modular as tlm
from tl_modular import toy

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

model = toy.load_model()
tokens, mask, scored = toy.mixed_tokens(n_per_task=64, seed=2, scored=True)
comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                        metric="logit", progress=False)
tasks = {name: gen(64, seed=5) for name, gen in toy.GENERATORS.items()}
circuits = graph.circuits(model, tasks, n_boot=100, n_random=5, batch_size=64, progress=False)
print(circuits)

# %% [markdown]
# ## Each task's circuit

# %%
n = len(graph.routes())
for name, c in circuits.items():
    lo, hi = c.faithfulness_interval
    print(f"{name:>16}: {c.size:3d} of {n} routes, faithfulness {c.faithfulness:.2f} [{lo:.2f}, {hi:.2f}], "
          f"completeness {c.completeness:.2f}, random circuits {max(c.random_faithfulness):.2f} at most")
    print("                  strongest:", c.routes[:5])
greedy = graph.circuits(model, tasks, search="greedy", n_boot=20, n_random=1, batch_size=64, progress=False)
print("routes per circuit, learnt mask vs attribution order:",
      {name: (c.size, greedy[name].size) for name, c in circuits.items()})
print("induction: previous-token head -> induction keys:",
      [r for r in circuits["induction"].routes if r[0] == "L0.H0" and r[1].endswith(":k")])

# %% [markdown]
# ## Shared and task-specific routes

# %%
print("shared by every task:", sorted(circuits.shared()))
for name, routes in circuits.specific().items():
    print(f"only {name}: {len(routes)} routes, e.g. {sorted(routes)[:4]}")
names, sim = circuits.similarity()
print("Jaccard similarity of the route sets:")
for name, row in zip(names, sim, strict=True):
    print(f"{name:>16}", " ".join(f"{v:.2f}" for v in row))

# %% [markdown]
# ## Examples cluster by the channels they use
# Each example's share of its route scores per channel; k-means over all examples of all tasks.

# %%
clusters = circuits.example_clusters(seed=0)
print(f"purity {clusters['purity']:.2f}, adjusted Rand index with the task labels {clusters['ari']:.2f}")
for name, labels in clusters["labels"].items():
    print(f"{name:>16}: examples per cluster {[labels.count(j) for j in range(clusters['k'])]}")

# %% [markdown]
# ## The circuits on the layer layout
# Red: routes in every task's circuit; blue: routes only this task's circuit uses.

# %%
circuits.plot(graph, out / "05_circuits.png")

# %% [markdown]
# ## Faithfulness against circuit size

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for name, c in circuits.items():
    ax.plot([p["fraction"] for p in c.curve], [p["faithfulness"] for p in c.curve], "o-", ms=3, label=name)
ax.axhline(0.9, color="0.6", ls="--", lw=0.8)
ax.set_xscale("log")
ax.set_xlabel("fraction of routes kept (greedy by attribution)")
ax.set_ylabel("faithfulness")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "05_faithfulness.png", dpi=120)
graph.save(out / "05_graph")
circuits.save(out / "05_graph")            # circuits.json beside graph.json
print("wrote", out / "05_faithfulness.png")

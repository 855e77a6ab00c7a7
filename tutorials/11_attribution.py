# %% [markdown]
# # 11. Feature-level attribution graphs next to route circuits
#
# `graph.circuits` (tutorial 05) finds which *routes* between whole channels a task needs. An
# attribution graph goes one level down: per prompt, its nodes are each channel's write
# directions (or SAE features) at each position, plus error, embedding, bias and logit nodes, and
# its edges are direct effects in the model linearised at the clean run (attention patterns,
# LayerNorm scales and MLP gates frozen), so every node's incoming edges add up exactly to its
# value. Pruning keeps what carries the logit's influence; intervention checks that the kept
# features alone recover the metric. Here: the induction task, its route circuit, its
# feature-level circuit, the two compared channel by channel, and the features each task uses.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular.attribution import aggregate, faithfulness, prune

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))

model = toy.load_model()
tokens, mask, scored = toy.mixed_tokens(n_per_task=32, seed=2, scored=True)
comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                        metric="logit", progress=False)
task = toy.induction(4, seed=5)
small = comp.truncated(rank=8)        # eight write directions per channel: graphs of ~500k edges, not ~2M

# %% [markdown]
# ## The route-level circuit

# %%
# the attribution order (search="greedy") keeps this tutorial quick; tutorial 05 learns the mask
routes = graph.circuits(model, {"induction": task}, search="greedy", n_boot=10, n_random=1,
                        progress=False)["induction"]
print(f"route circuit: {routes.size} of {len(graph.routes())} routes, faithfulness {routes.faithfulness:.2f}")
print("previous-token head -> induction keys:", [r for r in routes.routes if r[0] == "L0.H0" and r[1].endswith(":k")])

# %% [markdown]
# ## The feature-level circuit of one prompt
#
# Completeness is exact up to fp32 rounding; the pruned graph keeps a fraction of a percent of the
# edges. Faithfulness keeps only the kept features of every prompt (all others set to their
# corrupted-run value) and compares with random feature sets of the same size.

# %%
graphs = tlm.attribution_graph(model, task, units=small)           # one per prompt
g = graphs[0]
print(g, f"completeness {g.completeness():.1e}")
kept = [prune(x, node_threshold=1.0, edge_threshold=0.9) for x in graphs]
print(f"kept {kept[0].n_edges} of {g.adjacency._nnz()} edges ({100 * kept[0].edge_fraction:.2f}%), "
      f"{len(kept[0].features())} features; strongest: {kept[0].features()[:4]}")
result = faithfulness(model, task, small, kept, baseline="corrupted", n_random=2)
print(f"faithfulness {result['faithfulness']:.2f}; random feature sets of the same size "
      f"{max(result['random']):.2f} at most")
g.save(out / "11_graph.json", pruned=kept[0])
strongest = torch.where(kept[0].nodes & g.mask("feature"), kept[0].node_influence, 0.0).argsort(descending=True)[:25]
show = torch.zeros(len(g), dtype=torch.bool)
show[strongest], show[g.logit] = True, True                          # the 25 most influential kept features
ax = g.plot(keep=show)
ax.figure.savefig(out / "11_feature_graph.png", dpi=100, bbox_inches="tight")
plt.close(ax.figure)

# %% [markdown]
# ## Side by side: the same task, routes and features
#
# Edges are different units — a route joins two whole channels, a feature edge two directions at
# given positions — so the count is set against each graph's own total. `tl-modular analyze`
# shows the same comparison per task in the report's **Feature circuits** tab.

# %%
mean_kept = sum(k.n_edges for k in kept) / len(kept)
mean_all = sum(x.adjacency._nnz() for x in graphs) / len(graphs)
print(f"{'':>9} {'edges kept':>12} {'of':>10} {'faithfulness':>13}")
print(f"{'routes':>9} {routes.size:>12} {len(graph.routes()):>10} {routes.faithfulness:>13.2f}")
print(f"{'features':>9} {mean_kept:>12,.0f} {mean_all:>10,.0f} {result['faithfulness']:>13.2f}   (per prompt)")

# %% [markdown]
# ## Channels: route circuit vs feature circuit
#
# Which channels' features does the pruned feature graph use, and are they the route circuit's
# channels? The feature graph can keep a channel's few directions that matter where the route
# circuit must keep the whole channel's route.

# %%
used: dict[str, int] = {}
for k in kept:
    for n, keep in zip(k.graph.nodes, k.nodes.tolist(), strict=True):
        if keep and n.kind == "feature":
            used[n.channel] = used.get(n.channel, 0) + 1
print("features kept per channel (4 prompts):", dict(sorted(used.items(), key=lambda kv: -kv[1])))
print("channels of the route circuit:", sorted(routes.channels - {"embed", "unembed"}))
print("in the feature circuit only:", sorted(set(used) - routes.channels),
      "| in the route circuit only:", sorted(routes.channels - set(used) - {"embed", "unembed"}))

# %% [markdown]
# ## Per task: shared and specific features
#
# `aggregate` sums each feature's influence over positions, averages over a task's prompts and
# keeps the features the pruned graphs of at least half of its prompts keep — as `CircuitSet` does
# for routes. It prunes the graphs itself (`node_threshold=0.8`: the features holding 80% of the
# logit's influence).

# %%
tasks = {"sorting": toy.sorting(4, seed=5), "modular_addition": toy.modular_addition(4, seed=5)}
per_task = {"induction": graphs} | {name: tlm.attribution_graph(model, t, units=small) for name, t in tasks.items()}
features = aggregate(per_task)
print(features)
for name, c in features.items():
    print(f"{name:>16}: {c.size} features, error share {c.error_share:.2f}, strongest {c.features[:3]}")
print("shared by every task:", len(features.shared()), "| specific:",
      {n: len(s) for n, s in features.specific().items()})
names, sim = features.similarity()
print("Jaccard:", {f"{a}/{b}": round(float(sim[i, j]), 2) for i, a in enumerate(names)
                   for j, b in enumerate(names) if i < j})
print("prompts clustered by feature use:", {k: v for k, v in features.example_clusters().items() if k != "labels"})
features.save(out)
ax = features.plot(top=25)
ax.figure.savefig(out / "11_features_per_task.png", dpi=100, bbox_inches="tight")
plt.close(ax.figure)

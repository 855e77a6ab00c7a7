# %% [markdown]
# # 9. Training for legibility: the modularity loss
#
# `tlm.training.ModularityLoss` measures how much of the read/write alignment between channels
# crosses module boundaries: a channel writes through `W_O` / `W_out`, later channels read through
# `W_Q, W_K, W_V` / `W_in`, and the alignment `||Ŵ_write · Ŵ_read||_F²` of unit-normalised maps is
# zero exactly when the two use orthogonal residual subspaces. Modules come from spectral
# clustering of that alignment (refreshed every few steps) or from `graph.modules()`.
# `tlm.training.train_modular` adds it to the workbench's training loop.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular.testing import planted_modules

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_num_threads(1)

# %% [markdown]
# ## Zero on a planted modular model, positive on the bundled one

# %%
planted, module_of, _ = planted_modules()
loss = tlm.training.ModularityLoss(n_modules=3)
print("planted model, spectral modules:", round(float(loss(planted).detach()), 6))
print("  found:", [sorted(m) for m in loss.modules()])

model = toy.load_model()
loss = tlm.training.ModularityLoss(n_modules=4, refresh_every=25)
print("bundled model: cross-module fraction", round(float(loss(model).detach()), 3))
print("  modules:", [sorted(m) for m in loss.modules()])

# %% [markdown]
# ## A short fine-tune with the loss
# The original loss, accuracy and the cross-module fraction are recorded at every evaluation; the
# graph's modularity z-scores (Newman's Q against the edge-permutation null) at the start and end —
# for the modules the graph's own rule finds, and (`z_modules`) for the loss's modules.

# %%
graph_tokens = toy.mixed_tokens(n_per_task=16, seed=2, scored=True)
result = tlm.training.train_modular(model, None, weight=1.0, steps=30, loss=loss, graph_tokens=graph_tokens,
                                    graph_n_modules=4, n_null=20, eval_every=15, lr=3e-4, warmup=5,
                                    progress=False)
first, last = result.initial, result.history[-1]
print(f"cross-module fraction {first['cross_fraction']:.3f} -> {last['cross_fraction']:.3f}")
print(f"graph modularity z-score {first['graph']['z']:.2f} -> {last['graph']['z']:.2f} (graph's modules), "
      f"{first['graph']['z_modules']:.2f} -> {last['graph']['z_modules']:.2f} (the loss's modules)")
print("accuracy:", {k: round(v, 3) for k, v in last["accuracy"].items()})

# %%
steps = [0] + [h["step"] for h in result.history]
cross = [first["cross_fraction"]] + [h["cross_fraction"] for h in result.history]
fig, ax = plt.subplots(figsize=(4.5, 3))
ax.plot(steps, cross, marker="o")
ax.set_xlabel("step")
ax.set_ylabel("cross-module fraction")
fig.tight_layout()
fig.savefig(out / "09_training.png", dpi=100)

# %% [markdown]
# ## Building a network around its labels
# `tlm.training.build_interpretable` goes layer by layer: it labels the layer's MLP neurons
# (held-out label scores = "before"), simulates each neuron's activations from its label alone on
# training contexts (the simulator's 0…10 predictions times the neuron's largest activation become
# fixed targets), trains with `task loss + match_weight · mean((act − target)² / scale²)`, then
# freezes the layer with everything upstream of it and re-labels it ("after"). `keep_free` leaves the
# worst-labeled neurons out of the match term. The offline labeler and simulator need no LLM; pass
# `tlm.OpenAILabeler(...)` for both to use one. Here: 32 neurons of layer 1, 30 steps.

# %%
data = {name: gen(512, seed=50 + i) for i, (name, gen) in enumerate(toy.GENERATORS.items())
        if name != "modular_addition"}
data["modular_addition"] = toy.modular_addition(512, seed=60, split="train")
built = tlm.training.build_interpretable(
    toy.load_model(), data, eval_sets={k: v[:128] for k, v in data.items()}, layers=[1], neurons=32, keep_free=4,
    steps_per_layer=30, match_weight=10.0, batch_size=32, n_label_rows=40, eval_every=15, progress=False)
print(built.to_markdown())
layer = built[1]
print("accuracy before:", {k: round(v, 3) for k, v in layer.accuracy["before"].items()})
print("accuracy after: ", {k: round(v, 3) for k, v in layer.accuracy["after"].items()})
n = layer.constrained[0]
print(f"N{n} before: {layer.labels_before[f'L1.MLP.N{n}'].text}")
print(f"N{n} after:  {layer.labels_after[f'L1.MLP.N{n}'].text}")
print("frozen:", len(layer.frozen), "parameters, e.g.", layer.frozen[:3])

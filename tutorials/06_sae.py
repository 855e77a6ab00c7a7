# %% [markdown]
# # 6. Polysemanticity and unfolding with SAEs
#
# A unit — an MLP neuron, or a direction of a channel's read subspace — is polysemantic when
# several unrelated features drive it. With a sparse autoencoder (sae-lens) at the hook the unit
# reads, each feature f contributes `c_f = z_f (d_f · w_u)` to the unit's activation; over the
# unit's top-activating tokens, `exp(entropy)` of the features' shares is the effective number of
# features driving it. tl_modular ships SAEs for the bundled model, so none is trained here.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import tl_modular as tlm
from tl_modular import sae as S
from tl_modular import toy

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

model = toy.load_model()
saes = S.bundled(model)                      # sae-lens SAEs, one per hook, checked against the model
print(saes)
tokens, mask, scored = toy.mixed_tokens(n_per_task=128, seed=3, scored=True)

# %% [markdown]
# ## How good are the SAEs?
# Fraction of variance unexplained, active features per token, dead features, and the loss
# recovered at the positions the tasks score when the SAE's reconstruction replaces the activation.

# %%
for hook, sae in saes.items():
    q = S.quality(model, sae, tokens, attention_mask=mask, loss_mask=scored)
    print(f"{hook:>26}: FVU {q['fvu']:.3f}  L0 {q['l0']:5.1f}  dead {q['dead_fraction']:.2f}  "
          f"loss recovered {q['ce_loss_recovered']:.3f}")

# %% [markdown]
# ## The most polysemantic units
# Every MLP neuron reading an SAE's hook (through LayerNorm, exactly: the centred read vector and
# each token's 1/σ) and every direction of the compression's read subspaces.

# %%
comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
table = S.score_model(model, saes, tokens, comp=comp, attention_mask=mask)
print(table.to_markdown(10))
rows = table.ranked()
neurons = np.array([r["score"] for r in rows if ".N" in r["unit"] and not np.isnan(r["score"])])
directions = np.array([r["score"] for r in rows if ":" in r["unit"] and not np.isnan(r["score"])])
print(f"neurons: median {np.median(neurons):.1f} effective features; read directions: {np.median(directions):.1f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist([neurons, directions], bins=30, label=["MLP neurons", "read-subspace directions"], stacked=False)
ax.set_xlabel("effective number of SAE features")
ax.set_ylabel("units")
ax.legend()
fig.tight_layout()
fig.savefig(out / "06_polysemanticity.png", dpi=120)

# %% [markdown]
# And the other way round: how many neurons each feature reaches (its degree of superposition).

# %%
spread = S.feature_spread(saes["blocks.0.hook_resid_mid"], S.neuron_readers(model, 0, "blocks.0.hook_resid_mid"))
print(f"features at blocks.0.hook_resid_mid reach {np.median(spread):.0f} of {model.cfg.d_mlp} "
      f"L0 neurons (median effective number)")

# %% [markdown]
# ## A channel unfolded into its features
# L0.MLP's write subspace in the features of the SAE on `hook_mlp_out`, and its read subspace in
# those of the SAE on `hook_resid_mid`: each feature's share of the subspace's energy, and how much
# of the subspace's activity the top m features explain (the rest held at their mean).

# %%
write = S.unfold(model, comp, "L0.MLP", saes["blocks.0.hook_mlp_out"], tokens, attention_mask=mask)
read = S.unfold(model, comp, "L0.MLP", saes["blocks.0.hook_resid_mid"], tokens, attention_mask=mask)
for u in (write, read):
    m = min(10, len(u.explained))
    print(f"L0.MLP {u.side} ({u.rank} dims, {u.hook}): top {m} features explain {u.explained[m - 1]:.2f}, "
          f"all {1 - u.error:.2f}; strongest {[(f, round(w, 3)) for f, w in u.top(3)]}")

# What does the strongest written feature stand for? The tokens it fires on most.
f = write.features[0]
acts = S.collect(model, tokens, ["blocks.0.hook_mlp_out"], attention_mask=mask)["blocks.0.hook_mlp_out"]
z = saes["blocks.0.hook_mlp_out"].encode(acts)[:, f]
valid = tokens[:, 1:][mask[:, 1:].bool()]
top = z.topk(8).indices
print(f"feature {f} fires on:", [toy.decode([int(valid[i])]) for i in top])

fig, ax = plt.subplots(figsize=(5, 3.5))
for u in (write, read):
    ax.plot(np.arange(1, len(u.explained) + 1), u.explained, label=f"{u.side} ({u.hook.split('.')[-1]})")
ax.set_xlabel("top m features")
ax.set_ylabel("fraction of the subspace's activity")
ax.set_title("L0.MLP unfolded")
ax.legend()
fig.tight_layout()
fig.savefig(out / "06_unfolded.png", dpi=120)

# %% [markdown]
# The graph with L0.MLP's outgoing routes leaving from its features (and an error node for what the
# SAE misses), so circuits can be read at feature level:

# %%
graph = tlm.build_graph(comp, model=model)
g = S.expand(graph, write, n_features=6)
for node in [n for n in g.nodes if n.startswith("L0.MLP#")]:
    strength = sum(d["static"] for _, _, d in g.out_edges(node, data=True))
    print(f"{node:>16}: weight {g.nodes[node]['weight']:.3f}, routes out {strength:.3g}")

# %% [markdown]
# ## On GPT-2
# The same calls take sae-lens' pretrained SAEs (downloaded once into the Hugging Face cache):
#
# ```python
# model = HookedTransformer.from_pretrained("gpt2")
# sae = tlm.sae.load("gpt2-small-res-jb", "blocks.6.hook_resid_pre", model=model)   # checks d_in and hook
# table = tlm.sae.score_model(model, [sae], tokens)
# ```
# and `tlm.sae.train_sae(model, tokens, hook)` trains new ones offline with sae-lens' trainer.

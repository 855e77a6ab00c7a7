# %% [markdown]
# # 1. Segmenting a transformer into channels
#
# tl_modular cuts a model into *channels*: the token and position embeddings, every attention
# head, every MLP, and each layer's attention-output bias. Each channel writes additively into
# the residual stream, and their writes sum exactly to the final residual stream — the vector
# the unembedding reads (after `ln_final`).
#
# Run it with `python tutorials/01_segmentation.py`; the figure lands in `tutorials/_output/`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import tl_modular as tlm

# The bundled multi-task model (no download). Any HookedTransformer — e.g.
# HookedTransformer.from_pretrained("gpt2") — or a TransformerBridge in compatibility mode works
# the same way. It uses rotary positions, so it has no pos_embed channel.
model = tlm.toy.load_model()
channels = tlm.segment(model)
print(channels)
print(channels.names[:8], "...")

# %% [markdown]
# Each channel knows where it reads and writes and its weights under TransformerLens' names.

# %%
head = channels["L1.H2"]
print(head)
print({name: tuple(w.shape) for name, w in head.weights.items()})

# %% [markdown]
# ## The exact decomposition
# Cache only what the decomposition needs with the set's `names_filter`, then take every
# channel's write: `[channel, batch, pos, d_model]`. The rows sum to the final residual stream.

# %%
tokens = tlm.toy.sorting(64, seed=0).clean          # e.g. "SRT 9 2 7 1 5 > 1 2 5 7 9"
_, cache = channels.run_with_cache(tokens)
parts = channels.contributions(cache)
residual = channels.residual(cache)
print("contributions:", tuple(parts.shape))
print("max |sum - residual| =", (parts.sum(0) - residual).abs().max().item())

# %% [markdown]
# ## Each channel's share of the final residual norm
# Projecting each write onto the final residual direction splits the squared norm exactly:
# `sum_c <part_c, resid> = |resid|^2`. Averaged over the sorted half of the sequence (where the
# answers are produced), this says which channels the final stream is made of.

# %%
resid = residual[:, 6:]
share = (parts[:, :, 6:] * resid).sum(-1) / resid.pow(2).sum(-1)   # [channel, batch, pos]
share = share.mean(dim=(1, 2))
assert torch.isclose(share.sum(), torch.tensor(1.0), atol=1e-4)
for name, s in sorted(zip(channels.names, share.tolist(), strict=True), key=lambda t: -abs(t[1]))[:5]:
    print(f"{name:8s} {s:+.3f}")

fig, ax = plt.subplots(figsize=(10, 3))
colors = {"embed": "tab:gray", "pos_embed": "tab:gray", "head": "tab:blue", "mlp": "tab:orange",
          "bias": "tab:green"}
ax.bar(range(len(channels)), share.numpy(), color=[colors[c.kind] for c in channels])
ax.set_xticks(range(len(channels)), channels.names, rotation=90, fontsize=7)
ax.set_ylabel("share of |final residual|²")
ax.set_title("Channel shares of the final residual stream")
fig.tight_layout()
out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "01_channel_shares.png", dpi=120)
print("saved", out / "01_channel_shares.png")

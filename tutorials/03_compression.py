# %% [markdown]
# # 3. Compressing channels to the subspaces they read and write
#
# Each head and MLP of a trained transformer uses only a small part of the residual stream.
# `tlm.compress` finds, from the channel's linearization on real data, a read subspace per
# input port (a head's query, key and value; an MLP's input) and a write subspace, and
# `Compression.applied` runs the model with every channel restricted to them.
#
# On GPT-2 (where the hub is reachable) the same code runs on
# `HookedTransformer.from_pretrained("gpt2")` with text tokens, e.g.
# `tokens = model.to_tokens(texts)[:, :128]`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular.compression.fidelity import rank_fidelity_curve

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

model = toy.load_model()
tasks = {name: gen(512, seed=1) for name, gen in toy.GENERATORS.items()}
# Statistics on a mix of every task's prompts (sequences are right-padded to one length).
tokens, mask = toy.mixed_tokens(tasks, n_per_task=256, seed=2)
comp = tlm.compress(model, tokens, attention_mask=mask)
print(comp)

# %% [markdown]
# Each side keeps its full spectrum, so ranks can be re-chosen without another pass:
# a per-side energy threshold, a fixed rank, or a total budget given to the directions worth
# most across all channels.

# %%
mlp = comp["L0.MLP"]
print("L0.MLP reads", mlp.read["in"].rank, "of", mlp.read["in"].max_rank, "dims; writes", mlp.write.rank)
head = comp["L1.H0"]
print({port: side.rank for port, side in head.read.items()}, "write", head.write.rank)

def task_accuracy(c):
    with c.applied(model):
        return {name: round(t.accuracy(model(t.clean)), 3) for name, t in tasks.items()}

base = {name: round(t.accuracy(model(t.clean)), 3) for name, t in tasks.items()}
print("clean     ", base)
budgets = [comp.max_total_rank // d for d in (16, 8, 4, 2)]
rows = []
for b in budgets:
    acc = task_accuracy(comp.truncated(budget=b))
    rows.append(acc)
    print(f"budget {b:4d}", acc)

# %% [markdown]
# ## Rank–fidelity curve
# CE loss recovered (relative to mean-ablating every channel) and KL to the clean model.

# %%
curve = rank_fidelity_curve(model, comp, tokens[:512], budgets, attention_mask=mask[:512])
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot([r["dimensions"] for r in curve], [r["loss_recovered"] for r in curve], "o-")
axes[0].set_xlabel("total dimensions kept")
axes[0].set_ylabel("CE loss recovered")
for name in tasks:
    axes[1].plot(budgets, [r[name] for r in rows], "o-", label=name)
axes[1].set_xlabel("total dimensions kept")
axes[1].set_ylabel("task accuracy")
axes[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "03_rank_fidelity.png", dpi=120)
print("half the dimensions:", rows[-1])

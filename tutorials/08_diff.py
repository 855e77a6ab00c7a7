# %% [markdown]
# # 8. Model diffing: what changed between two checkpoints
#
# Fine-tuning, a later checkpoint, a regularizer: comparisons of two models of one architecture
# are everyday interpretability work. Rather than reading both models whole, `tlm.diff` compares
# their compressions and graphs channel by channel, like a code review:
#
# - per channel and side, the **principal angles** between the read (q/k/v/in) and write
#   subspaces, and the change of rank and spectrum;
# - per route, the change of its strength (b brought to a's scale, so a global rescaling is no change);
# - which channels changed **module**, with the adjusted Rand index of the two partitions;
# - per circuit category, routes **gained and lost**; and label changes when labels are given.
#
# Here: the bundled model against a copy fine-tuned briefly on induction only. Its loss is ~1e-6
# already, so the fine-tune is gentle (AdamW lr 1e-4, eps 1e-6): with torch's eps, Adam turns even
# vanishing gradients into steps of ~lr on every weight, and at lr 1e-3 the other tasks are lost.

# %%
import copy
import os
from pathlib import Path

import torch

import tl_modular as tlm
from tl_modular import toy

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_num_threads(2)

model = toy.load_model()
tuned = copy.deepcopy(model)  # the shipped model stays as it was
toy.train(tuned, toy.induction(2000, seed=77), steps=200, warmup=0, lr=1e-4, eps=1e-6, weight_decay=0.0,
          eval_every=10_000, progress=False)
print("accuracy after fine-tuning on induction:",
      {k: round(v, 3) for k, v in toy.evaluate(tuned, toy.eval_tasks(256)).items()})

# %% [markdown]
# ## Two checkpoints, two graphs
# The same data for both, so that what differs is the model.

# %%
tokens, mask, scored = toy.mixed_tokens(n_per_task=64, seed=2, scored=True)


def graph_of(m):
    comp = tlm.compress(m, tokens, attention_mask=mask, progress=False)
    return tlm.build_graph(comp, model=m, tokens=tokens, attention_mask=mask, loss_mask=scored,
                           metric="logit", progress=False)


before, after = graph_of(model), graph_of(tuned)
d = tlm.diff(before, after, names=("shipped", "tuned on induction"))
print(d.summary(n=8))

# %% [markdown]
# ## A model diffed with itself is empty
# Every principal angle is zero up to floating point, no route or module changes.

# %%
same = tlm.diff(before, before)
print("empty:", same.is_empty, "largest angle", max(c.max_angle for c in same.channels), "degrees")

# %% [markdown]
# ## Changes against chance
# The routes that change most are the strong ones every task uses (embeddings → MLPs, MLPs →
# logits): *any* move of the weights changes them most. A code review wants what changed more than
# chance. `tlm.diff_null` gives copies of the shipped model moved exactly as far as the fine-tune
# moved it, tensor by tensor, but in random directions; built into graphs the same way and passed
# as `null=`, they give every route and channel a z-score (its change over its RMS change to the
# null models), and the diff is ranked by it.

# %%
null = [graph_of(m) for m in tlm.diff_null(model, tuned, n=3, seed=0)]
dz = tlm.diff(before, after, null=null, modules=False, names=("shipped", "tuned on induction"))
print(dz.summary(n=6))

# %% [markdown]
# ## Do the changed routes belong to the induction circuit?
# Each task's circuit on the shipped model (tutorial 5), and how many of the 10 most changed
# routes each holds, for both rankings.

# %%
tasks = {name: gen(64, seed=5) for name, gen in toy.GENERATORS.items()}
circuits = before.circuits(model, tasks, n_boot=10, n_random=1, progress=False)
for how, diff in (("raw change", d), ("against chance", dz)):
    top = {r.route for r in diff.top_routes(10)}
    print(f"{how:>15}:", {name: len(top & set(c.routes)) for name, c in circuits.items()})
# The raw ranking's top routes sit in every circuit about equally (the big brackets and sorting
# circuits hold the shared highways); against chance, induction's circuit holds the most: the
# embeddings' routes into the induction heads' values and keys, the previous-token head's route
# into MLP0; and the channel sides turned most against chance are the induction heads' key
# subspaces (`benchmarks/diff_finetune.py` repeats this over seeds: 4 of 4 for induction).

# %% [markdown]
# ## The picture, and the diff on disk
# Channels shaded by their largest principal angle; the most changed routes in red (stronger)
# and blue (weaker).

# %%
d.plot(after, out / "08_diff.png")
d.save(out / "08_diff")
print("top changed channels:", [(c.channel, c.side, round(c.max_angle, 1)) for c in d.top_channels(5)])
print("wrote", out / "08_diff.png", "and", out / "08_diff" / "diff.json")

# %% [markdown]
# # 4. From compression to modules: the channel graph and its Gomory–Hu tree
#
# With every channel compressed, the model becomes a graph: a writer feeds a reader port when
# its write subspace lines up with the port's read subspace (the *static* strength, from weights
# and spectra), and the data says how much that route is used (the *data* strength: gradient ×
# deviation from the mean, through the subspaces, one forward and one backward pass per batch).
# Modules are sets of channels strongly connected inside and weakly between, cut from the
# Gomory–Hu tree, which holds every pairwise min cut of the graph.
#
# On GPT-2 the same calls run on `HookedTransformer.from_pretrained("gpt2")` with text tokens
# (`metric="loss"`, no `loss_mask`).

# %%
import os
from pathlib import Path

import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular.graph import spearman

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

model = toy.load_model()
# The bundled model was trained on its tasks' scored positions only, and is so confident there
# that cross-entropy gradients vanish: measure routes by the correct token's logit instead.
tokens, mask, scored = toy.mixed_tokens(n_per_task=64, seed=2, scored=True)
comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                        metric="logit", progress=False)
print(graph)

# %% [markdown]
# ## The strongest routes
# Ports are named as in `tlm.patching`: `L1.H1:k` is head 1 of layer 1's key input; an MLP is
# its own port; `unembed` is the logits.

# %%
routes = graph.routes()                          # {(writer, port): data strength}
for (writer, port), s in sorted(routes.items(), key=lambda kv: -kv[1])[:12]:
    edge = graph.nx.edges[writer, port]
    print(f"{writer:>8} -> {port:<9} data {s:.3f}  static {edge['static']:.3f}  share {edge['share']:.2f}")

# The previous-token head's write into the induction heads' keys (the composition the
# workbench plants) and how it ranks among all routes into those keys:
for h in range(4):
    port = f"L1.H{h}:k"
    into = sorted(((s, w) for (w, p), s in routes.items() if p == port), reverse=True)
    print(port, "strongest writers:", [(w, round(s, 3)) for s, w in into[:3]])

# %% [markdown]
# ## Data strengths against real ablation
# Each sampled route is mean-ablated for real (through the subspaces) and the change of the
# metric compared with its data strength.

# %%
check = graph.check_routes(model, tokens[:64], attention_mask=mask[:64], loss_mask=scored[:64], n=50,
                           batch_size=64)
print(f"Spearman(data strength, |real ablation effect|) over 50 routes: {check['spearman']:.2f}")

# TransformerLens' weight-only composition scores against our static strengths (head -> head):
rows = []
for mode in "QKV":
    scores = model.all_composition_scores(mode).detach()
    for (w, p), _ in routes.items():
        reader, _, path = p.partition(":")
        if path == mode.lower() and graph.nx.nodes[w]["kind"] == "head":
            nw, nr = graph.nx.nodes[w], graph.nx.nodes[reader]
            score = float(scores[nw["layer"], nw["head"], nr["layer"], nr["head"]])
            rows.append((graph.nx.edges[w, p]["static"], score))
print(f"Spearman(static strength, all_composition_scores) over {len(rows)} head pairs: "
      f"{spearman([r[0] for r in rows], [r[1] for r in rows]):.2f}")

# %% [markdown]
# ## Modules, their hierarchy and how modular the model is
# The embeddings and the unembedding talk to every channel; they stay out of the capacity graph
# (with them in, the tree becomes a star around them). Tree edges are cut from the weakest up
# while both sides keep `min_size` channels; the default number of modules is the level of that
# hierarchy with the highest Newman Q. The null model shuffles route strengths within each layer
# pair and finds its own modules by the same rule.

# %%
tree = graph.gomory_hu()
print("Gomory-Hu tree:", sorted((round(w, 3), a, b) for a, b, w in tree.edges(data="weight")))
print("modules:", [sorted(m) for m in graph.modules()])
result = graph.modularity(n_null=100, progress=False)
for key in ("Q", "crossing", "ncut"):
    r = result[key]
    print(f"{key:>8}: {r['value']:.3f}  null {r['null_mean']:.3f} ± {r['null_std']:.3f}  p {r['p']:.3f}")

# %% [markdown]
# The bundled model's tree is a star around `L0.MLP`: every head's cheapest cut is its own link
# to that MLP, so no cut leaves two channels on each side and the model is one module — as
# small multi-task models trained without a modularity loss tend to be (the null model agrees:
# it is no more modular than its own shuffles). The peeling order (`min_size=1`) still says
# which channels hang on the rest most loosely:

# %%
for split in graph.hierarchy(min_size=1)[:4]:
    side = min(split.left, split.right, key=len)
    print(f"cut {split.value:.3f} separates {sorted(side)}")

# %% [markdown]
# ## What a modular model looks like
# `tl_modular.testing.planted_modules` builds a model whose channels form three planted modules
# (each reads and writes its own block of the residual stream, with a little leak). The same
# calls recover them, and the null model tells them apart from chance.

# %%
from tl_modular.testing import planted_modules  # noqa: E402

planted, truth, _ = planted_modules(leak=0.05)
ptokens = torch.randint(0, 64, (64, 24), generator=torch.Generator().manual_seed(0))
pgraph = tlm.build_graph(tlm.compress(planted, ptokens, progress=False), model=planted, tokens=ptokens,
                         progress=False)
pmodules = pgraph.modules()
for m in pmodules:
    print(sorted(m), "planted modules:", sorted({truth[n] for n in m}))
presult = pgraph.modularity(n_null=100, progress=False)
print(f"Q {presult['Q']['value']:.3f} vs null {presult['Q']['null_mean']:.3f}, p {presult['Q']['p']:.3f}")
lesion = pgraph.lesion(planted, ptokens, n_random=3)
print(f"lesion: {lesion['n_cross_routes']} cross-module routes (strength {lesion['cross_strength']:.3f}) "
      f"change the loss by {lesion['cross']:+.4f}; random routes of equal strength by {lesion['random_mean']:+.4f}")

# %% [markdown]
# ## Pictures and files
# Channels by stream position (embeddings left, logits right), modules coloured, edge widths by
# strength. `save` writes `graph.json` (schema in `tl_modular.graph`); GraphML and DOT exports.

# %%
graph.plot(out / "04_toy_graph.png")
pgraph.plot(out / "04_planted_modules.png")
graph.save(out / "04_graph")
graph.to_graphml(out / "04_graph.graphml")
pgraph.to_dot(out / "04_planted.dot")
print("wrote", out / "04_toy_graph.png", "and", out / "04_planted_modules.png")

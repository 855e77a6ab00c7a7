# %% [markdown]
# # 10. A GPT-2 trained on real text: compression, modules, circuits and labels
#
# The bundled task model has known algorithms; `tlm.textlm` has the statistics of a real language
# model instead — GPT-2's architecture exactly (4 layers, d_model 192, 6 heads, the GPT-2
# tokenizer), trained on the Python documentation and the source of the standard library and ten
# packages, and held out on NetworkX's source, which it never saw. The same calls run on
# `HookedTransformer.from_pretrained("gpt2")` (its heads have other names and roles).
#
# To run in seconds on a laptop CPU this tutorial fits on 1,024 tokens and scores on 512
# held-out ones; real runs use tens of thousands (`tl-modular analyze --model textlm --tokens 65536`),
# and the figures below move with the sample.

# %%
import os
from pathlib import Path

import torch

import tl_modular as tlm
from tl_modular import labeling, textlm

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

model = textlm.load_model()
fit = textlm.tokens("train", 1024, 128)             # Python docs and source: the statistics
held = textlm.tokens("heldout", 512, 128)           # NetworkX's source: every score below
print(f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, {model.cfg.n_heads} heads; "
      f"fit {tuple(fit.shape)}, held out {tuple(held.shape)}")
print("a held-out row, decoded:")
print(model.to_string(held[0, 1:72]))
with torch.no_grad():
    loss = model(held, return_type="loss")
print(f"held-out loss {loss.item():.3f} nats per token")

# %% [markdown]
# ## Compression by what the output uses
# `read="fisher", write="fisher"` keeps, per channel, the directions the model's own predictions
# depend on (the Fisher of its next-token distribution at every read port and layer output); its
# spectra are in one unit everywhere (twice the KL a dropped direction costs), so one budget for
# the reads and one for the writes is spent where it buys the most fidelity. The default
# (`read="whitened"`: each channel's own linearized output error; `write="output"`: PCA of its
# output) judges every channel by itself, in its own units.
# Both get ~35% of the read and of the write dimensions; `truncated` re-chooses ranks from the
# stored spectra without another pass. CE alone flatters a compression (a model can lose
# probability on the right token little while its distribution moves a lot): KL to the clean
# model says how far the predictions moved.

# %%
# One pass of each statistic over the fit tokens; both compressions are built from them.
stats = tlm.compression.collect_statistics(model, fit, progress=False)     # input, output, Jacobian moments
fisher_stats = tlm.compression.collect_fisher(model, fit, progress=False)  # the Fisher of the predictions
fisher = tlm.compress(model, read="fisher", write="fisher", statistics=stats, fisher=fisher_stats, progress=False)
default = tlm.compress(model, statistics=stats, progress=False)
sides = fisher.sides()
n_read = sum(s.max_rank for (_, side), s in sides.items() if side != "write")
n_write = sum(s.max_rank for (_, side), s in sides.items() if side == "write")
budget = {"read": round(0.35 * n_read), "write": round(0.35 * n_write)}
print(f"budget: {budget['read']} of {n_read} read and {budget['write']} of {n_write} write dimensions")
results = {}
for name, comp in (("Fisher", fisher), ("whitened / output PCA", default)):
    comp = comp.truncated(budget=budget)
    results[name] = comp
    f = comp.fidelity(model, held)
    print(f"{name:>22} ({f['dimensions']} dims): CE {f['clean_loss']:.3f} -> {f['compressed_loss']:.3f} "
          f"(+{f['compressed_loss'] - f['clean_loss']:.3f}), KL {f['kl']:.3f} nats, "
          f"CE recovered {f['loss_recovered']:.3f}")
comp = results["Fisher"]
head = comp["L3.H4"]
print("L3.H4 keeps", {port: side.rank for port, side in head.read.items()}, "write", head.write.rank)

# %% [markdown]
# ## The channel graph and its modules
# Routes between channels through the Fisher subspaces, data strengths from the loss on held-out
# text (two rows here); modules are cut from the Gomory–Hu tree (tutorial 4).

# %%
graph = tlm.build_graph(comp, model=model, tokens=held[:2], progress=False)
print(graph)
routes = graph.routes()
for (writer, port), s in sorted(routes.items(), key=lambda kv: -kv[1])[:6]:
    print(f"{writer:>8} -> {port:<9} data {s:.4f}")
for i, m in enumerate(graph.modules()):
    print(f"module {i}: {sorted(m)}")

# %% [markdown]
# ## Induction: a head and its circuit
# Repeated random tokens (`tlm.tasks.induction`, the GPT-2 prompt set): the second half is
# predictable only by copying what followed the previous occurrence. L3.H4 is the model's
# induction head (its attention from each repeated token to the one after its first occurrence),
# L2.H0 a previous-token head that feeds its keys.

# %%
task = tlm.tasks.induction(model.tokenizer, 8, seed=0, length=10)
L = (task.clean.shape[1] - 1) // 2
with torch.no_grad():
    _, cache = model.run_with_cache(task.clean, names_filter=lambda n: n.endswith("hook_pattern"))
    print(f"logit difference clean {float(task.metric(model(task.clean))):.2f}, "
          f"corrupted {float(task.metric(model(task.corrupted))):.2f}")
q = torch.arange(L + 1, 2 * L + 1)                   # repeated positions (BOS first)
for layer, h in ((3, 4), (2, 0)):
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, h]
    induction = pattern[:, q, q - L + 1].mean().item()
    previous = pattern[:, torch.arange(2, 2 * L + 1), torch.arange(1, 2 * L)].mean().item()
    print(f"L{layer}.H{h}: attention to the token after the previous occurrence {induction:.2f}, "
          f"to the previous token {previous:.2f}")

# Routes ordered by attribution and verified by real patching at four circuit sizes (real runs verify
# a finer grid, learn a joint mask and prune route by route: drop `search=`, `sizes=`, `prune=`).
n = len(routes)
sizes = sorted({max(1, round(n * f)) for f in (0.05, 0.15, 0.4, 1.0)})
circuits = graph.circuits(model, {"induction": task}, search="greedy", sizes=sizes, prune=False, n_boot=20,
                          n_random=1, progress=False)
c = circuits["induction"]
lo, hi = c.faithfulness_interval
print(f"induction circuit: {c.size} of {n} routes, faithfulness {c.faithfulness:.2f} "
      f"[{lo:.2f}, {hi:.2f}], completeness {c.completeness:.2f}")
print("strongest routes:", c.routes[:6])
keys = [w for w, p in c.routes if p == "L3.H4:k"]
print(f"{len(keys)} writers into L3.H4's keys in the circuit, strongest first: {keys[:5]}; "
      f"L2.H0 -> L3.H4:k is {'in' if 'L2.H0' in keys else 'not in'} it")

# %% [markdown]
# ## Labels for a few channels
# The offline labeler (tutorial 7) summarises each channel's top contexts — here real code and
# prose — and the offline simulator scores the label on held-out contexts. An OpenAI-compatible
# server writes real descriptions through the same call.

# %%
rows = textlm.tokens("heldout", 1024, 32)          # short rows: more contexts to rank
units = labeling.channel_units(model, ["L3.H4", "L2.H0", "L0.MLP", "L3.MLP"])
labels = tlm.label(units, model, rows, n_baseline=4, n_boot=50, progress=False)
print(labels)
for lab in labels:
    print(f"{lab.unit:>7}  score {lab.score if lab.score is None else round(lab.score, 2)}  {lab.text}")
    for ctx in lab.evidence["top"][:2]:
        print("         ", repr("".join(ctx["tokens"]))[:110])
labels.save(out / "10_labels.json")
print("wrote", out / "10_labels.json")

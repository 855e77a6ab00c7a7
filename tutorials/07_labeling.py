# %% [markdown]
# # 7. Labeling units and modules, and scoring the labels
#
# Once a model is cut into channels and modules, every part can be described in plain words — and
# the description checked: a simulator predicts the unit's activations on held-out text from the
# label alone, and the label is scored by how well the prediction matches (correlation, detection,
# fuzzing), next to a baseline of random labels. `tlm.label` does this for channels, modules,
# neurons, subspace directions and SAE features. Offline it needs no LLM: the offline labeler
# summarises the evidence deterministically and the offline simulator reads the label's quoted
# tokens back. With an OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp) the same call
# writes real descriptions.

# %%
import json
import os
import tempfile
from pathlib import Path

import torch

import tl_modular as tlm
from tl_modular import labeling, toy

out = Path(os.environ.get("TLM_TUTORIAL_OUT", "tutorials/_output"))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

model = toy.load_model()
tokens, mask, _ = toy.mixed_tokens(n_per_task=64, seed=5, scored=True)
comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
graph = tlm.build_graph(comp, model=model)
print(graph)

# %% [markdown]
# ## Channels and modules, bottom-up
# Given a graph, `tlm.label` labels its channels first, then its modules — whose evidence holds
# their members' labels. Each label comes with its score on held-out contexts (95% bootstrap
# interval), detection and fuzzing balanced accuracies; `labels.baseline` is what a random label
# (another unit's) scores.

# %%
labels = tlm.label(graph, model, tokens, attention_mask=mask, progress=False)
print(labels)
print(labels.to_markdown())

# %% [markdown]
# ## What the labeler saw
# The evidence: top contexts (and more across activation quantiles), random contexts, the
# strongest routes in and out, the tokens the unit's write promotes, its members' labels.

# %%
mod = next(lab for lab in labels if lab.kind == "module")
ev = mod.evidence
print(mod.unit, "members:", mod.members)
print("member labels:", json.dumps(ev["member_labels"], indent=1)[:400])
print("strongest inputs:", ev["incoming"][:3])
print("promotes:", [t for t, _ in ev["promoted"][:6]])
top = ev["top"][0]
print("top context:", " ".join(f"{t}[{a:.1f}]" for t, a in zip(top["tokens"], top["acts"], strict=True)))

# %% [markdown]
# ## Neurons and SAE features
# Any list of units works: here the first 32 neurons of layer 0, and 16 features of the bundled
# SAE on layer 0's MLP output. Token-driven neurons get high scores from the offline pair; the
# random-label baseline sits near zero.

# %%
neuron_labels = tlm.label(labeling.neurons(model, 0, range(32)), model, tokens, attention_mask=mask, progress=False)
best = sorted((lab for lab in neuron_labels if lab.score is not None), key=lambda lab: -lab.score)[:5]
print(neuron_labels)
for lab in best:
    print(f"{lab.unit:>12}  {lab.score:.2f}  {lab.text}")
sae = tlm.sae.bundled(model)["blocks.0.hook_mlp_out"]
feature_labels = tlm.label(labeling.feature_units(sae, range(16), model=model), model, tokens, attention_mask=mask,
                           progress=False)
print(feature_labels)
labels.save(out / "labels.json")
print("reloaded:", labeling.Labels.load(out / "labels.json"))

# %% [markdown]
# ## With a language model
# `tlm.OpenAILabeler` speaks the chat-completions API through the `openai` client: OpenAI itself
# (`OpenAILabeler(model="gpt-4o-mini")`, key from `$OPENAI_API_KEY`) or any compatible server —
# vLLM (`base_url="http://localhost:8000/v1"`), Ollama (`"http://localhost:11434/v1"`), llama.cpp.
# One explanation request and one batched simulation request per unit; answers are validated
# against a JSON schema (one repair attempt), retried with backoff on 429/5xx/timeouts, cached by
# content (`cache_dir`) so a re-run costs nothing, and counted against an optional budget.
#
# This tutorial has no LLM, so it starts the loopback server that tl_modular's tests use, serving
# `offline_chat_model` — a stand-in that answers the same prompts by rule — with 50 ms of latency.
# Point `base_url` at a real server and nothing else changes.

# %%
from tl_modular.labeling._client import ClientConfig  # noqa: E402
from tl_modular.labeling.testing_server import ChatServer  # noqa: E402

units = labeling.neurons(model, 0, range(16))
with tempfile.TemporaryDirectory() as cache, ChatServer(labeling.offline_chat_model, latency_s=0.05) as server:
    config = ClientConfig(model="stand-in", base_url=server.url, api_key="none", cache_dir=cache,
                          max_concurrency=8, budget_usd=1.0)
    llm = tlm.OpenAILabeler(config=config)
    llm_labels = tlm.label(units, model, tokens, attention_mask=mask, labeler=llm, progress=False)
    print(llm_labels)
    print("usage:", llm_labels.usage)
    print(llm_labels.to_markdown(5))
    sent = len(server.requests)
    again = tlm.label(units, model, tokens, attention_mask=mask, labeler=tlm.OpenAILabeler(config=config),
                      progress=False)
    print(f"second run: {len(server.requests) - sent} requests reached the server "
          f"({again.usage.get('cached', 0)} answers from the cache)")

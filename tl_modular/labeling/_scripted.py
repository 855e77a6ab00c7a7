"""A stand-in chat model that answers tl_modular's labeling prompts without a language model.

``offline_chat_model(request)`` takes a chat-completions request body and returns the assistant's
content: for an explanation request, a label naming the tokens with the highest mean activation
in the top contexts (``fires on "=" (10)``); for a simulation request, the levels
:class:`~tl_modular.labeling.OfflineSimulator` reads from the label. Serve it with the loopback
server to run :class:`~tl_modular.labeling.OpenAILabeler` end to end with no model and no network
(tests, the tutorial, the benchmark).

>>> from tl_modular.labeling.testing_server import ChatServer          # doctest: +SKIP
>>> with ChatServer(offline_chat_model) as server:                     # doctest: +SKIP
...     labels = tlm.label(units, model, tokens, labeler=tlm.OpenAILabeler(model="stand-in", base_url=server.url,
...                                                                         api_key="none"))
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from tl_modular.labeling._labelers import OfflineSimulator
from tl_modular.labeling._prompts import EXPLAIN_SYSTEM, read_data_block


def _explain(doc: dict[str, Any]) -> dict[str, str]:
    levels: dict[str, list[int]] = defaultdict(list)
    for c in doc.get("top_contexts", []) + doc.get("random_contexts", []):
        for tok, lv in zip(c["tokens"], c["activations"], strict=False):
            levels[tok].append(lv)
    means = {t: sum(v) / len(v) for t, v in levels.items()}
    best = sorted((t for t, m in means.items() if m >= 3), key=lambda t: -means[t])[:3]
    if not best:
        return {"label": "no clear pattern", "negative_label": ""}
    items = ", ".join(f"{json.dumps(t, ensure_ascii=False)} ({round(means[t])})" for t in best)
    return {"label": f"fires on {items}", "negative_label": ""}


def _simulate(doc: dict[str, Any]) -> dict[str, Any]:
    rules = OfflineSimulator.parse(doc["unit_description"])
    out = []
    for c in doc["contexts"]:
        toks = c["tokens"]
        acts = [rules["on"].get(t, 0.0) + (rules["after"].get(toks[j - 1], 0.0) if j else 0.0)
                for j, t in enumerate(toks)]
        out.append({"id": c["id"], "activations": [int(max(0, min(10, round(a)))) for a in acts]})
    return {"contexts": out}


def offline_chat_model(request: dict[str, Any]) -> str:
    """The assistant's JSON answer to a labeling request body (see the module docs)."""
    messages = request["messages"]
    doc = read_data_block(next(m["content"] for m in messages if m["role"] == "user"))   # not a repair turn
    answer = _explain(doc) if messages[0]["content"] == EXPLAIN_SYSTEM else _simulate(doc)
    return json.dumps(answer)

"""Labeling: describe every unit in plain words with a language model, and check the words.

A :class:`Unit` is any scalar read-out of a cache — a neuron, a channel's write norm, a direction
of a read or write subspace, an SAE feature, a module. :func:`label` gathers evidence for each
(top contexts across quantiles, random contexts, the negative tail, strongest inputs and outputs,
promoted tokens, the input categories that use it, its members' labels), asks a labeler for a
label, asks a simulator to predict held-out activations from the label alone, and scores the
prediction (correlation, detection, fuzzing) against a random-label baseline.

>>> import tl_modular as tlm
>>> labels = tlm.label(graph, model, tokens)                                  # doctest: +SKIP
>>> labels = tlm.label(graph, model, tokens, labeler=tlm.OpenAILabeler(model="gpt-4o-mini"))  # doctest: +SKIP
>>> labels = tlm.label(tlm.labeling.neurons(model, 0), model, tokens)        # doctest: +SKIP
"""

from tl_modular.errors import LabelingError
from tl_modular.labeling._client import BudgetExceeded, ClientConfig, LLMError, LLMUnavailable
from tl_modular.labeling._evidence import Context, Evidence, EvidenceConfig, collect_evidence, split_rows, str_tokens
from tl_modular.labeling._labelers import (
    Explanation,
    Labeler,
    OfflineLabeler,
    OfflineSimulator,
    OpenAILabeler,
    Simulation,
    Simulator,
)
from tl_modular.labeling._labels import Label, Labels
from tl_modular.labeling._run import label
from tl_modular.labeling._scoring import Score, score
from tl_modular.labeling._scripted import offline_chat_model
from tl_modular.labeling._units import (
    Unit,
    UnitKind,
    channel_units,
    direction_units,
    feature_units,
    module_unit,
    neurons,
    unit_named,
    units_for,
)

__all__ = [
    "BudgetExceeded",
    "ClientConfig",
    "Context",
    "Evidence",
    "EvidenceConfig",
    "Explanation",
    "LLMError",
    "LLMUnavailable",
    "Label",
    "Labeler",
    "LabelingError",
    "Labels",
    "OfflineLabeler",
    "OfflineSimulator",
    "OpenAILabeler",
    "Score",
    "Simulation",
    "Simulator",
    "Unit",
    "UnitKind",
    "channel_units",
    "collect_evidence",
    "direction_units",
    "feature_units",
    "label",
    "module_unit",
    "neurons",
    "offline_chat_model",
    "score",
    "split_rows",
    "str_tokens",
    "unit_named",
    "units_for",
]

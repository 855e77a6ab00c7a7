"""Tasks: :class:`Task` (prompts with answers and a metric) and the standard GPT-2 prompt sets.

- :mod:`~tl_modular.tasks.task` — :class:`Task`: clean and corrupted prompts, answers at scored
  positions, a metric.
- :mod:`~tl_modular.tasks.gpt2` — circuit-discovery prompt sets for GPT-2-tokenizer models,
  generated locally: :func:`ioi`, :func:`greater_than`, :func:`docstring`, :func:`induction`.
  (The bundled toy model's tasks live in :mod:`tl_modular.toy`.)

>>> task = tlm.tasks.ioi(tok, 64, seed=0)                           # doctest: +SKIP
>>> task.metric(model(task.clean))                                  # doctest: +SKIP
"""

from tl_modular.tasks.gpt2 import IOI_TEMPLATES, docstring, greater_than, induction, ioi
from tl_modular.tasks.task import MetricKind, Task

__all__ = ["IOI_TEMPLATES", "MetricKind", "Task", "docstring", "greater_than", "induction", "ioi"]

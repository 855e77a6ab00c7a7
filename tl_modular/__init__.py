"""tl_modular: make trained transformers legible, channel by channel.

A TransformerLens plugin: segment a model into channels (embeddings, heads, MLPs), compress
each to the residual-stream subspaces it reads and writes, map them into a graph of modules
and circuits, unfold polysemantic parts with SAEs, and label every part with a language model.

>>> import tl_modular as tlm
>>> channels = tlm.segment(model)  # doctest: +SKIP
"""

from tl_modular.errors import UnsupportedModelError
from tl_modular.segmentation import Channel, ChannelSet, segment

__version__ = "0.1.0.dev0"

__all__ = [
    "Channel",
    "ChannelSet",
    "UnsupportedModelError",
    "__version__",
    "segment",
]

"""A GPT-2 of our own, trained on real text, bundled: the model users' GPT-2s resemble.

The bundled task model (:mod:`tl_modular.toy`) has known algorithms; this one has the statistics
of a real language model — heavy-tailed activations, an attention sink on the first token,
induction on text — at a size that runs on a laptop CPU. GPT-2's architecture exactly (Hugging
Face ``GPT2LMHeadModel``: LayerNorm, gelu_new, learned positions, tied embeddings), the real GPT-2
tokenizer, 4 layers, d_model 192, 6 heads of 32 dimensions, n_ctx 512; trained on the Python 3.11
documentation's prose and on the source code of the Python standard library and of ten widely
used packages (all fetched as Debian packages), held out on NetworkX's source.
``python tools/train_textlm.py`` reproduces it.

>>> model = tlm.textlm.load_model()                      # doctest: +SKIP
>>> rows = tlm.textlm.tokens("heldout", 8192, 128)       # real text the model never saw
>>> model(rows, return_type="loss")                      # doctest: +SKIP
"""

from tl_modular.textlm.model import BUNDLED_DIR, EOT, info, load_model, token_stream, tokens

__all__ = ["BUNDLED_DIR", "EOT", "info", "load_model", "token_stream", "tokens"]

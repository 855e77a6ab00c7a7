"""Test session set-up: an offline, temporary Hugging Face home and user cache, and shared model fixtures.

The hub reads its paths when ``huggingface_hub`` is first imported, so HF_HOME and the offline
flags are set here, before any test module imports TransformerLens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="tlm-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The default LLM response cache lives under XDG_CACHE_HOME: the suite never writes into the real home.
_XDG_CACHE_HOME = tempfile.mkdtemp(prefix="tlm-xdg-cache-")
os.environ["XDG_CACHE_HOME"] = _XDG_CACHE_HOME
os.environ.pop("TL_MODULAR_NO_LLM_CACHE", None)

import pytest  # noqa: E402
import torch  # noqa: E402

#: The real GPT-2 tokenizer files shipped beside the project.
GPT2_TOKENIZER_DIR = Path(
    os.environ.get("TLM_GPT2_TOKENIZER", Path(__file__).resolve().parents[1].parent
                   / "shared" / "data" / "gpt2-tokenizer")
)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)
    shutil.rmtree(_XDG_CACHE_HOME, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium for the report page's tests (skipped where none is installed)."""
    from tl_modular.report.browser import Browser, find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium: `apt-get install chromium` (CI installs it in its system-packages stage)")
    with Browser(exe, tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


@pytest.fixture(scope="session")
def hf_home() -> Path:
    """The session's temporary Hugging Face home (tests may add hub-cache entries)."""
    return Path(_HF_HOME)


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    if not (GPT2_TOKENIZER_DIR / "vocab.json").exists():
        pytest.skip(f"GPT-2 tokenizer files not found at {GPT2_TOKENIZER_DIR}; "
                    "set TLM_GPT2_TOKENIZER to the folder holding vocab.json and merges.txt")
    return GPT2_TOKENIZER_DIR


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir), add_bos_token=True)


@pytest.fixture(scope="session")
def bridge(gpt2_tokenizer):
    """A TransformerBridge in compatibility mode around a random 2-layer GPT-2."""
    from tl_modular.testing import offline_bridge

    return offline_bridge(gpt2_tokenizer)


@pytest.fixture(scope="session")
def gpt2_small(gpt2_tokenizer_dir, hf_home):
    """GPT-2 small's architecture with random weights, through from_pretrained("gpt2")."""
    from transformer_lens import HookedTransformer

    from tl_modular.testing import write_offline_gpt2_hub

    write_offline_gpt2_hub(gpt2_tokenizer_dir)
    return HookedTransformer.from_pretrained("gpt2", device="cpu").eval()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine a second busy process makes 2 threads far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_graph():
    """``(model, data, comp, graph)``: a tiny GPT-2-shaped model, 16 rows of 10 token ids, its default
    compression and channel graph (for tests that need every stage built, not checked)."""
    import tl_modular as tlm
    from tl_modular.testing import tiny_model

    torch.manual_seed(0)
    model = tiny_model("gpt2", seed=0)
    data = torch.randint(0, model.cfg.d_vocab, (16, 10), generator=torch.Generator().manual_seed(3))
    comp = tlm.compress(model, data, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=data, progress=False)
    return model, data, comp, graph


@pytest.fixture()
def tokens() -> torch.Tensor:
    """A [batch, pos] batch of token ids valid for every tiny model (d_vocab = 50)."""
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))


def pytest_terminal_summary(terminalreporter):
    import _bad

    if _bad.COUNT["n"]:
        terminalreporter.write_line(f"bad inputs and faults tried (each gets a clear error): {_bad.COUNT['n']}")

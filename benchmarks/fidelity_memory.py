"""Peak memory and time of the rank–fidelity curve (``analyze``'s ``rank_fidelity`` stage) on a
GPT-2-small-shaped model: the defaults (log-softmax, CE and KL in chunks of rows within
``fidelity.CHUNK_MEMORY``, the clean log-probs kept within ``CLEAN_MEMORY``), the clean log-probs
run again for every point (``CLEAN_MEMORY`` 0), and the whole batch at once (as before the bound),
with the largest difference of the scores.

    python benchmarks/fidelity_memory.py [--rows 32] [--points 1] [--threads 1] [--before FILE]

Random GPT-2-small weights, ``--rows`` rows of 128 random tokens in one batch (``analyze``'s batch of
32), compressed on their first 8 rows (not timed); ``--points`` points of the curve. The peak is
the process's resident set from the start of each variant (Linux: VmHWM, reset through
/proc/self/clear_refs), so it includes the model and the compression (the "base"); the variants
run in order of their memory, as the allocator keeps what an earlier one freed. ``--before FILE``
also runs an older ``tl_modular/compression/fidelity.py`` (e.g. ``git show
0291861:tl_modular/compression/fidelity.py > /tmp/fidelity_before.py``) last, for its peak and scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from _peak import peak_gb, reset_peak


def _module_from(path: str):   # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("fidelity_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--points", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=None, help="an older fidelity.py to run last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tl_modular as tlm
    from tl_modular.compression import fidelity
    from tl_modular.testing import gpt2_small_model

    model = gpt2_small_model(seed=0)
    tokens = torch.randint(0, 50257, (args.rows, 128), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens[:8], batch_size=8, progress=False)
    budgets = [max(1, comp.total_rank * (i + 1) // (args.points + 1)) for i in range(args.points)]
    defaults = fidelity.CHUNK_MEMORY, fidelity.CLEAN_MEMORY
    variants = [("clean log-probs run again per point", fidelity, (defaults[0], 0)),
                ("default (chunks of rows, clean kept)", fidelity, defaults),
                ("whole batch at once (one chunk)", fidelity, (1 << 50, 1 << 50))]
    if args.before:
        variants.append((f"before ({args.before})", _module_from(args.before), defaults))
    ref = None
    for name, module, (chunk, clean) in variants:
        fidelity.CHUNK_MEMORY, fidelity.CLEAN_MEMORY = chunk, clean
        base = reset_peak()
        start = time.perf_counter()
        rows = module.rank_fidelity_curve(model, comp, tokens, budgets, batch_size=args.rows, progress=False)
        seconds = time.perf_counter() - start
        values = torch.tensor([[r[k] for k in ("clean_loss", "ablated_loss", "compressed_loss", "kl")] for r in rows],
                              dtype=torch.float64)
        diff = 0.0 if ref is None else float(((values - ref).abs() / ref.abs()).max())
        ref = values if ref is None else ref
        print(f"{name}: {seconds:.1f} s, peak {peak_gb():.2f} GB (base {base:.2f} GB), largest relative "
              f"difference {diff:.1e}; kl {values[:, 3].tolist()}", flush=True)
    fidelity.CHUNK_MEMORY, fidelity.CLEAN_MEMORY = defaults


if __name__ == "__main__":
    main()

"""The LLM request layer alone: 200 units x (1 explanation + 1 batched simulation) through ``ChatClient``.

    .venv/bin/python benchmarks/labeling_client.py [--units 200] [--latency 0.2] [--concurrency 16] [--in-process]
                                                   [--batch]

Each unit sends one explanation request (a prompt with 20 quoted contexts, a ``{"explanation"}`` schema)
and then, with the label it got, one batched simulation request (10 contexts x 16 tokens, per-token
levels 0…10, logprobs asked) — through :class:`~tl_modular.labeling._client.ChatClient` and the real
``openai`` client to the loopback server (``tl_modular.labeling.testing_server.ChatServer``), which
answers every request after ``--latency`` seconds. By default the server runs in its own process
(like a real one: it does not share this interpreter's lock); ``--in-process`` runs it in a thread.

``--batch`` sends the same requests through the server's Batch API (``ClientConfig(batch=True)``,
polled every 50 ms doubling up to 0.5 s; the loopback server answers a batch's lines when it is
polled, without ``--latency``): the explanations go in one batch, the simulations in the next.

Run 1 uses a fresh cache folder: wall time (aim < 20 s at 200 units, 200 ms, concurrency 16; the floor
is 2 x units / concurrency x latency = 5 s) and requests. Run 2 repeats it with the same cache: requests
(aim 0) and wall time. Prints a README benchmark-table row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tl_modular.labeling._client import ChatClient, ClientConfig, Usage

N_CONTEXTS, N_TOKENS = 10, 16
WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang in trees at dawn".split()
EXPLANATION_SCHEMA = {"type": "object", "properties": {"explanation": {"type": "string"}},
                      "required": ["explanation"], "additionalProperties": False}
SIMULATION_SCHEMA = {"type": "object", "required": ["activations"], "additionalProperties": False,
                     "properties": {"activations": {
                         "type": "array", "minItems": N_CONTEXTS, "maxItems": N_CONTEXTS,
                         "items": {"type": "array", "minItems": N_TOKENS, "maxItems": N_TOKENS,
                                   "items": {"type": "integer", "minimum": 0, "maximum": 10}}}}}


def respond(body: dict) -> str:
    """The scripted model: a label naming the unit's word, then levels that follow the label."""
    name = body["response_format"]["json_schema"]["name"]
    prompt = body["messages"][-1]["content"]
    if name == "explanation":
        word = prompt.split("unit fires most on: ", 1)[1].split()[0]
        return json.dumps({"explanation": f"fires on the word {word}"})
    word = prompt.split("fires on the word ", 1)[1].split()[0]
    rows = json.loads(prompt.split("Contexts:\n", 1)[1])
    return json.dumps({"activations": [[10 if tok == word else 0 for tok in row] for row in rows]})


def _contexts(rng: random.Random, n: int) -> list[list[str]]:
    return [[rng.choice(WORDS) for _ in range(N_TOKENS)] for _ in range(n)]


async def _unit(client: ChatClient, i: int) -> None:
    rng = random.Random(i)
    word = rng.choice(WORDS)
    shown = "\n".join(" ".join(f"{t}({10 if t == word else 0})" for t in row) for row in _contexts(rng, 20))
    explain = [{"role": "system", "content": "You describe what makes a unit of a neural network fire."},
               {"role": "user", "content": f"Unit {i}; unit fires most on: {word} \nQuoted contexts:\n{shown}"}]
    label = (await client.request(explain, EXPLANATION_SCHEMA, name="explanation")).data["explanation"]
    simulate = [{"role": "system", "content": "Predict the unit's activation (0-10) on every token."},
                {"role": "user", "content": f"Unit {i}: {label} \nContexts:\n{json.dumps(_contexts(rng, N_CONTEXTS))}"}]
    reply = await client.request(simulate, SIMULATION_SCHEMA, name="simulation", logprobs=True)
    if len(reply.data["activations"]) != N_CONTEXTS:
        raise RuntimeError("the simulation answer lost contexts")


async def _run(url: str, cache: Path, units: int, concurrency: int, batch: bool = False
               ) -> tuple[float, Usage, int]:
    client = ChatClient(ClientConfig(model="stand-in", base_url=url, api_key="none", cache_dir=cache,
                                     max_concurrency=concurrency, batch=batch, batch_poll_s=0.05,
                                     batch_max_poll_s=0.5, batch_collect_s=0.2))
    start = time.perf_counter()
    try:
        await asyncio.gather(*(_unit(client, i) for i in range(units)))
    finally:
        await client.aclose()
    return time.perf_counter() - start, client.usage, len(client.batch.created) if client.batch else 0


@contextlib.contextmanager
def _server(latency: float, in_process: bool) -> Iterator[str]:
    from tl_modular.labeling.testing_server import ChatServer

    if in_process:
        with ChatServer(respond, latency_s=latency) as server:
            yield server.url
        return
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _serve(latency: float) -> None:
    from tl_modular.labeling.testing_server import ChatServer

    with ChatServer(respond, latency_s=latency) as server:
        print(server.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--in-process", action="store_true", help="serve from a thread of this process")
    parser.add_argument("--batch", action="store_true", help="through the Batch API (OpenAILabeler(batch=True))")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return _serve(args.latency)
    with tempfile.TemporaryDirectory() as tmp, _server(args.latency, args.in_process) as url:
        cache = Path(tmp) / "cache"
        t1, u1, b1 = asyncio.run(_run(url, cache, args.units, args.concurrency, args.batch))
        t2, u2, b2 = asyncio.run(_run(url, cache, args.units, args.concurrency, args.batch))
        files = sum(1 for _ in cache.rglob("*.json"))
    if args.batch:
        where = "in-process" if args.in_process else "separate-process"
        print(f"{args.units} units x 2 requests through the Batch API, {where} server")
        print(f"run 1 (fresh cache): {t1:.2f} s, {u1.requests} requests in {b1} batches, {u1.retries} retries, "
              f"${u1.cost_usd:.4f} at half the list price; {files} cache files")
        print(f"run 2 (same cache):  {t2:.2f} s, {u2.requests} requests, {b2} batches, {u2.cached} cached replies")
        print(f"| the same through the Batch API (`batch=True`, polls every 50 ms doubling to 0.5 s) | first run "
              f"**{t1:.1f} s** ({u1.requests} requests in {b1} batches); re-run with the cache {t2:.2f} s, "
              f"**{u2.requests} requests** | `.venv/bin/python benchmarks/labeling_client.py --batch` |")
        return
    floor = 2 * -(-args.units // args.concurrency) * args.latency
    where = "in-process" if args.in_process else "separate-process"
    print(f"{args.units} units x 2 requests, {where} server, latency {args.latency * 1000:.0f} ms, "
          f"concurrency {args.concurrency} (floor {floor:.1f} s)")
    print(f"run 1 (fresh cache): {t1:.2f} s, {u1.requests} requests, {u1.retries} retries, {u1.failures} failures, "
          f"{u1.prompt_tokens} prompt + {u1.completion_tokens} completion tokens, ${u1.cost_usd:.4f} at list price; "
          f"{files} cache files")
    print(f"run 2 (same cache):  {t2:.2f} s, {u2.requests} requests, {u2.cached} cached replies")
    print(f"| LLM request layer: {args.units} units x (explanation + batched simulation), {where} OpenAI-compatible "
          f"server with {args.latency * 1000:.0f} ms latency, concurrency {args.concurrency} | first run "
          f"**{t1:.1f} s** ({u1.requests} requests; floor {floor:.1f} s); re-run with the cache {t2:.2f} s, "
          f"**{u2.requests} requests** | `.venv/bin/python benchmarks/labeling_client.py"
          f"{' --in-process' if args.in_process else ''}` |")


if __name__ == "__main__":
    main()

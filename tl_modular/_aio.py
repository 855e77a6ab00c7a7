"""Running asynchronous work from synchronous code (the LLM clients are async; users' code is not)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

__all__ = ["run_sync"]


def run_sync(coro: Any) -> Any:
    """Run a coroutine from sync code, also when an event loop is already running (Jupyter).

    >>> async def two():
    ...     return 2
    >>> run_sync(two())
    2
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

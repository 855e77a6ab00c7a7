"""Running asynchronous work from synchronous code (the LLM clients are async; users' code is not)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
from typing import Any

__all__ = ["run_sync"]

#: Seconds the tasks get to finish after Ctrl-C before the loop is stopped regardless.
GRACE_S = 5.0


def run_sync(coro: Any) -> Any:
    """Run a coroutine from sync code, also when an event loop is already running (Jupyter).

    In the main thread, Ctrl-C cancels *every* task of the loop and ends the run at most
    :data:`GRACE_S` seconds later with ``KeyboardInterrupt``, even if a task does not finish on
    its cancellation (``asyncio.run`` cancels only the main task and then waits for it, so a
    task that absorbs its cancellation, such as a retrying request, kept the run alive).

    >>> async def two():
    ...     return 2
    >>> run_sync(two())
    2
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            return _run_interruptible(coro)
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _run_interruptible(coro: Any) -> Any:
    loop = asyncio.new_event_loop()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        if interrupted:                 # a second Ctrl-C: stop now
            loop.stop()
            return
        interrupted = True
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.call_later(GRACE_S, loop.stop)

    try:
        asyncio.set_event_loop(loop)
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        main = loop.create_task(coro)
        try:
            result = loop.run_until_complete(main)
        except (asyncio.CancelledError, RuntimeError):   # RuntimeError: the loop was stopped first
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        if interrupted:                 # the work ended anyway: the user still asked to stop
            raise KeyboardInterrupt
        return result
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:                     # a bounded wait: a task that ignores cancellation is left behind
            loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()

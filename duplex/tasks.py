"""Stopping asyncio tasks without swallowing the caller's own cancellation.

``task.cancel(); try: await task except CancelledError: pass`` has a trap: if the coroutine doing
the stopping is itself cancelled while it waits (a server shutting down while a session closes),
the CancelledError it receives is caught as if it were the task's, and the caller goes on as
though nothing happened. That once made ``DuplexServer.close()`` wait forever.
:func:`cancel_and_wait` re-raises when the caller is being cancelled.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task | asyncio.Future | None, what: str = "task") -> None:
    """Cancel ``tasks`` (None entries are skipped) and wait until each has ended. A task's own
    exception is logged (at debug: its owner reported it where it happened), not raised; a
    cancellation of the *calling* task is re-raised once every task has been told to stop."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    for task in live:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:  # noqa: BLE001 - ended with an error while stopping: already reported
            log.debug("%s ended with an error while being stopped", what, exc_info=True)

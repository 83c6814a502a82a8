"""cancel_and_wait: stops tasks, and never swallows the caller's own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from duplex.tasks import cancel_and_wait


async def test_it_cancels_every_task_and_returns_when_they_have_ended() -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    a, b = asyncio.create_task(forever("a")), asyncio.create_task(forever("b"))
    await asyncio.sleep(0)
    await cancel_and_wait(a, None, b)
    assert sorted(ended) == ["a", "b"] and a.cancelled() and b.cancelled()


async def test_a_task_that_failed_is_logged_not_raised() -> None:
    async def boom() -> None:
        raise ValueError("already reported")

    task = asyncio.create_task(boom())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # no ValueError here
    assert isinstance(task.exception(), ValueError)


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    """The trap it exists for: the stopper is cancelled while the task it stops is still
    cleaning up. The old ``except CancelledError: pass`` let the stopper carry on (and a server's
    close() then waited forever); here the stopper ends cancelled."""
    cleanup_started = asyncio.Event()
    release = asyncio.Event()
    after_wait: list[bool] = []

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleanup_started.set()
            await release.wait()  # cleanup that takes a while
            raise

    async def stopper(task: asyncio.Task) -> None:
        await cancel_and_wait(task)
        after_wait.append(True)  # must not run: this coroutine was cancelled

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(stopper(task))
    await cleanup_started.wait()
    stopping.cancel()  # cancel the stopper while it waits for the task
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert after_wait == [] and stopping.cancelled()

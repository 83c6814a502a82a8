"""What every session kind shares with its transport: an event stream, a close, and the decode
hold the voice pipeline uses while a reply's first audio is synthesised.

:class:`~duplex.session.core.Session` (chat) and
:class:`~duplex.translate.session.TranslateSession` both run one loop task that emits events into
``_out``; the voice pipeline drives either through this one interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from duplex.tasks import cancel_and_wait

__all__ = ["SessionLifecycle"]


class SessionLifecycle:
    """Mixin: needs ``_out`` (an ``asyncio.Queue`` of events, ``None`` = end), ``_task`` (the
    loop task or None) and ``_decode_held`` (an ``asyncio.Event`` or None) set in ``__init__``."""

    _out: asyncio.Queue[Any]
    _task: asyncio.Task[None] | None
    _decode_held: asyncio.Event | None

    async def events(self) -> AsyncIterator[Any]:
        """The session's events, in order, until :meth:`close`."""
        while True:
            ev = await self._out.get()
            if ev is None:
                return
            yield ev

    def get_nowait(self) -> Any:
        """The next event if one is ready, else None."""
        try:
            return self._out.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def close(self) -> None:
        """Stop the loop task and end the event stream."""
        task, self._task = self._task, None
        await cancel_and_wait(task, what="session loop")
        self._out.put_nowait(None)

    def hold_decoding(self) -> None:
        """Pause decoding for a moment: the voice pipeline does while a reply's first audio is
        synthesised (on a 2-core CPU decode steps would slow that synthesis, which is on the
        end-of-speech -> first-audio path, while the text is far ahead of the audio anyway). The
        session's next step waits for :meth:`release_decoding`, bounded by the session."""
        if self._decode_held is None:
            self._decode_held = asyncio.Event()

    def release_decoding(self) -> None:
        held, self._decode_held = self._decode_held, None
        if held is not None:
            held.set()

"""Admission control for ``duplex serve``: how many sessions one process holds at once.

Every session holds a KV cache and a share of the one engine, so the server caps them: live and
detached sessions together count toward ``max_sessions`` (a new connection over it gets a
``server_busy`` error and a close, code 1013), and detached sessions, which wait for a resume, are
also capped on their own (the oldest is closed first) and expire after ``resume_ttl_s``.

Total KV memory is bounded too: a session's cache never outgrows its context window (the shared
sequence evicts beyond ``max_tokens``), so ``kv_bytes_per_session`` (the window's worst case,
growth headroom included) times the sessions held stays within ``max_kv_bytes``; a new session
that would break the budget is refused like one over ``max_sessions``, and the error names the
limit hit. Pure logic: the server feeds it what it holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Admission", "CLOSE_TRY_AGAIN_LATER", "ServerBusy", "default_max_sessions"]

CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455: the server is overloaded
_BYTES_PER_SESSION = 256 << 20  # a full 4096-token KV cache of a small model, plus ASR/TTS state
_SESSIONS_PER_CORE = 4


class ServerBusy(RuntimeError):
    """A new session was refused: ``max_sessions`` are held (live and detached)."""

    def __init__(self, message: str, max_sessions: int) -> None:
        super().__init__(message)
        self.max_sessions = max_sessions


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def default_max_sessions(cpu_count: int | None = None, memory_bytes: int | None = None) -> int:
    """Sized to the machine: 4 per core, and no more than one per 256 MiB of RAM (at least 1)."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    memory = memory_bytes if memory_bytes is not None else _memory_bytes()
    n = cores * _SESSIONS_PER_CORE
    if memory:
        n = min(n, memory // _BYTES_PER_SESSION)
    return max(1, int(n))


@dataclass(frozen=True, slots=True)
class Admission:
    """``max_sessions``: live + detached; ``max_detached``: detached alone (at most ``max_sessions``)."""

    max_sessions: int
    max_detached: int
    max_kv_bytes: int | None = None  # None: no KV budget beyond max_sessions
    kv_bytes_per_session: int = 0
    type: str = "admission"

    @classmethod
    def from_limits(cls, max_sessions: int | None, max_detached: int | None, max_kv_bytes: int | None = None,
                    kv_bytes_per_session: int = 0) -> Admission:
        total = max_sessions if max_sessions is not None else default_max_sessions()
        if total < 1:
            raise ValueError(f"max_sessions must be >= 1, got {total}")
        detached = max_detached if max_detached is not None else max(1, total // 2)
        if detached < 0:
            raise ValueError(f"max_detached_sessions must be >= 0, got {detached}")
        if max_kv_bytes is not None and kv_bytes_per_session > max_kv_bytes:
            raise ValueError(f"max_kv_mb {max_kv_bytes / 2**20:.0f} is less than one session's KV cache "
                             f"({kv_bytes_per_session / 2**20:.0f} MiB at the context window): no session could start")
        return cls(total, min(detached, total), max_kv_bytes, kv_bytes_per_session)

    def limit_hit(self, held: int) -> str | None:
        """The limit a new session would break while ``held`` sessions (live and detached) exist:
        ``max_sessions``, ``max_kv_mb``, or None when it may start."""
        if held >= self.max_sessions:
            return "max_sessions"
        if self.max_kv_bytes is not None and (held + 1) * self.kv_bytes_per_session > self.max_kv_bytes:
            return "max_kv_mb"
        return None

    def admits(self, held: int) -> bool:
        """May a new session start while ``held`` sessions (live and detached) exist?"""
        return self.limit_hit(held) is None

    def busy_message(self, held: int) -> str:
        if self.limit_hit(held) == "max_kv_mb":
            assert self.max_kv_bytes is not None
            return (f"server busy: {held} sessions hold up to {held * self.kv_bytes_per_session / 2**20:.0f} MiB of "
                    f"KV cache and one more needs {self.kv_bytes_per_session / 2**20:.0f} MiB; the limit (max_kv_mb) "
                    f"is {self.max_kv_bytes / 2**20:.0f} MiB; try again later")
        return (f"server busy: {held} sessions held, the limit (max_sessions) is {self.max_sessions}; "
                "try again later")

    def over_detached(self, detached: Iterable[tuple[str, float]]) -> list[str]:
        """Ids of detached sessions to close, oldest detach time first, to get under the cap."""
        ordered = sorted(detached, key=lambda item: item[1])
        excess = len(ordered) - self.max_detached
        return [sid for sid, _ in ordered[:excess]] if excess > 0 else []

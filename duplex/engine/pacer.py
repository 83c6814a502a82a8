"""How much long prefill a scheduler tick may carry: a tick-cost model fitted as the ticks run.

The scheduler (:mod:`duplex.engine.scheduler`) asks it, each tick with speakers, how many seconds
of prefill the tick may add, and how many tokens of a prefill at a given position that buys.
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["TickPacer", "least_squares"]


class TickPacer:
    """Sizes prefill pieces while sessions speak, so that a tick carrying a piece costs at most
    ``PACE`` times what its decode rows alone would: the speakers' inter-token time stays under
    twice its idle value even deep into a long prompt, where a fixed token count would cost ever
    more (attention grows with the context).

    A tick's time is fitted by least squares over recent ticks as ``a + b * tokens + c * attn``:
    ``a`` what any forward pays (reading the weights: most of a small tick on a CPU), ``b`` the
    linear layers per token, ``c`` the attention per (query, cached position) pair, which the
    int8 mat-vecs make relatively dear (one prefill token at 3k context costs ~3 decode rows).
    Where a single token costs more than the tick may add, the allowance is banked over ticks and
    the token goes in when it is covered: fewer ticks carry prefill, none carries more than one
    token over its share."""

    PACE = 1.3  # a tick with prefill costs at most this times its decode rows alone (target: 2x)
    WINDOW = 64

    def __init__(self, config: Any) -> None:
        self._ticks: deque[tuple[float, float, float]] = deque(maxlen=self.WINDOW)  # (tokens, attn, s)
        self._coef: tuple[float, float, float] | None = None
        self._dirty = False
        self.bank = 0.0  # seconds of allowance saved up for a token that costs more than one tick's

    @staticmethod
    def attn(n: int, start: int) -> float:
        """(query, cached position) pairs of ``n`` tokens appended at ``start``."""
        return n * (start + (n + 1) / 2)

    def observe(self, seconds: float, tokens: float, attn: float) -> None:
        if tokens > 0:
            self._ticks.append((tokens, attn, seconds))
            self._dirty = True

    def fit(self) -> tuple[float, float, float] | None:
        """(a, b, c), refitted when ticks were added; None until 8 ticks are known."""
        if self._dirty:
            self._dirty = False
            self._coef = self._solve()
        return self._coef

    def _solve(self) -> tuple[float, float, float] | None:
        # pure Python on purpose: numpy's lstsq runs in OpenBLAS, whose spinning threads took a core
        # from whisper in the voice server (committed words +250 ms in bench realtime)
        if len(self._ticks) < 8:
            return None
        for columns in ((0, 1), (1,), (0,), ()):  # drop a term whose fit comes out negative
            coef = least_squares([[1.0, *(t[j] for j in columns)] for t in self._ticks],
                                  [t[2] for t in self._ticks])
            if coef is not None and all(c >= 0 for c in coef):
                full = [coef[0], 0.0, 0.0]
                for j, value in zip(columns, coef[1:]):
                    full[1 + j] = value
                return full[0], full[1], full[2]
        return None

    def cost(self, n: int, start: int) -> float | None:
        """Seconds ``n`` tokens at ``start`` add to a tick (None before a fit)."""
        coef = self.fit()
        return None if coef is None else coef[1] * n + coef[2] * self.attn(n, start)

    def budget(self, decode_tokens: int, decode_attn: float) -> float | None:
        """Seconds of prefill a tick whose decode rows are these may add (None before a fit)."""
        coef = self.fit()
        if coef is None:
            return None
        a, b, c = coef
        return (self.PACE - 1) * (a + b * decode_tokens + c * decode_attn)


def least_squares(rows: list[list[float]], y: list[float]) -> list[float] | None:
    """Solve min |X c - y| through the normal equations (at most 3 unknowns), None if singular."""
    n = len(rows[0])
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(n)]  # columns to ~1 for conditioning
    x = [[r[j] / scale[j] for j in range(n)] for r in rows]
    a = [[sum(r[i] * r[j] for r in x) for j in range(n)] + [sum(r[i] * v for r, v in zip(x, y))] for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, n), key=lambda i: abs(a[i][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for i in range(n):
            if i != col:
                f = a[i][col] / a[col][col]
                a[i] = [u - f * v for u, v in zip(a[i], a[col])]
    return [a[i][n] / a[i][i] / scale[i] for i in range(n)]

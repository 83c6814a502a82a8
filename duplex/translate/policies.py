"""Simultaneous read/write policies (SimulEval vocabulary), registered by name.

A policy is driven once per source event: a word was just read, or the source finished. It writes
zero or more target words through a :class:`~duplex.translate.translator.TranslationModel` and
returns the words it confirmed; the caller then reads the next word. No I/O, no clock: the same
schedule offline (eval) and live (session).

- ``wait-k``: read k words, then alternate: one target word per source word; the rest at the end.
- ``local-agreement``: LocalAgreement-2: after each word, confirm the longest common prefix of
  this hypothesis and the previous one (beyond what is already confirmed).
- ``retranslate``: the baseline that re-translates the whole source after each word; nothing is
  confirmed before the end, the hypothesis is shown (and may change).
- ``offline``: read everything, then translate (the full-sentence upper bound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from duplex.translate.translator import TargetWord, TranslationModel

__all__ = ["LocalAgreementPolicy", "OfflinePolicy", "RetranslatePolicy", "SimulPolicy", "WaitKPolicy",
           "available_simul_policies", "make_simul_policy", "register_simul_policy"]

_REGISTRY: dict[str, Callable[..., SimulPolicy]] = {}


def register_simul_policy(name: str) -> Callable[[Callable[..., SimulPolicy]], Callable[..., SimulPolicy]]:
    def deco(factory: Callable[..., SimulPolicy]) -> Callable[..., SimulPolicy]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_simul_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_simul_policy(name: str, **params: Any) -> SimulPolicy:
    name = {"waitk": "wait-k", "la2": "local-agreement", "la": "local-agreement",
            "re-translation": "retranslate", "full": "offline"}.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown translation policy {name!r}; available: {', '.join(available_simul_policies())}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for translation policy {name!r}: {exc}") from exc


class SimulPolicy:
    """Base: ``on_source`` after each source event; ``hypothesis`` = what to display beyond the
    confirmed words (re-translation and LocalAgreement show their latest guess)."""

    name = "base"

    def __init__(self) -> None:
        self.hypothesis: list[str] = []

    def reset(self) -> None:
        self.hypothesis = []

    def on_source(self, model: TranslationModel, n_read: int, finished: bool) -> list[TargetWord]:
        raise NotImplementedError

    @staticmethod
    def _finish(model: TranslationModel) -> list[TargetWord]:
        """Source complete: confirm the rest of the translation."""
        rest = model.hypothesis()
        model.confirm(rest)
        return rest


@register_simul_policy("wait-k")
class WaitKPolicy(SimulPolicy):
    name = "wait-k"

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError("wait-k needs k >= 1")
        self.k = int(k)
        self._written = 0

    def reset(self) -> None:
        super().reset()
        self._written = 0

    def on_source(self, model: TranslationModel, n_read: int, finished: bool) -> list[TargetWord]:
        if finished:
            out = self._finish(model)
            self._written += len(out)
            return out
        out: list[TargetWord] = []
        # target word i is written after min(k + i - 1, |X|) source words
        while self._written < n_read - self.k + 1:
            word = model.next_word()
            if word is None:
                break  # the model would end here, but the source goes on: read more
            out.append(word)
            self._written += 1
        return out


@register_simul_policy("local-agreement")
class LocalAgreementPolicy(SimulPolicy):
    """LocalAgreement-n (n=2 by default): confirm what the last n hypotheses agree on."""

    name = "local-agreement"

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        if int(n) < 2:
            raise ValueError("local-agreement needs n >= 2")
        self.n = int(n)
        self._history: list[list[str]] = []  # full targets (confirmed + hypothesis), newest last
        self._confirmed: list[str] = []

    def reset(self) -> None:
        super().reset()
        self._history, self._confirmed = [], []

    def on_source(self, model: TranslationModel, n_read: int, finished: bool) -> list[TargetWord]:
        if finished:
            out = self._finish(model)
            self._confirmed += [w.text for w in out]
            self.hypothesis = []
            return out
        hyp = model.hypothesis()
        full = self._confirmed + [w.text for w in hyp]
        self._history = (self._history + [full])[-self.n:]
        if len(self._history) < self.n:
            self.hypothesis = [w.text for w in hyp]
            return []
        agreed = _common_prefix(self._history)
        new = max(0, agreed - len(self._confirmed))
        out = hyp[:new]
        model.confirm(out)
        self._confirmed += [w.text for w in out]
        self.hypothesis = [w.text for w in hyp[new:]]
        return out


@register_simul_policy("retranslate")
class RetranslatePolicy(SimulPolicy):
    """Re-translate the whole source after every word; confirm only at the end."""

    name = "retranslate"

    def on_source(self, model: TranslationModel, n_read: int, finished: bool) -> list[TargetWord]:
        if finished:
            out = self._finish(model)
            self.hypothesis = []
            return out
        self.hypothesis = [w.text for w in model.hypothesis()]
        return []


@register_simul_policy("offline")
class OfflinePolicy(SimulPolicy):
    """Full-sentence translation: the quality upper bound (and the latency worst case)."""

    name = "offline"

    def on_source(self, model: TranslationModel, n_read: int, finished: bool) -> list[TargetWord]:
        return self._finish(model) if finished else []


def _common_prefix(seqs: list[list[str]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n

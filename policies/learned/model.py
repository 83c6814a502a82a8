"""The learned turn model: standardised features -> (tanh hidden layers) -> P(the user's turn is over).

Weights live in a small JSON file (``weights.json`` beside this module, written by
``duplex policy train``); inference is pure Python, a few hundred multiply-adds per tick.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .features import FEATURE_NAMES

__all__ = ["DEFAULT_WEIGHTS", "TurnModel", "load_turn_model"]

DEFAULT_WEIGHTS = Path(__file__).with_name("weights.json")


@dataclass(frozen=True, slots=True)
class TurnModel:
    """``layers``: (weight rows [out][in], bias [out]) per layer; tanh between, sigmoid at the end."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layers: tuple[tuple[tuple[tuple[float, ...], ...], tuple[float, ...]], ...]
    threshold: float
    max_gap_ms: float
    meta: dict[str, Any]
    type: str = "turn_model"

    def probability(self, x: list[float]) -> float:
        """``x``: a vector in :data:`FEATURE_NAMES` order; the model reads the features it was trained on."""
        if len(x) != len(self.features):
            x = [x[i] for i in _positions(self.features)]
        h = [(v - m) / s for v, m, s in zip(x, self.mean, self.std)]
        for i, (w, b) in enumerate(self.layers):
            h = [sum(wi * hi for wi, hi in zip(row, h)) + bi for row, bi in zip(w, b)]
            if i < len(self.layers) - 1:
                h = [math.tanh(v) for v in h]
        z = max(-60.0, min(60.0, h[0]))
        return 1.0 / (1.0 + math.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "version": 1, "features": list(self.features), "mean": list(self.mean),
                "std": list(self.std), "layers": [{"w": [list(r) for r in w], "b": list(b)} for w, b in self.layers],
                "threshold": self.threshold, "max_gap_ms": self.max_gap_ms, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TurnModel:
        unknown = [f for f in d["features"] if f not in FEATURE_NAMES]
        if unknown or list(d["features"]) != [f for f in FEATURE_NAMES if f in d["features"]]:
            raise ValueError(f"weights were trained on features {d['features']}, this code computes {list(FEATURE_NAMES)} "
                             f"(unknown or out of order: {unknown or d['features']}); retrain with duplex policy train")
        layers = tuple((tuple(tuple(float(v) for v in row) for row in layer["w"]), tuple(float(v) for v in layer["b"]))
                       for layer in d["layers"])
        return cls(tuple(d["features"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])), layers,
                   float(d["threshold"]), float(d["max_gap_ms"]), dict(d.get("meta", {})))


@functools.cache
def _positions(features: tuple[str, ...]) -> tuple[int, ...]:
    """Where a model's features sit in :data:`FEATURE_NAMES` (weights trained before a feature was
    added read the older subset)."""
    return tuple(FEATURE_NAMES.index(f) for f in features)


def load_turn_model(path: str | Path | None = None) -> TurnModel:
    path = Path(path) if path else DEFAULT_WEIGHTS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no learned-policy weights at {path}: train them with duplex policy train") from exc
    return TurnModel.from_dict(data)

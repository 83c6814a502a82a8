"""Next-token sampling: greedy, temperature, top-k, top-p, with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SamplingConfig", "Sampler"]


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """temperature 0 means greedy. ``stop`` strings end a reply like EOS does."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    repetition_penalty: float = 1.0
    type: str = "sampling"

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class Sampler:
    """Stateful only in its random generator, so a seed reproduces a whole reply."""

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self._generator = torch.Generator(device="cpu")
        if config.seed is not None:
            self._generator.manual_seed(config.seed)
        else:
            self._generator.seed()

    def __call__(self, logits: torch.Tensor, recent_ids: list[int] | None = None) -> int:
        """logits: [vocab] for the next position. Returns one token id."""
        cfg = self.config
        logits = logits.float().cpu()
        if cfg.repetition_penalty != 1.0 and recent_ids:
            idx = torch.tensor(sorted(set(recent_ids)), dtype=torch.long)
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
        if cfg.temperature == 0.0:
            return int(torch.argmax(logits))
        logits = logits / cfg.temperature
        if cfg.top_k > 0:
            k = min(cfg.top_k, logits.numel())
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            cum = torch.cumsum(probs, dim=-1)
            remove = cum - probs > cfg.top_p  # keep the smallest set whose mass reaches top_p
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))

"""Turn boundaries derived from the tokenizer's own chat template (no magic token ids).

The shared sequence is written a piece at a time: a user turn opens, its words stream in, it
closes, an agent turn opens... So we need each role's header and footer as separate token lists.
We get them by rendering the template around unique marker strings and cutting at the markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RoleMarkers", "TurnTemplate"]

_M = ("\u2063MARKA\u2063", "\u2063MARKB\u2063", "\u2063MARKC\u2063")


@dataclass(frozen=True, slots=True)
class RoleMarkers:
    """Header and footer token ids around one role's content."""

    header: tuple[int, ...]
    footer: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TurnTemplate:
    """Per-role header/footer ids plus the token that ends a user turn (for end-of-turn probability)."""

    system: RoleMarkers
    user: RoleMarkers
    agent: RoleMarkers
    eos_ids: tuple[int, ...]

    @property
    def end_of_user_turn_id(self) -> int:
        """First footer token of a user turn: P(this token) is the model's end-of-turn probability."""
        return self.user.footer[0] if self.user.footer else self.eos_ids[0]

    @property
    def end_of_agent_turn_ids(self) -> tuple[int, ...]:
        ids = set(self.eos_ids)
        if self.agent.footer:
            ids.add(self.agent.footer[0])
        return tuple(sorted(ids))

    def role(self, speaker: str) -> RoleMarkers:
        return {"system": self.system, "user": self.user, "agent": self.agent}[speaker]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TurnTemplate:
        eos = tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if not getattr(tokenizer, "chat_template", None):
            return cls._plain(tokenizer, eos_ids)

        def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        a, b, c = _M
        sys_only = render([{"role": "system", "content": a}])
        sys_user = render([{"role": "system", "content": a}, {"role": "user", "content": b}])
        full = render([{"role": "system", "content": a}, {"role": "user", "content": b},
                       {"role": "assistant", "content": c}])
        gen = render([{"role": "system", "content": a}, {"role": "user", "content": b}], gen=True)

        sys_header, rest = sys_only.split(a, 1)
        sys_footer = rest
        between_a_b = sys_user.split(a, 1)[1].split(b, 1)[0]
        user_header = between_a_b[len(sys_footer):] if between_a_b.startswith(sys_footer) else between_a_b
        user_footer = sys_user.split(b, 1)[1]
        agent_header = gen[len(sys_user):] if gen.startswith(sys_user) else ""
        between_b_c = full.split(b, 1)[1].split(c, 1)[0]
        if not agent_header:
            agent_header = between_b_c[len(user_footer):]
        agent_footer = full.split(c, 1)[1]
        bos = getattr(tokenizer, "bos_token", None)
        if bos and sys_header.startswith(bos):
            pass  # keep BOS inside the system header: it is a real sequence position

        def enc(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()

        return cls(
            system=RoleMarkers(enc(sys_header), enc(sys_footer)),
            user=RoleMarkers(enc(user_header), enc(user_footer)),
            agent=RoleMarkers(enc(agent_header), enc(agent_footer)),
            eos_ids=eos_ids,
        )

    @classmethod
    def _plain(cls, tokenizer: Any, eos_ids: tuple[int, ...]) -> TurnTemplate:
        """Fallback for base models without a chat template: 'User: ...' / 'Assistant: ...' lines."""

        def enc(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        return cls(
            system=RoleMarkers((), enc("\n\n")),
            user=RoleMarkers(enc("User: "), enc("\n")),
            agent=RoleMarkers(enc("Assistant: "), enc("\n")),
            eos_ids=eos_ids,
        )

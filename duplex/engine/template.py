"""Turn boundaries derived from the tokenizer's own chat template (no magic token ids).

The shared sequence is written a piece at a time: a user turn opens, its words stream in, it
closes, an agent turn opens... So we need each role's header and footer as separate token lists.
We get them by rendering the template around unique marker strings and cutting at the markers.
Templates without a system role (Gemma) fold the system text into the first user turn: the
system "turn" is then the user header plus the instructions, and the user turn right after it
adds no header of its own (``system_in_user_turn``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    system_in_user_turn: bool = False  # a user turn right after a system turn has no header
    # single tokens that break a line or paragraph ("\n", "\n\n", " \n"): after a finished
    # sentence a chat model puts much of its mass there rather than on the footer (more could
    # follow), so P(footer) alone reads "He was a kind man." as unfinished
    break_ids: tuple[int, ...] = ()

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
        template = cls._from_tokenizer(tokenizer)
        return replace(template, break_ids=_break_ids(tokenizer, template))

    @classmethod
    def _from_tokenizer(cls, tokenizer: Any) -> TurnTemplate:
        eos = tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if not getattr(tokenizer, "chat_template", None):
            return cls._plain(tokenizer, eos_ids)

        def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        a, b, c = _M
        try:
            sys_only = render([{"role": "system", "content": a}])
        except Exception:  # noqa: BLE001 - jinja raise_exception: "System role not supported"
            sys_only = ""
        if a not in sys_only:
            return cls._folded(tokenizer, eos_ids, render)
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
    def _folded(cls, tokenizer: Any, eos_ids: tuple[int, ...], render: Any) -> TurnTemplate:
        """A template with no system role (Gemma): the system text opens the first user turn,
        separated from the user's words the way the template itself does it (Gemma 3: a blank line)."""
        a, b, c = _M
        user = render([{"role": "user", "content": b}])
        gen = render([{"role": "user", "content": b}], gen=True)
        full = render([{"role": "user", "content": b}, {"role": "assistant", "content": c}])
        prefix, user_footer = user.split(b, 1)
        bos = getattr(tokenizer, "bos_token", None) or ""
        user_header = prefix[len(bos):] if bos and prefix.startswith(bos) else prefix
        separator = "\n\n"
        try:
            folded = render([{"role": "system", "content": a}, {"role": "user", "content": b}])
            if a in folded and b in folded.split(a, 1)[1]:
                separator = folded.split(a, 1)[1].split(b, 1)[0]
        except Exception:  # noqa: BLE001 - no system role at all (Gemma 2): keep the blank line
            pass
        agent_header = gen[len(user):] if gen.startswith(user) else full.split(b, 1)[1].split(c, 1)[0][len(user_footer):]

        def enc(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()

        return cls(
            system=RoleMarkers(enc(prefix), enc(separator)),  # BOS + user header: a real sequence position
            user=RoleMarkers(enc(user_header), enc(user_footer)),
            agent=RoleMarkers(enc(agent_header), enc(full.split(c, 1)[1])),
            eos_ids=eos_ids,
            system_in_user_turn=True,
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


def _break_ids(tokenizer: Any, template: TurnTemplate) -> tuple[int, ...]:
    """The tokenizer's single-token line and paragraph breaks, minus any turn marker."""
    markers = set(template.eos_ids) | {template.end_of_user_turn_id}
    ids: set[int] = set()
    for text in ("\n", "\n\n", " \n"):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in markers:
            ids.add(int(encoded[0]))
    return tuple(sorted(ids))

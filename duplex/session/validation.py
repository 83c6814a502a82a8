"""Input validation at ``Session.submit``: a bad input is refused with an error that names the
problem and the limit, before it can reach the session loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped
from duplex.audio.turn_features import TurnAudioFeatures
from duplex.policies import make_policy
from duplex.session.config import SessionConfig
from duplex.session.events import Cancel, PlaybackMark, TextInput, TranscriptStatus, UpdateSession

__all__ = ["MAX_TEMPERATURE", "instructions_token_limit", "max_reply_tokens_limit", "validate_input"]

MAX_TEMPERATURE = 2.0
_MARKER_SLACK_TOKENS = 16  # role header + footer around the instructions


def instructions_token_limit(config: SessionConfig) -> int:
    """Most tokens an instructions update may have. Eviction keeps the first system prompt, the
    latest instructions and a recent window; all three must fit under ``sequence.max_tokens``, or
    the instructions would be evicted (or eviction would thrash)."""
    seq = config.sequence
    room = (seq.max_tokens - seq.keep_recent_tokens) // 2 - _MARKER_SLACK_TOKENS
    return max(1, min(config.max_instructions_tokens, room))


def max_reply_tokens_limit(config: SessionConfig) -> int:
    """A reply longer than half the kept window would be cut by eviction while it is generated."""
    return max(1, config.sequence.keep_recent_tokens // 2)


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def validate_input(ev: Any, config: SessionConfig, user_text_pending: bool, pending_chars: int = 0,
                   count_tokens: Callable[[str], int] | None = None) -> tuple[str, str] | None:
    """(error code, message) for an input the session cannot take, else None. ``user_text_pending``:
    the user's turn already has text, so an empty final ``TextInput`` just ends it; ``pending_chars``:
    typed characters already buffered (a word not yet ended); ``count_tokens``: the tokenizer's count,
    for the instructions' token limit."""
    if not isinstance(ev, (TextInput, AsrWord, SpeechStarted, SpeechStopped, TranscriptStatus, TurnAudioFeatures,
                           PlaybackMark, Cancel, UpdateSession)):
        return "unknown_event", f"unknown input event {type(ev).__name__}"
    if isinstance(ev, TextInput):
        if not isinstance(ev.text, str):
            return "invalid_text", "text must be a string"
        if _not_utf8(ev.text):
            return "invalid_value", "text is not valid Unicode (it contains a lone surrogate)"
        if ev.final and not ev.text.strip() and not user_text_pending:
            return "empty_text", "text input is empty"
        if len(ev.text) > config.max_text_chars:
            return "text_too_long", (f"text input has {len(ev.text)} characters; the limit is "
                                     f"{config.max_text_chars}. Split it into smaller chunks.")
        if pending_chars + len(ev.text) > config.max_text_chars:
            return "text_too_long", (f"typed text without a word break would reach {pending_chars + len(ev.text)} "
                                     f"characters; the limit (max_text_chars) is {config.max_text_chars}")
    if isinstance(ev, PlaybackMark) and ev.heard_tokens < 0:
        return "invalid_playback_mark", "heard_tokens must be >= 0"
    if isinstance(ev, UpdateSession):
        return _validate_update(ev, config, count_tokens)
    return None


def _validate_update(ev: UpdateSession, config: SessionConfig,
                     count_tokens: Callable[[str], int] | None) -> tuple[str, str] | None:
    if ev.temperature is not None and (isinstance(ev.temperature, bool) or not isinstance(ev.temperature, (int, float))
                                       or not math.isfinite(ev.temperature)
                                       or not 0.0 <= ev.temperature <= MAX_TEMPERATURE):
        return "invalid_value", f"temperature must be a number between 0 and {MAX_TEMPERATURE:g}, got {ev.temperature!r}"
    if ev.max_reply_tokens is not None:
        limit = max_reply_tokens_limit(config)
        if isinstance(ev.max_reply_tokens, bool) or not isinstance(ev.max_reply_tokens, int) \
                or not 1 <= ev.max_reply_tokens <= limit:
            return "invalid_value", (f"max_reply_tokens must be an integer from 1 to {limit} (half the kept "
                                     f"window), got {ev.max_reply_tokens!r}")
    if ev.instructions is not None:
        text = ev.instructions
        if not isinstance(text, str):
            return "invalid_value", "instructions must be a string"
        if _not_utf8(text):
            return "invalid_value", "instructions are not valid Unicode (they contain a lone surrogate)"
        if len(text) > config.max_instructions_chars:
            return "instructions_too_long", (f"instructions have {len(text)} characters; the limit "
                                             f"(max_instructions_chars) is {config.max_instructions_chars}")
        if count_tokens is not None:
            n, limit = count_tokens(text), instructions_token_limit(config)
            if n > limit:
                return "instructions_too_long", (f"instructions are {n} tokens; the limit is {limit} tokens "
                                                 "(longer ones would be evicted from the conversation)")
    if ev.policy is not None or ev.policy_params is not None:
        name = ev.policy or config.policy  # the same choice of params as Session._update makes
        same = ev.policy is None or ev.policy == config.policy
        params = ev.policy_params if ev.policy_params is not None else (config.policy_params if same else {})
        try:
            make_policy(name, **params)
        except (ValueError, TypeError) as exc:
            return "invalid_policy", f"policy {name!r} with policy_params {params!r}: {exc}"
    return None

"""Input validation at ``Session.submit``: a bad input is refused with an error that names the
problem, before it can reach the session loop."""

from __future__ import annotations

from typing import Any

from duplex.audio.events import AsrWord, SpeechStarted, SpeechStopped
from duplex.policies import make_policy
from duplex.session.config import SessionConfig
from duplex.session.events import Cancel, PlaybackMark, TextInput, UpdateSession

__all__ = ["validate_input"]


def validate_input(ev: Any, config: SessionConfig, user_text_pending: bool) -> tuple[str, str] | None:
    """(error code, message) for an input the session cannot take, else None. ``user_text_pending``:
    the user's turn already has text, so an empty final ``TextInput`` just ends it."""
    if not isinstance(ev, (TextInput, AsrWord, SpeechStarted, SpeechStopped, PlaybackMark, Cancel, UpdateSession)):
        return "unknown_event", f"unknown input event {type(ev).__name__}"
    if isinstance(ev, TextInput):
        if not isinstance(ev.text, str):
            return "invalid_text", "text must be a string"
        if ev.final and not ev.text.strip() and not user_text_pending:
            return "empty_text", "text input is empty"
        if len(ev.text) > config.max_text_chars:
            return "text_too_long", (f"text input has {len(ev.text)} characters; the limit is "
                                     f"{config.max_text_chars}. Split it into smaller chunks.")
    if isinstance(ev, PlaybackMark) and ev.heard_tokens < 0:
        return "invalid_playback_mark", "heard_tokens must be >= 0"
    if isinstance(ev, UpdateSession) and ev.policy is not None:
        try:
            make_policy(ev.policy, **(ev.policy_params or {}))
        except (ValueError, TypeError) as exc:
            return "invalid_policy", str(exc)
    return None

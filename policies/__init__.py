"""Read/write interaction policies, registered by name (``make_policy("eou")``)."""

from __future__ import annotations

from .base import (Action, Backchannel, BargeInRules, Continue, Listen, Observation, Pause, Policy, Resume, Speak,
                   Yield, available_policies, is_stop_phrase, make_policy, register_policy)
from .simple import EouPolicy, HalfDuplexPolicy, SilencePolicy
from .smart_turn import SmartTurnPolicy
from .learned import LearnedPolicy

__all__ = [
    "Action", "Backchannel", "BargeInRules", "Continue", "EouPolicy", "HalfDuplexPolicy", "LearnedPolicy", "Listen",
    "Observation", "Pause", "Policy", "Resume", "SilencePolicy", "SmartTurnPolicy", "Speak", "Yield",
    "available_policies", "is_stop_phrase", "make_policy", "register_policy",
]

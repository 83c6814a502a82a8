"""The read/write interaction policy interface: pure ``decide(observation) -> action``.

Policies do no I/O and read no clock: time arrives inside the :class:`Observation`. That makes
live sessions, tests with a fake clock and offline evaluation replays behave identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Action", "Backchannel", "BargeInRules", "Continue", "Listen", "Observation", "Pause", "Policy", "Resume", "Speak",
    "Yield", "agent_backchannel", "is_stop_phrase",
    "available_policies", "make_policy", "register_policy",
]


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything a policy may look at, at time ``t`` (seconds)."""

    t: float
    user_speaking: bool = False
    agent_speaking: bool = False  # generating, or its audio is still playing
    silence_s: float | None = None  # since the user's speech (or typing) ended; None while speaking
    overlap_s: float = 0.0  # user speech while the agent speaks, in the current overlap
    user_turn_words: int = 0  # words so far in the current user turn (committed + tentative)
    partial_text: str = ""  # current user turn text, tentative words included
    user_turn_final: bool = False  # an explicit end of turn (typed text submitted)
    agent_pending_tokens: int = 0  # generated, not yet delivered to the user
    agent_spoken_tokens: int = 0  # delivered to the user in the current agent turn
    eou_prob: float | None = None  # model's P(end of user turn) after the committed prefix
    # model's P(a line/paragraph break) there: after a finished statement it hedges between that
    # and the end of the turn ("He was a kind man." -> "\n" 0.26, end 0.03)
    sentence_break_prob: float | None = None
    agent_paused: bool = False  # the agent's audio is paused while the user's overlap is judged
    transcript_pending: bool = False  # the user's sound has ended, its final words are on the way
    overlap_ended: bool = False  # the user's sound over the agent has stopped (VAD), judged or not
    user_speech_s: float = 0.0  # how long the user has been talking, while talking (0 otherwise)
    since_agent_backchannel_s: float | None = None  # since the agent's own last "mm-hm"; None: never
    # the user's words, split (user_turn_words counts both)
    committed_words: int = 0
    tentative_words: int = 0
    # acoustic features of the user's latest pause (audio.turn_features.TurnAudioFeatures), None
    # until one arrives in this user turn (typed text never has them)
    audio_eot_prob: float | None = None  # Smart Turn v3.2's P(the turn is complete)
    pitch_slope_st_s: float | None = None  # pitch slope over the last voiced 0.5 s, semitones/s
    pitch_end_st: float | None = None  # final pitch relative to the utterance's median, semitones
    energy_slope_db_s: float | None = None  # loudness slope over the last voiced 0.5 s, dB/s
    speech_s: float | None = None  # voiced duration of the utterance before the pause
    vad_mean_1s: float | None = None  # mean VAD speech probability over its last second
    vad_mean: float | None = None  # mean VAD speech probability over the analysed segment
    # the user's current turn began by talking over the agent, which yielded: what they say is a
    # correction or a new request, and they wait for the answer
    after_interruption: bool = False
    # whisper's mean probability for the current user turn's heard words (None: none yet, or typed)
    word_confidence: float | None = None
    type: str = "observation"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def turn_open(self) -> bool:
        """The moment a turn policy decides: the user has said something and stopped (silence
        counts only once their final words are in), has not submitted typed text, and the agent
        is silent. The learned policy is trained on these ticks; the session computes acoustic
        turn features only while the policy listens at one."""
        return (not self.agent_speaking and not self.user_speaking and self.silence_s is not None
                and not self.user_turn_final and (self.user_turn_words > 0 or bool(self.partial_text.strip())))


@dataclass(frozen=True, slots=True)
class Listen:
    type: str = "listen"


@dataclass(frozen=True, slots=True)
class Speak:
    """Take or keep the floor and generate up to ``n_tokens`` more tokens before asking again."""

    n_tokens: int = 1
    type: str = "speak"


@dataclass(frozen=True, slots=True)
class Yield:
    """Stop speaking now; the session rolls back to what the user heard."""

    reason: str = "barge_in"
    type: str = "yield"


@dataclass(frozen=True, slots=True)
class Continue:
    """Keep speaking through user sound judged to be a backchannel."""

    reason: str = "backchannel"
    type: str = "continue"


@dataclass(frozen=True, slots=True)
class Pause:
    """Pause the agent's audio now (user sound over the agent) and decide later: resume or yield.
    Generation may go on into the cache meanwhile; nothing new is played until then."""

    reason: str = "overlap"
    type: str = "pause"


@dataclass(frozen=True, slots=True)
class Resume:
    """Undo a pause: the overlap was a backchannel or noise; play on exactly where it paused."""

    reason: str = "backchannel"
    type: str = "resume"


@dataclass(frozen=True, slots=True)
class Backchannel:
    """Emit a short acknowledgement without taking the turn (the user keeps the floor)."""

    text: str = "mm-hm"
    type: str = "backchannel"


def agent_backchannel(obs: Observation, every_s: float | None, text: str = "mm-hm") -> Backchannel | None:
    """While the user talks at length, acknowledge every ``every_s`` seconds of their speech
    (``None``: never, the default). Never over the agent's own speech."""
    if every_s is None or obs.agent_speaking or not obs.user_speaking or obs.user_speech_s < every_s:
        return None
    if obs.since_agent_backchannel_s is not None and obs.since_agent_backchannel_s < every_s:
        return None
    return Backchannel(text)


Action = Listen | Speak | Yield | Continue | Pause | Resume | Backchannel


class Policy(Protocol):
    name: str

    def decide(self, obs: Observation) -> Action:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    def deco(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **params: Any) -> Policy:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _REGISTRY[name](**params)


# Acknowledgement tokens. Used only together with duration and word count: "yeah" said for two
# seconds, or followed by more words, is a turn, not a backchannel.
_ACK_WORDS = frozenset({
    "mm", "mhm", "mm-hm", "mmhm", "mm-hmm", "mhmm", "hmm-hmm", "uh-uh", "hm", "hmm", "uh-huh", "uhhuh", "uh", "huh", "yeah", "yep", "yes", "ok",
    "okay", "right", "sure", "aha", "ah", "oh", "wow", "cool", "nice", "great", "true", "exactly", "totally",
    "i", "see", "got", "it", "indeed", "alright", "good",
})
# Words that mean "stop now" whatever their length.
_STOP_WORDS = frozenset({"stop", "wait", "hold", "no", "pause", "quiet", "enough", "sorry", "excuse", "actually"})


def _words(text: str) -> list[str]:
    return [w.strip(".,!?;:\"'()").lower() for w in text.split() if w.strip(".,!?;:\"'()")]


def is_stop_phrase(text: str) -> bool:
    """Does the user's sound start with a word that means "stop" ("wait", "no", "sorry")? Also
    used by the session for the late words of a sound it already judged to be a backchannel."""
    return any(w in _STOP_WORDS for w in _words(text)[:2])


@dataclass(frozen=True, slots=True)
class BargeInRules:
    """Shared by every overlapping policy: what user sound during agent speech means.

    Pause first, decide after: the moment the user is heard over the agent its audio pauses
    (``pause_on_overlap``), which costs nothing if the sound turns out to be a backchannel, and
    leaves time to wait for words. Yield once the overlap holds ``min_words`` words with content
    (after ``min_overlap_ms``), a stop word, or lasts ``backchannel_max_ms`` while still going on.
    When the overlap ends as at most ``backchannel_max_words`` acknowledgement words (or no words:
    a cough, a door), resume where the audio paused.

    A sound shorter than ``resume_sound_ms`` resumes at once, without waiting for its words:
    acknowledgements are short ("uh-huh" is about 0.3 s), and what ASR makes of half a second
    over the agent's own voice is unreliable ("uh-huh" came back as "Sir Sir" in ``bench
    realtime``). Its late words can still turn it into a yield with a stop word ("wait", "no");
    any other late words only go into the backchannel note. The cost: a one-word question under
    ``resume_sound_ms`` ("what?") is taken for an acknowledgement. Words that arrive while such a
    sound goes on count only if whisper is confident of them (``min_word_confidence``: its guesses
    at a backchannel came back at 0.1-0.7, real words over the agent at 0.8-1.0).
    """

    min_overlap_ms: float = 600.0
    min_words: int = 3
    backchannel_max_words: int = 2
    backchannel_max_ms: float = 1500.0
    pause_on_overlap: bool = True
    words_wait_ms: float = 1500.0  # how long a paused agent waits for the final words of an overlap
    short_sound_ms: float = 1000.0  # if they never come, a sound this short (VAD hangover included) resumes
    resume_sound_ms: float = 700.0  # a sound shorter than this resumes at its end, words or not (0: off)
    # words of an overlap shorter than short_sound_ms whose mean whisper probability is below this
    # are its guesses at a short sound (0.5 s "yeah yeah" heard as "You are you"), not words: they
    # neither yield nor count (stop words still do). 0: off
    min_word_confidence: float = 0.5
    type: str = "barge_in_rules"

    def decide(self, obs: Observation) -> Action | None:
        """None when nothing overlaps; otherwise Pause, Yield, Resume or Continue."""
        if not obs.agent_speaking:
            return None
        if obs.overlap_s <= 0 and not obs.user_speaking and not obs.partial_text.strip():
            return None
        words = _words(obs.partial_text)
        if obs.user_turn_final and words:
            return Yield("text")  # typed and submitted over the agent: an explicit barge-in
        if is_stop_phrase(obs.partial_text):
            return Yield("stop_word")
        overlap_ms = obs.overlap_s * 1000
        if (obs.word_confidence is not None and obs.word_confidence < self.min_word_confidence
                and overlap_ms < self.short_sound_ms):
            words = []  # guesses at a short sound: judged by its length, as one without words
        content = [w for w in words if w not in _ACK_WORDS]
        if len(content) >= 1 and len(words) >= self.min_words:
            return Yield("words")
        if obs.user_speaking:
            # one content word may still be a cut-off tentative word ("yea-"): wait for a second
            if overlap_ms >= self.min_overlap_ms and (len(content) >= 2 or len(words) > self.backchannel_max_words):
                return Yield("overlap")
            if overlap_ms >= self.backchannel_max_ms:
                return Yield("overlap")  # too long for a backchannel, words or not
            return Pause("overlap") if self.pause_on_overlap else Continue("pending")
        # the overlap has ended: a short sound is an acknowledgement (see above) ...
        if obs.overlap_ended and overlap_ms < self.resume_sound_ms:
            return Resume("backchannel") if obs.agent_paused else Continue("backchannel")
        # ... a longer one is judged from its final words (bounded wait)
        if obs.transcript_pending and obs.agent_paused and (obs.silence_s or 0.0) * 1000 < self.words_wait_ms:
            return Pause("words_pending")
        if content and not (obs.transcript_pending and overlap_ms < self.short_sound_ms):
            return Yield("words")  # "what?" or a name: a short turn, not an acknowledgement
        # (a short sound whose final words never came is judged by its length: a backchannel)
        return Resume("backchannel") if obs.agent_paused else Continue("backchannel")

"""The voice defaults, in one place: every path that talks to a user (``serve``, ``talk``, the
benchmarks and the evaluation) builds its pipeline from :func:`default_voice_config`.

The VAD's silence hangover is short on purpose: the final ASR pass at the end of speech and the
turn policy (not the VAD) decide when the user's turn is over.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

from duplex.audio.asr import StreamingAsr
from duplex.audio.speech_input import SpeechInput
from duplex.audio.turn_features import default_turn_features
from duplex.audio.vad import FrameVad, VadSegmenter, WebRtcVad
from duplex.session.config import DEFAULT_INSTRUCTIONS, SessionConfig

__all__ = ["EOU_VOICE_PARAMS", "SERVED_POLICY_PARAMS", "VAD_MIN_SILENCE_MS", "VOICE_POLICY", "VoiceConfig",
           "default_voice_config", "make_speech_input", "voice_policy_params", "voice_session_config"]

VAD_MIN_SILENCE_MS = 200
# The served default. learned (policies/learned) won the served turn-policy comparison on the test
# voices, 48 scenarios with short complete turns and long unfinished halves among them: turn-taking
# latency 0.697 s against eou 0.739, silence 0.850, smart-turn 0.862, and no worse on any of the four
# take-over rates (pause 0.19 against 0.56 / 0.69 / 0.38); bench/results/xeon/policies-measured-fair.json.
VOICE_POLICY = "learned"
# eou's served parameters (it is no longer the default, but a session that names it gets these):
# The VAD's hangover and the final ASR pass already are the acoustic gap, so the model's
# end-of-turn belief only adds time when the words look unfinished; then it waits up to 1.5 s
# ("So my plan for tomorrow is to ..."). With 700 ms, once the path got fast, the agent talked for
# over a second into 2 of 5 mid-sentence pauses (TOR pause 0.4, bench/results/realtime-long-gap-700.json).
# The belief counts the model's sentence-break mass after a finished sentence (sentence_breaks):
# with the footer alone, read prose ("...to do for them.") looked unfinished: after LibriVox speech
# the turn was taken ~1 s after the last words (stage p50s); with both, 27 ms, and the synthetic
# scenarios' take-over rates did not move (bench/results/ab-sentence-breaks/, confident 0.3 vs 0.2).
EOU_VOICE_PARAMS: dict[str, Any] = {"short_gap_ms": 0.0, "long_gap_ms": 1500.0, "confident": 0.3,
                                    "unlikely": 0.02, "sentence_breaks": True}
# The parameters each policy is served with when a session names it without any. Per policy, not
# only for the default: a session that asks for eou by name gets the tuned eou, whatever the default.
SERVED_POLICY_PARAMS: dict[str, dict[str, Any]] = {"eou": EOU_VOICE_PARAMS}


@dataclass(frozen=True, slots=True)
class VoiceConfig:
    """One voice conversation's settings.

    ``first_clause_words``: the first TTS clause of a reply is cut after this many words so audio
    starts early; later clauses follow punctuation (up to ``clause_words`` words).
    ``hold_stop_for_final_words``: the session sees the end of speech only once the utterance's
    final ASR pass has delivered its words, so a reply never misses the last words.
    """

    session: SessionConfig = field(default_factory=SessionConfig)
    vad_min_silence_ms: int = VAD_MIN_SILENCE_MS
    # periodic whisper passes while the user speaks. Every second, not every 500 ms: words that
    # agree across passes a second apart are better agreed (WER on the LibriVox clips 5.6 % vs
    # 11.3 %: `duplex bench asr`), whisper takes half the CPU (RTF 0.21 vs 0.45), and the turn
    # only needs them by its end (bench/results/ab-asr-schedule/). A translation asks for 500 ms
    # (TranslateSession.asr_interval_ms): its latency is counted per word.
    asr_interval_ms: int = 1000
    # The final pass starts this long into a pause (its result is reused if only silence
    # follows), and no periodic pass starts once the silence is ``skip_pass_after_silence_ms``
    # long: one running then would hold the ASR thread when the turn-end pass is due.
    speculate_after_silence_ms: float = 80.0
    skip_pass_after_silence_ms: float = 40.0
    first_clause_words: int = 1
    clause_words: int = 14
    hold_stop_for_final_words: bool = True
    hold_decode_for_first_audio: bool = True  # decode waits while the reply's first word is synthesised
    # turn features (Smart Turn, prosody) at every pause even when the policy does not read them:
    # the decision log (policies/learned's training data) then has them for every policy
    turn_features_always: bool = False
    type: str = "voice_config"

    def with_session(self, **changes: Any) -> VoiceConfig:
        return replace(self, session=replace(self.session, **changes))


def voice_policy_params(policy: str) -> dict[str, Any]:
    """The parameters a voice session runs ``policy`` with when none are given."""
    return dict(SERVED_POLICY_PARAMS.get(policy, {}))


def voice_session_config(policy: str = VOICE_POLICY, **overrides: Any) -> SessionConfig:
    """Session settings for a voice conversation: the voice policy gets its tuned parameters."""
    params = voice_policy_params(policy)
    overrides.setdefault("instructions", DEFAULT_INSTRUCTIONS)
    overrides.setdefault("policy_params", params)
    return SessionConfig(policy=policy, **overrides)


def default_voice_config(policy: str | None = None, **session_overrides: Any) -> VoiceConfig:
    """The voice defaults (talk, serve, bench and eval all start here)."""
    return VoiceConfig(session=voice_session_config(policy or VOICE_POLICY, **session_overrides))


def make_speech_input(whisper: Any, config: VoiceConfig | None = None, vad: FrameVad | None = None,
                      whisper_lock: threading.Lock | None = None, **speech_options: Any) -> SpeechInput:
    """VAD (WebRTC unless given) + streaming whisper with the voice defaults. ``whisper_lock``:
    shared by every stream that uses the same model (passes run one at a time)."""
    config = config or VoiceConfig()
    segmenter = VadSegmenter(vad if vad is not None else WebRtcVad(), min_silence_ms=config.vad_min_silence_ms)
    speech_options.setdefault("asr_interval_ms", config.asr_interval_ms)
    speech_options.setdefault("speculate_after_silence_ms", config.speculate_after_silence_ms)
    speech_options.setdefault("skip_pass_after_silence_ms", config.skip_pass_after_silence_ms)
    if "turn_features" not in speech_options:  # Smart Turn + prosody at each pause, for the turn policy
        speech_options["turn_features"] = default_turn_features()
    return SpeechInput(segmenter, StreamingAsr(whisper, lock=whisper_lock), **speech_options)

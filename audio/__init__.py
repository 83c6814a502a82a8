"""duplex.audio: speech I/O stages (convert, VAD, streaming ASR, TTS, devices).

Every stage is a sync, I/O-free object with ``push``/``flush``; model loading and passes are
blocking and belong on a worker thread (``AsyncSpeechInput`` brings its own).
"""

from __future__ import annotations

from .asr import StreamingAsr, load_whisper
from .clauses import ClauseChunker
from .convert import read_wav, to_mono_16k
from .devices import AudioDeviceError, MicrophoneStream, SpeakerStream
from .events import AsrWord, AudioFormatError, Clause, SpeechStarted, SpeechStopped, TtsChunk
from .playback import PlaybackLedger
from .speech_input import AsyncSpeechInput, SpeechInput
from .tts import CachedTts, EspeakTts, FliteTts, PiperTts, StreamingTts, load_tts
from .vad import SileroVad, VadSegmenter, WebRtcVad

__all__ = [
    "AsrWord", "AsyncSpeechInput", "AudioDeviceError", "AudioFormatError", "CachedTts", "Clause",
    "ClauseChunker", "EspeakTts", "FliteTts", "MicrophoneStream", "PiperTts", "PlaybackLedger",
    "SileroVad", "SpeakerStream", "SpeechInput", "SpeechStarted", "SpeechStopped",
    "StreamingAsr", "StreamingTts", "TtsChunk", "VadSegmenter", "WebRtcVad", "load_tts",
    "load_whisper", "read_wav", "to_mono_16k",
]

"""``duplex talk``: local voice chat through the default microphone and speaker, with barge-in.

Echo handling — half-duplex mic gating unless ``--headphones``. Without echo cancellation the
microphone hears the agent's own voice; whisper transcribes it into words, and the barge-in rules
(3 words, or a stop word) would then cut the agent off with its own speech. An energy gate against
the playback reference (pass the mic only when it is much louder than the expected echo) depends
on the speaker volume, the room and the device latency, and when it is wrong it fails the bad way:
a false barge-in truncates the reply mid-sentence. So without headphones the mic is replaced by
silence while agent audio is queued or playing, plus a 300 ms tail for the device latency and the
room's reverberation: the gate is driven by the playback reference itself (queued and played
samples), never by a level guess. Press Enter to interrupt instead. With ``--headphones`` there is
no echo path and the mic stays open: talk over the agent to interrupt it (full duplex).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass, field

import numpy as np

from duplex.audio.asr import load_whisper
from duplex.audio.devices import AudioDeviceError, MicrophoneStream, SpeakerStream, find_device
from duplex.audio.tts import CachedTts, load_tts
from duplex.engine.worker import Engine
from duplex.voice.config import default_voice_config, make_speech_input
from duplex.voice.outputs import AudioCleared, AudioOut, AudioPaused, AudioResumed
from duplex.voice.pipeline import VoicePipeline

__all__ = ["MicGate", "PlaybackTracker", "converse", "run_talk"]

log = logging.getLogger(__name__)

EXIT_NO_DEVICE = 2
_REPORT_S = 0.04


@dataclass(slots=True)
class MicGate:
    """Half-duplex gate: mic blocks become silence while the speaker plays and ``tail_s`` after."""

    headphones: bool = False
    tail_s: float = 0.3
    _open_at: float = 0.0

    def process(self, block: np.ndarray, now_s: float, speaker_busy: bool) -> np.ndarray:
        if self.headphones:
            return block
        if speaker_busy:
            self._open_at = now_s + self.tail_s
        if speaker_busy or now_s < self._open_at:
            return np.zeros_like(block)
        return block


@dataclass(slots=True)
class PlaybackTracker:
    """Maps the speaker's global sample counters to samples played within each agent turn."""

    enqueued: int = 0  # samples handed to the speaker and not dropped
    turn_base: dict[int, int] = field(default_factory=dict)

    def queued(self, turn: int, offset_samples: int, n_samples: int) -> None:
        self.turn_base.setdefault(turn, self.enqueued - offset_samples)
        self.enqueued += n_samples

    def dropped(self, n_samples: int) -> None:
        self.enqueued -= n_samples

    def played_in_turn(self, turn: int, heard_samples: int) -> int:
        base = self.turn_base.get(turn)
        return 0 if base is None else max(0, heard_samples - base)

    def prune(self, heard_samples: int) -> None:
        """Forget turns whose successor has started playing: they are fully heard."""
        turns = sorted(self.turn_base)
        for older, newer in zip(turns, turns[1:]):
            if self.turn_base[newer] <= heard_samples:
                del self.turn_base[older]


async def run_talk(args: argparse.Namespace) -> int:
    """Returns 0 on a clean exit, 2 when there is no usable audio device."""
    try:
        find_device("input")
        find_device("output")
    except AudioDeviceError as exc:  # before loading any model: fail fast and clearly
        print(f"duplex talk: {exc}", file=sys.stderr)
        print("duplex talk needs a microphone and a speaker; try `duplex chat` for text, or "
              "`duplex serve` for the browser", file=sys.stderr)
        return EXIT_NO_DEVICE
    print("loading models ...", file=sys.stderr)
    engine, whisper, tts = await asyncio.gather(
        asyncio.to_thread(Engine.load, args.model, args.device, args.dtype),
        asyncio.to_thread(load_whisper, None),
        asyncio.to_thread(lambda: CachedTts(load_tts(args.tts))),
    )
    mic = MicrophoneStream()
    speaker = SpeakerStream(sample_rate_hz=int(tts.sample_rate_hz))
    try:
        await mic.start()
        await speaker.start()
    except AudioDeviceError as exc:
        mic.close()
        speaker.close()
        engine.close()
        print(f"duplex talk: {exc}", file=sys.stderr)
        return EXIT_NO_DEVICE
    config = default_voice_config(args.policy)
    voice = VoicePipeline(engine, config, speech_factory=lambda: make_speech_input(whisper, config), tts=tts)
    mode = "headphones: talk over the agent to interrupt" if args.headphones else \
        "speaker: the mic is muted while the agent talks; press Enter to interrupt"
    print(f"listening ({mode}). Ctrl-C to quit.", file=sys.stderr)
    try:
        await converse(voice, mic, speaker, headphones=bool(args.headphones), keyboard=True)
    except asyncio.CancelledError:
        pass
    finally:
        await voice.close()
        mic.close()
        speaker.close()
        engine.close()
    return 0


async def converse(voice: VoicePipeline, mic: MicrophoneStream, speaker: SpeakerStream, *, headphones: bool,
                   keyboard: bool = False) -> None:
    """The sounddevice transport around the voice pipeline: mic blocks in (through the echo
    gate), agent audio out to the speaker, played positions back. Runs until cancelled."""
    await voice.start()
    tracker = PlaybackTracker()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_mic_loop(voice, mic, speaker, MicGate(headphones=headphones)))
        tg.create_task(_output_loop(voice, speaker, tracker))
        tg.create_task(_playback_loop(voice, speaker, tracker))
        if keyboard:
            tg.create_task(_keyboard_loop(voice))


async def _mic_loop(voice: VoicePipeline, mic: MicrophoneStream, speaker: SpeakerStream, gate: MicGate) -> None:
    loop = asyncio.get_running_loop()
    while True:
        block = await mic.read()
        busy = speaker.queued_samples > 0 and not speaker.paused  # a paused speaker makes no echo
        await voice.push_audio(gate.process(block, loop.time(), busy))


async def _output_loop(voice: VoicePipeline, speaker: SpeakerStream, tracker: PlaybackTracker) -> None:
    async for item in voice.outputs():
        if isinstance(item, AudioOut):
            if item.chunk.sample_rate_hz != speaker.sample_rate_hz:
                log.warning("dropping a %d Hz chunk on a %d Hz speaker", item.chunk.sample_rate_hz,
                            speaker.sample_rate_hz)
                continue
            tracker.queued(item.turn, item.offset_samples, len(item.chunk.pcm))
            speaker.play(item.chunk.pcm)
        elif isinstance(item, AudioPaused):
            speaker.pause()  # the user spoke over the agent: hold its audio until resumed or cleared
        elif isinstance(item, AudioResumed):
            speaker.resume()
        elif isinstance(item, AudioCleared):
            tracker.dropped(speaker.stop())
            voice.report_played(item.turn, tracker.played_in_turn(item.turn, speaker.heard_samples))
            print("  [interrupted]", file=sys.stderr)
        elif item.type == "user_transcript" and getattr(item, "committed", False):
            print(f"you>   {item.text}", file=sys.stderr)  # type: ignore[union-attr]
        elif item.type == "turn_ended" and getattr(item, "speaker", "") == "agent":
            print(f"agent> {item.text}", file=sys.stderr)  # type: ignore[union-attr]
        elif item.type == "error":
            print(f"  error: {item.message}", file=sys.stderr)  # type: ignore[union-attr]


async def _playback_loop(voice: VoicePipeline, speaker: SpeakerStream, tracker: PlaybackTracker) -> None:
    """Report what has left the speaker for every turn with audio, every 40 ms."""
    while True:
        await asyncio.sleep(_REPORT_S)
        heard = speaker.heard_samples
        for turn in list(tracker.turn_base):
            voice.report_played(turn, tracker.played_in_turn(turn, heard))
        tracker.prune(heard)


async def _keyboard_loop(voice: VoicePipeline) -> None:
    """Enter interrupts the agent (the only way to, without headphones)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):
        return  # no usable stdin (e.g. a pipe that closed): voice only
    while await reader.readline():
        voice.cancel()

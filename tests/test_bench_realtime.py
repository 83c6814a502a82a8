"""The loopback benchmark: the virtual speaker's arithmetic, and the browser-like client against a
real in-process server (tiny random model, fake ASR/TTS, energy VAD) over a real socket.

Facts only (an agent turn happened, marks and truncates were sent, the records score); timeouts
are hang guards and nothing asserts on time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from duplex.audio.fakes import EnergyVad, FakeTts, FakeWhisper
from duplex.bench.loopback import LoopbackConfig, run_episode
from duplex.bench.realtime import RealtimeConfig, bench_realtime, episode_latencies, summarize_realtime
from duplex.bench.servers import in_process_server
from duplex.bench.speaker import PlayedFrame, VirtualSpeaker, heard_tokens
from duplex.engine.sampling import SamplingConfig
from duplex.eval.metrics import episode_metrics
from duplex.eval.scenario import AudioItem, Cue, Scenario, load_scenario, render_user_audio, resolve_cues, save_scenario
from duplex.session.core import SessionConfig

from tests.fakes import tone_wav

SR = 16_000


def write_short_scenarios(directory: Path) -> dict[str, Path]:
    """A 4.5 s turn-taking scenario and a 6 s interruption scenario made of tone bursts."""
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    tone_wav(directory / "audio" / "q.wav", 1.0)
    q = AudioItem(0.3, "audio/q.wav", "a question")
    scenarios = [
        Scenario("turn_taking-0", "turn_taking", (q,), (Cue("end_of_turn", item=0),), 4.5),
        Scenario("interruption-0", "interruption", (q, AudioItem(3.6, "audio/q.wav", "wait")),
                 (Cue("end_of_turn", item=0), Cue("interruption", item=1)), 6.0),
    ]
    out = {}
    for s in scenarios:
        out[s.category] = directory / f"{s.id}.json"
        save_scenario(s, out[s.category])
    return out


def _frame(turn: int, offset: int, samples: int, t: float, rate: int = 1000) -> PlayedFrame:
    header = {"turn": turn, "sample_offset": offset, "sample_rate_hz": rate, "token_start": 0, "token_end": 1,
              "text": " hi"}
    return PlayedFrame.from_header(header, np.zeros(samples, "<i2").tobytes(), t)


# ---- the virtual speaker (pure) ------------------------------------------------------------
def test_speaker_plays_back_to_back_pauses_and_stops() -> None:
    sp = VirtualSpeaker()
    sp.push(_frame(1, 0, 500, 0.0), 0.0)  # 0.5 s at 1 kHz, plays from arrival
    sp.push(_frame(1, 500, 500, 0.2), 0.2)  # queued behind it
    assert sp.position(1, 0.25) == 250 and sp.queued_end_t(0.25) == pytest.approx(1.0)
    sp.pause(0.7)  # 200 samples into the second frame
    assert sp.position(1, 5.0) == 700 and sp.playing_turn(5.0) is None and sp.pending(5.0)
    sp.resume(6.0)
    assert sp.position(1, 6.1) == 800
    sp.push(_frame(2, 0, 1000, 6.2), 6.2)  # the next turn queues after turn 1
    assert sp.stop(1, 6.2) == 900 and sp.playing_turn(6.2) == 2  # turn 2 starts at once
    sp.finish(6.5)
    pieces = [p for f in sp.frames for p in f.pieces]
    assert [(n) for _, _, n in pieces] == [500, 200, 200, 300]
    assert pieces[2][0] == pytest.approx(6.0)  # the split frame resumed where it was paused


def test_heard_tokens_follows_the_token_offsets() -> None:
    headers = [{"sample_offset": 0, "samples": 100, "token_start": 0, "token_end": 3,
                "token_offsets_samples": [0, 40, 70]},
               {"sample_offset": 100, "samples": 50, "token_start": 3, "token_end": 5,
                "token_offsets_samples": [0, 20]}]
    assert [heard_tokens(headers, p) for p in (0, 39, 40, 70, 99, 100, 120, 150)] == [0, 0, 1, 2, 2, 3, 4, 5]


# ---- against a real server -----------------------------------------------------------------
def _server_kwargs(chars_per_s: float, max_tokens: int) -> dict[str, Any]:
    config = SessionConfig(policy="silence", sampling=SamplingConfig(temperature=1.0, max_tokens=max_tokens),
                           truncate_wait_ms=2000)
    return {"config": config, "tts": FakeTts(chars_per_s=chars_per_s), "asr": FakeWhisper(), "vad_factory": EnergyVad}


def _load(path: Path) -> tuple[Scenario, Any, tuple[Cue, ...]]:
    s = load_scenario(path)
    user = render_user_audio(s)
    return s, user, resolve_cues(s, user)


def _client_events(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r["event"] for r in records if r["type"] == "client_event" and r["event"]["type"] == kind]


async def test_loopback_turn_taking_episode_scores_with_the_eval_metrics(tmp_path: Path, tiny_engine) -> None:
    paths = write_short_scenarios(tmp_path)
    scenario, user, cues = _load(paths["turn_taking"])
    async with in_process_server(tiny_engine, **_server_kwargs(chars_per_s=80.0, max_tokens=8)) as url:
        result = await run_episode(url, scenario, user, cues, LoopbackConfig(), label="silence")
    records = list(result.records)
    kinds = {r["type"] for r in records}
    assert {"episode", "cue", "user_speech", "server_event", "client_event", "turn_started", "agent_audio",
            "episode_end"} <= kinds
    assert records[0]["type"] == "episode" and records[-1]["type"] == "episode_end"
    assert [r["t"] for r in records[1:]] == sorted(r["t"] for r in records[1:])
    json.dumps(records)  # JSON-ready
    update = _client_events(records, "session.update")[0]["session"]
    assert update["output_modalities"] == ["text", "audio"] and update["input_audio_format"]["sample_rate_hz"] == SR
    server = {r["event"]["type"] for r in records if r["type"] == "server_event"}
    assert {"session.created", "session.updated", "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped", "response.created", "response.output_text.delta",
            "response.output_audio.delta"} <= server
    assert result.stats["mic_frames"] == len(user.audio) // 320
    marks = _client_events(records, "playback.mark")
    assert marks and all("audio_end_ms" in m and "heard_tokens" in m for m in marks)
    if "response.output_audio.done" in server:  # the whole reply played within the episode
        assert any(m.get("done") for m in marks)
    m = episode_metrics(records)
    assert m.category == "turn_taking" and m.policy == "silence" and m.agent_turns >= 1 and m.tor is not None
    lat = episode_latencies(records)
    (reply,) = lat["replies"]
    assert reply["turn"] is not None and reply["stages_s"]["first_audio_played"] is not None
    assert set(reply["stages_s"]) >= {"speech_stopped", "transcription_completed", "first_text_delta",
                                      "first_audio_received", "first_audio_played"}


async def test_loopback_barge_in_stops_playback_and_truncates(tmp_path: Path, tiny_engine) -> None:
    paths = write_short_scenarios(tmp_path)
    scenario, user, cues = _load(paths["interruption"])
    # slow fake speech: the reply is still playing when the user barges in at 3.6 s
    async with in_process_server(tiny_engine, **_server_kwargs(chars_per_s=6.0, max_tokens=60)) as url:
        result = await run_episode(url, scenario, user, cues, LoopbackConfig(), label="silence")
    records = list(result.records)
    interrupted = [r for r in records if r["type"] == "interrupted"]
    assert interrupted, "the agent never yielded to the barge-in"
    turn = interrupted[0]["turn"]
    truncates = _client_events(records, "conversation.item.truncate")
    assert truncates and truncates[0]["turn"] == turn and truncates[0]["item_id"] == f"item_{turn}"
    assert truncates[0]["audio_end_ms"] >= 0
    halted = [r for r in records if r["type"] == "agent_audio_halted"]
    assert halted and halted[0]["turn"] == turn
    assert any(r["type"] == "playback_paused" for r in records)  # the page silences at the VAD onset
    played_after = [r for r in records if r["type"] == "agent_audio" and r["turn"] == turn
                    and r["t"] > halted[0]["interrupted_t"]]
    assert not played_after  # nothing of the interrupted turn plays after response.interrupted
    m = episode_metrics(records)
    assert m.category == "interruption"
    if m.tor is not None:  # the reply was audible at the cue
        assert m.yielded == 1.0 and m.stop_latency_s is not None
    lat = episode_latencies(records)
    assert len(lat["replies"]) == 1 and all(b["kind"] == "interruption" for b in lat["bargeins"])
    summary = summarize_realtime([{"latencies": lat, "metrics": m.to_dict()}], "silence")
    assert {"end_of_speech_to_first_audio_played_s", "bargein", "full_duplex_bench", "stages_s",
            "targets"} <= set(summary)


async def test_bench_realtime_against_a_running_server_with_background_talker(tmp_path: Path, tiny_engine) -> None:
    paths = write_short_scenarios(tmp_path / "scn")
    paths["interruption"].unlink()
    out = tmp_path / "result.json"
    async with in_process_server(tiny_engine, **_server_kwargs(chars_per_s=80.0, max_tokens=8)) as url:
        cfg = RealtimeConfig(url=url, scenarios=str(tmp_path / "scn"), n=1, background_talker=True, warmup=False,
                             out=str(out))
        result = await bench_realtime(cfg)
    json.dumps(result)
    assert result["benchmark"] == "realtime" and result["server"]["started_by_bench"] is False
    assert result["machine"]["cpu_count"] and "git_commit" in result["machine"]
    assert result["config"]["scenarios_used"] == 1 and len(result["per_episode"]) == 1
    assert result["end_of_speech_to_first_audio_played_s"]["n"] == 1
    assert set(result["stages_s"]) == {"speech_stopped", "last_committed_words", "transcription_completed",
                                       "first_text_delta", "first_audio_received", "first_audio_played"}
    assert set(result["targets"]) == {"first_audio_p50_s", "first_audio_p95_s", "first_text_p50_s"}
    assert isinstance(result["targets_met"], bool)
    fdb = result["full_duplex_bench"]
    assert {"tor_pause", "tor_backchannel", "tor_turn_taking", "tor_interruption", "turn_taking_latency_s"} <= set(fdb)
    assert fdb["valid_cues"]["turn_taking"] == "1/1"
    assert result["background_talker"]["enabled"] and result["background_talker"].get("turns", 0) >= 1
    assert (tmp_path / "result.json.timelines" / "turn_taking-0.jsonl").exists()


def test_cli_parses_bench_realtime_and_drops_pipeline() -> None:
    from duplex.cli.main import build_parser

    args = build_parser().parse_args(["bench", "realtime", "--n", "2", "--json", "--speech", "librivox",
                                      "--background-talker", "--policy", "eou:short_gap_ms=0", "--url",
                                      "ws://127.0.0.1:1/ws", "--out", "x.json"])
    assert (args.what, args.n, args.speech, args.background_talker, args.policy) == (
        "realtime", 2, "librivox", True, "eou:short_gap_ms=0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "pipeline"])


def test_reply_after_an_interruption_is_checked_for_the_interruptions_content_words():
    from duplex.bench.realtime import _addressed

    hit = _addressed("No, no, I asked about Oslo.", "Oslo is the capital of Norway.")
    assert hit["reply_uses_its_words"] is True and hit["words_used"] == ["oslo"]
    miss = _addressed("Stop, stop. Let's talk about submarines.", "Wind turbines turn wind into power.")
    assert miss["reply_uses_its_words"] is False
    assert _addressed("No, no.", "Sure.")["reply_uses_its_words"] is None  # nothing to look for
    assert _addressed("about Oslo", None)["reply_uses_its_words"] is None  # no reply at all

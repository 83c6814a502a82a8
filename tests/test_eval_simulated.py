"""Scenario files, the simulated clocks driving the served pipeline (determinism, pause-first barge-in) and a small end-to-end smoke evaluation on
the tiny model with the fake VAD/ASR/TTS (tone bursts stand in for speech)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from duplex.audio.fakes import EnergyVad, FakeTts, FakeWhisper
from duplex.eval.metrics import episode_metrics
from duplex.eval.runner import RunSpec, parse_policy, read_timeline, rebuild_summary, run_eval
from duplex.eval.simulated import SimConfig, SimModels, simulate_episode
from duplex.eval.scenario import (AudioItem, Cue, Scenario, TypedChunk, TypedItem, load_scenario, load_scenarios,
                                  render_user_audio, resolve_cues, save_scenario)

from tests.fakes import tone_wav

SR = 16_000


def write_tone_scenarios(directory: Path) -> None:
    """One scenario per category; speech = tone bursts (exact for EnergyVad + FakeWhisper)."""
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    for name, secs in (("q", 1.5), ("half", 1.0), ("bc", 0.3), ("int", 1.5)):
        tone_wav(directory / "audio" / f"{name}.wav", secs)
    q = AudioItem(0.5, "audio/q.wav", "a question")
    scenarios = [
        Scenario("turn_taking-0", "turn_taking", (q,), (Cue("end_of_turn", item=0),), 10.0),
        Scenario("pause-0", "pause", (AudioItem(0.5, "audio/half.wav"), AudioItem(3.0, "audio/half.wav")),
                 (Cue("pause", item=0), Cue("end_of_turn", item=1)), 12.0),
        Scenario("backchannel-0", "backchannel", (q, AudioItem(4.5, "audio/bc.wav", "mm-hm")),
                 (Cue("end_of_turn", item=0), Cue("backchannel", item=1)), 12.0),
        Scenario("interruption-0", "interruption", (q, AudioItem(4.5, "audio/int.wav", "wait")),
                 (Cue("end_of_turn", item=0), Cue("interruption", item=1)), 12.0),
    ]
    for s in scenarios:
        save_scenario(s, directory / f"{s.id}.json")


@pytest.fixture(scope="module")
def tone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("scenarios")
    write_tone_scenarios(d)
    return d


def test_scenario_round_trip_and_cue_resolution(tone_dir: Path, tmp_path: Path):
    s = load_scenario(tone_dir / "interruption-0.json")
    user = render_user_audio(s)
    eot, interruption = resolve_cues(s, user)
    assert eot.t == pytest.approx(2.0, abs=0.02) and eot.start == pytest.approx(0.5, abs=0.02)
    assert (interruption.t, interruption.end) == (pytest.approx(4.5, abs=0.02), pytest.approx(6.0, abs=0.02))
    typed = Scenario("typed-0", "turn_taking", (TypedItem((TypedChunk(1.0, "hello "), TypedChunk(1.4, "there", True))),),
                     (Cue("end_of_turn", t=1.4),), 5.0)
    save_scenario(typed, tmp_path / "typed-0.json")
    again = load_scenario(tmp_path / "typed-0.json")
    assert again.items == typed.items and again.cues == typed.cues
    assert tuple(render_user_audio(again).typed) == ((1.0, "hello ", False), (1.4, "there", True))
    assert len(load_scenarios(tone_dir)) == 4


def _models(lm, whisper: FakeWhisper | None = None) -> SimModels:
    return SimModels(lm, None, FakeTts(), whisper or FakeWhisper(), EnergyVad)


def _replay(scenario_path: Path, lm, clock: str = "ideal", policy: str = "silence",
            whisper: FakeWhisper | None = None) -> list[dict]:
    s = load_scenario(scenario_path)
    user = render_user_audio(s)
    config = SimConfig(clock=clock, seed=3, max_reply_tokens=16, temperature=1.0)
    result = asyncio.run(simulate_episode(s, user, resolve_cues(s, user), policy, {}, _models(lm, whisper), config))
    return list(result.records)


def test_ideal_clock_holds_speech_stopped_until_final_words(tone_dir: Path, tiny_lm):
    """The pipeline's rule, seen through the simulated microphone: the session gets the end of
    speech only with the utterance's final words, so the reply follows the whole question."""
    records = _replay(tone_dir / "turn_taking-0.json", tiny_lm)
    inputs = [r for r in records if r["type"] == "input"]
    kinds = [r["event"]["type"] for r in inputs]
    assert kinds[0] == "speech_started" and "speech_stopped" in kinds and "speech_finalized" in kinds
    committed = [r["event"]["text"] for r in inputs if r["event"]["type"] == "asr_word" and r["event"]["committed"]]
    assert " ".join(committed).split() == ["w0", "w1", "w2"]
    user_end = next(r for r in records if r["type"] == "turn_ended" and r["speaker"] == "user")
    assert user_end["text"].split() == ["w0", "w1", "w2"]
    agent = next(r for r in records if r["type"] == "turn_started" and r["speaker"] == "agent")
    assert agent["t"] >= next(r["t"] for r in inputs if r["event"]["type"] == "speech_finalized")


def test_ideal_clock_pauses_then_resumes_for_a_backchannel_and_yields_to_an_interruption(tone_dir: Path, tiny_lm):
    """Pause first, decide after, on the virtual clock: "yeah" over the agent pauses its audio and
    resumes it (the paused stretch is not heard, the rest plays on); words over the agent pause it
    and then take the turn."""
    yeah = FakeWhisper(word_s=0.3, word_namer=lambda i: "yeah")
    bc = _replay(tone_dir / "backchannel-0.json", tiny_lm, whisper=yeah)
    kinds = [r["type"] for r in bc]
    assert "playback_paused" in kinds and "playback_resumed" in kinds
    assert kinds.index("playback_paused") < kinds.index("playback_resumed")
    assert "interrupted" not in kinds and "agent_audio_halted" not in kinds
    paused_t = next(r["t"] for r in bc if r["type"] == "playback_paused")
    resumed_t = next(r["t"] for r in bc if r["type"] == "playback_resumed")
    played = [r for r in bc if r["type"] == "agent_audio"]
    assert not any(r["t"] < resumed_t and r["end"] > paused_t + 1e-9 for r in played)  # silent while paused
    assert any(r["t"] >= resumed_t for r in played)  # and the same turn plays on
    m = episode_metrics(bc)
    assert m.false_interruption == 0.0 and m.tor == 0.0

    it = _replay(tone_dir / "interruption-0.json", tiny_lm)
    kinds = [r["type"] for r in it]
    assert "playback_paused" in kinds and "interrupted" in kinds and "playback_resumed" not in kinds
    assert kinds.index("playback_paused") < kinds.index("interrupted")
    halted = next(r for r in it if r["type"] == "agent_audio_halted")
    assert halted["t"] == next(r["t"] for r in it if r["type"] == "playback_paused")  # unheard since the pause
    m = episode_metrics(it)
    assert m.yielded == 1.0 and m.tor == 1.0


def test_ideal_clock_replay_is_bit_identical(tone_dir: Path, tiny_lm):
    a = _replay(tone_dir / "interruption-0.json", tiny_lm)
    b = _replay(tone_dir / "interruption-0.json", tiny_lm)
    assert json.dumps(a) == json.dumps(b)
    types = {r["type"] for r in a}
    assert {"policy_decided", "agent_text_delta", "agent_audio", "interrupted", "agent_audio_halted"} <= types
    decided = next(r for r in a if r["type"] == "policy_decided")
    assert "silence_s" in decided["observation"] and "type" in decided["action"]
    assert [r["t"] for r in a] == sorted(r["t"] for r in a)


def test_measured_clock_charges_compute_to_the_agent(tone_dir: Path, tiny_lm):
    ideal = _replay(tone_dir / "turn_taking-0.json", tiny_lm)
    measured = _replay(tone_dir / "turn_taking-0.json", tiny_lm, clock="replay-measured")
    first = lambda recs: next(r["t"] for r in recs if r["type"] == "agent_text_delta")  # noqa: E731
    assert first(measured) > first(ideal)
    assert measured[-1]["type"] == "episode_end" and measured[-1]["compute_s"]["engine"] > 0


def test_parse_policy_with_parameters():
    p = parse_policy("eou:short_gap_ms=300,confident=0.6")
    assert (p.label, p.name, p.params) == ("eou:short_gap_ms=300,confident=0.6", "eou",
                                           {"short_gap_ms": 300, "confident": 0.6})
    with pytest.raises(ValueError):
        parse_policy("no-such-policy")


def test_smoke_evaluation_writes_timelines_summary_and_report(tone_dir: Path, tmp_path: Path, tiny_lm):
    spec = RunSpec(out_dir=str(tmp_path / "run"), policies=(parse_policy("silence"), parse_policy("half-duplex")),
                   clock="ideal", model="tiny", asr="fake", vad="energy", tts="fake", max_reply_tokens=24,
                   temperature=1.0)
    summary = run_eval(spec, tone_dir, workers=1)
    run = tmp_path / "run"
    assert {r["policy"] for r in summary["rows"]} == {"silence", "half-duplex"}
    assert summary["meta"]["clock"] == "ideal" and summary["policies"]["silence"]["params"]["gap_ms"] == 500.0
    rows = {r["policy"]: r for r in summary["rows"]}
    assert rows["silence"]["tor_turn_taking"] == 1.0 and rows["silence"]["turn_taking_latency_s"] > 0
    assert rows["silence"]["yield_rate"] == 1.0 and rows["half-duplex"]["yield_rate"] == 0.0
    assert rows["half-duplex"]["stop_latency_s"] > rows["silence"]["stop_latency_s"]
    timeline = read_timeline(run / "episodes" / "silence" / "pause-0.jsonl")
    assert timeline[0]["type"] == "episode" and timeline[-1]["type"] == "episode_end"
    episodes = [json.loads(x) for x in (run / "episodes.jsonl").read_text().splitlines()]
    assert sorted((e["policy"], e["scenario"]) for e in episodes) == sorted(
        (p, s) for p in ("silence", "half-duplex") for s in ("backchannel-0", "interruption-0", "pause-0", "turn_taking-0"))
    assert "data:image/png;base64," in (run / "report.html").read_text()
    assert rebuild_summary(run)["rows"] == summary["rows"]  # the timelines alone reproduce the metrics


def test_cli_wires_eval_subcommands(tone_dir: Path, tmp_path: Path):
    from duplex.cli.main import build_parser, main

    args = build_parser().parse_args(["eval", "run", "--scenarios", "x", "--policy", "eou", "--out", "y",
                                      "--clock", "ideal", "--workers", "2"])
    assert args.policy == ["eou"] and args.clock == "ideal" and callable(args.func)
    assert build_parser().parse_args(["eval", "run", "--scenarios", "x", "--out", "y"]).clock == "measured"
    assert main(["eval", "report", str(tmp_path / "missing")]) == 1  # a clear error, not a traceback


@pytest.mark.skipif(shutil.which("flite") is None, reason="needs the flite binary")
def test_make_scenarios_writes_loadable_annotated_scenarios(tmp_path: Path):
    from duplex.eval.make import make_scenarios

    paths = make_scenarios(tmp_path, 1, seed=7, voices=["flite:kal", "flite:slt"])
    assert len(paths) == 4
    again = make_scenarios(tmp_path / "again", 1, seed=7, voices=["flite:kal", "flite:slt"])
    assert [p.read_text() for p in paths] == [p.read_text() for p in again]  # deterministic under the seed
    for s in load_scenarios(tmp_path):
        cue = s.primary_cue()
        assert cue is not None and cue.t is not None and s.duration_s > cue.t
        if s.category in ("pause", "backchannel", "interruption"):
            assert cue.end is not None and cue.end > cue.t


def test_short_turns_and_long_pause_halves_break_the_length_cue():
    """Complete turns of one to seven words and unfinished halves of seven or more: word count alone
    must not tell a finished turn from a pause."""
    import random

    from duplex.eval import sentences

    for seed in range(200):
        rng = random.Random(seed)
        assert 1 <= len(sentences.short_turn(rng).split()) <= 7
        first, second = sentences.long_pause_pair(rng)
        assert len(first.split()) >= 7 and second and "{" not in first + second


def test_make_scenarios_mixes_short_turns_and_long_pauses_on_request(tmp_path: Path):
    from duplex.eval.make import LayoutConfig, make_scenarios

    layout = LayoutConfig(short_turn_share=1.0, long_pause_share=1.0)
    make_scenarios(tmp_path, 2, seed=3, voices=["flite:kal"], categories=("turn_taking", "pause"), layout=layout)
    scenarios = load_scenarios(tmp_path)
    assert sorted(s.category for s in scenarios) == ["pause", "pause", "turn_taking", "turn_taking"]
    for s in scenarios:
        words = len(s.items[0].text.split())
        assert (words >= 7) if s.category == "pause" else (words <= 7)
    with pytest.raises(ValueError, match="unknown scenario categories"):
        make_scenarios(tmp_path / "bad", 1, categories=("turn-taking",))
    with pytest.raises(ValueError, match="short_turn_share"):
        make_scenarios(tmp_path / "bad", 1, layout=LayoutConfig(short_turn_share=1.5))


def test_an_id_offset_renames_a_set_without_changing_it(tmp_path: Path):
    """A second set joins a directory under new ids (the turn-policy test set is two sets in one)."""
    from duplex.eval.make import make_scenarios

    make_scenarios(tmp_path / "plain", 1, seed=9, voices=["flite:kal"], categories=("pause",))
    plain = load_scenarios(tmp_path / "plain")
    make_scenarios(tmp_path / "both", 1, seed=4, voices=["flite:kal"], categories=("pause",))
    make_scenarios(tmp_path / "both", 1, seed=9, voices=["flite:kal"], categories=("pause",), id_offset=1000)
    both = {s.id: s for s in load_scenarios(tmp_path / "both")}
    assert sorted(both) == ["pause-0000", "pause-1000"]
    moved = both["pause-1000"]
    assert [(i.t, i.text) for i in moved.items] == [(i.t, i.text) for i in plain[0].items]
    assert moved.cues == plain[0].cues and (tmp_path / "both" / moved.items[0].audio).exists()
    with pytest.raises(ValueError, match="id_offset"):
        make_scenarios(tmp_path / "bad", 1, id_offset=-1)


@pytest.mark.integration
def test_real_pipeline_takes_the_turn_after_a_spoken_question(tmp_path: Path):
    """SmolLM2 + whisper tiny.en + Piper on one synthesised turn-taking scenario, virtual time charged
    with the measured compute."""
    from duplex.eval.make import make_scenarios

    make_scenarios(tmp_path / "scn", 1, seed=1, voices=["piper:joe"], categories=("turn_taking",))
    spec = RunSpec(out_dir=str(tmp_path / "run"), policies=(parse_policy("eou"),), clock="replay-measured",
                   max_reply_tokens=16)
    (row,) = run_eval(spec, tmp_path / "scn", workers=1, report=False)["rows"]
    assert row["tor_turn_taking"] == 1.0 and row["turn_taking_latency_s"] > 0
    timeline = read_timeline(tmp_path / "run" / "episodes" / "eou" / "turn_taking-0000.jsonl")
    heard = " ".join(r["event"]["text"] for r in timeline if r["type"] == "input"
                     and r["event"]["type"] == "asr_word" and r["event"]["committed"])
    assert len(heard.split()) >= 3  # whisper understood the synthesised question

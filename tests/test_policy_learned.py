"""The smart-turn and learned policies, and the training pipeline end to end on a small generated
set: ideal-clock episodes (tiny model, fake VAD/ASR/TTS, tone bursts) -> ticks -> weights -> policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from duplex.eval.runner import RunSpec, parse_policy, read_timeline, run_eval
from duplex.eval.scenario import AudioItem, Cue, Scenario, save_scenario
from duplex.policies import Listen, Observation, Speak, make_policy
from duplex.policies.learned import DEFAULT_WEIGHTS, LearnedPolicy, load_turn_model
from duplex.policies.learned.train import (TrainConfig, cross_validate, load_episodes, simulate, split_episodes,
                                          tick_label, train_policy)

from tests.fakes import tone_wav


def _obs(**kw) -> Observation:
    base = dict(t=5.0, user_turn_words=4, partial_text="what time is it?", committed_words=4, silence_s=0.05)
    base.update(kw)
    return Observation(**base)


def test_smart_turn_policy_waits_on_an_incomplete_turn():
    policy = make_policy("smart-turn")
    assert isinstance(policy.decide(_obs(audio_eot_prob=0.95)), Speak)
    assert isinstance(policy.decide(_obs(audio_eot_prob=0.1)), Listen)
    assert isinstance(policy.decide(_obs(audio_eot_prob=0.1, silence_s=1.6)), Speak)
    assert isinstance(policy.decide(_obs(audio_eot_prob=None, silence_s=0.6)), Speak)  # typed: a plain gap
    assert isinstance(policy.decide(_obs(audio_eot_prob=0.95, user_speaking=True, silence_s=None)), Listen)


def test_committed_weights_load_and_decide():
    model = load_turn_model(DEFAULT_WEIGHTS)
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000 and 0 < model.threshold < 1
    policy = make_policy("learned")
    assert isinstance(policy.decide(_obs(user_speaking=True, silence_s=None)), Listen)
    assert isinstance(policy.decide(_obs(user_turn_final=True, silence_s=0.0)), Speak)  # typed and submitted
    assert isinstance(policy.decide(_obs(silence_s=5.0)), Speak)  # the max gap
    assert isinstance(policy.decide(_obs(agent_speaking=True, silence_s=None, partial_text="", user_turn_words=0)),
                      Speak)
    audio = dict(pitch_slope_st_s=-3.0, pitch_end_st=-2.0, energy_slope_db_s=-10.0, speech_s=2.5, vad_mean_1s=0.9,
                 vad_mean=0.85, silence_s=0.1)
    p_done = policy.probability(_obs(eou_prob=0.8, audio_eot_prob=0.95, **audio))
    p_cut = policy.probability(_obs(eou_prob=0.01, audio_eot_prob=0.02, partial_text="could you tell me what time the",
                                    **audio))
    assert p_done > p_cut


def _tone_scenarios(directory: Path) -> None:
    """Two voices x (a question; a pause then the rest): tone bursts stand in for speech."""
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    for name, secs in (("q", 1.5), ("half", 1.0)):
        tone_wav(directory / "audio" / f"{name}.wav", secs)
    for voice in ("va", "vb"):
        for i, lead in enumerate((0.5,)):
            q = AudioItem(lead, "audio/q.wav", f"question {voice} {i}")
            save_scenario(Scenario(f"turn_taking-{voice}{i}", "turn_taking", (q,), (Cue("end_of_turn", item=0),), 6.0,
                                   meta={"voice": voice}), directory / f"turn_taking-{voice}{i}.json")
            items = (AudioItem(lead, "audio/half.wav", f"first {voice} {i}"),
                     AudioItem(lead + 2.5, "audio/half.wav", f"second {voice} {i}"))
            save_scenario(Scenario(f"pause-{voice}{i}", "pause", items, (Cue("pause", item=0), Cue("end_of_turn", item=1)),
                                   8.0, meta={"voice": voice}), directory / f"pause-{voice}{i}.json")


def test_training_pipeline_on_a_small_generated_set(tmp_path: Path, tiny_lm):
    scen = tmp_path / "scenarios"
    _tone_scenarios(scen)
    run = tmp_path / "run"
    spec = RunSpec(out_dir=str(run), policies=(parse_policy("silence:gap_ms=2500"),), clock="ideal", model="tiny",
                   asr="fake", vad="energy", tts="fake", max_reply_tokens=4)
    run_eval(spec, scen, workers=1, report=False)

    # every tick is logged, with the new observation fields
    timeline = read_timeline(run / "episodes" / "silence_gap_ms=2500" / "pause-va0.jsonl")
    ticks = [r for r in timeline if r["type"] == "policy_decided"]
    assert len(ticks) > 50 and "audio_eot_prob" in ticks[0]["observation"]
    assert any(r["type"] == "input" and r["event"]["type"] == "turn_audio_features" for r in timeline)

    episodes = load_episodes([run])
    assert len(episodes) == 4 and {e.voice for e in episodes} == {"va", "vb"}
    pause = next(e for e in episodes if e.scenario == "pause-va0")
    assert pause.pauses and tick_label(pause, pause.pauses[0][0] + 0.5) == 0
    assert pause.eot_t is not None and tick_label(pause, pause.eot_t + 0.1) == 1
    train, test, dropped = split_episodes(episodes, ["vb"])
    assert {e.voice for e in train} == {"va"} and {e.voice for e in test} == {"vb"} and dropped == 0

    out = tmp_path / "weights.json"
    report = train_policy([str(run)], out, TrainConfig(epochs=60, test_voices=("vb",)),
                          baselines={"silence": make_policy("silence")})
    assert report["split"]["train_episodes"] == 2 and report["split"]["test_episodes"] == 2
    assert set(report["test"]["policies"]) == {"learned", "silence"}
    assert json.loads(out.read_text())["features"] and out.stat().st_size < 1_000_000
    policy = LearnedPolicy(weights=str(out))
    sim = simulate(pause, lambda obs: isinstance(policy.decide(obs), Speak))
    assert sim.decided_t is not None
    assert policy.params()["threshold"] == pytest.approx(report["threshold"])

    # model choice without the test split: each training voice is held out in turn
    cv = cross_validate([str(run)], {"lr": TrainConfig(epochs=30, test_voices=()),
                                     "mlp": TrainConfig(epochs=30, hidden=2, test_voices=())})
    assert set(cv["configs"]) == {"lr", "mlp"} and cv["best"] in cv["configs"]
    for row in cv["configs"].values():
        assert row["folds"] == ["va", "vb"] and row["n"] == 4  # every episode replayed once, by a model that never saw its voice
    with pytest.raises(ValueError, match="2 training voices"):
        cross_validate([str(run)], {"lr": TrainConfig(epochs=30, test_voices=("vb",))})


def test_cli_wires_policy_train():
    from duplex.cli.main import build_parser

    args = build_parser().parse_args(["policy", "train", "--runs", "a", "--runs", "b", "--hidden", "4"])
    assert args.runs == ["a", "b"] and args.hidden == 4 and callable(args.func)
    cv = build_parser().parse_args(["policy", "cv", "--runs", "a", "--json", "x.json"])
    assert cv.runs == ["a"] and cv.json == "x.json" and callable(cv.func)


def test_served_decision_events_are_training_ticks(tmp_path: Path):
    """A measured-clock timeline: ``duplex serve --log-decisions`` sent ``policy.decided`` events,
    timed on the client's clock like the cues; the agent's first turn ends the usable ticks."""
    def decided(t: float, silence: float | None, speaking: bool = False) -> dict:
        obs = {"t": 100 + t, "user_speaking": speaking, "agent_speaking": False, "silence_s": silence,
               "user_turn_words": 3, "partial_text": "where is it", "eou_prob": 0.6}
        return {"type": "server_event", "t": t, "event": {"type": "policy.decided", "observation": obs,
                                                          "action": {"type": "listen"}}}

    records = [{"type": "episode", "t": 0.0, "scenario": "turn_taking-0000", "category": "turn_taking",
                "clock": "measured", "voice": "flite:kal"},
               {"type": "user_speech", "t": 0.5, "end": 1.5, "item": 0, "text": "Where is it?"},
               {"type": "cue", "t": 1.5, "kind": "end_of_turn"},
               decided(1.0, None, speaking=True), decided(1.8, 0.1), decided(1.9, 0.2),
               {"type": "server_event", "t": 2.0, "event": {"type": "state.changed", "state": "speaking"}},
               {"type": "turn_started", "t": 2.0, "speaker": "agent", "turn": 1},
               decided(2.1, 0.4),
               {"type": "episode_end", "t": 4.0}]
    path = tmp_path / "run" / "episodes" / "silence" / "turn_taking-0000.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    [ep] = load_episodes([tmp_path / "run"])
    assert ep.voice == "flite:kal" and ep.eot_t == 1.5
    assert [t for t, _ in ep.ticks] == [1.8, 1.9]  # listening ticks only, before the agent's turn
    assert ep.ticks[0][1].eou_prob == 0.6 and [tick_label(ep, t) for t, _ in ep.ticks] == [1, 1]


def _decided(t: float, **obs) -> dict:
    base = dict(t=t, user_turn_words=3, partial_text="no, I meant Oslo.", committed_words=3, silence_s=0.05)
    base.update(obs)
    return {"type": "policy_decided", "t": t, "observation": Observation(**base).to_dict(), "action": {"type": "listen"}}


def test_ticks_after_an_interruption_form_their_own_labelled_episode(tmp_path: Path):
    """After the agent yielded to an interruption and until its next turn, the listening ticks are
    an ``after_interruption`` episode labelled by the interruption cue's end; ticks from before the
    first agent turn stay the scenario's own episode, and ticks of the agent's turns are dropped."""
    records = [
        {"type": "episode", "t": 0.0, "scenario": "interruption-0", "category": "interruption", "voice": "va"},
        {"type": "user_speech", "t": 0.5, "end": 2.0, "text": "Where should I go in May?"},
        {"type": "cue", "t": 2.0, "kind": "end_of_turn", "end": None, "start": 0.5},
        _decided(2.1, partial_text="Where should I go in May?"),
        {"type": "turn_started", "t": 2.4, "speaker": "agent", "turn": 1},
        _decided(3.0, agent_speaking=True, silence_s=None),
        {"type": "cue", "t": 4.0, "kind": "interruption", "end": 6.0, "start": None},
        _decided(4.9, after_interruption=True, partial_text="No,"),  # a pause inside the interrupting words
        _decided(6.2, after_interruption=True),
        _decided(6.4, after_interruption=True, user_speaking=True, silence_s=None),  # not a listening tick
        {"type": "turn_started", "t": 6.5, "speaker": "agent", "turn": 3},
        _decided(6.6, after_interruption=True),  # after the reply started: not policy-independent
        {"type": "episode_end", "t": 9.0},
    ]
    (tmp_path / "episodes" / "p").mkdir(parents=True)
    (tmp_path / "episodes" / "p" / "interruption-0.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    first, cut = load_episodes([tmp_path])
    assert first.category == "interruption" and [t for t, _ in first.ticks] == [2.1] and first.eot_t == 2.0
    assert cut.category == "after_interruption" and cut.eot_t == 6.0 and cut.scenario == "interruption-0#after-interruption"
    assert [t for t, _ in cut.ticks] == [4.9, 6.2]
    assert [tick_label(cut, t) for t, _ in cut.ticks] == [0, 1]
    assert cut.voice == "va" and cut.sentences == first.sentences  # the split keeps them together


def test_weights_trained_before_a_feature_was_added_still_load_and_read_their_subset():
    from duplex.policies.learned import FEATURE_NAMES, TurnModel, turn_features

    old = [f for f in FEATURE_NAMES if f != "after_interruption"]
    model = TurnModel.from_dict({"features": old, "mean": [0.0] * len(old), "std": [1.0] * len(old),
                                 "layers": [{"w": [[1.0 if f == "silence_s" else 0.0 for f in old]], "b": [0.0]}],
                                 "threshold": 0.5, "max_gap_ms": 2000.0})
    x = turn_features(_obs(silence_s=2.0, after_interruption=True))
    assert len(x) == len(FEATURE_NAMES) and model.probability(x) == pytest.approx(1 / (1 + math.exp(-2.0)))
    with pytest.raises(ValueError, match="retrain"):
        TurnModel.from_dict({"features": ["no_such_feature"], "mean": [0.0], "std": [1.0],
                             "layers": [{"w": [[1.0]], "b": [0.0]}], "threshold": 0.5, "max_gap_ms": 2000.0})


def test_the_last_word_marks_an_unfinished_half_whatever_whisper_punctuates():
    """whisper closes unfinished halves with a full stop or a question mark ("...right now is that.",
    "...better to?"): the feature reads the word, not the punctuation."""
    from duplex.policies.learned import FEATURE_NAMES, turn_features

    i = FEATURE_NAMES.index("ends_function_word")
    for text in ("the main reason is that.", "Do you think it would be better to?", "I need a gift for...",
                 "My cousin told me the best time is"):
        assert turn_features(_obs(partial_text=text))[i] == 1.0, text
    for text in ("Thanks a lot.", "Remind me at 10.", "What about Seoul?", "I ended up calling them", ""):
        assert turn_features(_obs(partial_text=text))[i] == 0.0, text


def test_committed_weights_do_not_read_length_as_the_end_of_a_turn():
    """The committed weights answer a short complete turn and wait on a long unfinished half: the
    observations are the served ones of "What time is it?" (piper:joe) and of a pause scenario's
    15-word first half, whose word count alone once decided (the model trained before the short
    turns answered the first only at its 2 s cap and took the second at once)."""
    policy = make_policy("learned")
    short = _obs(partial_text="What time is it?", user_turn_words=4, committed_words=4, eou_prob=0.08,
                 sentence_break_prob=0.42, audio_eot_prob=0.967, pitch_slope_st_s=14.5, pitch_end_st=12.0,
                 energy_slope_db_s=-23.3, speech_s=0.87, vad_mean_1s=0.85, vad_mean=0.69, silence_s=0.1)
    assert isinstance(policy.decide(short), Speak)
    half = _obs(partial_text="The main reason I am asking you about all of this right now is that.",
                user_turn_words=15, committed_words=15, eou_prob=0.164, sentence_break_prob=0.2, silence_s=1.0)
    assert isinstance(policy.decide(half), Listen)

"""Full-Duplex-Bench metrics against timelines computed by hand (design §4), edge cases included."""

from __future__ import annotations

from typing import Any

import pytest

from duplex.eval.metrics import EpisodeMetrics, agent_outputs, episode_metrics, summarize


def _timeline(category: str, cues: list[dict[str, Any]], user: list[tuple[float, float]],
              agent: list[dict[str, Any]], halted: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """agent: [{"turn", "start", "end", "words": [...]}] (voiced span = start..end)."""
    recs: list[dict[str, Any]] = [{"type": "episode", "t": 0.0, "scenario": "s", "category": category, "policy": "p"}]
    recs += [{"type": "cue", **c} for c in cues]
    recs += [{"type": "user_speech", "t": a, "end": b} for a, b in user]
    for a in agent:
        recs.append({"type": "turn_started", "speaker": "agent", "turn": a["turn"], "t": a.get("turn_t", a["start"])})
        if a["end"] > a["start"]:
            recs.append({"type": "agent_audio", "t": a["start"], "end": a["end"], "turn": a["turn"],
                         "voiced_start": a["start"], "voiced_end": a["end"], "word_times": a["words"]})
    for turn, t in (halted or {}).items():
        recs.append({"type": "agent_audio_halted", "t": t, "turn": turn})
    return recs


EOT = {"kind": "end_of_turn", "t": 2.0, "start": 0.5}


def test_turn_taking_latency_is_first_word_minus_end_of_turn():
    recs = _timeline("turn_taking", [EOT], [(0.5, 2.0)],
                     [{"turn": 1, "start": 2.8, "end": 4.5, "words": [2.8, 3.1, 3.5, 3.9, 4.2]}])
    m = episode_metrics(recs)
    assert m.tor == 1.0 and m.latency_s == pytest.approx(0.8)
    assert m.agent_backchannels == 0 and m.overlap_s == 0.0


def test_empty_reply_does_not_take_the_turn():
    recs = _timeline("turn_taking", [EOT], [(0.5, 2.0)], [{"turn": 1, "start": 2.5, "end": 2.5, "words": []}])
    m = episode_metrics(recs)
    assert m.tor == 0.0 and m.latency_s is None and m.agent_turns == 1 and m.agent_backchannels == 0


def test_reply_under_one_second_with_three_words_is_a_backchannel_not_a_turn():
    recs = _timeline("turn_taking", [EOT], [(0.5, 2.0)],
                     [{"turn": 1, "start": 2.5, "end": 3.3, "words": [2.5, 2.8, 3.1]}])
    m = episode_metrics(recs)
    assert m.tor == 0.0 and m.latency_s is None and m.agent_backchannels == 1


@pytest.mark.parametrize("end,words,tor", [
    (3.5, [2.5, 2.8, 3.1], 0.0),  # exactly 1 s, 3 words: neither "longer than 1 s" nor "more than 3 words"
    (3.51, [2.5, 2.8, 3.1], 1.0),  # just over 1 s
    (3.0, [2.5, 2.6, 2.8, 2.9], 1.0),  # 0.5 s but 4 words
])
def test_turn_threshold_boundaries(end, words, tor):
    recs = _timeline("turn_taking", [EOT], [(0.5, 2.0)], [{"turn": 1, "start": 2.5, "end": end, "words": words}])
    assert episode_metrics(recs).tor == tor


def test_latency_is_clamped_at_zero_when_the_agent_starts_early():
    recs = _timeline("turn_taking", [EOT], [(0.5, 2.0)],
                     [{"turn": 1, "start": 1.7, "end": 4.0, "words": [1.7, 2.1, 2.6, 3.0]}])
    m = episode_metrics(recs)
    assert m.tor == 1.0 and m.latency_s == 0.0
    assert m.overlap_s == pytest.approx(0.3)


def test_pause_tor_counts_only_agent_turns_before_the_user_is_done():
    cues = [{"kind": "pause", "t": 1.5, "end": 3.0}, {"kind": "end_of_turn", "t": 4.5, "start": 3.0}]
    user = [(0.5, 1.5), (3.0, 4.5)]
    jumped_in = _timeline("pause", cues, user, [{"turn": 1, "start": 2.6, "end": 4.0, "words": [2.6, 3.0, 3.4]}])
    waited = _timeline("pause", cues, user, [{"turn": 1, "start": 5.0, "end": 7.0, "words": [5.0, 5.5, 6.0]}])
    assert episode_metrics(jumped_in).tor == 1.0
    assert episode_metrics(waited).tor == 0.0


def test_interruption_stop_and_response_latency():
    cues = [EOT, {"kind": "interruption", "t": 6.0, "end": 7.0}]
    recs = _timeline("interruption", cues, [(0.5, 2.0), (6.0, 7.0)],
                     [{"turn": 1, "start": 3.0, "end": 6.5, "words": [3.0, 3.5, 4.0, 5.0, 6.2]},
                      {"turn": 3, "start": 8.2, "end": 10.0, "words": [8.2, 8.6, 9.0, 9.5]}], halted={1: 6.5})
    m = episode_metrics(recs)
    assert m.tor == 1.0 and m.yielded == 1.0
    assert m.stop_latency_s == pytest.approx(0.5) and m.response_latency_s == pytest.approx(1.2)
    assert m.overlap_s == pytest.approx(0.5)


def test_interruption_ignored_by_a_half_duplex_agent_stops_at_its_natural_end():
    cues = [EOT, {"kind": "interruption", "t": 6.0, "end": 7.0}]
    recs = _timeline("interruption", cues, [(0.5, 2.0), (6.0, 7.0)],
                     [{"turn": 1, "start": 3.0, "end": 9.0, "words": [3.0, 4.0, 5.0, 6.0, 7.0]},
                      {"turn": 3, "start": 9.5, "end": 11.0, "words": [9.5, 10.0, 10.5, 10.8]}])
    m = episode_metrics(recs)
    assert m.yielded == 0.0 and m.stop_latency_s == pytest.approx(3.0)
    assert m.tor == 1.0 and m.response_latency_s == pytest.approx(2.5)


def test_backchannel_keeping_the_floor_vs_false_interruption():
    cues = [EOT, {"kind": "backchannel", "t": 5.0, "end": 5.4}]
    user = [(0.5, 2.0), (5.0, 5.4)]
    kept = _timeline("backchannel", cues, user, [{"turn": 1, "start": 3.0, "end": 9.0, "words": [3.0, 4.0, 5.0, 6.0]}])
    m = episode_metrics(kept)
    assert m.tor == 0.0 and m.false_interruption == 0.0
    stopped = _timeline("backchannel", cues, user,
                        [{"turn": 1, "start": 3.0, "end": 5.6, "words": [3.0, 4.0, 5.0]},
                         {"turn": 3, "start": 6.5, "end": 8.0, "words": [6.5, 6.9, 7.2, 7.6]}], halted={1: 5.6})
    m = episode_metrics(stopped)
    assert m.tor == 1.0 and m.false_interruption == 1.0


def test_cue_without_agent_speech_is_not_applicable():
    cues = [EOT, {"kind": "backchannel", "t": 5.0, "end": 5.4}]
    recs = _timeline("backchannel", cues, [(0.5, 2.0), (5.0, 5.4)],
                     [{"turn": 1, "start": 3.0, "end": 4.0, "words": [3.0, 3.5]}])
    m = episode_metrics(recs)
    assert m.tor is None and m.false_interruption is None


def test_agent_outputs_reads_played_audio_per_turn():
    recs = _timeline("turn_taking", [EOT], [], [{"turn": 1, "start": 2.0, "end": 3.0, "words": [2.0, 2.5]}],
                     halted={1: 3.0})
    (o,) = agent_outputs(recs)
    assert (o.first_word_t, o.end_t, o.n_words, o.halted_t) == (2.0, 3.0, 2, 3.0)
    assert o.duration_s == pytest.approx(1.0)


def test_summary_has_one_row_per_policy_with_category_means():
    eps = [
        EpisodeMetrics("a", "turn_taking", "p", tor=1.0, latency_s=0.4, user_speech_s=2.0),
        EpisodeMetrics("b", "turn_taking", "p", tor=1.0, latency_s=0.8, user_speech_s=2.0, agent_backchannels=1),
        EpisodeMetrics("c", "turn_taking", "p", tor=0.0, user_speech_s=1.0),
        EpisodeMetrics("d", "pause", "p", tor=1.0, overlap_s=1.0, user_speech_s=1.0),
        EpisodeMetrics("e", "interruption", "p", tor=None),
        EpisodeMetrics("a", "turn_taking", "q", tor=0.0),
    ]
    rows = summarize(eps)
    assert set(rows) == {"p", "q"}
    p = rows["p"]
    assert p["tor_turn_taking"] == pytest.approx(2 / 3) and p["turn_taking_latency_s"] == pytest.approx(0.6)
    assert p["tor_pause"] == 1.0 and p["tor_interruption"] is None
    assert (p["n_interruption"], p["n_interruption_total"]) == (0, 1)
    assert p["backchannel_per_s"] == pytest.approx(1 / 6)
    assert p["overlap_s"] == pytest.approx(1.0 / 5) and p["episodes"] == 5

"""``duplex bench translate``'s client and level summary, against an in-process server with the tiny
model (the command itself starts ``duplex serve``; here only the measuring is under test)."""

from __future__ import annotations

import pytest
from test_translate_server import server  # noqa: F401 - the fixture: a server with translate mode

from duplex.bench.translate import TranslateBenchConfig, _level, _translate_client
from duplex.cli.main import build_parser
from duplex.serving.server import DuplexServer

_TEXTS = ["Where is the station?", "I am lost.", "Good morning to you.", "See you tomorrow at noon."]


async def test_every_sentence_is_timed_from_its_words_to_its_translation(server: DuplexServer) -> None:  # noqa: F811
    cfg = TranslateBenchConfig(words_per_s=40.0, k=2, timeout_s=60.0)
    run = await _translate_client(server.ws_url(), _TEXTS[:2], cfg)
    assert [s.words for s in run.sentences] == [t.split() for t in _TEXTS[:2]]
    for s in run.sentences:
        assert s.first_sent <= s.last_sent <= s.done  # sent in order, done after its last word
        assert s.first_target is None or s.first_sent <= s.first_target <= s.done
    assert run.sentences[0].last_sent < run.sentences[1].first_sent  # one live source, in order


async def test_a_level_reports_lags_throughput_and_the_policy_bound(server: DuplexServer) -> None:  # noqa: F811
    cfg = TranslateBenchConfig(sentences=3, words_per_s=40.0, k=2, timeout_s=60.0)
    level = await _level(server.ws_url(), 2, cfg, _TEXTS)
    assert level["sessions"] == 2 and level["sentences"] == 6
    assert level["source_words"] == sum(len(_TEXTS[i % 4].split()) for i in (0, 1, 2, 3, 4, 5))
    assert level["policy_wait_ms"] == pytest.approx(25.0)  # (k - 1) words at 40 words/s
    assert level["finish_lag_ms_p50"] is not None and level["finish_lag_ms_p50"] >= 0
    assert level["finish_lag_ms_p95"] >= level["finish_lag_ms_p50"]
    assert level["source_words_per_s_offered"] == 80.0
    assert level["errors"] == {}


def test_the_command_line_reaches_the_config() -> None:
    args = build_parser().parse_args(["bench", "translate", "--translate-sessions", "1,3", "--sentences", "4",
                                      "--words-per-s", "2", "--k", "4", "--serve-arg=--tts none"])
    assert args.what == "translate" and args.translate_sessions == "1,3" and args.sentences == 4
    assert args.words_per_s == 2.0 and args.k == 4 and args.serve_arg == ["--tts none"]

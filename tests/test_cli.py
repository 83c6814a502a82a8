"""The console script parses its subcommands and reports errors without tracebacks."""

from __future__ import annotations

import json

import pytest

from duplex.cli.main import build_parser, main


@pytest.mark.parametrize("argv", [["chat"], ["serve", "--port", "0"], ["talk", "--headphones"],
                                  ["transcribe", "x.wav"], ["client", "--text", "hi"],
                                  ["bench", "decode", "--json"], ["bench", "ttft"], ["bench", "bargein", "--trials", "2"]])
def test_subcommands_parse(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_bad_model_path_is_a_one_line_error(tmp_path, capsys):
    rc = main(["bench", "decode", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "model error" in err and "missing" in err and "Traceback" not in err


def test_serve_voice_options_set_voice_config_fields_and_reject_unknown_ones():
    import pytest

    from duplex.cli.main import build_parser
    from duplex.cli.serve import voice_config_from_args

    args = build_parser().parse_args(["serve", "--speculate-after-silence-ms", "80", "--voice-option",
                                      "hold_decode_for_first_audio=false", "--voice-option", "first_clause_words=2"])
    config = voice_config_from_args(args)
    assert config.speculate_after_silence_ms == 80.0 and config.first_clause_words == 2
    assert config.hold_decode_for_first_audio is False
    with pytest.raises(SystemExit, match="unknown --voice-option 'nope'"):
        voice_config_from_args(build_parser().parse_args(["serve", "--voice-option", "nope=1"]))
    assert config.session.overlap_layout == "hold"
    layout = voice_config_from_args(build_parser().parse_args(["serve", "--overlap-layout", "interleave"]))
    assert layout.session.overlap_layout == "interleave"
    assert not config.session.log_decisions and not config.turn_features_always
    logged = voice_config_from_args(build_parser().parse_args(["serve", "--log-decisions"]))
    assert logged.session.log_decisions and logged.turn_features_always  # the served path's training data
    window = voice_config_from_args(build_parser().parse_args(["serve", "--context-tokens", "1024"]))
    assert (window.session.sequence.max_tokens, window.session.sequence.keep_recent_tokens) == (1024, 512)
    with pytest.raises(SystemExit, match="--context-tokens 100"):
        voice_config_from_args(build_parser().parse_args(["serve", "--context-tokens", "100"]))


def test_bench_realtime_passes_serve_flags_to_the_server_it_starts():
    from duplex.bench.realtime import RealtimeConfig
    from duplex.bench.servers import ServeOptions
    from duplex.cli.main import build_parser

    args = build_parser().parse_args(["bench", "realtime", "--serve-arg=--overlap-layout interleave"])
    flags = tuple(a for item in args.serve_arg for a in item.split())
    assert flags == ("--overlap-layout", "interleave")
    assert RealtimeConfig(serve_args=flags).serve_args == flags
    assert ServeOptions(extra_args=flags).argv(1)[-2:] == ["--overlap-layout", "interleave"]


def test_serve_sets_the_instructions_limit_and_the_scheduler():
    import pytest

    from duplex.cli.main import build_parser
    from duplex.cli.serve import voice_config_from_args

    args = build_parser().parse_args(["serve", "--max-instructions-chars", "20000", "--scheduler", "fifo"])
    assert args.scheduler == "fifo"
    session = voice_config_from_args(args).session
    assert (session.max_instructions_chars, session.max_instructions_tokens) == (20000, 20000)
    with pytest.raises(SystemExit, match="--max-instructions-chars 0"):
        voice_config_from_args(build_parser().parse_args(["serve", "--max-instructions-chars", "0"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--scheduler", "round-robin"])


def test_bench_json_file_is_written_for_the_engine_benchmarks(tmp_path, monkeypatch, capsys):
    from duplex.bench import engine as bench_engine

    calls = []
    monkeypatch.setattr(bench_engine, "bench_ttft",
                        lambda model, device, dtype: calls.append((model, device, dtype)) or {"benchmark": "ttft"})
    out = tmp_path / "ttft.json"
    assert main(["bench", "ttft", "--model", "tiny", "--json", str(out)]) == 0
    assert calls == [("tiny", "auto", "auto")]
    assert json.loads(out.read_text()) == {"benchmark": "ttft"}
    assert json.loads(capsys.readouterr().out) == {"benchmark": "ttft"}

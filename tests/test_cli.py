"""The console script parses its subcommands and reports errors without tracebacks."""

from __future__ import annotations

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

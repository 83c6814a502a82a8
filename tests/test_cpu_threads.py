"""Per-stage thread counts (duplex.cpu): half the cores by default, the environment overrides."""

from __future__ import annotations

import pytest

from duplex.cpu import stage_threads


def test_half_the_cores_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUPLEX_TORCH_THREADS", raising=False)
    for cores, want in ((1, 1), (2, 1), (3, 1), (4, 2), (16, 8)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert stage_threads("DUPLEX_TORCH_THREADS") == want


def test_the_environment_overrides_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "3")
    assert stage_threads("DUPLEX_TORCH_THREADS") == 3
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "0")
    assert stage_threads("DUPLEX_TORCH_THREADS") == 1
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "two")
    with pytest.raises(ValueError, match="DUPLEX_TORCH_THREADS"):
        stage_threads("DUPLEX_TORCH_THREADS")


def test_a_text_only_server_gives_the_llm_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from duplex.cli.serve import _llm_threads

    monkeypatch.delenv("DUPLEX_TORCH_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _llm_threads(argparse.Namespace(asr_model="none", tts="none")) == 2
    assert _llm_threads(argparse.Namespace(asr_model="tiny.en", tts="none")) == 1  # whisper needs a core
    assert _llm_threads(argparse.Namespace(asr_model="none", tts="piper")) == 1
    monkeypatch.setenv("DUPLEX_TORCH_THREADS", "1")
    assert _llm_threads(argparse.Namespace(asr_model="none", tts="none")) == 1  # the environment decides

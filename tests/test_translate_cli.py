"""``duplex translate score`` on a hand-written instances.log (values computed by hand), and
``duplex translate run`` / ``evaluate`` with the tiny random model writing SimulEval's format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from duplex.cli.main import main
from duplex.engine.models import LoadedModel
from duplex.translate.evaluate import evaluate
from duplex.translate.instances import read_instances, score_instances
from duplex.translate.prompt import make_prompt
from duplex.translate.translator import SimulTranslator

# Sentence 0: |X| = 4, 4 target words, a 3-word reference; the log gives the source duration.
# Sentence 1: |X| = 3, 3 target words, a 3-word reference; no duration: 3 words x 300 ms = 900 ms.
_LOG = [
    {"index": 0, "prediction": "uno dos tres cuatro", "delays": [2, 3, 4, 4],
     "elapsed": [700.0, 1000.0, 1300.0, 1300.0], "prediction_length": 4, "reference": "uno dos tres",
     "source_length": 4, "source_duration_ms": 1200.0},
    {"index": 1, "prediction": "la casa roja", "delays": [1, 1, 1], "elapsed": [400.0, 450.0, 500.0],
     "prediction_length": 3, "reference": "la casa azul", "source_length": 3},
]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_score_prints_simuleval_latency_and_sacrebleu_quality(tmp_path: Path, capsys) -> None:
    log = _write(tmp_path / "instances.log", _LOG)
    assert main(["translate", "score", str(log)]) == 0
    out = json.loads(capsys.readouterr().out)
    # AL uses the reference length |Y|: sentence 0 rate 4/3 -> (2 + (3 - 4/3) + (4 - 8/3)) / 3 = 5/3
    # (tau = 3); sentence 1 rate 1 -> (1 + 0 - 1) / 3 = 0
    assert out["AL"] == pytest.approx((5 / 3 + 0.0) / 2, abs=1e-3)
    # LAAL: max(|Y|, |hyp|) = 4 for sentence 0 -> (2 + 2 + 2) / 3 = 2
    assert out["LAAL"] == pytest.approx((2.0 + 0.0) / 2, abs=1e-3)
    # AP: 13 / (4 * 3) and 3 / (3 * 3)
    assert out["AP"] == pytest.approx((13 / 12 + 1 / 3) / 2, abs=1e-3)
    # DAL uses |hyp|: d' = 2, 3, 4, 5 -> 2; d' = 1, 2, 3 -> 1
    assert out["DAL"] == pytest.approx(1.5, abs=1e-3)
    # computation-aware, ms: sentence 0 (1200 ms, rate 400): (700 + 600 + 500) / 3 = 600;
    # sentence 1 (900 ms, rate 300, never >= 900): (400 + 150 - 100) / 3 = 150
    assert out["AL_CA_ms"] == pytest.approx((600.0 + 150.0) / 2, abs=1e-3)
    # LAAL_CA: sentence 0 at rate 300: (700 + 700 + 700) / 3
    assert out["LAAL_CA_ms"] == pytest.approx((700.0 + 150.0) / 2, abs=1e-3)
    assert out["AP_CA"] == pytest.approx((4300 / 3600 + 1350 / 2700) / 2, abs=1e-3)
    # DAL_CA: d' = 700, 1000, 1300, 1600 (rate 300) -> 700; d' = 400, 700, 1000 -> 400
    assert out["DAL_CA_ms"] == pytest.approx(550.0, abs=1e-3)
    assert out["word_interval_ms"] == 300.0  # sentence 1's duration came from it
    hyps, refs = [r["prediction"] for r in _LOG], [[r["reference"] for r in _LOG]]
    assert out["BLEU"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score, abs=0.01)
    assert out["chrF"] == pytest.approx(sacrebleu.corpus_chrf(hyps, refs).score, abs=0.01)


def test_score_without_references_or_elapsed_gives_plain_latency_only(tmp_path: Path) -> None:
    bare = [{k: v for k, v in r.items() if k not in ("reference", "elapsed", "source_duration_ms")} for r in _LOG]
    out = score_instances(_write(tmp_path / "instances.log", bare))
    assert "BLEU" not in out and "AL_CA_ms" not in out
    # without a reference |Y| = |hyp|: sentence 0 rate 1 -> (2 + 2 + 2) / 3 = 2
    assert out["AL"] == pytest.approx(1.0, abs=1e-3)
    # a slower word interval stretches the computation-aware source only
    timed = [{k: v for k, v in r.items() if k != "source_duration_ms"} for r in _LOG]
    slow = score_instances(_write(tmp_path / "timed.log", timed), word_interval_ms=600.0)
    assert slow["AL"] == pytest.approx((5 / 3) / 2, abs=1e-3)
    # sentence 0 at 2400 ms, rate 2400 / 3 = 800, never >= 2400: (700 + 200 - 300 - 1100) / 4;
    # sentence 1 at 1800 ms, rate 600: (400 + (450 - 600) + (500 - 1200)) / 3
    assert slow["AL_CA_ms"] == pytest.approx(((700 + 200 - 300 - 1100) / 4 + (400 - 150 - 700) / 3) / 2, abs=1e-3)


def test_score_reports_a_malformed_log_by_line(tmp_path: Path, capsys) -> None:
    log = tmp_path / "instances.log"
    log.write_text(json.dumps(_LOG[0]) + "\n{\"index\": 1, \"prediction\": \"x\"}\n", encoding="utf-8")
    assert main(["translate", "score", str(log)]) == 2
    assert "instances.log:2: missing delays, source_length" in capsys.readouterr().err


def test_run_writes_simuleval_instances_and_scores_with_the_tiny_model(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("where is the station\nI like coffee\nsee you\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("dónde está la estación\nme gusta el café\nhasta luego\n", encoding="utf-8")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "duplex.cli.main", "translate", "run", "--model", "tiny",
                           "--src", str(tmp_path / "src.txt"), "--ref", str(tmp_path / "ref.txt"),
                           "--policy", "wait-k", "--k", "2", "--out", str(out), "--threads", "1"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3/3" in proc.stderr  # the progress bar
    records = read_instances(out / "instances.log")
    assert [r["index"] for r in records] == [0, 1, 2]
    for r, src, ref in zip(records, ["where is the station", "I like coffee", "see you"],
                           ["dónde está la estación", "me gusta el café", "hasta luego"]):
        assert {"index", "prediction", "delays", "elapsed", "prediction_length", "reference",
                "source_length"} <= set(r)
        assert r["reference"] == ref and r["source_length"] == len(src.split())
        assert r["prediction_length"] == len(r["delays"]) == len(r["elapsed"]) == len(r["prediction"].split())
        # wait-k, k = 2: target word i is written after min(k + i - 1, |X|) source words at the earliest
        assert all(d >= min(2 + i, r["source_length"]) for i, d in enumerate(r["delays"]))
        assert r["delays"] == sorted(r["delays"]) and r["elapsed"] == sorted(r["elapsed"])
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert scores["policy"] == "wait-k:k=2" and json.loads(proc.stdout) == scores
    rescored = score_instances(out / "instances.log")
    assert {k: scores[k] for k in rescored} == rescored


def test_run_refuses_an_unknown_policy_before_loading_a_model(tmp_path: Path, capsys) -> None:
    (tmp_path / "src.txt").write_text("hello\n", encoding="utf-8")
    assert main(["translate", "run", "--model", "tiny", "--src", str(tmp_path / "src.txt"),
                 "--policy", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_eval_instances_score_the_same_as_its_json(tiny_lm: LoadedModel, tmp_path: Path) -> None:
    model = SimulTranslator(tiny_lm, make_prompt(), max_word_tokens=3, max_target_ratio=1.0)
    results = evaluate(model, ["where is the station", "I like coffee"], ["dónde está la estación", "me gusta"],
                       ["wait-k:k=1", "offline"], instances_dir=tmp_path)
    for spec, folder in (("wait-k:k=1", "wait-k_k1"), ("offline", "offline")):
        rescored = score_instances(tmp_path / folder / "instances.log")
        assert {k: results[spec][k] for k in rescored} == rescored

"""The scheduler's tick log (``DUPLEX_TICK_LOG``) and its summary (duplex.bench.ticks): rows and
chains are counted from the log's records; the times in them are made up or not asserted."""

from __future__ import annotations

import json

from duplex.bench.ticks import summarize_tick_log
from duplex.engine.models import LoadedModel
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import Speaker
from duplex.engine.worker import Engine


def _tick(n: int, ended: float, seconds: float, rows: list[list], express: int = 0) -> str:
    return json.dumps({"tick": n, "ended": ended, "seconds": seconds, "express": express, "rows": rows})


def test_first_words_chains_are_cut_from_the_urgent_rows_and_name_the_prefill_they_rode_with(tmp_path) -> None:
    # rows: [owner, tokens, start_pos, decode, urgent, waited_s]
    lines = [
        # session 1's question + hand-over, alone (it waited 10 ms for the tick)
        _tick(0, 1.10, 0.09, [[1, 20, 0, 0, 1, 0.01]]),
        # its first decode step rides with 16 tokens of session 2's question
        _tick(1, 1.30, 0.19, [[1, 1, 20, 1, 1, 0.0], [2, 16, 0, 0, 1, 0.05]]),
        # its second step alone, still urgent; session 2's rest
        _tick(2, 1.35, 0.04, [[1, 1, 21, 1, 1, 0.0], [2, 5, 16, 0, 1, 0.0]]),
        # session 1's first words are out (not urgent any more); session 2's first step
        _tick(3, 1.40, 0.03, [[1, 1, 22, 1, 0, 0.0], [2, 1, 21, 1, 1, 0.0]]),
        '{"tick": 4, "ended": 1.5',  # cut short by a killed server: skipped
        _tick(5, 1.45, 0.03, [[2, 1, 22, 1, 0, 0.0]]),
    ]
    path = tmp_path / "ticks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = summarize_tick_log(path)
    assert summary["ticks"] == 5
    chains = summary["first_words_chains"]
    assert chains["n"] == 2
    # session 1: arrived at 1.10 - 0.09 - 0.01 = 1.00, its last urgent row's tick ended at 1.35
    # session 2: arrived at 1.30 - 0.19 - 0.05 = 1.06, its last urgent tick ended at 1.40
    assert chains["span_ms"]["p95"] == 349.5  # interpolated between 340 and 350 (soak_report.percentile)
    slow = chains["slowest_tenth"]
    assert slow["n"] == 1 and slow["mean_span_ms"] == 350.0
    assert slow["mean_ticks"] == 3
    assert slow["mean_waiting_ms"] == 10.0
    assert slow["mean_in_ticks_ms"] == 320.0  # 90 + 190 + 40
    assert slow["mean_in_ticks_with_others_prefill_ms"] == 230.0  # the ticks with session 2's question
    assert slow["mean_others_prefill_tokens_per_tick"] == 7.0  # (0 + 16 + 5) / 3
    assert summarize_tick_log(path, since=1.32)["ticks"] == 3  # a window by the ticks' end times


def test_decode_ticks_split_the_gap_before_them_by_their_rows_arrivals(tmp_path) -> None:
    # six 2-row decode ticks of 20 ms, each starting 3 ms after the one before ended: its rows
    # arrived 2.0 and 1.5 ms before it started (1 ms after the last tick, then 0.5 ms apart);
    # a prefill tick and a lone 1-row tick are left out (too few of their size)
    lines, ended = [], 1.0
    for n in range(6):
        start = ended + 0.003
        ended = start + 0.02
        lines.append(_tick(n, ended, 0.02, [[1, 1, 10 + n, 1, 0, 0.002], [2, 1, 30 + n, 1, 0, 0.0015]]))
    lines.append(_tick(6, ended + 0.05, 0.04, [[3, 12, 0, 0, 1, 0.0]]))
    lines.append(_tick(7, ended + 0.07, 0.01, [[1, 1, 16, 1, 0, 0.0]]))
    path = tmp_path / "ticks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    decode = summarize_tick_log(path)["decode_ticks"]
    assert list(decode) == ["2"]
    two = decode["2"]
    assert two["ticks"] == 6 and two["tick_ms_p50"] == 20.0
    assert two["gap_before_ms_p50"] == 3.0  # the first tick has no tick before it: 5 gaps
    assert two["gap_until_first_row_ms_p50"] == 1.0
    assert two["gap_rows_arriving_ms_p50"] == 0.5
    assert two["gap_after_last_row_ms_p50"] == 1.5


async def test_the_scheduler_logs_every_tick_with_its_rows(tiny_lm: LoadedModel, tmp_path, monkeypatch) -> None:
    path = tmp_path / "ticks.jsonl"
    monkeypatch.setenv("DUPLEX_TICK_LOG", str(path))
    engine = Engine(tiny_lm)
    try:
        seq = engine.new_sequence()
        engine.scheduler.trace.clear()
        await engine.run(seq.add_message, Speaker.SYSTEM, "You are brief.")
        await engine.run_urgent(seq, seq.hand_over, Speaker.AGENT)
        sampler = Sampler(SamplingConfig(temperature=0.0, max_tokens=8))
        for _ in range(3):
            await engine.decode(seq, sampler)
        traced = list(engine.scheduler.trace)
    finally:
        engine.close()  # flushes the log
    logged = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(logged) == len(traced) > 0
    for entry, tick in zip(logged, traced):
        assert entry["tick"] == tick.tick and entry["express"] == int(tick.express)
        assert [r[:5] for r in entry["rows"]] == [[r.owner, r.tokens, r.start_pos, int(r.decode), int(r.urgent)]
                                                   for r in tick.rows]
        assert all(r[5] >= 0 for r in entry["rows"]) and entry["seconds"] >= 0
    rows = [r for e in logged for r in e["rows"]]
    assert any(r[4] and not r[3] for r in rows)  # the urgent hand-over
    assert sum(1 for r in rows if r[3]) >= 3  # the decode steps


def test_two_engines_in_one_process_log_to_two_files(tmp_path):
    """A translation engine beside the chat engine: the second log gets FILE.2, so neither buffered
    writer cuts the other's lines; the path is free again once closed."""
    import json as _json

    from duplex.engine.scheduler_work import RowRecord, TickLog, TickRecord

    path = str(tmp_path / "ticks.jsonl")
    first, second = TickLog(path), TickLog(path)
    try:
        assert first.path == path and second.path == path + ".2"
        for log, tick in ((first, 1), (second, 2)):
            log.add(TickRecord(tick, (RowRecord(7, 1, 10, True, 0),), 1, 0.01))
    finally:
        first.close()
        second.close()
    assert [_json.loads(line)["tick"] for line in open(path)] == [1]
    assert [_json.loads(line)["tick"] for line in open(path + ".2")] == [2]
    third = TickLog(path)
    third.close()
    assert third.path == path

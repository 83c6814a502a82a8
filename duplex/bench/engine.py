"""Engine benchmarks that print JSON and compare against a bound or baseline measured in the same run.

- decode: ms/token of the model vs the memory-bandwidth bound (a mat-vec over the same weight bytes);
          for the int8 model also batched decode rows through the lean forward (ms per forward at
          1-16 rows, the 8-row/1-row ratio) and a 6-token hand-over at a short and a long history.
- ttft:   end of user turn -> first reply token, shared cache (incremental prefill) vs re-prefilling
          the whole history as a stateless chat API must.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import torch

from duplex.engine.attention import attention_isa, set_attention_isa
from duplex.engine.models import LoadedModel, load_model, resolve_device
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SequenceConfig, SharedSequence, Speaker
from duplex.engine.template import TurnTemplate

__all__ = ["bench_decode", "bench_decode_rows", "bench_ttft", "fp32_gmacs", "memory_bound_ms"]

log = logging.getLogger(__name__)

_FILLER = (
    "I went to the market this morning and bought apples, bread, some cheese and a bunch of "
    "flowers for my sister, who is visiting from Lisbon next week with her two children. "
)


def _progress(out: TextIO | None, msg: str) -> None:
    if out is not None:
        print(f"[bench] {msg}", file=out, flush=True)


def memory_bound_ms(weight_bytes: int, dtype: torch.dtype, device: torch.device, reps: int = 10,
                    int8: bool = False) -> float:
    """Time one mat-vec that reads ``weight_bytes`` of weights in the model's storage format
    (``int8``: the same int8 mat-vec the quantized model's decode steps use): the floor for a decode
    step with that kernel; ``bandwidth_bound_ms`` in :func:`bench_decode` is the physical one."""
    elem = 1 if int8 else torch.tensor([], dtype=dtype).element_size()
    cols = 4096
    rows = max(1, weight_bytes // (elem * cols))
    x = torch.randn(1, cols, dtype=torch.float32).to(dtype=dtype, device=device)
    if int8:
        from duplex.engine.quant import int8_matmul

        w = torch.randint(-127, 127, (rows, cols), dtype=torch.int8, device=device)
        scales = torch.rand(rows, device=device).to(dtype)

        def op() -> None:
            int8_matmul(x, w, scales)  # the mat-vec decode steps use (the C kernel where it builds)
    else:
        w = torch.randn(rows, cols, dtype=torch.float32).to(dtype=dtype, device=device)

        def op() -> None:
            torch.nn.functional.linear(x, w)
    times = []
    with torch.inference_mode():
        for _ in range(reps + 2):
            _sync(device)
            t = time.perf_counter()
            op()
            _sync(device)
            times.append((time.perf_counter() - t) * 1000)
    return min(times[2:])


def bandwidth_gbps(device: torch.device, mbytes: int = 512) -> float:
    """Streaming read bandwidth (an fp32 mat-vec over ``mbytes``), best of several runs."""
    ms = memory_bound_ms(mbytes * 1_000_000, torch.float32, device)
    return mbytes / 1000 / (ms / 1000)


def fp32_gmacs(device: torch.device, n: int = 512, k: int = 2048, reps: int = 7) -> float:
    """Multiply-adds per second of PyTorch's own fp32 matrix product at this run's threads (best of
    ``reps``): the rate of the fp32 arithmetic the AVX2 attention code does, as good as a tuned
    GEMM gets it on this CPU."""
    a = torch.randn(n, k, device=device)
    b = torch.randn(k, n, device=device)
    best = float("inf")
    for _ in range(reps):
        best = min(best, _timed(lambda: torch.mm(a, b), device))
    return n * k * n / (best / 1000) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _decode_ms_per_token(lm: LoadedModel, tokens: int) -> float:
    seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer))
    seq.add_message(Speaker.USER, "Tell me a long story about a lighthouse keeper.")
    seq.begin_turn(Speaker.AGENT)
    sampler = Sampler(SamplingConfig())
    for _ in range(4):  # warm-up
        seq.step(sampler)
    times = []
    for _ in range(tokens):
        _sync(lm.device)
        t = time.perf_counter()
        seq.step(sampler)
        _sync(lm.device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


_VARIANTS = (("float32", None), ("bfloat16", None), ("bfloat16", "int8"))


def bench_decode(model: str | None = None, device: str = "auto",
                 variants: tuple[tuple[str, str | None], ...] = _VARIANTS,
                 tokens: int = 48, progress: TextIO | None = sys.stderr, batched: bool = True) -> dict[str, Any]:
    """Decode speed per weight format next to its bound; the headline is the fastest format.
    ``batched``: for the int8 format also :func:`bench_decode_rows` (key ``batched``).

    ``bound_ms_per_token``: one mat-vec over the same weight bytes in the same storage format.
    ``bandwidth_bound_ms``: the same bytes at the best streaming bandwidth measured in this run
    (an fp32 mat-vec), i.e. the physical floor whatever the kernel."""
    dev = resolve_device(device)
    gbps = bandwidth_gbps(dev)
    _progress(progress, f"streaming bandwidth {gbps:.1f} GB/s")
    rows = []
    batched_result: dict[str, Any] | None = None
    for dt, quant in variants:
        label = dt if quant is None else f"{dt}+{quant}"
        _progress(progress, f"loading {model or 'default'} as {label}")
        lm = load_model(model, device=device, dtype=dt, quantize=quant)
        _progress(progress, f"decoding {tokens} tokens ({label})")
        ms = _decode_ms_per_token(lm, tokens)
        bound = memory_bound_ms(lm.weight_bytes, lm.dtype, lm.device, int8=quant == "int8")
        bw_bound = lm.weight_bytes / 1e9 / gbps * 1000
        if quant == "int8" and batched:
            batched_result = bench_decode_rows(lm, progress=progress)
        rows.append({"dtype": label, "ms_per_token": round(ms, 2), "bound_ms_per_token": round(bound, 2),
                     "ratio": round(ms / bound, 3), "bandwidth_bound_ms": round(bw_bound, 2),
                     "bandwidth_ratio": round(ms / bw_bound, 2), "weight_mb": round(lm.weight_bytes / 1e6, 1)})
        _progress(progress, f"{label}: {ms:.1f} ms/token, bound {bound:.1f} ms ({ms / bound:.2f}x), "
                            f"bandwidth bound {bw_bound:.1f} ms ({ms / bw_bound:.2f}x)")
        del lm
    best = min(rows, key=lambda r: r["ms_per_token"])
    _progress(progress, f"fastest: {best['dtype']} {best['ms_per_token']} ms/token = {best['ratio']}x its bound "
                        f"(target <= 1.5x, stretch 1.3x)")
    return {"benchmark": "decode", "model": model or "smollm2-135m-instruct", "device": str(dev),
            "threads": torch.get_num_threads(), "load_avg_1min": _load_avg(), "bandwidth_gbps": round(gbps, 1), **best,
            "all_variants": rows, **({"batched": batched_result} if batched_result else {})}


def _prefilled_cache(lm: LoadedModel, ids: list[int], chunk: int = 512) -> Any:
    from duplex.engine.kv import new_kv_cache

    cache = new_kv_cache(lm.model.config)  # the engine's cache: in-place appends
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            lm.model(input_ids=torch.tensor([ids[i:i + chunk]], device=lm.device), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)
    return cache


def bench_decode_rows(lm: LoadedModel, row_counts: tuple[int, ...] = (1, 2, 4, 8, 16), history: int = 100,
                      handover: tuple[int, int] = (100, 4000), handover_tokens: int = 6, reps: int = 7,
                      threads: int | None = None, progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """The scheduler's batched decode forward (:meth:`FastDecoder.forward`, one row per session,
    each with its own cache at ``history`` tokens): median ms per forward at each row count, per
    row, and the 8-row/1-row ratio (the issue target: aggregate tokens/s at 8 sessions >= 3x one,
    so well under 2x); and one row's ``handover_tokens``-token forward (a turn hand-over) over
    ``handover`` cached tokens, short vs long. Runs at ``threads`` torch/OpenMP threads (default:
    the served LLM stage's, :func:`duplex.cpu.stage_threads`), restored afterwards."""
    from duplex.cpu import stage_threads
    from duplex.engine.fast_decode import DecodeRow, fast_decoder

    dec = fast_decoder(lm.model)
    if dec is None:
        return {"skipped": "no lean decode forward for this model"}
    threads = threads or stage_threads("DUPLEX_TORCH_THREADS")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        filler = lm.tokenizer.encode(_FILLER, add_special_tokens=False)
        text = filler * (max(*handover, history) // len(filler) + 2)
        result: dict[str, Any] = {"threads": threads, "history_tokens": history, "forward_ms": {}, "ms_per_row": {}}
        caches = [_prefilled_cache(lm, text[i:i + history]) for i in range(max(row_counts))]

        def timed_forward(rows: list[DecodeRow], n_cached: list[int]) -> float:
            ms = _timed(lambda: dec.forward(rows), lm.device)
            for row, n in zip(rows, n_cached):
                extra = int(row.cache.get_seq_length()) - n
                if extra > 0:
                    row.cache.crop(-extra)  # back to n cached tokens for the next repetition
            return ms

        from duplex.engine.int8_kernel import q16_isa, set_q16_isa

        # the same forwards on the next older int8 tiles (same bits) alternate with them, so both see
        # the same machine (shared hosts drift by the minute)
        result["q16_isa"] = isa = q16_isa()
        lower = {"amx-int8": "avx512-vnni", "avx512-vnni": "avx2"}.get(isa or "")
        base: dict[str, float] = {}
        try:
            for m in row_counts:
                rows = [DecodeRow(caches[i], [text[history + i]], history) for i in range(m)]
                times, times2 = [], []
                for _ in range(reps + 2):
                    times.append(timed_forward(rows, [history] * m))
                    if lower:
                        set_q16_isa(lower)
                        times2.append(timed_forward(rows, [history] * m))
                        set_q16_isa(isa)
                ms = statistics.median(times[2:])
                result["forward_ms"][str(m)] = round(ms, 2)
                result["ms_per_row"][str(m)] = round(ms / m, 2)
                note = ""
                if lower:
                    base[str(m)] = round(statistics.median(times2[2:]), 2)
                    note = f"; {lower} tiles {base[str(m)]:.1f} ms"
                _progress(progress, f"batched decode: {m} rows {ms:.1f} ms per forward ({ms / m:.2f} ms per row){note}")
        finally:
            if isa:
                set_q16_isa(isa)
        if "1" in result["forward_ms"] and "8" in result["forward_ms"]:
            result["ratio_8_to_1"] = round(result["forward_ms"]["8"] / result["forward_ms"]["1"], 2)
            result["aggregate_tokens_per_s_8_vs_1"] = round(8 / result["ratio_8_to_1"], 2)
        if base:
            result["lower_isa"] = lower
            result["lower_isa_forward_ms"] = base
            if "1" in base and "8" in base:
                result["lower_isa_ratio_8_to_1"] = round(base["8"] / base["1"], 2)
        del caches
        ho: dict[str, float] = {}
        for n in handover:
            cache = _prefilled_cache(lm, text[:n])
            row = DecodeRow(cache, text[n:n + handover_tokens], n)
            times = [timed_forward([row], [n]) for _ in range(reps + 2)][2:]
            ho[str(n)] = round(statistics.median(times), 2)
            _progress(progress, f"hand-over: {handover_tokens} tokens at {n} cached: {ho[str(n)]:.1f} ms")
            del cache
        result["handover"] = {"tokens": handover_tokens, "forward_ms": ho,
                              "ratio_long_to_short": round(ho[str(handover[-1])] / ho[str(handover[0])], 2)}
        # 8 sessions' aggregate tokens/s >= 3x one session's: a forward of 8 rows <= 8/3 of one row's
        result["targets"] = {"ratio_8_to_1_max": round(8 / 3, 2), "handover_ratio_long_to_short_max": 1.5}
        return result
    finally:
        torch.set_num_threads(before)


def _load_avg() -> float | None:
    """The machine's 1-minute load average when the result was taken (shared machines)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _history_sequence(lm: LoadedModel, history_tokens: int) -> tuple[SharedSequence, list[int]]:
    """A sequence holding ``history_tokens`` of alternating turns, plus the final user turn's ids."""
    seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer),
                         SequenceConfig(max_tokens=max(8192, history_tokens * 2), keep_recent_tokens=4096))
    seq.add_message(Speaker.SYSTEM, "You are a helpful assistant.")
    filler = lm.tokenizer.encode(_FILLER, add_special_tokens=False)
    speaker = Speaker.USER
    while len(seq) < history_tokens:
        seq.begin_turn(speaker)
        seq.append(filler[: max(1, min(len(filler), history_tokens - len(seq)))])
        seq.end_turn(speaker)
        speaker = Speaker.AGENT if speaker is Speaker.USER else Speaker.USER
    last = lm.tokenizer.encode("So what should I cook for them tonight?", add_special_tokens=False)
    return seq, last


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t) * 1000


# the C attention codes below each one, timed on the same turn ends for comparison
_LOWER_ATTENTION_ISAS = {"amx-bf16": ("avx512-bf16", "avx2"), "avx512-bf16": ("avx2",)}


def bench_ttft(model: str | None = None, device: str = "auto", dtype: str = "auto",
               histories: tuple[int, ...] = (100, 1000, 4000), reps: int = 7, turn_ends_per_rep: int = 3,
               progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """TTFT at several history lengths: shared cache vs full re-prefill, same model, same run.

    Every round times each history in turn (and each attention code on it), so the growth ratio
    compares turn ends taken seconds apart: on a shared host whose speed drifts by 2x from minute to
    minute, timing one history's reps after the other's had put that drift into the ratio."""
    lm = load_model(model, device=device, dtype=dtype)
    sampler = Sampler(SamplingConfig())
    best = attention_isa()
    lower = [isa for isa in _LOWER_ATTENTION_ISAS.get(best or "", ()) if set_attention_isa(isa) == isa]
    if best:
        set_attention_isa(best)
    states = []
    for n in histories:
        _progress(progress, f"history {n} tokens: building")
        seq, last = _history_sequence(lm, n)
        seq.begin_turn(Speaker.USER)
        seq.append(last)  # prefilled while the user was still speaking
        states.append({"seq": seq, "base": len(seq), "shared": [], "full": [], "prepared": [],
                       "by_isa": {isa: [] for isa in lower}})

    def turn_end(seq: SharedSequence) -> None:
        # user turn ends: close it, open the agent turn, sample the first token
        seq.hand_over(Speaker.AGENT)
        seq.sample(sampler)  # emitted here; its own forward pass comes after

    def reset(st: dict[str, Any]) -> None:
        seq = st["seq"]
        seq.truncate_to(st["base"])
        seq.reopen(Speaker.USER, seq.open_turn[1] if seq.open_turn else _last_turn(seq))

    for rep in range(reps):
        _progress(progress, f"round {rep + 1}/{reps}")
        for st in states:
            seq = st["seq"]
            for _ in range(turn_ends_per_rep):
                st["shared"].append(_timed(functools.partial(turn_end, seq), lm.device))
                reset(st)
                for isa in lower:  # the same turn end on the older attention codes
                    set_attention_isa(isa)
                    try:
                        st["by_isa"][isa].append(_timed(functools.partial(turn_end, seq), lm.device))
                    finally:
                        set_attention_isa(best)
                    reset(st)
            history_ids = seq.ids
            tail = list(seq.template.user.footer) + list(seq.template.agent.header)
            st["full"].append(_timed(functools.partial(_reprefill_first_token, lm, history_ids + tail, sampler),
                                     lm.device))
            # the session's speculative path: footer + agent header were prefilled during the
            # user's end-of-turn silence, so the turn end itself only samples
            seq.hand_over(Speaker.AGENT)
            st["prepared"].append(_timed(functools.partial(seq.sample, sampler), lm.device))
            reset(st)
    rows = []
    for st in states:
        row = {"history_tokens": len(st["seq"]), "shared_cache_ms": round(statistics.median(st["shared"]), 1),
               "shared_cache_prepared_ms": round(statistics.median(st["prepared"]), 2),
               "reprefill_ms": round(statistics.median(st["full"]), 1)}
        if lower:
            row["shared_cache_ms_by_attention"] = {isa: round(statistics.median(ms), 1)
                                                   for isa, ms in st["by_isa"].items()}
        row["speedup"] = round(row["reprefill_ms"] / row["shared_cache_ms"], 1)
        rows.append(row)
        _progress(progress, str(row))
    first, last_row = rows[0], rows[-1]
    extra = {}
    if "shared_cache_ms_by_attention" in first:
        extra["growth_ratio_by_attention"] = {
            isa: round(last_row["shared_cache_ms_by_attention"][isa] / ms, 2)
            for isa, ms in first["shared_cache_ms_by_attention"].items()}
    # the physical floor of the growth: reading the extra history's keys and values once, at the
    # streaming bandwidth of this run's threads (what a turn end cannot avoid; everything else in
    # it is the same work at any history)
    cfg = lm.model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * lm.dtype.itemsize
    gbps = bandwidth_gbps(lm.device, mbytes=512)  # twice what the KV cache or an L3 holds
    extra_ms = (last_row["history_tokens"] - first["history_tokens"]) * kv_bytes_per_token / (gbps * 1e6)
    extra["kv_bytes_per_token"] = kv_bytes_per_token
    extra["bandwidth_gbps"] = round(gbps, 1)
    extra["memory_bound_growth_ratio"] = round((first["shared_cache_ms"] + extra_ms) / first["shared_cache_ms"], 2)
    if attention_isa() == "avx2":
        # where attention is fp32 multiply-adds (the AVX2 code), the extra history's arithmetic is a
        # second floor: the hand-over's query rows against every extra key, scores and values
        hand_over = len(states[0]["seq"].template.user.footer) + len(states[0]["seq"].template.agent.header)
        macs = (hand_over * cfg.num_attention_heads * head_dim * 2 * cfg.num_hidden_layers
                * (last_row["history_tokens"] - first["history_tokens"]))
        gmacs = fp32_gmacs(lm.device)
        compute_ms = macs / (gmacs * 1e6)
        extra["fp32_gmacs"] = round(gmacs, 1)
        extra["attention_extra_gmac"] = round(macs / 1e9, 3)
        extra["compute_bound_growth_ratio"] = round((first["shared_cache_ms"] + compute_ms) / first["shared_cache_ms"], 2)
    return {
        "benchmark": "ttft", "attention": attention_isa(), **extra, "model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
        "quantization": lm.quantization, "load_avg_1min": _load_avg(),
        "rows": rows,
        "shared_growth_ratio": round(last_row["shared_cache_ms"] / first["shared_cache_ms"], 2),
        "speedup_at_longest": last_row["speedup"],
        "targets": {"shared_growth_ratio_max": 1.5, "speedup_at_longest_min": 10.0},
    }


@torch.inference_mode()
def _reprefill_first_token(lm: LoadedModel, ids: list[int], sampler: Sampler, chunk: int = 512) -> int:
    """What a stateless chat API does at every turn: encode the whole history, then sample."""
    from transformers import DynamicCache

    lm.model.set_attn_implementation(lm.attn_implementation)  # the loaded prefill kernel
    cache = DynamicCache(config=lm.model.config)
    logits = None
    for i in range(0, len(ids), chunk):
        piece = torch.tensor([ids[i:i + chunk]], device=lm.device)
        out = lm.model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[0, -1]
    assert logits is not None
    return sampler(logits)


def _last_turn(seq: SharedSequence) -> int:
    return seq.spans()[-1].turn

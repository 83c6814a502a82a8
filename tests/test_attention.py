"""The GQA decode kernel equals PyTorch's reference attention for short query blocks."""

from __future__ import annotations

import pytest
import torch

from duplex.engine.attention import gqa_decode_attention


@pytest.mark.parametrize("q,n", [(1, 1), (1, 37), (3, 10), (6, 64)])
def test_matches_causal_sdpa_on_the_last_positions(q, n):
    torch.manual_seed(0)
    query = torch.randn(1, 6, q, 16)
    key = torch.randn(1, 2, n, 16)
    value = torch.randn(1, 2, n, 16)
    out, _ = gqa_decode_attention(None, query, key, value, None)
    k = key.repeat_interleave(3, dim=1)
    v = value.repeat_interleave(3, dim=1)
    mask = torch.ones(q, n, dtype=torch.bool).tril(diagonal=n - q)
    ref = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q,n", [(1, 300), (5, 64)])
def test_half_precision_inputs_are_attended_in_fp32_on_cpu(q, n, monkeypatch):
    """The torch path (``DUPLEX_DECODE_ATTN_KERNEL=torch``; the default C kernel sums in another
    order) computes bf16 inputs exactly as fp32 attention of the same values."""
    from duplex.engine import attention

    monkeypatch.setenv("DUPLEX_DECODE_ATTN_KERNEL", "torch")
    attention._cpu_decode_kernel.cache_clear()
    try:
        torch.manual_seed(1)
        query, key, value = (torch.randn(1, h, t, 16) for h, t in ((6, q), (2, n), (2, n)))
        ref, _ = gqa_decode_attention(None, *(t.bfloat16().float() for t in (query, key, value)), None)
        out, _ = gqa_decode_attention(None, query.bfloat16(), key.bfloat16(), value.bfloat16(), None)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    finally:
        attention._cpu_decode_kernel.cache_clear()


@pytest.fixture
def c_kernel(monkeypatch):
    """The C decode-attention kernel, built fresh with ``DUPLEX_DECODE_ATTN_KERNEL=c``."""
    from duplex.engine import attention

    monkeypatch.setenv("DUPLEX_DECODE_ATTN_KERNEL", "c")
    attention._cpu_decode_kernel.cache_clear()
    try:
        kernel = attention._cpu_decode_kernel()
        if kernel is None:
            pytest.skip("no C compiler or no AVX2")
        yield kernel
    finally:
        attention._cpu_decode_kernel.cache_clear()


def _causal_fp32(query, key, value, scale):
    """fp32 SDPA of the last q positions over n keys, causal: what the kernel must reproduce."""
    q, n = query.shape[2], key.shape[2]
    mask = torch.ones(q, n, dtype=torch.bool).tril(diagonal=n - q)
    return torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                                            scale=scale, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("q,n", [(1, 1), (1, 300), (5, 5), (5, 130), (6, 6), (6, 300), (11, 200)])
def test_c_decode_kernel_matches_fp32_attention(q, n, c_kernel):
    """Blocks of several tokens (a 6-token turn hand-over, 11 tokens: 33 query rows per KV head) run
    in one call, each token with its own causal bound."""
    torch.manual_seed(2)
    query = torch.randn(1, 6, q, 16).bfloat16()
    key = torch.randn(1, 2, n + 7, 16).bfloat16()[:, :, :n]  # a view into a larger buffer, as the cache
    value = torch.randn(1, 2, n + 7, 16).bfloat16()[:, :, :n]
    out = c_kernel(query, key, value, 0.25)
    assert out is not None and out.shape == (1, q, 6, 16)
    torch.testing.assert_close(out.float(), _causal_fp32(query, key, value, 0.25), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("q", [1, 6, 11])
@pytest.mark.parametrize("n", [11, 64, 65, 130, 1000])
def test_c_decode_kernel_with_smollm_heads_matches_fp32_attention(q, n, monkeypatch):
    """SmolLM2's layout (9 query heads over 3 KV heads, head_dim 64): key blocks of 64 with a
    partial last one, the online softmax across blocks, and rows whose causal bound ends inside a
    block (t > 1) or before the last block starts."""
    from duplex.engine import attention

    monkeypatch.setenv("DUPLEX_DECODE_ATTN_KERNEL", "c")
    attention._cpu_decode_kernel.cache_clear()
    try:
        kernel = attention._cpu_decode_kernel()
        if kernel is None:
            pytest.skip("no C compiler or no AVX2")
        if n < q:
            pytest.skip("fewer keys than queries")
        torch.manual_seed(n * 100 + q)
        query = (torch.randn(1, 9, q, 64) * 2).bfloat16()
        key = torch.randn(1, 3, n + 5, 64).bfloat16()[:, :, :n]
        value = torch.randn(1, 3, n + 5, 64).bfloat16()[:, :, :n]
        out = kernel(query, key, value, 0.125)
        assert out is not None and out.shape == (1, q, 9, 64)
        mask = torch.ones(q, n, dtype=torch.bool).tril(diagonal=n - q)
        ref = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                                               scale=0.125, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    finally:
        attention._cpu_decode_kernel.cache_clear()


@pytest.mark.parametrize("isa", ["avx2", "avx512-bf16", "amx-bf16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("q,n,d", [(1, 4000, 64), (6, 4000, 64), (16, 700, 64), (5, 333, 128), (3, 64, 64),
                                   (2, 130, 64), (11, 4000, 64), (6, 70, 128), (7, 500, 64)])
def test_attention_codes_match_fp32_and_the_avx2_code(isa, q, n, d, threads, monkeypatch):
    """Every code splits a row's keys across threads (3 KV heads on 2 threads) and merges the
    per-range softmax sums, for any number of query rows (11 tokens: 33 rows). Where the CPU has
    AVX512_BF16, head dims that are multiples of 64 run the zmm code: keys
    transposed per block for the bf16 dot products, keys split across threads (3 KV heads on 2
    threads) with the per-range softmax sums merged. Where it also has AMX, blocks of 6 or more query
    rows run on tiles: scores transposed (keys straight from the cache), rows padded to 16 (6 rows;
    21 rows = 2 groups), a trailing group of at most 4 rows with its softmax along the rows (18 and
    33 rows: 2 and 1 left over), a partial last block, the causal masks only near the end,
    probabilities in bf16. Same attention as the fp32 reference and the AVX2 code, to bf16 rounding."""
    from duplex.engine import attention

    monkeypatch.setenv("DUPLEX_DECODE_ATTN_KERNEL", "c")
    attention._cpu_decode_kernel.cache_clear()
    before = torch.get_num_threads()
    try:
        kernel = attention._cpu_decode_kernel()
        if kernel is None or attention.set_attention_isa(isa) != isa:
            pytest.skip(f"no {isa} here")
        torch.set_num_threads(threads)
        torch.manual_seed(q * 7 + n + d)
        h, kvh = 9, 3
        query = (torch.randn(1, h, q, d) * 2).bfloat16()
        key = torch.randn(1, kvh, n + 3, d).bfloat16()[:, :, :n]
        value = torch.randn(1, kvh, n + 3, d).bfloat16()[:, :, :n]
        scale = d ** -0.5
        outs = {}
        for code in ("avx2", isa):
            assert attention.set_attention_isa(code) == code
            outs[code] = kernel(query, key, value, scale)
            assert outs[code] is not None and outs[code].shape == (1, q, h, d)
        mask = torch.ones(q, n, dtype=torch.bool).tril(diagonal=n - q)
        ref = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                                               scale=scale, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(outs[isa].float(), ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(outs[isa].float(), outs["avx2"].float(), rtol=1e-2, atol=1e-2)
    finally:
        torch.set_num_threads(before)
        attention._cpu_decode_kernel.cache_clear()


def test_attention_isa_names_are_checked():
    from duplex.engine import attention

    if attention.decode_kernel() is None:
        pytest.skip("no C kernel")
    with pytest.raises(ValueError, match="avx512"):
        attention.set_attention_isa("avx1024")


@pytest.mark.parametrize("isa", ["avx2", "avx512-bf16", "amx-bf16"])
def test_a_long_row_attends_in_one_pass(isa):
    """The batched kernel takes a whole prefill chunk of a row (64 tokens x 3 query heads) in one
    pass over the cache on every code: same result as fp32 SDPA."""
    import ctypes

    from duplex.engine import attention

    attention._cpu_decode_kernel.cache_clear()
    try:
        fn = attention.decode_rows_kernel()
        if fn is None or attention.set_attention_isa(isa) != isa:
            pytest.skip(f"no {isa} here")
        torch.manual_seed(5)
        h, kvh, d, cached, t = 9, 3, 64, 300, 64
        k_cache = torch.zeros(1, kvh, cached + t + 10, d, dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        k_cache[:, :, :cached] = torch.randn(1, kvh, cached, d).bfloat16()
        v_cache[:, :, :cached] = torch.randn(1, kvh, cached, d).bfloat16()
        qkv = (torch.randn(t, (h + 2 * kvh) * d) * 2).bfloat16()
        out = torch.empty(t, h * d, dtype=torch.bfloat16)
        desc = torch.tensor([k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2] * d, 0, t, cached], dtype=torch.int64)
        assert fn(desc.data_ptr(), 1, qkv.data_ptr(), qkv.stride(0), out.data_ptr(), h, kvh, d, ctypes.c_float(0.125)) == 0
        n = cached + t
        q = qkv[:, :h * d].view(t, h, d).transpose(0, 1)[None].float()
        k_new = qkv[:, h * d:(h + kvh) * d].view(t, kvh, d).transpose(0, 1)
        v_new = qkv[:, (h + kvh) * d:].view(t, kvh, d).transpose(0, 1)
        assert torch.equal(k_cache[0, :, cached:n], k_new) and torch.equal(v_cache[0, :, cached:n], v_new)
        mask = torch.ones(t, n, dtype=torch.bool).tril(diagonal=n - t)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k_cache[:, :, :n].float(), v_cache[:, :, :n].float(),
                                                               attn_mask=mask, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(out.view(t, h, d).float(), ref[0].transpose(0, 1), rtol=1e-2, atol=1e-2)
    finally:
        attention._cpu_decode_kernel.cache_clear()


@pytest.mark.parametrize("isa", ["avx2", "avx512-bf16", "amx-bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_in_one_call_equal_a_call_per_row_bit_for_bit(isa, threads):
    """Every code attends every row of a layer in one parallel region (each (row, KV head, key
    range) a task): a decode row, a short hand-over on the tiles and a long-cache row whose keys
    split across threads give exactly what one call per row gives, caches included."""
    import ctypes

    from duplex.engine import attention

    attention._cpu_decode_kernel.cache_clear()
    before = torch.get_num_threads()
    try:
        fn = attention.decode_rows_kernel()
        if fn is None or attention.set_attention_isa(isa) != isa:
            pytest.skip(f"no {isa} here")
        torch.set_num_threads(threads)
        torch.manual_seed(11)
        h, kvh, d = 9, 3, 64
        rows = [(300, 1), (100, 6), (700, 19), (40, 2)]  # (cached, new tokens)
        t_all = sum(t for _, t in rows)
        qkv = (torch.randn(t_all, (h + 2 * kvh) * d) * 2).bfloat16()

        def caches():
            torch.manual_seed(12)
            out = []
            for cached, t in rows:
                k = torch.zeros(1, kvh, cached + t + 4, d, dtype=torch.bfloat16)
                v = torch.zeros_like(k)
                k[:, :, :cached] = torch.randn(1, kvh, cached, d).bfloat16()
                v[:, :, :cached] = torch.randn(1, kvh, cached, d).bfloat16()
                out.append((k, v))
            return out

        def desc(kv, first, t, cached):
            k, v = kv
            return [k.data_ptr(), v.data_ptr(), k.shape[2] * d, first, t, cached]

        together, alone = caches(), caches()
        out_together = torch.empty(t_all, h * d, dtype=torch.bfloat16)
        out_alone = torch.empty_like(out_together)
        starts = [sum(t for _, t in rows[:i]) for i in range(len(rows))]
        all_rows = torch.tensor([desc(kv, s, t, c) for kv, s, (c, t) in zip(together, starts, rows)], dtype=torch.int64)
        assert fn(all_rows.data_ptr(), len(rows), qkv.data_ptr(), qkv.stride(0), out_together.data_ptr(), h, kvh, d,
                  ctypes.c_float(0.125)) == 0
        for kv, s, (c, t) in zip(alone, starts, rows):
            one = torch.tensor([desc(kv, s, t, c)], dtype=torch.int64)
            assert fn(one.data_ptr(), 1, qkv.data_ptr(), qkv.stride(0), out_alone.data_ptr(), h, kvh, d,
                      ctypes.c_float(0.125)) == 0
        assert torch.equal(out_together, out_alone)
        for (k1, v1), (k2, v2) in zip(together, alone):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
        for (k_cache, v_cache), s, (cached, t) in zip(together, starts, rows):  # and it is attention
            n = cached + t
            q = qkv[s:s + t, :h * d].view(t, h, d).transpose(0, 1)[None].float()
            mask = torch.ones(t, n, dtype=torch.bool).tril(diagonal=n - t)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q, k_cache[:, :, :n].float(), v_cache[:, :, :n].float(), attn_mask=mask, scale=0.125, enable_gqa=True)
            torch.testing.assert_close(out_together[s:s + t].view(t, h, d).float(), ref[0].transpose(0, 1),
                                       rtol=1e-2, atol=1e-2)
    finally:
        torch.set_num_threads(before)
        attention._cpu_decode_kernel.cache_clear()


@pytest.mark.parametrize("q,n", [(17, 40), (64, 300), (150, 150)])
def test_the_avx2_code_takes_blocks_of_any_length(q, n, c_kernel):
    """On its AVX2 code the C kernel takes prefill blocks past 16 tokens (a typed question, a 64-token
    piece, a whole short prompt) instead of handing them to the torch path: max_query_rows says so,
    and the result stays that of fp32 attention. The other codes keep the 16-token limit."""
    from duplex.engine import attention

    best = attention.attention_isa()
    try:
        if best != "avx2":
            assert attention.max_query_rows() == attention._MAX_SPLIT_TOKENS
            assert c_kernel(torch.zeros(1, 9, q, 64).bfloat16(), torch.zeros(1, 3, n, 64).bfloat16(),
                            torch.zeros(1, 3, n, 64).bfloat16(), 0.125) is None
        assert attention.set_attention_isa("avx2") == "avx2"
        assert attention.max_query_rows() >= 1 << 20
        torch.manual_seed(3)
        query = torch.randn(1, 9, q, 64).bfloat16()
        key = torch.randn(1, 3, n + 5, 64).bfloat16()[:, :, :n]
        value = torch.randn(1, 3, n + 5, 64).bfloat16()[:, :, :n]
        out = c_kernel(query, key, value, 0.125)
        assert out is not None and out.shape == (1, q, 9, 64)
        torch.testing.assert_close(out.float(), _causal_fp32(query, key, value, 0.125), rtol=1e-2, atol=1e-2)
    finally:
        attention.set_attention_isa(best)

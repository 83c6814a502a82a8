/* Grouped-query attention for a few new tokens over a bf16 KV cache (CPU decode steps, hand-overs).
 *
 * out[h] = softmax(scale * q[h] . K[h / g]^T) V[h / g], fp32 inside, bf16 out. Each KV head's keys
 * and values are read once, in place (strided cache views), for its whole group of g query heads
 * and t tokens (rows = g * t, any number: a prefill chunk reads the cache once): no fp32 copies of
 * the cache, which at 4k context cost more than the mat-muls themselves. One pass over the cache
 * in blocks of KB keys with an online softmax, split into items (KV head, key range) so that 3 KV
 * heads keep 2 threads busy (the flash-decoding split, merged in fp32). The AVX2 code:
 *
 * - a block's keys and values are converted to fp32 once for all rows (row-major, 8 lanes a step);
 * - scores: 2 query rows x 4 keys per step (6 loads, 8 fmas), each group of 4 dot products
 *   reduced with one hadd tree (no horizontal sum per row and key);
 * - values: 2 rows x 32 output columns in 8 register accumulators over the whole block (the
 *   running output is loaded, rescaled by exp(old max - new max), and stored once per block).
 *
 * expf is Cephes' polynomial (~1 ulp), so results match PyTorch's attention to fp32 rounding, not
 * bit for bit; the thread count changes them only through the key split (at 2+ threads a row's
 * keys may run as that many ranges, merged in fp32). Built at first use by
 * duplex.engine.int8_kernel (-O3 -mavx2 -mfma -ffast-math -fopenmp).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    if (f != f) return 0x7FC0;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

static inline __m256 load_bf16x8(const uint16_t* p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

/* expf for 8 lanes (Cephes' polynomial, as in avx_mathfun); inputs <= 0 here */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) { /* (sum a0, .., sum a3) */
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

#define MAX_D 256
#define KB 64 /* keys per block (blocks of 32 in the AVX2 code, for L1, measured slower) */

/* sc[r0 + i][0 .. jb4) = q[r0 + i] . kf[j] for i < NR (1 to 3) query rows; jb4 % 4 == 0. Up to 12
 * accumulators: the fmas' latency needs 8 or more in flight on 2 pipes */
static inline __attribute__((always_inline)) void scores(const float* qf, const float* kf, float* sc, int r0,
                                                         int jb4, int d, const int NR) {
    const float* q0 = qf + (int64_t)r0 * d;
    const float* q1 = NR > 1 ? q0 + d : q0;
    const float* q2 = NR > 2 ? q0 + 2 * d : q0;
    for (int j = 0; j < jb4; j += 4) {
        const float* k0 = kf + (int64_t)j * d;
        __m256 a[3][4];
        for (int i = 0; i < NR; ++i)
            for (int u = 0; u < 4; ++u) a[i][u] = _mm256_setzero_ps();
        for (int c = 0; c < d; c += 8) {
            __m256 x0 = _mm256_load_ps(q0 + c), x1 = _mm256_load_ps(q1 + c), x2 = _mm256_load_ps(q2 + c);
            for (int u = 0; u < 4; ++u) {
                __m256 kv = _mm256_load_ps(k0 + u * d + c);
                a[0][u] = _mm256_fmadd_ps(x0, kv, a[0][u]);
                if (NR > 1) a[1][u] = _mm256_fmadd_ps(x1, kv, a[1][u]);
                if (NR > 2) a[2][u] = _mm256_fmadd_ps(x2, kv, a[2][u]);
            }
        }
        for (int i = 0; i < NR; ++i) _mm_store_ps(sc + (int64_t)(r0 + i) * KB + j, sum4(a[i][0], a[i][1], a[i][2], a[i][3]));
    }
}

/* acc[r0 + i][c0 .. c0 + 8 NV) = alpha[r0 + i] * acc + sum_j p[r0 + i][j] * vf[j][c0 ..] for i < NR
 * (1 to 3) rows */
static inline __attribute__((always_inline)) void values(const float* p, const float* vf, float* acc,
                                                         const float* alpha, int r0, int c0, int jb, int d,
                                                         const int NR, const int NV) {
    __m256 a[3][4];
    for (int i = 0; i < NR; ++i) {
        __m256 al = _mm256_set1_ps(alpha[r0 + i]);
        for (int u = 0; u < NV; ++u) /* acc lies in the job's partial results: unaligned */
            a[i][u] = _mm256_mul_ps(al, _mm256_loadu_ps(acc + (int64_t)(r0 + i) * d + c0 + 8 * u));
    }
    const float* p0 = p + (int64_t)r0 * KB;
    for (int j = 0; j < jb; ++j) {
        __m256 w0 = _mm256_broadcast_ss(p0 + j), w1 = _mm256_broadcast_ss(p0 + (NR > 1 ? KB : 0) + j),
               w2 = _mm256_broadcast_ss(p0 + (NR > 2 ? 2 * KB : 0) + j);
        for (int u = 0; u < NV; ++u) {
            __m256 vv = _mm256_load_ps(vf + (int64_t)j * d + c0 + 8 * u);
            a[0][u] = _mm256_fmadd_ps(w0, vv, a[0][u]);
            if (NR > 1) a[1][u] = _mm256_fmadd_ps(w1, vv, a[1][u]);
            if (NR > 2) a[2][u] = _mm256_fmadd_ps(w2, vv, a[2][u]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int u = 0; u < NV; ++u) _mm256_storeu_ps(acc + (int64_t)(r0 + i) * d + c0 + 8 * u, a[i][u]);
}

/* values() for every row, 3 at a time, columns c0 .. c0 + 8 NV */
static inline __attribute__((always_inline)) void values_rows(const float* p, const float* vf, float* acc,
                                                              const float* alpha, int rows, int c0, int jb, int d,
                                                              const int NV) {
    int r = 0;
    for (; r + 3 <= rows; r += 3) values(p, vf, acc, alpha, r, c0, jb, d, 3, NV);
    if (rows - r == 2) values(p, vf, acc, alpha, r, c0, jb, d, 2, NV);
    else if (rows - r == 1) values(p, vf, acc, alpha, r, c0, jb, d, 1, NV);
}

/* ---- the flash-decoding split, shared by every code ---------------------------------------------
 * A call's work is items: (KV head, key range) pairs. A row's keys are split across threads where
 * its KV heads alone would leave one idle (3 KV heads on 2 threads), each item keeps its own running
 * max, sum and unnormalised output, and the items' results are merged at the end in fp32. A
 * layer's batched rows are one parallel region of all their items. */

/* One query block of one row: t tokens of h query heads over the last n keys (gqa_decode's
 * contract), its partial results in part: per item, the running max and sum per query row and the
 * unnormalised output [rows][d] */
typedef struct {
    const uint16_t *q, *k, *v;
    int64_t q_head, q_tok, head_stride;
    uint16_t* out;
    int t, n, splits, first_item;
    float* part;
} attn_job;

/* item it (KV head it / splits, key range it % splits) of job jb: returns 0, or 1 without memory */
typedef int (*attn_item_fn)(const attn_job* jb, int it, int h, int kvh, int d, float scale);

static int attn_threads(void) {
#ifdef _OPENMP
    extern int omp_get_max_threads(void);
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* a row's keys are split across threads only where its KV heads would leave one idle */
static int attn_splits(int n, int items, int nt) {
    int nblocks = (n + KB - 1) / KB;
    return (nt > 1 && items % nt && nblocks >= 2 * nt) ? nt : 1;
}

/* the cache is two streams per head with compute between their blocks, which the hardware
 * prefetchers do not run far enough ahead of: each block asks for the keys and values this many
 * blocks ahead, a row at a time through its loops (one thread, 4k keys, 5 tokens: 8-12 % less time
 * at 2 blocks ahead than none, interleaved A/B) */
static const int attn_pf_blocks = 2;
#define PREFETCH_ROW(base, j)                                                              \
    do {                                                                                   \
        if (base)                                                                          \
            for (int o_ = 0; o_ < d * 2; o_ += 64)                                         \
                _mm_prefetch((const char*)((base) + (int64_t)(j) * d) + o_, _MM_HINT_T0); \
    } while (0)

/* online softmax of one block (AVX2 code): sc [rows][KB] holds scores of pre-scaled queries; writes
 * each row's probabilities relative to its new running max (0 past the keys it may see), its
 * rescale factor alpha for what it summed before, and updates the running max and sum */
static inline void softmax_block2(float* sc, int rows, const int* last, int j0, int jb, float* mx, float* den,
                                  float* alpha) {
    for (int r = 0; r < rows; ++r) {
        float* s = sc + (int64_t)r * KB;
        int lim = last[r] - j0 + 1 < jb ? last[r] - j0 + 1 : jb; /* keys this row may see */
        if (lim <= 0) {
            alpha[r] = 1.0f;
            memset(s, 0, sizeof(float) * KB);
            continue;
        }
        float m = den[r] > 0.0f ? mx[r] : s[0];
        for (int j = 0; j < lim; ++j) m = s[j] > m ? s[j] : m;
        alpha[r] = den[r] > 0.0f ? expf(mx[r] - m) : 0.0f; /* den > 0 once a key was seen */
        mx[r] = m;
        __m256 mv = _mm256_set1_ps(m), z = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= lim; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(s + j), mv));
            _mm256_store_ps(s + j, e);
            z = _mm256_add_ps(z, e);
        }
        float zs = 0.0f;
        for (; j < lim; ++j) zs += (s[j] = expf(s[j] - m));
        for (; j < KB; ++j) s[j] = 0.0f;
        __m128 z4 = _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1));
        z4 = _mm_add_ps(z4, _mm_movehl_ps(z4, z4));
        zs += _mm_cvtss_f32(_mm_add_ss(z4, _mm_movehdup_ps(z4)));
        den[r] = den[r] * alpha[r] + zs;
    }
}

/* the AVX2 code's item (any d % 8 == 0 up to MAX_D, any number of rows) */
static int attn_item2(const attn_job* jb, int it, int h, int kvh, int d, float scale) {
    int t = jb->t, n = jb->n, splits = jb->splits;
    int g = h / kvh, rows = g * t;
    int nblocks = (n + KB - 1) / KB;
    int kh = it / splits, sp = it % splits;
    int j_lo = (int)((int64_t)nblocks * sp / splits) * KB, j_hi = (int)((int64_t)nblocks * (sp + 1) / splits) * KB;
    if (j_hi > n) j_hi = n;
    /* qf [rows][d] (scaled), kf and vf [KB][d], sc [rows][KB], alpha [rows], last [rows] */
    size_t fl = (size_t)rows * d + (size_t)KB * d * 2 + (size_t)rows * KB + 2 * (size_t)rows;
    float* ws = (float*)aligned_alloc(32, (sizeof(float) * fl + 31) & ~(size_t)31);
    if (!ws) return 1;
    float *qf = ws, *kf = qf + (size_t)rows * d, *vf = kf + (size_t)KB * d, *sc = vf + (size_t)KB * d;
    float* alpha = sc + (size_t)rows * KB;
    int* last = (int*)(alpha + rows);
    float* mx = jb->part + (size_t)it * rows * (d + 2);
    float* den = mx + rows;
    float* acc = den + rows;
    const uint16_t* kb = jb->k + kh * jb->head_stride;
    const uint16_t* vb = jb->v + kh * jb->head_stride;
    const __m256 sv = _mm256_set1_ps(scale);
    for (int r = 0; r < rows; ++r) { /* row r = query head kh * g + r / t, token r % t */
        const uint16_t* qr = jb->q + (int64_t)(kh * g + r / t) * jb->q_head + (int64_t)(r % t) * jb->q_tok;
        for (int c = 0; c < d; c += 8) _mm256_store_ps(qf + (int64_t)r * d + c, _mm256_mul_ps(load_bf16x8(qr + c), sv));
        memset(acc + (int64_t)r * d, 0, sizeof(float) * d);
        mx[r] = 0.0f;
        den[r] = 0.0f;
        last[r] = n - t + r % t;
    }
    for (int j0 = j_lo; j0 < j_hi; j0 += KB) {
        int jb_ = j_hi - j0 < KB ? j_hi - j0 : KB, jb4 = (jb_ + 3) & ~3;
        int jp = j0 + attn_pf_blocks * KB;
        const uint16_t* pfk = jp + KB <= j_hi ? kb + (int64_t)jp * d : NULL;
        const uint16_t* pfv = pfk ? vb + (int64_t)jp * d : NULL;
        for (int j = 0; j < jb_; ++j) { /* this block's keys and values in fp32, once for all rows */
            PREFETCH_ROW(pfk, j);
            PREFETCH_ROW(pfv, j);
            for (int c = 0; c < d; c += 8) {
                _mm256_store_ps(kf + (int64_t)j * d + c, load_bf16x8(kb + (int64_t)(j0 + j) * d + c));
                _mm256_store_ps(vf + (int64_t)j * d + c, load_bf16x8(vb + (int64_t)(j0 + j) * d + c));
            }
        }
        memset(kf + (int64_t)jb_ * d, 0, sizeof(float) * (size_t)(jb4 - jb_) * d);
        int r = 0;
        for (; r + 3 <= rows; r += 3) scores(qf, kf, sc, r, jb4, d, 3);
        if (rows - r == 2) scores(qf, kf, sc, r, jb4, d, 2);
        else if (rows - r == 1) scores(qf, kf, sc, r, jb4, d, 1);
        softmax_block2(sc, rows, last, j0, jb_, mx, den, alpha);
        int c = 0;
        for (; c + 32 <= d; c += 32) values_rows(sc, vf, acc, alpha, rows, c, jb_, d, 4);
        for (; c < d; c += 8) values_rows(sc, vf, acc, alpha, rows, c, jb_, d, 1);
    }
    free(ws);
    return 0;
}

/* job jb's output from its items' partial results: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) den_s */
static void attn_merge(const attn_job* jb, int h, int kvh, int d) {
    int g = h / kvh, t = jb->t, rows = g * t, splits = jb->splits;
    const float* part = jb->part;
    uint16_t* out = jb->out;
    for (int kh = 0; kh < kvh; ++kh)
        for (int r = 0; r < rows; ++r) {
            float M = -3.0e38f;
            for (int sp = 0; sp < splits; ++sp) {
                const float* pm = part + (size_t)(kh * splits + sp) * rows * (d + 2);
                if (pm[rows + r] > 0.0f && pm[r] > M) M = pm[r];
            }
            float o[MAX_D], tot = 0.0f;
            for (int c = 0; c < d; ++c) o[c] = 0.0f;
            for (int sp = 0; sp < splits; ++sp) {
                const float* pm = part + (size_t)(kh * splits + sp) * rows * (d + 2);
                if (!(pm[rows + r] > 0.0f)) continue;
                float w = expf(pm[r] - M);
                tot += w * pm[rows + r];
                const float* pa = pm + 2 * rows + (size_t)r * d;
                for (int c = 0; c < d; ++c) o[c] += w * pa[c];
            }
            int head = kh * g + r / t, tok = r % t;
            float inv = 1.0f / tot;
            for (int c = 0; c < d; ++c) out[((int64_t)tok * h + head) * d + c] = f32_to_bf16(o[c] * inv);
        }
}

/* gqa_decode's contract on one code: the job's items in one parallel region, then the merge */
static int attn_run(attn_item_fn item, const uint16_t* q, int64_t q_head, int64_t q_tok, const uint16_t* k,
                    const uint16_t* v, uint16_t* out, int h, int kvh, int t, int n, int d, int64_t head_stride,
                    float scale) {
    int g = h / kvh, rows = g * t;
    if (d > MAX_D || d % 8 || g * kvh != h || n < t || t < 1) return -1; /* any number of rows */
    attn_job jb = {q, k, v, q_head, q_tok, head_stride, out, t, n, attn_splits(n, kvh, attn_threads()), 0, NULL};
    int items = kvh * jb.splits;
    jb.part = (float*)malloc(sizeof(float) * (size_t)items * (size_t)rows * (size_t)(d + 2));
    if (!jb.part) return -2;
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int i = 0; i < items; ++i) failed |= item(&jb, i, h, kvh, d, scale);
    if (!failed) attn_merge(&jb, h, kvh, d);
    free(jb.part);
    return failed ? -2 : 0;
}

/* the rows of one layer (duplex_gqa_decode_rows_bf16, caches written) in one parallel region: every
 * (row, KV head, key range) item is one task, so 8 rows x 3 KV heads share 2 threads evenly where a
 * region per row left one thread a head behind the other, and pay one fork/join, not eight. Each
 * row's items and merge are those of a call for that row alone: the same arithmetic */
static int attn_rows(attn_item_fn item, const int64_t* desc, int nrows, const uint16_t* qkv, int64_t stride,
                     uint16_t* out, int h, int kvh, int d, float scale) {
    int g = h / kvh, nt = attn_threads();
    if (d > MAX_D || d % 8 || g * kvh != h) return -1;
    attn_job* jobs = (attn_job*)calloc((size_t)nrows, sizeof(attn_job));
    if (!jobs) return -2;
    int items = 0, failed = 0;
    size_t floats = 0;
    for (int r = 0; r < nrows; ++r) {
        const int64_t* e = desc + (int64_t)r * 6;
        int64_t s = e[3];
        int t = (int)e[4], n = (int)e[5] + t;
        attn_job* jb = jobs + r;
        jb->q = qkv + s * stride;
        jb->k = (const uint16_t*)(intptr_t)e[0];
        jb->v = (const uint16_t*)(intptr_t)e[1];
        jb->q_head = d;
        jb->q_tok = stride;
        jb->head_stride = e[2];
        jb->out = out + s * h * d;
        jb->t = t;
        jb->n = n;
        jb->splits = attn_splits(n, kvh, nt); /* as a call per row splits it: the same arithmetic */
        jb->first_item = items;
        items += kvh * jb->splits;
        floats += (size_t)kvh * jb->splits * (size_t)(g * t) * (size_t)(d + 2);
    }
    float* part = (float*)malloc(sizeof(float) * (floats ? floats : 1));
    if (!part) {
        free(jobs);
        return -2;
    }
    for (int r = 0, off = 0; r < nrows; ++r) {
        jobs[r].part = part + off;
        off += kvh * jobs[r].splits * g * jobs[r].t * (d + 2);
    }
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int i = 0; i < items; ++i) {
        int r = 0;
        while (r + 1 < nrows && jobs[r + 1].first_item <= i) ++r;
        failed |= item(jobs + r, i - jobs[r].first_item, h, kvh, d, scale);
    }
    if (!failed) {
#pragma omp parallel for schedule(static)
        for (int r = 0; r < nrows; ++r) attn_merge(jobs + r, h, kvh, d);
    }
    free(part);
    free(jobs);
    return failed ? -2 : 0;
}

/* ---- AVX-512 (BF16) path -----------------------------------------------------------------------
 * Where the CPU has AVX512BW and AVX512_BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4) and
 * head_dim is a multiple of 64, the same attention runs on zmm registers:
 * - scores with vdpbf16ps on the bf16 keys as they are in the cache: a block's keys are transposed
 *   once into pairs of dims x 64 keys (16x16 32-bit transposes), so a row's 64 scores are 4
 *   registers filled by d/2 dot-product steps, with no horizontal sums. The products of bf16
 *   values are exact in fp32, so this is the fp32 dot product up to the order of its additions;
 *   the scale is applied to the sums (fp32);
 * - values in fp32 (16 lanes of the head dim), 4 rows x 64 dims per register tile;
 * - the keys are split across threads as well as the KV heads (3 KV heads on 2 threads left one
 *   idle half the time): each (head, key range) keeps its own running max, sum and output, merged
 *   at the end in fp32 (the flash-decoding split). */

/* compilers too old for AVX512_BF16 intrinsics (gcc < 10, clang < 11) build the AVX2 code only */
#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define DUPLEX_HAVE_A512 1
#define A512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

static int attn_isa512 = -1; /* -1: undecided; 0: AVX2 code; 1: AVX-512 BF16 code; 2: that and AMX tiles */
static int attn_max_isa = 2;  /* what duplex_attn_set_isa allows */

#ifdef DUPLEX_HAVE_AMX
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
static int amx_available(void) { return duplex_amx_available(DUPLEX_AMX_BF16_BIT); }
#else
static int amx_available(void) { return 0; }
#endif

static int attn_use512(void) {
    if (attn_isa512 < 0) {
        __builtin_cpu_init();
        attn_isa512 = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
        if (attn_isa512 && attn_max_isa >= 2 && amx_available()) attn_isa512 = 2;
        if (attn_isa512 > attn_max_isa) attn_isa512 = attn_max_isa;
    }
    return attn_isa512;
}

/* 0: the AVX2 code; 1: AVX-512 BF16 where the CPU has it; 2 or -1: AMX tiles too where the CPU and
 * the OS allow them; returns the path now in use (0, 1 or 2) */
int duplex_attn_set_isa(int isa) {
    attn_max_isa = isa < 0 || isa > 2 ? 2 : isa;
    attn_isa512 = -1;
    return attn_use512();
}

int duplex_attn_isa(void) { return attn_use512(); }

static inline A512 __m512 exp16(__m512 x) { /* exp8's polynomial on 16 lanes; inputs <= 0 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

int duplex_transpose16_test(const uint32_t* src, uint32_t* dst) { /* for the tests */
    if (!attn_use512()) return -1;
    duplex_transpose16x32(src, 64, 64, dst, 16);
    return 0;
}


/* The AMX code asks for the next block's lines a few at a time from every loop of a block (its
 * prefetch cursor), into L2: asked for all at once, in one loop, they filled the core's line-fill
 * buffers and stalled it, so reading and computing took turns instead of overlapping (30 layers,
 * 5 tokens over 4k keys, 2 threads, interleaved A/B: 8.5 -> 7.3 ms; 1 block ahead and L2 a few %
 * better than 2 and L1). Its cursor: K line i/2 of the block for even i, V line i/2 for odd i. */
static const int attn_pf_blocks_amx = 1;
#ifndef AMX_THIN_ROWS
#define AMX_THIN_ROWS 4 /* a trailing group of at most this many rows runs amx_block_thin */
#endif
typedef struct {
    const char *k, *v;
    int i, n;
} pf_cursor;
static inline void pf_take(pf_cursor* c, int lines) {
    for (int e = c->i + lines < c->n ? c->i + lines : c->n; c->i < e; ++c->i)
        _mm_prefetch((c->i & 1 ? c->v : c->k) + (int64_t)(c->i >> 1) * 64, _MM_HINT_T1);
}

/* keys j0 .. j0 + jb (jb <= KB) of one head transposed into kt: pairs of dims x 64 keys, as uint32
 * (the bf16 pairs vdpbf16ps takes); keys past jb are zero */
static inline A512 void transpose_keys(const uint16_t* kb, int j0, int jb, int d, uint32_t* kt) {
    int d2 = d / 2;
    for (int kg = 0; kg < 4; ++kg) { /* keys kg*16 .. +16 of the block */
        int j = kg * 16;
        for (int ug = 0; ug < d2; ug += 16) {
            if (j + 16 <= jb) {
                duplex_transpose16x32((const uint32_t*)(kb + (int64_t)(j0 + j) * d) + ug, d2 * 4, 64, kt + (int64_t)ug * 64 + j, 64);
            } else {
                uint32_t tmp[16 * 16];
                for (int i = 0; i < 16; ++i) {
                    if (j + i < jb) memcpy(tmp + i * 16, (const uint32_t*)(kb + (int64_t)(j0 + j + i) * d) + ug, 64);
                    else memset(tmp + i * 16, 0, 64);
                }
                duplex_transpose16x32(tmp, 64, 64, kt + (int64_t)ug * 64 + j, 64);
            }
        }
    }
}

/* online softmax of one block for `rows` rows: sc [rows][64] holds unscaled scores; writes each row's
 * probabilities relative to its new running max (0 past the keys it may see), its rescale factor
 * alpha for what it summed before, and updates the running max and sum */
static inline A512 void softmax_block(float* sc, int rows, const int* last, int j0, int jb, float scale, float* mx,
                                      float* den, float* alpha) {
    __m512 sv = _mm512_set1_ps(scale);
    for (int r = 0; r < rows; ++r) {
        float* s = sc + (int64_t)r * 64;
        int lim = last[r] - j0 + 1 < jb ? last[r] - j0 + 1 : jb;
        if (lim <= 0) {
            alpha[r] = 1.0f;
            memset(s, 0, sizeof(float) * 64);
            continue;
        }
        __m512 m = _mm512_set1_ps(-3.0e38f);
        for (int j = 0; j < 64; j += 16) {
            _mm512_store_ps(s + j, _mm512_mul_ps(_mm512_load_ps(s + j), sv));
            if (j < lim) {
                __mmask16 mk = lim - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (lim - j)) - 1);
                m = _mm512_mask_max_ps(m, mk, m, _mm512_load_ps(s + j));
            }
        }
        float bm = _mm512_reduce_max_ps(m);
        float nm = den[r] > 0.0f && mx[r] > bm ? mx[r] : bm;
        alpha[r] = den[r] > 0.0f ? expf(mx[r] - nm) : 0.0f;
        mx[r] = nm;
        __m512 mv = _mm512_set1_ps(nm), z = _mm512_setzero_ps();
        for (int j = 0; j < 64; j += 16) {
            __mmask16 mk = lim - j >= 16 ? (__mmask16)0xFFFF : lim > j ? (__mmask16)((1u << (lim - j)) - 1) : 0;
            __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_load_ps(s + j), mv)));
            _mm512_store_ps(s + j, e);
            z = _mm512_add_ps(z, e);
        }
        den[r] = den[r] * alpha[r] + _mm512_reduce_add_ps(z);
    }
}

#ifdef DUPLEX_HAVE_AMX
/* ---- AMX tiles (Sapphire Rapids and later) ----------------------------------------------------
 * For blocks of many query rows (a turn hand-over, a prefill piece) the zmm products are the cost:
 * a 5-token hand-over (15 rows) over 4k keys took 2.2x a one-token step (one thread). Per 64 keys and
 * 16 query rows, tiles do
 * - the scores transposed, S^T = K . Q^T: the keys are A tiles read straight from the cache (no
 *   transposes), Q^T (dim pairs x rows) is built once per call; each key's 16 row scores are then
 *   one zmm, so the online softmax is vertical (masks from each row's last visible key, no
 *   horizontal max or sum per row);
 * - the values, O = P . V: P transposed back (4 16x16 transposes) and rounded to bf16 as flash
 *   attention does on GPUs, the values interleaved into key pairs (B tiles).
 * Tiles 0-3: C (16 x 16 fp32); 4: A (16 x 32 bf16); 6: B (16 pairs x 16 columns). Rows are
 * padded to 16 with zero queries that no key is visible to. */

/* e^x for x <= 0 to ~2e-6 relative (degree-5 polynomial of 2^f on [-0.5, 0.5], then vscalefps):
 * the probabilities it makes are rounded to bf16 (2^-9) for the tile product anyway */
static inline AMX __m512 exp16_bf(__m512 x) {
    __m512 tt = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    __m512 nn = _mm512_roundscale_ps(tt, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(tt, nn);
    __m512 y = _mm512_set1_ps(1.3333558e-3f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504109e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022651e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, nn);
}

/* values rows j0 .. j0 + jb of one head interleaved into key pairs: vp[jp][c] = (v[2jp][c], v[2jp+1][c]),
 * as uint32 (a B tile's layout); zero past jb */
static inline AMX void pair_values(const uint16_t* vb, int j0, int jb, int d, uint32_t* vp, pf_cursor* pc) {
    static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    __m512i ilo = _mm512_loadu_si512((const void*)lo_idx);
    __m512i ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
    for (int jp = 0; jp < KB / 2; ++jp) {
        int ja = 2 * jp, jc = 2 * jp + 1;
        pf_take(pc, 2);
        for (int c = 0; c < d; c += 32) {
            __m512i a = ja < jb ? _mm512_loadu_si512((const void*)(vb + (int64_t)(j0 + ja) * d + c)) : _mm512_setzero_si512();
            __m512i b = jc < jb ? _mm512_loadu_si512((const void*)(vb + (int64_t)(j0 + jc) * d + c)) : _mm512_setzero_si512();
            _mm512_store_si512((void*)(vp + (int64_t)jp * d + c), _mm512_permutex2var_epi16(a, ilo, b));
            _mm512_store_si512((void*)(vp + (int64_t)jp * d + c + 16), _mm512_permutex2var_epi16(a, ihi, b));
        }
    }
}

/* S^T = K . Q^T for keys j0 .. j0 + jb (jb <= 64) of one group of 16 query rows into st [64][16]: qt
 * [d2][16] their queries transposed into dim pairs; kpad a 64 x d buffer for a partial block */
static inline AMX void amx_scores(const uint32_t* qt, int d, const uint16_t* kb, int j0, int jb, uint16_t* kpad,
                                  float* st) {
    int d2 = d / 2;
    const uint16_t* kr = kb + (int64_t)j0 * d;
    if (jb < 64) { /* the last, partial block: tile loads read whole groups of 16 keys */
        memcpy(kpad, kr, sizeof(uint16_t) * (size_t)jb * d);
        memset(kpad + (size_t)jb * d, 0, sizeof(uint16_t) * (size_t)(64 - jb) * d);
        kr = kpad;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int p = 0; p < d2; p += 16) { /* 32 dims a step */
        _tile_loadd(6, qt + (int64_t)p * 16, 64);
        _tile_loadd(4, kr + 2 * p, d * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(4, kr + (int64_t)16 * d + 2 * p, d * 2);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(4, kr + (int64_t)32 * d + 2 * p, d * 2);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(4, kr + (int64_t)48 * d + 2 * p, d * 2);
        _tile_dpbf16ps(3, 4, 6);
    }
    _tile_stored(0, st, 64);
    _tile_stored(1, st + 256, 64);
    _tile_stored(2, st + 512, 64);
    _tile_stored(3, st + 768, 64);
}

/* acc[i] = al[i] acc[i] + P[i] . V for rows i < nr: pb [16][64] the block's probabilities in bf16,
 * vp its values in key pairs (pair_values), ob [16][d] fp32 scratch */
static inline AMX void amx_values(const uint16_t* pb, const uint32_t* vp, int d, float* ob, float* acc,
                                  const float* al, int nr, pf_cursor* pc) {
    for (int c0 = 0; c0 < d; c0 += 64) {
        pf_take(pc, 8);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int half = 0; half < 2; ++half) { /* keys 0-31, 32-63: 16 key pairs each */
            _tile_loadd(4, pb + half * 32, 128);
            const uint32_t* vr = vp + (int64_t)half * 16 * d + c0;
            _tile_loadd(6, vr, d * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(6, vr + 16, d * 4);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(6, vr + 32, d * 4);
            _tile_dpbf16ps(2, 4, 6);
            _tile_loadd(6, vr + 48, d * 4);
            _tile_dpbf16ps(3, 4, 6);
        }
        _tile_stored(0, ob, 256);
        _tile_stored(1, ob + 16, 256);
        _tile_stored(2, ob + 32, 256);
        _tile_stored(3, ob + 48, 256);
        for (int i = 0; i < nr; ++i) { /* acc = alpha acc + this block's output */
            pf_take(pc, 2);
            float* ar = acc + (int64_t)i * d + c0;
            __m512 a = _mm512_set1_ps(al[i]);
            for (int u = 0; u < 64; u += 16)
                _mm512_storeu_ps(ar + u, _mm512_fmadd_ps(a, _mm512_loadu_ps(ar + u), _mm512_load_ps(ob + i * 64 + u)));
        }
    }
}

/* one block of keys j0 .. j0 + jb (jb <= 64) for one group of 16 rows: qt [d2][16] their queries
 * transposed into dim pairs; vp the block's values in key pairs (pair_values); kpad a zeroed 64 x d
 * buffer for a partial block; st [64][16], pf [16][64] fp32 and pb [16][64] bf16 scratch; ob [16][d]
 * fp32; m, den [16] running max and sum; acc [16][d] running output; last [16] each row's last
 * visible key (-1 for padding), first_last the smallest of them over real rows */
static AMX __attribute__((noinline)) void amx_block(const uint32_t* qt, int d, const uint16_t* kb, int j0, int jb,
                                                    const uint32_t* vp, uint16_t* kpad, float* st, float* pf,
                                                    uint16_t* pb, float* ob, float* m, float* den, float* acc,
                                                    const int* last, int first_last, int nr, float scale,
                                                    pf_cursor* pc) {
    pf_take(pc, 16);
    amx_scores(qt, d, kb, j0, jb, kpad, st);
    /* online softmax, one zmm per key (lane = row). Only a block past the first query's own position
     * needs the causal masks; elsewhere padded rows (zero queries) are left unmasked: their lanes are
     * finite and never read */
    __m512 sv = _mm512_set1_ps(scale), mo = _mm512_loadu_ps(m), raw = _mm512_set1_ps(-3.0e38f);
    __mmask16 vis[64];
    int masked = jb < 64 || j0 + 63 > first_last;
    if (masked) {
        __m512i lastv = _mm512_loadu_si512((const void*)last);
        for (int j = 0; j < 64; ++j) {
            pf_take(pc, 1);
            vis[j] = j < jb ? _mm512_cmpge_epi32_mask(lastv, _mm512_set1_epi32(j0 + j)) : 0;
            raw = _mm512_mask_max_ps(raw, vis[j], raw, _mm512_load_ps(st + j * 16));
        }
    } else {
        __m512 r1 = raw;
        for (int j = 0; j < 64; j += 2) {
            pf_take(pc, 2);
            raw = _mm512_max_ps(raw, _mm512_load_ps(st + j * 16));
            r1 = _mm512_max_ps(r1, _mm512_load_ps(st + j * 16 + 16));
        }
        raw = _mm512_max_ps(raw, r1);
    }
    __m512 mn = _mm512_max_ps(mo, _mm512_mul_ps(raw, sv)); /* scale > 0 */
    __m512 alpha = exp16(_mm512_sub_ps(mo, mn)); /* 0 (underflow) where nothing was seen before */
    __m512 z = _mm512_setzero_ps(), z1 = z;
    if (masked) {
        for (int j = 0; j < 64; ++j) {
            pf_take(pc, 1);
            __m512 x = _mm512_min_ps(_mm512_fmsub_ps(_mm512_load_ps(st + j * 16), sv, mn), _mm512_setzero_ps());
            __m512 e = _mm512_maskz_mov_ps(vis[j], exp16_bf(x));
            _mm512_store_ps(st + j * 16, e);
            z = _mm512_add_ps(z, e);
        }
    } else {
        for (int j = 0; j < 64; j += 2) {
            pf_take(pc, 2);
            __m512 e0 = exp16_bf(_mm512_fmsub_ps(_mm512_load_ps(st + j * 16), sv, mn));
            __m512 e1 = exp16_bf(_mm512_fmsub_ps(_mm512_load_ps(st + j * 16 + 16), sv, mn));
            _mm512_store_ps(st + j * 16, e0);
            _mm512_store_ps(st + j * 16 + 16, e1);
            z = _mm512_add_ps(z, e0);
            z1 = _mm512_add_ps(z1, e1);
        }
        z = _mm512_add_ps(z, z1);
    }
    _mm512_storeu_ps(den, _mm512_fmadd_ps(_mm512_loadu_ps(den), alpha, z));
    _mm512_storeu_ps(m, mn);
    float al[16];
    _mm512_storeu_ps(al, alpha);
    for (int kg = 0; kg < 4; ++kg) { /* P = (P^T)^T, then bf16 */
        pf_take(pc, 8);
        duplex_transpose16x32(st + kg * 256, 64, 64, (uint32_t*)(pf + kg * 16), 64);
    }
    for (int r = 0; r < 16; ++r) {
        pf_take(pc, 2);
        for (int j = 0; j < 64; j += 32) {
            const float* sr = pf + r * 64 + j;
            _mm512_store_si512((void*)(pb + r * 64 + j),
                               (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(sr + 16), _mm512_load_ps(sr)));
        }
    }
    amx_values(pb, vp, d, ob, acc, al, nr, pc);
    pf_take(pc, 1 << 20);
}

/* amx_block for a group of at most AMX_THIN_ROWS real rows (the 2 left over from a 6-token hand-over's
 * 18 rows): the same tile products, but the softmax runs along each real row (4 zmm of 64 keys)
 * instead of down 64 keys of 16 lanes of which few are real rows: that vertical softmax was most of
 * a group's cost, so 18 rows had cost as much as 32 */
static AMX __attribute__((noinline)) void amx_block_thin(const uint32_t* qt, int d, const uint16_t* kb, int j0,
                                                         int jb, const uint32_t* vp, uint16_t* kpad, float* st,
                                                         float* pf, uint16_t* pb, float* ob, float* m, float* den,
                                                         float* acc, const int* last, int nr, float scale,
                                                         pf_cursor* pc) {
    pf_take(pc, 16);
    amx_scores(qt, d, kb, j0, jb, kpad, st);
    for (int kg = 0; kg < 4; ++kg) { /* S = (S^T)^T: row r's 64 scores at pf + 64 r */
        pf_take(pc, 8);
        duplex_transpose16x32(st + kg * 256, 64, 64, (uint32_t*)(pf + kg * 16), 64);
    }
    __m512 sv = _mm512_set1_ps(scale);
    float al[AMX_THIN_ROWS];
    for (int r = 0; r < nr; ++r) {
        pf_take(pc, 8);
        int lim = last[r] - j0 + 1 < jb ? last[r] - j0 + 1 : jb; /* keys of the block row r sees */
        __m512 s[4], raw = _mm512_set1_ps(-3.0e38f);
        __mmask16 mk[4];
        for (int c = 0; c < 4; ++c) {
            int k0 = 16 * c;
            mk[c] = lim - k0 >= 16 ? (__mmask16)0xFFFF : lim > k0 ? (__mmask16)((1u << (lim - k0)) - 1) : 0;
            s[c] = _mm512_mul_ps(_mm512_load_ps(pf + r * 64 + k0), sv);
            raw = _mm512_mask_max_ps(raw, mk[c], raw, s[c]);
        }
        float mn = _mm512_reduce_max_ps(raw);
        if (m[r] > mn) mn = m[r];
        al[r] = expf(m[r] - mn); /* 0 where nothing was seen before (m = -3e38) */
        __m512 mv = _mm512_set1_ps(mn), z = _mm512_setzero_ps();
        for (int c = 0; c < 4; ++c) {
            s[c] = _mm512_maskz_mov_ps(mk[c], exp16_bf(_mm512_min_ps(_mm512_sub_ps(s[c], mv), _mm512_setzero_ps())));
            z = _mm512_add_ps(z, s[c]);
        }
        den[r] = den[r] * al[r] + _mm512_reduce_add_ps(z);
        m[r] = mn;
        _mm512_store_si512((void*)(pb + r * 64), (__m512i)_mm512_cvtne2ps_pbh(s[1], s[0]));
        _mm512_store_si512((void*)(pb + r * 64 + 32), (__m512i)_mm512_cvtne2ps_pbh(s[3], s[2]));
    }
    /* rows nr .. 15 of pb keep an earlier group's probabilities: finite, and their outputs unread */
    amx_values(pb, vp, d, ob, acc, al, nr, pc);
    pf_take(pc, 1 << 20);
}
#endif

/* 4 zmm of scores (64 keys) for NR rows: sc[r][j] = sum_c q[r][c] k[j][c], from kt (pairs of
 * dims x 64 keys, as uint32) and q2 (each row's dims as pairs) */
static inline __attribute__((always_inline)) A512 void scores512(const uint32_t* q2, const uint32_t* kt, float* sc,
                                                                int d2, const int NR) {
    __m512 a[4][4];
    for (int i = 0; i < NR; ++i)
        for (int u = 0; u < 4; ++u) a[i][u] = _mm512_setzero_ps();
    for (int c = 0; c < d2; ++c) {
        __m512bh k0 = (__m512bh)_mm512_load_si512((const void*)(kt + c * 64));
        __m512bh k1 = (__m512bh)_mm512_load_si512((const void*)(kt + c * 64 + 16));
        __m512bh k2 = (__m512bh)_mm512_load_si512((const void*)(kt + c * 64 + 32));
        __m512bh k3 = (__m512bh)_mm512_load_si512((const void*)(kt + c * 64 + 48));
        for (int i = 0; i < NR; ++i) {
            __m512bh qv = (__m512bh)_mm512_set1_epi32((int)q2[i * d2 + c]);
            a[i][0] = _mm512_dpbf16_ps(a[i][0], qv, k0);
            a[i][1] = _mm512_dpbf16_ps(a[i][1], qv, k1);
            a[i][2] = _mm512_dpbf16_ps(a[i][2], qv, k2);
            a[i][3] = _mm512_dpbf16_ps(a[i][3], qv, k3);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int u = 0; u < 4; ++u) _mm512_store_ps(sc + i * 64 + 16 * u, a[i][u]);
}

/* acc[r][c0 .. c0 + 64) = alpha[r] acc + sum_{j < jb} p[r][j] vf[j][c0 ..] for NR rows */
static inline __attribute__((always_inline)) A512 void values512(const float* p, const float* vf, float* acc,
                                                                const float* alpha, int c0, int jb, int d,
                                                                const int NR) {
    __m512 a[4][4];
    for (int i = 0; i < NR; ++i) {
        __m512 al = _mm512_set1_ps(alpha[i]);
        for (int u = 0; u < 4; ++u) a[i][u] = _mm512_mul_ps(al, _mm512_loadu_ps(acc + (int64_t)i * d + c0 + 16 * u));
    }
    for (int j = 0; j < jb; ++j) {
        const float* vr = vf + (int64_t)j * d + c0;
        __m512 v0 = _mm512_load_ps(vr), v1 = _mm512_load_ps(vr + 16), v2 = _mm512_load_ps(vr + 32),
               v3 = _mm512_load_ps(vr + 48);
        for (int i = 0; i < NR; ++i) {
            __m512 w = _mm512_set1_ps(p[i * 64 + j]);
            a[i][0] = _mm512_fmadd_ps(w, v0, a[i][0]);
            a[i][1] = _mm512_fmadd_ps(w, v1, a[i][1]);
            a[i][2] = _mm512_fmadd_ps(w, v2, a[i][2]);
            a[i][3] = _mm512_fmadd_ps(w, v3, a[i][3]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int u = 0; u < 4; ++u) _mm512_storeu_ps(acc + (int64_t)i * d + c0 + 16 * u, a[i][u]);
}

/* rows at and above which the AMX code runs (where it is in use): below, the zmm products are cheap */
#ifndef AMX_MIN_ROWS
#define AMX_MIN_ROWS 6
#endif


/* item it (KV head it / splits, key range it % splits) of job jb: returns 0, or 1 without memory */
static A512 int attn_item512(const attn_job* jb, int it, int h, int kvh, int d, float scale) {
    const uint16_t *q = jb->q, *k = jb->k, *v = jb->v;
    int64_t q_head = jb->q_head, q_tok = jb->q_tok, head_stride = jb->head_stride;
    int t = jb->t, n = jb->n, splits = jb->splits;
    int g = h / kvh, rows = g * t, d2 = d / 2;
    int amx = 0;
#ifdef DUPLEX_HAVE_AMX
    amx = attn_use512() >= 2 && rows >= AMX_MIN_ROWS;
#endif
    int rows_pad = amx ? (rows + 15) & ~15 : rows;
    int nblocks = (n + KB - 1) / KB;
    float* part = jb->part;
    int kh = it / splits, sp = it % splits;
    int j_lo = (int)((int64_t)nblocks * sp / splits) * KB, j_hi = (int)((int64_t)nblocks * (sp + 1) / splits) * KB;
    if (j_hi > n) j_hi = n;
    /* q2 [rows_pad][d2], kt [d2][64], vf [KB][d] fp32 values, sc [rows][64], alpha [rows], last [rows] */
    size_t fl = (size_t)rows_pad * d2 + (size_t)d2 * 64 + (size_t)KB * d + (size_t)rows * 64 + 2 * (size_t)rows;
    uint32_t* ws = (uint32_t*)aligned_alloc(64, (sizeof(uint32_t) * fl + 63) & ~(size_t)63);
    if (!ws) return 1;
    uint32_t *q2 = ws, *kt = q2 + (size_t)rows_pad * d2;
    float *vf = (float*)(kt + (size_t)d2 * 64), *sc = vf + (size_t)KB * d;
    float* alpha = sc + (size_t)rows * 64;
    int* last = (int*)(alpha + rows);
    float* mx = part + (size_t)it * rows * (d + 2);
    float* den = mx + rows;
    float* acc = den + rows;
    const uint16_t* kb = k + kh * head_stride;
    const uint16_t* vb = v + kh * head_stride;
    for (int r = 0; r < rows; ++r) {
        const uint16_t* qr = q + (int64_t)(kh * g + r / t) * q_head + (int64_t)(r % t) * q_tok;
        memcpy(q2 + (size_t)r * d2, qr, sizeof(uint16_t) * d);
        memset(acc + (int64_t)r * d, 0, sizeof(float) * d);
        mx[r] = 0.0f;
        den[r] = 0.0f;
        last[r] = n - t + r % t;
    }
    if (amx) /* padded rows: zero queries */
        memset(q2 + (size_t)rows * d2, 0, sizeof(uint32_t) * (size_t)(rows_pad - rows) * d2);
#ifdef DUPLEX_HAVE_AMX
    if (amx) {
        int groups = rows_pad / 16;
        /* qt [groups][d2][16], vp [32][d], kpad [64][d] bf16, st [64][16], pf [16][64], pb [16][64] bf16,
         * ob [16][d], m and den [rows_pad], last [rows_pad] */
        size_t al = (size_t)groups * d2 * 16 + (size_t)32 * d + (size_t)32 * d + 1024 + 1024 + 512
                    + (size_t)16 * d + 3 * (size_t)rows_pad;
        uint32_t* aw = (uint32_t*)aligned_alloc(64, (sizeof(uint32_t) * al + 63) & ~(size_t)63);
        if (!aw) {
            free(ws);
            return 1;
        }
        uint32_t *qt = aw, *vp = qt + (size_t)groups * d2 * 16;
        uint16_t* kpad = (uint16_t*)(vp + (size_t)32 * d);
        float *st = (float*)(vp + (size_t)64 * d), *pf = st + 1024;
        uint16_t* pbt = (uint16_t*)(pf + 1024);
        float *ob = (float*)(pbt + 1024), *m = ob + (size_t)16 * d, *dn = m + rows_pad;
        int* lastp = (int*)(dn + rows_pad);
        for (int r = 0; r < rows_pad; ++r) {
            m[r] = -3.0e38f;
            dn[r] = 0.0f;
            lastp[r] = r < rows ? last[r] : -1;
        }
        for (int grp = 0; grp < groups; ++grp)
            for (int pc = 0; pc < d2; pc += 16)
                duplex_transpose16x32(q2 + (size_t)grp * 16 * d2 + pc, d2 * 4, 64, qt + (size_t)grp * d2 * 16 + (size_t)pc * 16, 16);
        duplex_amx_config_16x64();
        for (int j0 = j_lo; j0 < j_hi; j0 += KB) {
            int jb = j_hi - j0 < KB ? j_hi - j0 : KB;
            int jp = j0 + attn_pf_blocks_amx * KB; /* the block to ask for while this one is computed */
            pf_cursor pc = {(const char*)(kb + (int64_t)jp * d), (const char*)(vb + (int64_t)jp * d), 0,
                            jp + KB <= j_hi ? 2 * KB * d * 2 / 64 : 0}, /* its K and V lines */
                      none = {NULL, NULL, 0, 0};
            pair_values(vb, j0, jb, d, vp, &pc);
            for (int grp = 0; grp < groups; ++grp) {
                int r0 = grp * 16, nr = rows - r0 < 16 ? rows - r0 : 16;
                if (nr <= AMX_THIN_ROWS && grp)
                    amx_block_thin(qt + (size_t)grp * d2 * 16, d, kb, j0, jb, vp, kpad, st, pf, pbt, ob, m + r0,
                                   dn + r0, acc + (int64_t)r0 * d, lastp + r0, nr, scale, &none);
                else
                    amx_block(qt + (size_t)grp * d2 * 16, d, kb, j0, jb, vp, kpad, st, pf, pbt, ob, m + r0, dn + r0,
                              acc + (int64_t)r0 * d, lastp + r0, n - t, nr, scale, grp ? &none : &pc);
            }
        }
        duplex_amx_release();
        for (int r = 0; r < rows; ++r) {
            mx[r] = m[r];
            den[r] = dn[r];
        }
        free(aw);
    }
#endif
    for (int j0 = j_lo; !amx && j0 < j_hi; j0 += KB) {
        int jb = j_hi - j0 < KB ? j_hi - j0 : KB;
        transpose_keys(kb, j0, jb, d, kt);
        int jp = j0 + attn_pf_blocks * KB;
        const uint16_t *pfk = jp + KB <= j_hi ? kb + (int64_t)jp * d : NULL;
        const uint16_t *pfv = pfk ? vb + (int64_t)jp * d : NULL;
        for (int j = 0; j < jb; ++j) { /* values in fp32, once for all rows */
            PREFETCH_ROW(pfk, j);
            PREFETCH_ROW(pfv, j);
            for (int c = 0; c < d; c += 16) {
                __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vb + (int64_t)(j0 + j) * d + c)));
                _mm512_store_ps(vf + (int64_t)j * d + c, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
            }
        }
        int r = 0;
        for (; r + 4 <= rows; r += 4) scores512(q2 + (size_t)r * d2, kt, sc + (size_t)r * 64, d2, 4);
        for (; r < rows; ++r) scores512(q2 + (size_t)r * d2, kt, sc + (size_t)r * 64, d2, 1);
        softmax_block(sc, rows, last, j0, jb, scale, mx, den, alpha);
        for (int c0 = 0; c0 < d; c0 += 64) {
            for (r = 0; r + 4 <= rows; r += 4) values512(sc + r * 64, vf, acc + (int64_t)r * d, alpha + r, c0, jb, d, 4);
            for (; r < rows; ++r) values512(sc + r * 64, vf, acc + (int64_t)r * d, alpha + r, c0, jb, d, 1);
        }
    }
    free(ws);
    return 0;
}

#else
static int attn_use512(void) { return 0; }
int duplex_attn_set_isa(int isa) { (void)isa; return 0; }
int duplex_attn_isa(void) { return 0; }
int duplex_transpose16_test(const uint32_t* src, uint32_t* dst) { (void)src; (void)dst; return -1; }
#endif

/* the item code for head dim d: AVX-512 (and AMX) where the CPU has it and d % 64 == 0, else AVX2 */
static attn_item_fn attn_item(int d) {
#ifdef DUPLEX_HAVE_A512
    if (d % 64 == 0 && attn_use512()) return attn_item512;
#endif
    (void)d;
    return attn_item2;
}

/* q [h, t, d] bf16 contiguous (t new tokens, the last t positions of the cache); k, v: element
 * (head, j, c) at head * head_stride + j * d + c (bf16); out [t, h, d] bf16. Token i of the t
 * attends causally to keys 0 .. n - t + i. Returns 0, -1 for unsupported sizes, -2 without memory. */
/* q element (head, token, c) at q + head * q_head + token * q_tok + c (any layout with unit-stride
 * head vectors: converting bf16 to fp32 is exact, so the layout does not change the result) */
static int gqa_decode(const uint16_t* q, int64_t q_head, int64_t q_tok, const uint16_t* k, const uint16_t* v,
                      uint16_t* out, int h, int kvh, int t, int n, int d, int64_t head_stride, float scale) {
    return attn_run(attn_item(d), q, q_head, q_tok, k, v, out, h, kvh, t, n, d, head_stride, scale);
}

int duplex_gqa_decode_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                           int h, int kvh, int t, int n, int d, int64_t head_stride, float scale) {
    return gqa_decode(q, (int64_t)t * d, d, k, v, out, h, kvh, t, n, d, head_stride, scale);
}

/* One layer of a batched decode pass: for each of `nrows` rows (one sequence each, its own cache),
 * write its new keys and values into its cache, then attend, exactly as duplex_gqa_decode_bf16
 * called per row after the cache's own update: the same arithmetic in the same order.
 *
 * qkv: [tokens, stride] bf16, token i's q heads at qkv + i * stride, then its kvh key heads, then
 * its kvh value heads (the fused projection's output after rope); out: [tokens, h, d] bf16.
 * desc: per row 6 int64 = k cache, v cache (element (head, j, c) at head * head_stride + j * d + c),
 * head_stride, first token of the row in qkv/out, its token count, its cached length before them
 * (where its new keys go). Returns 0, -1 for unsupported sizes, -2 without memory. */
int duplex_gqa_decode_rows_bf16(const int64_t* desc, int nrows, const uint16_t* qkv, int64_t stride, uint16_t* out,
                                int h, int kvh, int d, float scale) {
    int g = h / kvh;
    if (g < 1 || g * kvh != h || d > MAX_D || d % 8) return -1;
    for (int r = 0; r < nrows; ++r) {
        const int64_t* e = desc + (int64_t)r * 6;
        uint16_t* kc = (uint16_t*)(intptr_t)e[0];
        uint16_t* vc = (uint16_t*)(intptr_t)e[1];
        int64_t hs = e[2], s = e[3];
        int t = (int)e[4], pos = (int)e[5];
        for (int i = 0; i < t; ++i) {
            const uint16_t* src = qkv + (s + i) * stride;
            for (int kh = 0; kh < kvh; ++kh) {
                memcpy(kc + kh * hs + (int64_t)(pos + i) * d, src + (int64_t)(h + kh) * d, sizeof(uint16_t) * d);
                memcpy(vc + kh * hs + (int64_t)(pos + i) * d, src + (int64_t)(h + kvh + kh) * d, sizeof(uint16_t) * d);
            }
        }
    }
    /* every row attended in one parallel region, each reading the cache once for all its tokens */
    return attn_rows(attn_item(d), desc, nrows, qkv, stride, out, h, kvh, d, scale);
}

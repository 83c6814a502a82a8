/* Grouped-query attention for a few new tokens over a bf16 KV cache (CPU decode steps, hand-overs).
 *
 * out[h] = softmax(scale * q[h] . K[h / g]^T) V[h / g], fp32 inside, bf16 out. Each KV head's keys
 * and values are read once, in place (strided cache views), for its whole group of g query heads:
 * no fp32 copies of the cache, which at 4k context cost more than the mat-muls themselves.
 * Built with -ffast-math (vectorised expf); results match PyTorch's attention to fp32 rounding,
 * not bit for bit. Built at first use by duplex.engine.int8_kernel.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    if (f != f) return 0x7FC0;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

#define MAX_D 256
#define MAX_ROWS 48 /* query heads per KV head x new tokens */
#define KEY_BLOCK 64

/* q [h, t, d] bf16 contiguous (t new tokens, the last t positions of the cache); k, v: element
 * (head, j, c) at head * head_stride + j * d + c (bf16); out [t, h, d] bf16. Token i of the t
 * attends causally to keys 0 .. n - t + i. Returns 0, or -1 for unsupported sizes. */
int duplex_gqa_decode_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                           int h, int kvh, int t, int n, int d, int64_t head_stride, float scale) {
    int g = h / kvh, rows = g * t;
    if (d > MAX_D || rows > MAX_ROWS || g * kvh != h || n < t || t < 1) return -1;
#pragma omp parallel for schedule(static)
    for (int kh = 0; kh < kvh; ++kh) {
        float qf[MAX_ROWS][MAX_D], acc[MAX_ROWS][MAX_D], kf[MAX_D], denom[MAX_ROWS], mx[MAX_ROWS];
        float kt[MAX_D][KEY_BLOCK];
        int last[MAX_ROWS];
        float* s = (float*)malloc(sizeof(float) * (size_t)rows * (size_t)n);
        const uint16_t* kb = k + kh * head_stride;
        const uint16_t* vb = v + kh * head_stride;
        for (int r = 0; r < rows; ++r) { /* row r = query head kh * g + r / t, token r % t */
            for (int c = 0; c < d; ++c) qf[r][c] = bf16_to_f32(q[((int64_t)kh * rows + r) * d + c]) * scale;
            mx[r] = -INFINITY;
            last[r] = n - t + r % t;
        }
        for (int j0 = 0; j0 < n; j0 += KEY_BLOCK) { /* scores, a block of keys at a time */
            int jb = n - j0 < KEY_BLOCK ? n - j0 : KEY_BLOCK;
            for (int jj = 0; jj < jb; ++jj) /* converted and transposed once for all rows */
                for (int c = 0; c < d; ++c) kt[c][jj] = bf16_to_f32(kb[(int64_t)(j0 + jj) * d + c]);
            for (int r = 0; r < rows; ++r) {
                float sc[KEY_BLOCK] = {0};
                for (int c = 0; c < d; ++c) {
                    float qc = qf[r][c];
                    for (int jj = 0; jj < KEY_BLOCK; ++jj) sc[jj] += qc * kt[c][jj];
                }
                float* sr = s + (int64_t)r * n + j0;
                int lim = last[r] - j0 + 1 < jb ? last[r] - j0 + 1 : jb;
                for (int jj = 0; jj < jb; ++jj) sr[jj] = sc[jj];
                for (int jj = 0; jj < lim; ++jj)
                    if (sc[jj] > mx[r]) mx[r] = sc[jj];
            }
        }
        for (int r = 0; r < rows; ++r) { /* softmax numerators; future keys get 0 */
            float* sr = s + (int64_t)r * n;
            float m = mx[r], z = 0.f;
            int lim = last[r] + 1;
            for (int j = 0; j < lim; ++j) {
                sr[j] = expf(sr[j] - m);
                z += sr[j];
            }
            for (int j = lim; j < n; ++j) sr[j] = 0.f;
            denom[r] = z;
            memset(acc[r], 0, sizeof(float) * d);
        }
        for (int j = 0; j < n; ++j) { /* values: each converted once for all rows */
            for (int c = 0; c < d; ++c) kf[c] = bf16_to_f32(vb[(int64_t)j * d + c]);
            for (int r = 0; r < rows; ++r) {
                float p = s[(int64_t)r * n + j];
                for (int c = 0; c < d; ++c) acc[r][c] += p * kf[c];
            }
        }
        for (int r = 0; r < rows; ++r) {
            int head = kh * g + r / t, tok = r % t;
            for (int c = 0; c < d; ++c) out[((int64_t)tok * h + head) * d + c] = f32_to_bf16(acc[r][c] / denom[r]);
        }
        free(s);
    }
    return 0;
}

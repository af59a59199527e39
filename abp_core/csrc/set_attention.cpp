// Exact fp32 multi-head self-attention within each molecule of size-sorted packed atoms,
// forward and backward, for head dimensions D = 16, 32, 64 (ABP's default width 256 with
// 16 heads gives D = 16).
//
// Why: PyTorch's CPU flash-attention kernel tiles queries in 32-64 rows and calls a BLAS gemm per
// tile; with D = 16 those gemms are tiny and the kernel runs at 20-30 % of the machine's matmul
// peak. Here one task is one molecule (all heads, so its strided rows are read once): its keys and
// values (at most a few hundred atoms) are staged in L2-resident scratch, keys as transposed 16-wide
// tiles, and blocks of R = 4 query rows stream over them with 16-wide vector FMAs. No n x n matrix
// is stored; the backward recomputes the probabilities from the saved log-sum-exps, as flash
// attention does. An optional q|k|v bias is added while staging, and the backward can return the
// bias gradient (column sums of the q|k|v gradient).
//
// Layout (the caller's, see abp_core/kernels.py): qkv [N, 3C] row-major, q | k | v side by side,
// head h in columns h*D .. h*D+D-1 of each; out [N, C]; lse [N, H]; grad [N, 3C] like qkv (may be
// qkv itself: a task reads all its rows of qkv before it writes any of their gradients).
// Plain C ABI (loaded with ctypes, which releases the GIL). Threads are OpenMP's: the library links
// libgomp.so.1, which resolves to the copy PyTorch has already loaded, so attention runs on PyTorch's
// own thread pool (separate std::threads competed with its spinning workers on a 2-core machine).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));  // unaligned access

inline v16 load16(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  // one vbroadcastss

// exp(x) for x <= 0 (softmax arguments after subtracting the row maximum), Cephes' expf
// polynomial after an exact-ish range reduction x = k ln2 + r: relative error ~1e-7, i.e. within a
// few ulp of libm's expf. Arguments below -87 (and -inf) give exp(-87) ~ 1.6e-38, a normal float.
#if defined(__AVX512F__)
#include <immintrin.h>
inline v16 exp16(v16 xv) {  // AVX-512: rounding and 2^k scaling in one instruction each
    const __m512 x = _mm512_max_ps((__m512)xv, _mm512_set1_ps(-87.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return (v16)_mm512_scalef_ps(p, k);
}
#else
inline v16 exp16(v16 x) {  // portable vector-extension version of the same arithmetic
    x = x < splat(-87.0f) ? splat(-87.0f) : x;
    const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    v16 kf = (x * splat(1.44269504088896341f) + magic) - magic;
    v16 r = x - kf * splat(0.693359375f) - kf * splat(-2.12194440e-4f);
    v16 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v16i k = __builtin_convertvector(kf, v16i);
    v16i bits = (k + 127) << 23;
    v16 scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}
#endif

// The D/16 bias vectors of one head (zeros without a bias).
template <int D>
struct HeadBias {
    v16 v[D / 16];
    HeadBias(const float* b) {
        for (int c = 0; c < D; c += 16) v[c / 16] = b ? load16(b + c) : v16{};
    }
};

// Horizontal sum and maximum of 16 lanes. With AVX-512 as a tree (four shuffle steps): the scalar loops were
// one 16-step latency chain each, paid for every query row of every head, and at QM9's ~16 keys per molecule they
// cost more than the row's dot products.
inline float hsum(v16 v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
#endif
}

inline float hmax(v16 v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)v);
#else
    float x = v[0];
    for (int i = 1; i < 16; ++i) x = std::max(x, v[i]);
    return x;
#endif
}

struct Problem {
    const float* qkv; const float* bias; float* out; float* lse; const float* dout; float* grad; float* colsum;
    const int64_t* starts; const int64_t* sizes; int64_t num_molecules;
    int64_t channels; int64_t heads; float scale;
};

constexpr int R = 4;  // query rows per block: each key/value tile is read from cache once per R rows

struct Scratch {
    std::vector<float> k, v, kt, vt, dq, dk, dv, s, dp, lse, delta;
    float* colsum = nullptr;  // this task's molecule's row of column sums (backward with a bias gradient)
    void reserve(int64_t n, int64_t c) {  // c = all heads' channels
        int64_t np = (n + 15) / 16 * 16;
        for (auto* b : {&k, &v, &dq, &dk, &dv}) if ((int64_t)b->size() < n * c) b->resize(n * c);
        for (auto* b : {&lse, &delta}) if ((int64_t)b->size() < n * c) b->resize(n * c);  // >= n * heads
        for (auto* b : {&kt, &vt}) if ((int64_t)b->size() < np * c) b->resize(np * c);
        for (auto* b : {&s, &dp}) if ((int64_t)b->size() < R * np) b->resize(R * np);
    }
};

// s_u[j] = mul * sum_t a_u[t] * b[j, t] for R rows u (a_u = rows[u] + bias) and j < np (rows of s at
// stride np), with b stored as tiles: tile c (keys 16c .. 16c+15) is the D x 16 block at bt + 16 c D
// (transposed, zero-padded past n). With Max, entries n .. np-1 become -inf and mx[u] = max_j s_u[j].
template <int D, bool Max>
inline void scores(const float* const* rows, const HeadBias<D>& bias, float mul, const float* __restrict bt, int64_t n,
                   int64_t np, float* __restrict s, float* mx) {
    float a[R * D];  // the R rows (plus bias, times mul) side by side: one base pointer, constant offsets
    for (int u = 0; u < R; ++u)
        for (int c = 0; c < D; c += 16) store16(a + u * D + c, (load16(rows[u] + c) + bias.v[c / 16]) * splat(mul));
    const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v16 m[R];
    for (int u = 0; u < R; ++u) m[u] = splat(-INFINITY);
    auto finish = [&](int64_t j, v16* acc) {
        for (int u = 0; u < R; ++u) {
            if (Max) {
                if (j + 16 > n) acc[u] = lane < (int32_t)(n - j) ? acc[u] : splat(-INFINITY);
                m[u] = acc[u] > m[u] ? acc[u] : m[u];
            }
            store16(s + u * np + j, acc[u]);
        }
    };
    int64_t j = 0;
    for (; j + 32 <= np; j += 32) {  // two tiles at a time: 6 loads per 8 FMAs
        const float* tile = bt + j * D;
        v16 acc0[R] = {}, acc1[R] = {};
        for (int t = 0; t < D; ++t) {
            const v16 b0 = load16(tile + t * 16), b1 = load16(tile + 16 * D + t * 16);
            for (int u = 0; u < R; ++u) {
                const v16 x = splat(a[u * D + t]);
                acc0[u] += x * b0;
                acc1[u] += x * b1;
            }
        }
        finish(j, acc0);
        finish(j + 16, acc1);
    }
    if (j < np) {
        const float* tile = bt + j * D;
        v16 acc[R] = {};
        for (int t = 0; t < D; ++t) {
            const v16 b = load16(tile + t * 16);
            for (int u = 0; u < R; ++u) acc[u] += splat(a[u * D + t]) * b;
        }
        finish(j, acc);
    }
    if (Max)
        for (int u = 0; u < R; ++u) mx[u] = hmax(m[u]);
}

// o_u[0:D] = sum_j w_u[j] rows[j, 0:D] for R rows u (w at stride np; rows is n x D).
template <int D>
inline void weighted_rows(const float* __restrict w, int64_t np, const float* __restrict rows, int64_t n,
                          float* __restrict o) {
    for (int c = 0; c < D; c += 16) {
        v16 a0[R] = {}, a1[R] = {};  // even and odd j: two chains per row
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            const v16 r0 = load16(rows + j * D + c), r1 = load16(rows + (j + 1) * D + c);
            for (int u = 0; u < R; ++u) {
                a0[u] += splat(w[u * np + j]) * r0;
                a1[u] += splat(w[u * np + j + 1]) * r1;
            }
        }
        if (j < n) {
            const v16 r0 = load16(rows + j * D + c);
            for (int u = 0; u < R; ++u) a0[u] += splat(w[u * np + j]) * r0;
        }
        for (int u = 0; u < R; ++u) store16(o + u * D + c, a0[u] + a1[u]);
    }
}

// In-register 16 x 16 transpose: four rounds, round B swapping bit B of the row index with bit B of
// the lane index (two-source shuffles with compile-time lane indices).
template <int B, int... L>
inline v16 shuffle_low(v16 a, v16 c, std::integer_sequence<int, L...>) {
    return __builtin_shufflevector(a, c, ((L & B) ? 16 + L - B : L)...);
}

template <int B, int... L>
inline v16 shuffle_high(v16 a, v16 c, std::integer_sequence<int, L...>) {
    return __builtin_shufflevector(a, c, ((L & B) ? 16 + L : L + B)...);
}

template <int B>
inline void transpose_round(v16* r) {
    const std::make_integer_sequence<int, 16> lanes;
    for (int i = 0; i < 16; ++i) {
        if (i & B) continue;
        const v16 a = r[i], c = r[i + B];
        r[i] = shuffle_low<B>(a, c, lanes);
        r[i + B] = shuffle_high<B>(a, c, lanes);
    }
}

inline void transpose16(v16* r) {
    transpose_round<1>(r);
    transpose_round<2>(r);
    transpose_round<4>(r);
    transpose_round<8>(r);
}

// Copy one of q, k, v of a molecule's n packed rows (row stride ld, head h in columns h*D .. h*D+D-1)
// plus its bias (C values, or nullptr) into per-head dense n x D blocks, rows read in order.
template <int D>
inline void gather_rows(const float* src, const float* bias, int64_t ld, int64_t n, int64_t heads, float* dense) {
    for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < heads; ++h)
            for (int c = 0; c < D; c += 16)
                store16(dense + (h * n + j) * D + c,
                        load16(src + j * ld + h * D + c) + (bias ? load16(bias + h * D + c) : v16{}));
}

// The same into per-head tiled transposed blocks for scores(): np / 16 tiles of D x 16 per head,
// zero-padded past n.
template <int D>
inline void gather_tiles(const float* src, const float* bias, int64_t ld, int64_t n, int64_t heads, int64_t np,
                         float* t) {
    for (int64_t j0 = 0; j0 < np; j0 += 16)
        for (int64_t h = 0; h < heads; ++h)
            for (int c = 0; c < D; c += 16) {
                const v16 b = bias ? load16(bias + h * D + c) : v16{};
                v16 r[16];
                for (int jj = 0; jj < 16; ++jj) r[jj] = j0 + jj < n ? load16(src + (j0 + jj) * ld + h * D + c) + b : v16{};
                transpose16(r);  // r[cc] = column c + cc of the 16 rows
                for (int cc = 0; cc < 16; ++cc) store16(t + h * np * D + j0 * D + (c + cc) * 16, r[cc]);
            }
}

// dv[j] += sum_u p_u[j] go_u and dk[j] += sum_u ds_u[j] (q_u + bq) qscale over the first `rows` of R query rows
// (p, ds at stride np): one load and store of dv[j], dk[j] per block of rows.
template <int D, int Rows>
inline void accumulate_kv(const float* __restrict p, const float* __restrict ds, int64_t np, const float* const* go,
                          const float* const* q, const HeadBias<D>& bq, float qscale, int64_t n, float* __restrict dv,
                          float* __restrict dk) {
    for (int c = 0; c < D; c += 16) {
        v16 goc[Rows], qc[Rows];
        for (int u = 0; u < Rows; ++u) {
            goc[u] = load16(go[u] + c);
            qc[u] = (load16(q[u] + c) + bq.v[c / 16]) * splat(qscale);
        }
        for (int64_t j = 0; j < n; ++j) {
            v16 a = load16(dv + j * D + c), b = load16(dk + j * D + c);
            for (int u = 0; u < Rows; ++u) {
                a += splat(p[u * np + j]) * goc[u];
                b += splat(ds[u * np + j]) * qc[u];
            }
            store16(dv + j * D + c, a);
            store16(dk + j * D + c, b);
        }
    }
}

// Per-head forward: o (n x D) and lse (n) of head h from its q rows (stride ldq, unscaled, bias bq or
// nullptr) and the staged key tiles and values.
template <int D>
void forward_head(int64_t n, int64_t np, const float* qh, int64_t ldq, const float* bq, float scale, const float* kth,
                  const float* vh, float* oh, float* lseh, float* s) {
    const HeadBias<D> bias(bq);
    for (int64_t i0 = 0; i0 < n; i0 += R) {
        const float* a[R];  // rows past n repeat the last one; their results are dropped
        for (int u = 0; u < R; ++u) a[u] = qh + std::min(i0 + u, n - 1) * ldq;
        float mx[R], l[R], o[R * D];
        scores<D, true>(a, bias, scale, kth, n, np, s, mx);
        for (int u = 0; u < R; ++u) {
            float* su = s + u * np;
            v16 sum{};
            for (int64_t j = 0; j < np; j += 16) {
                v16 x = load16(su + j);
                v16 e = exp16(x - splat(mx[u]));
                e = x == splat(-INFINITY) ? splat(0.0f) : e;  // padded keys
                store16(su + j, e);
                sum += e;
            }
            l[u] = hsum(sum);
        }
        weighted_rows<D>(s, np, vh, n, o);
        for (int u = 0; u < R && i0 + u < n; ++u) {
            const float inv = 1.0f / l[u];
            for (int c = 0; c < D; ++c) oh[(i0 + u) * D + c] = o[u * D + c] * inv;
            lseh[i0 + u] = mx[u] + std::log(l[u]);
        }
    }
}

// Per-head backward: dq (n x D, times scale), dk, dv (n x D) of head h from its q and dO rows (strides
// ldq, ldo), the staged keys and key/value tiles, and delta_i = dO_i . O_i.
template <int D>
void backward_head(int64_t n, int64_t np, float scale, const float* qh, int64_t ldq, const float* bq, const float* kh,
                   const float* kth, const float* vth, const float* goh, int64_t ldo, const float* lseh,
                   const float* deltah, float* dqh, float* dkh, float* dvh, float* p, float* ds) {
    const HeadBias<D> bias(bq), none(nullptr);
    std::fill(dkh, dkh + n * D, 0.0f);
    std::fill(dvh, dvh + n * D, 0.0f);
    for (int64_t i0 = 0; i0 < n; i0 += R) {
        const int rows = (int)std::min<int64_t>(R, n - i0);
        const float *q[R], *go[R];  // rows past n repeat the last one; their results are dropped
        for (int u = 0; u < R; ++u) {
            const int64_t i = std::min(i0 + u, n - 1);
            q[u] = qh + i * ldq;
            go[u] = goh + i * ldo;
        }
        scores<D, false>(q, bias, scale, kth, n, np, p, nullptr);  // scaled scores
        scores<D, false>(go, none, 1.0f, vth, n, np, ds, nullptr);  // dP = dO V^T
        for (int u = 0; u < R; ++u) {
            const int64_t i = std::min(i0 + u, n - 1);
            const v16 lse = splat(lseh[i]), delta = splat(deltah[i]);
            float *pu = p + u * np, *du = ds + u * np;
            for (int64_t j = 0; j < np; j += 16) {
                v16 pj = exp16(load16(pu + j) - lse);
                store16(pu + j, pj);
                store16(du + j, pj * (load16(du + j) - delta));  // dS = P (dP - delta)
            }
        }
        float dq[R * D];  // dQ = dS K * scale
        weighted_rows<D>(ds, np, kh, n, dq);
        for (int u = 0; u < rows; ++u)
            for (int c = 0; c < D; ++c) dqh[(i0 + u) * D + c] = dq[u * D + c] * scale;
        // dV += P^T dO, dK += dS^T (scaled q), over the real rows only
        switch (rows) {
            case 4: accumulate_kv<D, 4>(p, ds, np, go, q, bias, scale, n, dvh, dkh); break;
            case 3: accumulate_kv<D, 3>(p, ds, np, go, q, bias, scale, n, dvh, dkh); break;
            case 2: accumulate_kv<D, 2>(p, ds, np, go, q, bias, scale, n, dvh, dkh); break;
            default: accumulate_kv<D, 1>(p, ds, np, go, q, bias, scale, n, dvh, dkh); break;
        }
    }
}

// Write per-head n x D blocks back into C columns of n packed rows (row stride ld); with colsum, also
// add their column sums to colsum (C values).
template <int D>
inline void scatter(const float* dense, int64_t n, int64_t heads, float* dst, int64_t ld, float* colsum) {
    for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < heads; ++h)
            for (int c = 0; c < D; c += 16) store16(dst + j * ld + h * D + c, load16(dense + (h * n + j) * D + c));
    if (colsum)  // column sums (the bias gradient), accumulated per head block
        for (int64_t h = 0; h < heads; ++h)
            for (int c = 0; c < D; c += 16) {
                v16 acc = load16(colsum + h * D + c);
                for (int64_t j = 0; j < n; ++j) acc += load16(dense + (h * n + j) * D + c);
                store16(colsum + h * D + c, acc);
            }
}

// log(1 + t) for t in [0, 1]: 2 atanh(s) with s = t / (2 + t) in [0, 1/3], the series to s^17
// (truncation error < 3e-9 relative).
inline v16 log1p16(v16 t) {
    const v16 s = t / (splat(2.0f) + t), s2 = s * s;
    v16 p = splat(1.0f / 17.0f);
    p = p * s2 + splat(1.0f / 15.0f);
    p = p * s2 + splat(1.0f / 13.0f);
    p = p * s2 + splat(1.0f / 11.0f);
    p = p * s2 + splat(1.0f / 9.0f);
    p = p * s2 + splat(1.0f / 7.0f);
    p = p * s2 + splat(1.0f / 5.0f);
    p = p * s2 + splat(1.0f / 3.0f);
    p = p * s2 + splat(1.0f);
    return splat(2.0f) * s * p;
}

// log(x) for x >= 1 (a softmax's sum of exponentials, whose largest term is exp(0) = 1): x = 2^e m with m in
// [1, 2), log x = e ln 2 + log1p(m - 1).
inline v16 log16(v16 x) {
#if defined(__AVX512F__)
    const __m512 e = _mm512_getexp_ps((__m512)x), m = _mm512_getmant_ps((__m512)x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    return (v16)e * splat(0.693147180559945309f) + log1p16((v16)m - splat(1.0f));
#else
    v16 r;
    for (int i = 0; i < 16; ++i) r[i] = std::log(x[i]);
    return r;
#endif
}

// ---- small molecules (head dimension 16, at most 32 atoms: QM7b, QM8, QM9, MD17), queries in vector lanes ----
// A head's 16 query rows of a tile are transposed into 16 registers (lane i = query i), so each key's scores, the
// row maxima, the exponentials, the sums and the log-sum-exps are plain vector operations: no horizontal
// reduction per query row and no padded key tiles (the general kernel above spent most of its time on those at
// ~16 keys per molecule).
constexpr int64_t SMALL = 32;

// s[j] (lanes: the tile's queries) = sum_t qt[t] * rows[j, t] for j < n (rows: n x 16, padded with zero rows to
// a multiple of 4), four keys per pass so that the FMAs form four independent chains.
inline void lane_scores(const v16* qt, const float* __restrict rows, int64_t n, v16* s) {
    for (int64_t j = 0; j < n; j += 4) {
        v16 a0{}, a1{}, a2{}, a3{};
        const float* r = rows + j * 16;
        for (int t = 0; t < 16; ++t) {
            a0 += qt[t] * splat(r[t]);
            a1 += qt[t] * splat(r[16 + t]);
            a2 += qt[t] * splat(r[32 + t]);
            a3 += qt[t] * splat(r[48 + t]);
        }
        s[j] = a0;
        s[j + 1] = a1;
        s[j + 2] = a2;
        s[j + 3] = a3;
    }
}

// o[t] (lanes: queries) = sum_j w[j] * rows[j, t]: 16 independent accumulators.
inline void lane_weighted(const v16* w, const float* __restrict rows, int64_t n, v16* o) {
    for (int t = 0; t < 16; ++t) o[t] = v16{};
    for (int64_t j = 0; j < n; ++j)
        for (int t = 0; t < 16; ++t) o[t] += w[j] * splat(rows[j * 16 + t]);
}

// n rows of one head (16 columns at src, row stride ld) plus bias (16 values or nullptr), times mul, into dense
// n x 16 rows, zero rows up to a multiple of 4.
inline void head_rows(const float* src, int64_t ld, const float* bias, float mul, int64_t n, float* dst) {
    const v16 b = bias ? load16(bias) : v16{};
    for (int64_t j = 0; j < n; ++j) store16(dst + j * 16, (load16(src + j * ld) + b) * splat(mul));
    for (int64_t j = n; j < (n + 3) / 4 * 4; ++j) store16(dst + j * 16, v16{});
}

// Rows i0 .. i0 + rows - 1 of dense 16-wide rows, transposed into r (lane ii = row i0 + ii; zero past rows).
inline void lanes_of(const float* dense, int64_t i0, int64_t rows, v16* r) {
    for (int ii = 0; ii < 16; ++ii) r[ii] = ii < rows ? load16(dense + (i0 + ii) * 16) : v16{};
    transpose16(r);
}

void forward_small(const Problem& P, int64_t m) {
    const int64_t n = P.sizes[m], r0 = P.starts[m], C = P.channels, H = P.heads, ld = 3 * C;
    const float* base = P.qkv + r0 * ld;
    const float* b = P.bias;
    alignas(64) float q[SMALL * 16], k[SMALL * 16], v[SMALL * 16];
    for (int64_t h = 0; h < H; ++h) {
        const int64_t c = h * 16;
        head_rows(base + c, ld, b ? b + c : nullptr, P.scale, n, q);
        head_rows(base + C + c, ld, b ? b + C + c : nullptr, 1.0f, n, k);
        head_rows(base + 2 * C + c, ld, b ? b + 2 * C + c : nullptr, 1.0f, n, v);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int64_t rows = std::min<int64_t>(16, n - i0);
            v16 qt[16], s[SMALL], o[16];
            lanes_of(q, i0, rows, qt);
            lane_scores(qt, k, n, s);
            v16 mx = s[0], l{};
            for (int64_t j = 1; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
            for (int64_t j = 0; j < n; ++j) {
                s[j] = exp16(s[j] - mx);
                l += s[j];
            }
            lane_weighted(s, v, n, o);
            const v16 inv = splat(1.0f) / l, lse = mx + log16(l);
            for (int t = 0; t < 16; ++t) o[t] *= inv;
            transpose16(o);  // o[ii] = output row i0 + ii
            for (int64_t ii = 0; ii < rows; ++ii) {
                store16(P.out + (r0 + i0 + ii) * C + c, o[ii]);
                P.lse[(r0 + i0 + ii) * H + h] = lse[ii];
            }
        }
    }
}

// dv[j] += sum_i p[j][i] go_i and dk[j] += sum_i ds[j][i] q_i (q scaled) over the tile's `rows` queries (rows of
// go and q dense, 16 wide, from i0; dv, dk padded to a multiple of 4 rows): four keys per pass, eight independent
// chains.
inline void lane_kv(const v16* p, const v16* ds, const float* go, const float* q, int64_t i0, int64_t rows, int64_t n,
                    float* dv, float* dk) {
    const int64_t n4 = (n + 3) / 4 * 4;
    alignas(64) float pm[SMALL * 16], dm[SMALL * 16];
    for (int64_t j = 0; j < n4; ++j) {
        store16(pm + j * 16, j < n ? p[j] : v16{});
        store16(dm + j * 16, j < n ? ds[j] : v16{});
    }
    for (int64_t j = 0; j < n4; j += 4) {
        v16 a[4], c[4];
        for (int u = 0; u < 4; ++u) {
            a[u] = load16(dv + (j + u) * 16);
            c[u] = load16(dk + (j + u) * 16);
        }
        for (int64_t ii = 0; ii < rows; ++ii) {
            const v16 g = load16(go + (i0 + ii) * 16), x = load16(q + (i0 + ii) * 16);
            for (int u = 0; u < 4; ++u) {
                a[u] += splat(pm[(j + u) * 16 + ii]) * g;
                c[u] += splat(dm[(j + u) * 16 + ii]) * x;
            }
        }
        for (int u = 0; u < 4; ++u) {
            store16(dv + (j + u) * 16, a[u]);
            store16(dk + (j + u) * 16, c[u]);
        }
    }
}

void backward_small(const Problem& P, int64_t m, float* colsum) {
    const int64_t n = P.sizes[m], r0 = P.starts[m], C = P.channels, H = P.heads, ld = 3 * C;
    const float* base = P.qkv + r0 * ld;
    const float* b = P.bias;
    float* g = P.grad + r0 * ld;
    alignas(64) float q[SMALL * 16], k[SMALL * 16], v[SMALL * 16], go[SMALL * 16], dk[SMALL * 16], dv[SMALL * 16];
    for (int64_t h = 0; h < H; ++h) {
        const int64_t c = h * 16;
        // everything of this head is read before any of its gradient is written (grad may be qkv)
        head_rows(base + c, ld, b ? b + c : nullptr, P.scale, n, q);
        head_rows(base + C + c, ld, b ? b + C + c : nullptr, 1.0f, n, k);
        head_rows(base + 2 * C + c, ld, b ? b + 2 * C + c : nullptr, 1.0f, n, v);
        head_rows(P.dout + r0 * C + c, C, nullptr, 1.0f, n, go);
        std::fill(dk, dk + (n + 3) / 4 * 64, 0.0f);
        std::fill(dv, dv + (n + 3) / 4 * 64, 0.0f);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int64_t rows = std::min<int64_t>(16, n - i0);
            v16 qt[16], gt[16], p[SMALL], dp[SMALL];
            lanes_of(q, i0, rows, qt);
            lanes_of(go, i0, rows, gt);
            alignas(64) float lse_rows[16] = {};
            for (int64_t ii = 0; ii < rows; ++ii) lse_rows[ii] = P.lse[(r0 + i0 + ii) * H + h];
            const v16 lse = load16(lse_rows);
            lane_scores(qt, k, n, p);
            lane_scores(gt, v, n, dp);  // dP = dO V^T
            v16 delta{};  // rowsum(dO * O) = sum_j P_ij dP_ij
            for (int64_t j = 0; j < n; ++j) {
                p[j] = exp16(p[j] - lse);
                delta += p[j] * dp[j];
            }
            for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);  // dS
            v16 dq[16];
            lane_weighted(dp, k, n, dq);  // dQ = dS K scale
            transpose16(dq);
            for (int64_t ii = 0; ii < rows; ++ii) {
                const v16 row = dq[ii] * splat(P.scale);
                store16(g + (i0 + ii) * ld + c, row);
                if (colsum) store16(colsum + c, load16(colsum + c) + row);
            }
            lane_kv(p, dp, go, q, i0, rows, n, dv, dk);  // dV += P^T dO, dK += dS^T (q scale)
        }
        for (int64_t j = 0; j < n; ++j) {
            store16(g + j * ld + C + c, load16(dk + j * 16));
            store16(g + j * ld + 2 * C + c, load16(dv + j * 16));
            if (colsum) {
                store16(colsum + C + c, load16(colsum + C + c) + load16(dk + j * 16));
                store16(colsum + 2 * C + c, load16(colsum + 2 * C + c) + load16(dv + j * 16));
            }
        }
    }
}

// A task is one molecule, all heads: every strided row of qkv, out, dO and grad is read or written
// once, in a row-order pass (a per-head pass would touch one cache line per row per head).
template <int D>
void forward_task(const Problem& P, int64_t m, Scratch& S) {
    if (D == 16 && P.sizes[m] <= SMALL) return forward_small(P, m);
    const int64_t n = P.sizes[m], r0 = P.starts[m], C = P.channels, H = P.heads, ld = 3 * C, np = (n + 15) / 16 * 16;
    S.reserve(n, C);
    const float* base = P.qkv + r0 * ld;
    const float* b = P.bias;
    gather_tiles<D>(base + C, b ? b + C : nullptr, ld, n, H, np, S.kt.data());
    gather_rows<D>(base + 2 * C, b ? b + 2 * C : nullptr, ld, n, H, S.v.data());
    float* lse = S.delta.data();
    for (int64_t h = 0; h < H; ++h)
        forward_head<D>(n, np, base + h * D, ld, b ? b + h * D : nullptr, P.scale, S.kt.data() + h * np * D,
                        S.v.data() + h * n * D,
                        S.dq.data() + h * n * D, lse + h * n, S.s.data());
    scatter<D>(S.dq.data(), n, H, P.out + r0 * C, C, nullptr);
    for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < H; ++h) P.lse[(r0 + j) * H + h] = lse[h * n + j];
}

template <int D>
void backward_task(const Problem& P, int64_t m, Scratch& S) {
    if (D == 16 && P.sizes[m] <= SMALL) return backward_small(P, m, S.colsum);
    const int64_t n = P.sizes[m], r0 = P.starts[m], C = P.channels, H = P.heads, ld = 3 * C, np = (n + 15) / 16 * 16;
    S.reserve(n, C);
    const float* base = P.qkv + r0 * ld;
    const float* b = P.bias;
    gather_rows<D>(base + C, b ? b + C : nullptr, ld, n, H, S.k.data());
    gather_tiles<D>(base + C, b ? b + C : nullptr, ld, n, H, np, S.kt.data());
    gather_tiles<D>(base + 2 * C, b ? b + 2 * C : nullptr, ld, n, H, np, S.vt.data());
    float *delta = S.delta.data(), *lse = S.lse.data();
    for (int64_t j = 0; j < n; ++j) {  // delta = rowsum(dO * O) per head, and lse, in one row pass
        const float *go = P.dout + (r0 + j) * C, *o = P.out + (r0 + j) * C;
        for (int64_t h = 0; h < H; ++h) {
            v16 dot{};
            for (int c = 0; c < D; c += 16) dot += load16(go + h * D + c) * load16(o + h * D + c);
            delta[h * n + j] = hsum(dot);
            lse[h * n + j] = P.lse[(r0 + j) * H + h];
        }
    }
    for (int64_t h = 0; h < H; ++h) {
        const int64_t a = h * n * D;
        backward_head<D>(n, np, P.scale, base + h * D, ld, b ? b + h * D : nullptr, S.k.data() + a, S.kt.data() + h * np * D,
                         S.vt.data() + h * np * D, P.dout + r0 * C + h * D, C, lse + h * n, delta + h * n, S.dq.data() + a,
                         S.dk.data() + a, S.dv.data() + a, S.s.data(), S.dp.data());
    }
    // nothing was written to grad before this point, so grad may be qkv itself
    float* g = P.grad + r0 * ld;
    float* cs = S.colsum;
    scatter<D>(S.dq.data(), n, H, g, ld, cs);
    scatter<D>(S.dk.data(), n, H, g + C, ld, cs ? cs + C : nullptr);
    scatter<D>(S.dv.data(), n, H, g + 2 * C, ld, cs ? cs + 2 * C : nullptr);
}

// Molecule m's rows of q|k|v, dO and dq|dk|dv, requested into the cache ahead of its backward task. They were
// written long before (the forward) and have left the core's L2, and each head's pass reads one 64-byte line per row
// at a stride of 3C floats: those loads were ~18 % of the small-molecule backward's time (perf, quickstart sizes).
// (The same in the forward, where the q|k|v matmul has just written the rows, made large molecules' forward ~12 %
// slower: benchmarks/attention.py --baseline.)
inline void prefetch_lines(const float* p, int64_t floats, bool write) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t o = 0, end = floats * 4; o < end; o += 64) {
        if (write) __builtin_prefetch(c + o, 1, 2);  // intent to write: no read-for-ownership stall
        else __builtin_prefetch(c + o, 0, 2);
    }
}

inline void prefetch_backward(const Problem& P, int64_t m) {
    const int64_t n = P.sizes[m], r0 = P.starts[m], C = P.channels;
    prefetch_lines(P.qkv + r0 * 3 * C, n * 3 * C, false);
    prefetch_lines(P.dout + r0 * C, n * C, false);
    if (P.grad != P.qkv) prefetch_lines(P.grad + r0 * 3 * C, n * 3 * C, true);
}

template <void (*Task)(const Problem&, int64_t, Scratch&)>
void run(const Problem& P, int threads) {
    // One task per molecule (all heads: its rows are read from memory once), largest first
    // (cost ~ n^2), handed out dynamically.
    const int64_t total = P.num_molecules;
    std::vector<int64_t> order(total);
    for (int64_t m = 0; m < total; ++m) order[m] = m;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return P.sizes[a] > P.sizes[b]; });
    std::atomic<int64_t> next{0};
    const int64_t cols = 3 * P.channels;
    // The bias gradient: one row of column sums per molecule, added up in molecule order afterwards, so that
    // the result does not depend on which thread took which molecule (bitwise the same from run to run).
    static thread_local std::vector<float> per_molecule;
    if (P.colsum) per_molecule.resize((size_t)(total * cols));
    float* rows = P.colsum ? per_molecule.data() : nullptr;
    threads = std::max(1, std::min<int>(threads, (int)std::min<int64_t>(total, 64)));
#pragma omp parallel num_threads(threads)
    {
        // kept per thread across calls: at small batches allocating and zero-filling it cost as much as a task
        static thread_local Scratch S;
        for (int64_t t; (t = next.fetch_add(1)) < total;) {
            const int64_t m = order[t];
            if (P.dout && t + 1 < total) prefetch_backward(P, order[t + 1]);  // the next one's, while this one runs
            if (rows) {
                S.colsum = rows + m * cols;
                std::fill(S.colsum, S.colsum + cols, 0.0f);
            }
            Task(P, m, S);
        }
        S.colsum = nullptr;
    }
    if (P.colsum) {
        std::fill(P.colsum, P.colsum + cols, 0.0f);
        for (int64_t m = 0; m < total; ++m)
            for (int64_t c = 0; c < cols; ++c) P.colsum[c] += rows[m * cols + c];
    }
}

template <int D>
int dispatch(const Problem& P, int threads, bool backward) {
    if (backward) run<backward_task<D>>(P, threads);
    else run<forward_task<D>>(P, threads);
    return 0;
}

int launch(const Problem& P, int threads, bool backward) {
    if (P.heads <= 0 || P.channels % P.heads != 0) return 1;
    switch (P.channels / P.heads) {
        case 16: return dispatch<16>(P, threads, backward);
        case 32: return dispatch<32>(P, threads, backward);
        case 64: return dispatch<64>(P, threads, backward);
        default: return 2;
    }
}

// Threads for an element-wise pass over `rows` rows: at most one per 256 rows.
inline int row_threads(int64_t rows, int threads) {
    return (int)std::max<int64_t>(1, std::min<int64_t>(threads, rows / 256 + 1));
}

// Rows [0, rows) split into row_threads(rows, threads) contiguous ranges, run(first, last, thread) on each.
template <typename F>
void parallel_rows(int64_t rows, int threads, F run) {
    threads = row_threads(rows, threads);
    const int64_t per = (rows + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) run(std::min(rows, t * per), std::min(rows, (t + 1) * per), t);
}

// parallel_rows with K column sums: run(first, last, acc) adds into acc[k] (cols zeroed floats per
// thread), and the threads' partial sums end up in sums[k] (cols values each).
template <int K, typename F>
void parallel_rows_summed(int64_t rows, int64_t cols, int threads, float* const (&sums)[K], F run) {
    const int nt = row_threads(rows, threads);
    std::vector<float> parts((size_t)nt * K * cols, 0.0f);
    parallel_rows(rows, nt, [&](int64_t first, int64_t last, int t) {
        float* acc[K];
        for (int k = 0; k < K; ++k) acc[k] = parts.data() + ((int64_t)t * K + k) * cols;
        run(first, last, acc);
    });
    for (int k = 0; k < K; ++k)
        for (int64_t c = 0; c < cols; ++c) {
            float total = 0.0f;
            for (int t = 0; t < nt; ++t) total += parts[((int64_t)t * K + k) * cols + c];
            sums[k][c] = total;
        }
}

// Row kernels of the ReLU passes, with restrict-qualified pointers: a byte-wide mask store may alias
// any float (char aliasing), which otherwise keeps the compiler from vectorising these loops (the
// forward pass ran ~9x slower than the plain residual add).
inline void relu_residual_row(float* __restrict z, const float* __restrict b, const float* __restrict h,
                              uint8_t* __restrict mask, int64_t cols) {
    if (h) {
        for (int64_t c = 0; c < cols; ++c) {
            const float a = z[c] + b[c];
            mask[c] = a > 0.0f;
            z[c] = h[c] + (a > 0.0f ? a : 0.0f);
        }
    } else {
        for (int64_t c = 0; c < cols; ++c) {
            const float a = z[c] + b[c];
            mask[c] = a > 0.0f;
            z[c] = a > 0.0f ? a : 0.0f;
        }
    }
}

inline void relu_backward_row(const float* __restrict gy, const uint8_t* __restrict mask, float* __restrict gz,
                              float* __restrict sum_gz, float* __restrict sum_gy, int64_t cols) {
    for (int64_t c = 0; c < cols; ++c) {
        const float g = gy[c];
        const float v = mask[c] ? g : 0.0f;
        gz[c] = v;
        sum_gz[c] += v;
        sum_gy[c] += g;
    }
}

}  // namespace

extern "C" {

// bias: the 3C q|k|v bias added to qkv on the fly (or null: qkv already includes it).
int abp_set_attention_forward(const float* qkv, const float* bias, float* out, float* lse, const int64_t* starts,
                              const int64_t* sizes, int64_t num_molecules, int64_t channels, int64_t heads,
                              int threads) {
    Problem P{qkv, bias, out, lse, nullptr, nullptr, nullptr, starts, sizes, num_molecules, channels, heads,
              1.0f / std::sqrt((float)(channels / heads))};
    return launch(P, threads, false);
}

// colsum: if not null, receives the column sums of grad (3C values: the q|k|v bias gradient).
int abp_set_attention_backward(const float* qkv, const float* bias, const float* out, const float* lse,
                               const float* dout, float* grad, float* colsum, const int64_t* starts,
                               const int64_t* sizes, int64_t num_molecules, int64_t channels, int64_t heads,
                               int threads) {
    Problem P{qkv, bias, const_cast<float*>(out), const_cast<float*>(lse), dout, grad, colsum, starts, sizes,
              num_molecules, channels, heads, 1.0f / std::sqrt((float)(channels / heads))};
    return launch(P, threads, true);
}

int abp_set_attention_abi_version() { return 10; }

// Flush-to-zero and denormals-are-zero (MXCSR bits 15 and 6) on the calling thread and on every thread of the
// OpenMP pool (PyTorch's intra-op workers: this library shares its libgomp), on or off; returns whether both were
// set on the calling thread before, or -1 off x86. Why here: torch.set_flush_denormal sets the calling thread only,
// and a worker that exists already keeps its own state (threads inherit the creator's only when created). On x86 an
// operation on or producing a sub-normal float takes a microcode assist, tens of times a normal one.
int abp_flush_denormal(int on, int threads) {
#if defined(__x86_64__) || defined(__i386__)
    const unsigned bits = 0x8040u;
    const int before = (_mm_getcsr() & bits) == bits;
#pragma omp parallel num_threads(std::max(1, threads))
    {
        const unsigned csr = _mm_getcsr();
        _mm_setcsr(on ? (csr | bits) : (csr & ~bits));
    }
    return before;
#else
    (void)on;
    (void)threads;
    return -1;
#endif
}


// Linear layer epilogue, in place: z <- h + relu(z + b) (or relu(z + b) if h is null), mask <- (z + b > 0),
// for [rows, C] z and h (b: C values). One pass instead of a bias copy, a comparison, a ReLU and an addition.
int abp_relu_residual(float* z, const float* b, const float* h, uint8_t* mask, int64_t rows, int64_t cols,
                      int threads) {
    parallel_rows(rows, threads, [&](int64_t first, int64_t last, int) {
        for (int64_t r = first; r < last; ++r)
            relu_residual_row(z + r * cols, b, h ? h + r * cols : nullptr, mask + r * cols, cols);
    });
    return 0;
}

// In place: h <- h + x + b for [rows, C] h and x (b: C values).
int abp_add_residual(float* h, const float* x, const float* b, int64_t rows, int64_t cols, int threads) {
    parallel_rows(rows, threads, [&](int64_t first, int64_t last, int) {
        for (int64_t r = first; r < last; ++r)
            for (int64_t c = 0; c < cols; ++c) h[r * cols + c] += x[r * cols + c] + b[c];
    });
    return 0;
}

// ReLU backward with column sums: gz = gy * mask, sum_gz = colsum(gz), sum_gy = colsum(gy).
int abp_relu_backward(const float* gy, const uint8_t* mask, float* gz, float* sum_gz, float* sum_gy, int64_t rows,
                      int64_t cols, int threads) {
    float* const sums[2] = {sum_gz, sum_gy};
    parallel_rows_summed<2>(rows, cols, threads, sums, [&](int64_t first, int64_t last, float* const* acc) {
        for (int64_t r = first; r < last; ++r)
            relu_backward_row(gy + r * cols, mask + r * cols, gz + r * cols, acc[0], acc[1], cols);
    });
    return 0;
}


// SchNet's filter-network activation, in place: y <- softplus(y + b) - shift for [rows, C] y (b: C
// values), softplus(z) = max(z, 0) + log1p(exp(-|z|)). One pass instead of a bias copy, softplus and
// a subtraction; nothing else is stored for the backward (see abp_shifted_softplus_backward).
int abp_shifted_softplus(float* y, const float* b, float shift, int64_t rows, int64_t cols, int threads) {
    if (cols % 16) return 3;
    parallel_rows(rows, threads, [&](int64_t first, int64_t last, int) {
        for (int64_t r = first; r < last; ++r)
            for (int64_t c = 0; c < cols; c += 16) {
                float* yr = y + r * cols + c;
                const v16 z = load16(yr) + load16(b + c);
                const v16 negabs = z > splat(0.0f) ? -z : z;
                const v16 relu = z > splat(0.0f) ? z : splat(0.0f);
                store16(yr, relu + log1p16(exp16(negabs)) - splat(shift));
            }
    });
    return 0;
}

// Its backward from the output alone: softplus'(z) = sigmoid(z) = 1 - exp(-softplus(z)) with
// softplus(z) = y + shift. gz = gy * sigmoid(z) and sum_gz = colsum(gz) (the bias gradient).
int abp_shifted_softplus_backward(const float* gy, const float* y, float shift, float* gz, float* sum_gz,
                                  int64_t rows, int64_t cols, int threads) {
    if (cols % 16) return 3;
    float* const sums[1] = {sum_gz};
    parallel_rows_summed<1>(rows, cols, threads, sums, [&](int64_t first, int64_t last, float* const* sum) {
        float* acc = sum[0];
        for (int64_t r = first; r < last; ++r)
            for (int64_t c = 0; c < cols; c += 16) {
                const v16 sp = load16(y + r * cols + c) + splat(shift);
                const v16 sig = splat(1.0f) - exp16(sp > splat(0.0f) ? -sp : splat(0.0f));
                const v16 g = load16(gy + r * cols + c) * sig;
                store16(gz + r * cols + c, g);
                store16(acc + c, load16(acc + c) + g);
            }
    });
    return 0;
}


}  // extern "C"

namespace {

// Pair ranges [first, last) that touch disjoint atoms, about `parts` of them: pairs are sorted by
// a (< b), so a split before pair p is safe when every earlier pair's b is below a[p] (a molecule
// boundary). One range if no such split exists or the pairs are not sorted that way.
std::vector<int64_t> pair_splits(const int64_t* a, const int64_t* b, int64_t pairs, int parts) {
    for (int64_t p = 0; p < pairs; ++p)  // not sorted by a, or a >= b: no split is known to be safe
        if (a[p] >= b[p] || (p && a[p] < a[p - 1])) return {0, pairs};
    std::vector<int64_t> cuts{0};
    int64_t max_b = -1;
    for (int64_t p = 0; p < pairs; ++p) {
        if ((int)cuts.size() < parts && p >= pairs * (int64_t)cuts.size() / parts && max_b < a[p] && p > cuts.back())
            cuts.push_back(p);
        max_b = std::max(max_b, b[p]);
    }
    cuts.push_back(pairs);
    return cuts;
}

template <typename F>
void over_pairs(const int64_t* a, const int64_t* b, int64_t pairs, int threads, F body) {
    const std::vector<int64_t> cuts = pair_splits(a, b, pairs, std::max(1, threads));
    const int n = (int)cuts.size() - 1;
#pragma omp parallel for num_threads(std::max(1, std::min(threads, n))) schedule(static, 1)
    for (int t = 0; t < n; ++t)
        for (int64_t p = cuts[t]; p < cuts[t + 1]; ++p) body(p);
}

}  // namespace

extern "C" {

// SchNet's continuous-filter sum over undirected pairs (a < b, sorted by a), both directions:
// out[a] += x[b] * w[p], out[b] += x[a] * w[p], for [N, F] x and out (zeroed here) and [P, F] w.
int abp_pair_mul_scatter(const float* x, const float* w, const int64_t* a, const int64_t* b, float* out,
                         int64_t pairs, int64_t nodes, int64_t f, int threads) {
    if (f % 16) return 3;
    std::fill(out, out + nodes * f, 0.0f);
    over_pairs(a, b, pairs, threads, [&](int64_t p) {
        const float *xa = x + a[p] * f, *xb = x + b[p] * f, *wp = w + p * f;
        float *oa = out + a[p] * f, *ob = out + b[p] * f;
        for (int64_t c = 0; c < f; c += 16) {
            const v16 wc = load16(wp + c);
            store16(oa + c, load16(oa + c) + load16(xb + c) * wc);
            store16(ob + c, load16(ob + c) + load16(xa + c) * wc);
        }
    });
    return 0;
}

// Its backward: gx[b] += g[a] * w[p], gx[a] += g[b] * w[p] (gx zeroed here; null: skipped) and
// gw[p] = g[a] * x[b] + g[b] * x[a] (null: skipped).
int abp_pair_mul_scatter_backward(const float* grad, const float* x, const float* w, const int64_t* a,
                                  const int64_t* b, float* gx, float* gw, int64_t pairs, int64_t nodes, int64_t f,
                                  int threads) {
    if (f % 16) return 3;
    if (gx) std::fill(gx, gx + nodes * f, 0.0f);
    over_pairs(a, b, pairs, threads, [&](int64_t p) {
        const float *ga = grad + a[p] * f, *gb = grad + b[p] * f, *wp = w + p * f;
        for (int64_t c = 0; c < f; c += 16) {
            const v16 gac = load16(ga + c), gbc = load16(gb + c);
            if (gx) {
                const v16 wc = load16(wp + c);
                float *xa = gx + a[p] * f + c, *xb = gx + b[p] * f + c;
                store16(xb, load16(xb) + gac * wc);
                store16(xa, load16(xa) + gbc * wc);
            }
            if (gw) store16(gw + p * f + c, gac * load16(x + b[p] * f + c) + gbc * load16(x + a[p] * f + c));
        }
    });
    return 0;
}


// SchNet's filters: y <- (y + b) * s[row], in place, for [rows, C] y (b: C values, s: rows values).
int abp_bias_scale_rows(float* y, const float* b, const float* s, int64_t rows, int64_t cols, int threads) {
    if (cols % 16) return 3;
    parallel_rows(rows, threads, [&](int64_t first, int64_t last, int) {
        for (int64_t r = first; r < last; ++r) {
            const v16 sr = splat(s[r]);
            for (int64_t c = 0; c < cols; c += 16) store16(y + r * cols + c, (load16(y + r * cols + c) + load16(b + c)) * sr);
        }
    });
    return 0;
}

// Its backward: g_pre = g * s[row] and sum_pre = colsum(g_pre) (the bias gradient).
int abp_scale_rows_backward(const float* g, const float* s, float* out, float* sum_out, int64_t rows, int64_t cols,
                            int threads) {
    if (cols % 16) return 3;
    float* const sums[1] = {sum_out};
    parallel_rows_summed<1>(rows, cols, threads, sums, [&](int64_t first, int64_t last, float* const* sum) {
        float* acc = sum[0];
        for (int64_t r = first; r < last; ++r) {
            const v16 sr = splat(s[r]);
            for (int64_t c = 0; c < cols; c += 16) {
                const v16 v = load16(g + r * cols + c) * sr;
                store16(out + r * cols + c, v);
                store16(acc + c, load16(acc + c) + v);
            }
        }
    });
    return 0;
}

}


// ---- ABP's molecule-level steps (abp_core/native_readout.py): the batch's molecule table and the PMA's pooling ----

extern "C" {

// Molecule table of a sorted batch vector (n entries, molecule ids in [0, M)): sizes[m] atoms of molecule m,
// starts[m] its first row (an empty molecule: size 0, start where it would begin). One pass; returns the number
// of non-empty molecules, or -1 if the vector is not sorted, -2 if an id lies outside [0, M).
int64_t abp_batch_table(const int64_t* batch, int64_t n, int64_t M, int64_t* starts, int64_t* sizes) {
    std::fill(sizes, sizes + M, (int64_t)0);
    int64_t prev = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = batch[i];
        if (b < 0 || b >= M) return -2;
        if (b < prev) return -1;
        sizes[b] += 1;
        prev = b;
    }
    int64_t row = 0, present = 0;
    for (int64_t m = 0; m < M; ++m) {
        starts[m] = row;
        row += sizes[m];
        present += sizes[m] > 0;
    }
    return present;
}

// PMA with one seed, per molecule m (rows starts[m] .. starts[m] + sizes[m]) and head h: a[i, h] = softmax over
// the molecule's atoms of scores[i, h], pooled[m, h, :] = sum_i a[i, h] z[i, :] (scores and a [N, H], z [N, C],
// pooled [M, H, C]; an empty molecule pools to zeros).
int abp_pma_pool_forward(const float* scores, const float* z, float* a, float* pooled, const int64_t* starts,
                         const int64_t* sizes, int64_t M, int64_t H, int64_t C, int threads) {
    parallel_rows(M, threads, [&](int64_t first, int64_t last, int) {
        for (int64_t m = first; m < last; ++m) {
            const int64_t r0 = starts[m], n = sizes[m];
            float* p = pooled + m * H * C;
            std::fill(p, p + H * C, 0.0f);
            for (int64_t h = 0; h < H; ++h) {
                float mx = -INFINITY;
                for (int64_t i = 0; i < n; ++i) mx = std::max(mx, scores[(r0 + i) * H + h]);
                float total = 0.0f;
                for (int64_t i = 0; i < n; ++i) {
                    const float e = std::exp(scores[(r0 + i) * H + h] - mx);
                    a[(r0 + i) * H + h] = e;
                    total += e;
                }
                const float inv = 1.0f / total;
                for (int64_t i = 0; i < n; ++i) a[(r0 + i) * H + h] *= inv;
            }
            for (int64_t i = 0; i < n; ++i) {
                const float* __restrict zi = z + (r0 + i) * C;
                const float* ai = a + (r0 + i) * H;
                for (int64_t h = 0; h < H; ++h) {
                    const float w = ai[h];
                    float* __restrict ph = p + h * C;
                    for (int64_t c = 0; c < C; ++c) ph[c] += w * zi[c];
                }
            }
        }
    });
    return 0;
}

// Its backward from gp = dL/dpooled [M, H, C]: gz[i, :] = sum_h a[i, h] gp[m, h, :] (written, [N, C]) and
// gs = dL/dscores [N, H] (softmax backward: gs = a * (ga - sum_j a_j ga_j) with ga[i, h] = gp[m, h, :] . z[i, :]).
int abp_pma_pool_backward(const float* gp, const float* z, const float* a, float* gz, float* gs,
                          const int64_t* starts, const int64_t* sizes, int64_t M, int64_t H, int64_t C,
                          int threads) {
    parallel_rows(M, threads, [&](int64_t first, int64_t last, int) {
        std::vector<float> dots((size_t)H);
        for (int64_t m = first; m < last; ++m) {
            const int64_t r0 = starts[m], n = sizes[m];
            const float* g = gp + m * H * C;
            std::fill(dots.begin(), dots.end(), 0.0f);
            for (int64_t i = 0; i < n; ++i) {
                const float* __restrict zi = z + (r0 + i) * C;
                const float* ai = a + (r0 + i) * H;
                float* __restrict gzi = gz + (r0 + i) * C;
                float* gsi = gs + (r0 + i) * H;
                std::fill(gzi, gzi + C, 0.0f);
                for (int64_t h = 0; h < H; ++h) {
                    const float* __restrict gh = g + h * C;
                    const float w = ai[h];
                    // the dot product in 16 explicit lanes: a scalar float reduction does not vectorise
                    // (its order is fixed without -ffast-math) and ran as one FMA latency chain
                    v16 acc{};
                    int64_t c = 0;
                    for (; c + 16 <= C; c += 16) {
                        const v16 gv = load16(gh + c);
                        store16(gzi + c, load16(gzi + c) + splat(w) * gv);
                        acc += gv * load16(zi + c);
                    }
                    float ga = hsum(acc);
                    for (; c < C; ++c) {
                        gzi[c] += w * gh[c];
                        ga += gh[c] * zi[c];
                    }
                    gsi[h] = ga;
                    dots[h] += w * ga;
                }
            }
            for (int64_t i = 0; i < n; ++i)
                for (int64_t h = 0; h < H; ++h) {
                    float* gsi = gs + (r0 + i) * H;
                    gsi[h] = a[(r0 + i) * H + h] * (gsi[h] - dots[h]);
                }
        }
    });
    return 0;
}

}  // extern "C"

// ---- ABP after the PMA keys (abp_core/native_readout.py): seed scores, pooling, the PMA's feed-forward, the
// decoder SABs over one key and the output projection, forward and backward, in one call each. The matmuls go
// to the BLAS sgemm_ that PyTorch itself uses (its address is handed in by abp_set_sgemm), so they give what
// torch.mm gives; the small element-wise steps between them are plain loops.

namespace {

typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
sgemm_fn g_sgemm = nullptr;

// Row-major C[m, n] = alpha op(A) op(B) + beta C (op(A) [m, k], op(B) [k, n]) through the column-major sgemm_:
// C^T = op(B)^T op(A)^T.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
        return;
    }
    const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
    const int M = (int)m, N = (int)n, K = (int)k, LA = (int)lda, LB = (int)ldb, LC = (int)ldc;
    g_sgemm(&tB, &tA, &N, &M, &K, &alpha, B, &LB, A, &LA, &beta, C, &LC);
}

// y[rows, out] = x[rows, in] W[out, in]^T + b
void linear(int64_t rows, int64_t in, int64_t out, const float* x, const float* W, const float* b, float* y) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * out, b, sizeof(float) * out);
    gemm(false, true, rows, out, in, 1.0f, x, in, W, in, 1.0f, y, out);
}

// Backward of linear from gy [rows, out]: gW = gy^T x, gb = colsum(gy), and gx = gy W (+ add_to if given).
void linear_backward(int64_t rows, int64_t in, int64_t out, const float* x, const float* W, const float* gy, float* gW,
                     float* gb, float* gx, bool accumulate) {
    gemm(true, false, out, in, rows, 1.0f, gy, out, x, in, 0.0f, gW, in);
    for (int64_t o = 0; o < out; ++o) gb[o] = 0.0f;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < out; ++o) gb[o] += gy[r * out + o];
    if (gx) gemm(false, false, rows, in, out, 1.0f, gy, out, W, in, accumulate ? 1.0f : 0.0f, gx, in);
}

enum Slot {
    Z, STARTS, SIZES, W_IN, B_IN, W_O, B_O, W_L, B_L, SEED, W_OUT, B_OUT,
    Q, U, A, POOLED, ATT, H1, Z1, HS, V, HH, ZZ, OUT,
    GRAD_OUT, GZ, GW_IN, GB_IN, GW_O, GB_O, GW_L, GB_L, G_SEED, GW_OUT, GB_OUT,
    DECODERS  // then 6 parameter pointers per decoder, then 6 gradient pointers per decoder
};

struct Tail {
    int64_t N, M, C, H, D, Cout, threads;
    const int64_t* p;
    template <typename T> T* at(int64_t slot) const { return reinterpret_cast<T*>(p[slot]); }
    const float* dec(int64_t k, int j) const { return at<const float>(DECODERS + 6 * k + j); }
    float* dec_grad(int64_t k, int j) const { return at<float>(DECODERS + 6 * D + 6 * k + j); }
};

Tail tail_of(const int64_t* dims, const int64_t* ptrs) {
    return Tail{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], ptrs};
}

}  // namespace

extern "C" {

void abp_set_sgemm(void* fn) { g_sgemm = reinterpret_cast<sgemm_fn>(fn); }

// dims: N, M, C, H, decoders, output width (0: no output projection), threads. ptrs: the Slot table.
int abp_pma_tail_forward(const int64_t* dims, const int64_t* ptrs) {
    if (!g_sgemm) return 4;
    const Tail T = tail_of(dims, ptrs);
    const int64_t N = T.N, M = T.M, C = T.C, H = T.H, d = C / H, MC = M * C;
    const float *z = T.at<const float>(Z), *w_in = T.at<const float>(W_IN), *b_in = T.at<const float>(B_IN),
                *s = T.at<const float>(SEED);
    const int64_t *starts = T.at<const int64_t>(STARTS), *sizes = T.at<const int64_t>(SIZES);
    float *q = T.at<float>(Q), *u = T.at<float>(U), *a = T.at<float>(A), *pooled = T.at<float>(POOLED),
          *att = T.at<float>(ATT), *h1 = T.at<float>(H1), *z1 = T.at<float>(Z1), *hs = T.at<float>(HS);
    // the seed's query, and the key projection folded into it: u_h = d^-1/2 q_h^T W_k,h
    linear(1, C, C, s, w_in, b_in, q);
    const float scale = 1.0f / std::sqrt((float)d);
    for (int64_t h = 0; h < H; ++h)
        for (int64_t c = 0; c < C; ++c) {
            float acc = 0.0f;
            for (int64_t j = 0; j < d; ++j) acc += q[h * d + j] * w_in[(C + h * d + j) * C + c];
            u[h * C + c] = acc * scale;
        }
    gemm(false, true, N, H, C, 1.0f, z, C, u, C, 0.0f, a, H);  // scores, softmaxed in place below
    int code = abp_pma_pool_forward(a, z, a, pooled, starts, sizes, M, H, C, (int)T.threads);
    if (code) return code;
    const float *w_v = w_in + 2 * C * C, *b_v = b_in + 2 * C;
    for (int64_t h = 0; h < H; ++h)  // att[m, head h] = W_v,h pooled[m, h] + b_v,h
        gemm(false, true, M, d, C, 1.0f, pooled + h * C, H * C, w_v + h * d * C, C, 0.0f, att + h * d, C);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < C; ++c) att[m * C + c] = sizes[m] ? att[m * C + c] + b_v[c] : 0.0f;  // empty: no keys
    linear(M, C, C, att, T.at<const float>(W_O), T.at<const float>(B_O), h1);
    for (int64_t i = 0; i < MC; ++i) h1[i] += s[i % C];
    linear(M, C, C, h1, T.at<const float>(W_L), T.at<const float>(B_L), z1);
    for (int64_t i = 0; i < MC; ++i) hs[i] = h1[i] + (z1[i] > 0.0f ? z1[i] : 0.0f);
    for (int64_t k = 0; k < T.D; ++k) {  // a decoder over one key: its softmax weight is exactly 1
        const float* hin = hs + k * MC;
        float *v = T.at<float>(V) + k * MC, *hh = T.at<float>(HH) + k * MC, *zz = T.at<float>(ZZ) + k * MC,
              *hout = hs + (k + 1) * MC;
        linear(M, C, C, hin, T.dec(k, 0) + 2 * C * C, T.dec(k, 1) + 2 * C, v);
        linear(M, C, C, v, T.dec(k, 2), T.dec(k, 3), hh);
        for (int64_t i = 0; i < MC; ++i) hh[i] += hin[i];
        linear(M, C, C, hh, T.dec(k, 4), T.dec(k, 5), zz);
        for (int64_t i = 0; i < MC; ++i) hout[i] = hh[i] + (zz[i] > 0.0f ? zz[i] : 0.0f);
    }
    const float* last = hs + T.D * MC;
    float* out = T.at<float>(OUT);
    if (T.Cout) {
        linear(M, C, T.Cout, last, T.at<const float>(W_OUT), T.at<const float>(B_OUT), out);
        for (int64_t i = 0; i < M * T.Cout; ++i) out[i] = out[i] > 0.0f ? out[i] : 0.0f;
    } else {
        std::memcpy(out, last, sizeof(float) * MC);
    }
    return 0;
}

// Its backward from ptrs[GRAD_OUT] [M, out]: every parameter gradient (decoders' q/k rows and the PMA's key bias
// exactly 0) and dL/dz [N, C] into ptrs[GZ].
int abp_pma_tail_backward(const int64_t* dims, const int64_t* ptrs) {
    if (!g_sgemm) return 4;
    const Tail T = tail_of(dims, ptrs);
    const int64_t N = T.N, M = T.M, C = T.C, H = T.H, d = C / H, MC = M * C;
    const float *z = T.at<const float>(Z), *w_in = T.at<const float>(W_IN), *s = T.at<const float>(SEED),
                *q = T.at<const float>(Q), *u = T.at<const float>(U), *a = T.at<const float>(A),
                *pooled = T.at<const float>(POOLED), *att = T.at<const float>(ATT), *h1 = T.at<const float>(H1),
                *z1 = T.at<const float>(Z1), *hs = T.at<const float>(HS);
    const int64_t *starts = T.at<const int64_t>(STARTS), *sizes = T.at<const int64_t>(SIZES);
    std::vector<float> g(MC), g2(MC), g3(MC);
    const float* last = hs + T.D * MC;
    if (T.Cout) {
        const float *go = T.at<const float>(GRAD_OUT), *out = T.at<const float>(OUT);
        std::vector<float> gpre((size_t)(M * T.Cout));
        for (int64_t i = 0; i < M * T.Cout; ++i) gpre[i] = out[i] > 0.0f ? go[i] : 0.0f;
        linear_backward(M, C, T.Cout, last, T.at<const float>(W_OUT), gpre.data(), T.at<float>(GW_OUT),
                        T.at<float>(GB_OUT), g.data(), false);
    } else {
        std::memcpy(g.data(), T.at<const float>(GRAD_OUT), sizeof(float) * MC);
    }
    // g: dL/d(block output); g2 / g3: scratch
    for (int64_t k = T.D - 1; k >= 0; --k) {
        const float *hin = hs + k * MC, *v = T.at<const float>(V) + k * MC, *hh = T.at<const float>(HH) + k * MC,
                    *zz = T.at<const float>(ZZ) + k * MC;
        for (int64_t i = 0; i < MC; ++i) g2[i] = zz[i] > 0.0f ? g[i] : 0.0f;  // dL/dzz
        linear_backward(M, C, C, hh, T.dec(k, 4), g2.data(), T.dec_grad(k, 4), T.dec_grad(k, 5), g.data(), true);
        // g is now dL/dhh; dL/dv into g3
        linear_backward(M, C, C, v, T.dec(k, 2), g.data(), T.dec_grad(k, 2), T.dec_grad(k, 3), g3.data(), false);
        float *gw_in = T.dec_grad(k, 0), *gb_in = T.dec_grad(k, 1);
        std::fill(gw_in, gw_in + 2 * C * C, 0.0f);  // q and k are not used
        std::fill(gb_in, gb_in + 2 * C, 0.0f);
        linear_backward(M, C, C, hin, T.dec(k, 0) + 2 * C * C, g3.data(), gw_in + 2 * C * C, gb_in + 2 * C, g.data(),
                        true);  // g += dL/dhin through v (the residual part is already in g)
    }
    // the PMA's feed-forward: hs[0] = h1 + relu(z1), z1 = h1 W_l^T + b_l, h1 = att W_o^T + b_o + s
    for (int64_t i = 0; i < MC; ++i) g2[i] = z1[i] > 0.0f ? g[i] : 0.0f;
    linear_backward(M, C, C, h1, T.at<const float>(W_L), g2.data(), T.at<float>(GW_L), T.at<float>(GB_L), g.data(),
                    true);  // g = dL/dh1
    float* g_seed = T.at<float>(G_SEED);
    linear_backward(M, C, C, att, T.at<const float>(W_O), g.data(), T.at<float>(GW_O), T.at<float>(GB_O), g3.data(),
                    false);  // g3 = dL/datt
    std::memcpy(g_seed, T.at<float>(GB_O), sizeof(float) * C);  // the seed is h1's residual
    for (int64_t m = 0; m < M; ++m)
        if (!sizes[m]) std::fill(g3.data() + m * C, g3.data() + (m + 1) * C, 0.0f);
    float *gw_in = T.at<float>(GW_IN), *gb_in = T.at<float>(GB_IN);
    const float* w_v = w_in + 2 * C * C;
    for (int64_t c = 0; c < C; ++c) gb_in[2 * C + c] = 0.0f;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < C; ++c) gb_in[2 * C + c] += g3[m * C + c];
    std::vector<float> gp((size_t)(M * H * C)), gs((size_t)(N * H)), gu((size_t)(H * C));
    for (int64_t h = 0; h < H; ++h) {
        gemm(true, false, d, C, M, 1.0f, g3.data() + h * d, C, pooled + h * C, H * C, 0.0f,
             gw_in + (2 * C + h * d) * C, C);  // dW_v,h = datt_h^T pooled_h
        gemm(false, false, M, C, d, 1.0f, g3.data() + h * d, C, w_v + h * d * C, C, 0.0f, gp.data() + h * C,
             H * C);  // dpooled_h = datt_h W_v,h
    }
    float* gz = T.at<float>(GZ);
    int code = abp_pma_pool_backward(gp.data(), z, a, gz, gs.data(), starts, sizes, M, H, C, (int)T.threads);
    if (code) return code;
    gemm(true, false, H, C, N, 1.0f, gs.data(), H, z, C, 0.0f, gu.data(), C);  // dL/du
    gemm(false, false, N, C, H, 1.0f, gs.data(), H, u, C, 1.0f, gz, C);       // dz += dscores u
    const float scale = 1.0f / std::sqrt((float)d);
    std::vector<float> gq((size_t)C, 0.0f);
    for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < d; ++j) {
            const int64_t r = h * d + j;
            const float* wk = w_in + (C + r) * C;
            float* gwk = gw_in + (C + r) * C;
            float acc = 0.0f;
            for (int64_t c = 0; c < C; ++c) {
                const float gc = gu[h * C + c] * scale;
                acc += wk[c] * gc;
                gwk[c] = q[r] * gc;
            }
            gq[r] = acc;
        }
    for (int64_t r = 0; r < C; ++r) {  // q = W_q s + b_q
        for (int64_t c = 0; c < C; ++c) gw_in[r * C + c] = gq[r] * s[c];
        gb_in[r] = gq[r];
        gb_in[C + r] = 0.0f;  // the key bias cancels in the softmax
    }
    gemm(false, false, 1, C, C, 1.0f, gq.data(), C, w_in, C, 1.0f, g_seed, C);  // g_seed += W_q^T gq
    return 0;
}

}  // extern "C"

// ---- ABP's whole readout in one call each way (abp_core/native_readout.py, when q|k|v is kept): the input
// projection, the encoder SABs, the PMA keys and the tail above, with every intermediate the backward needs in two
// caller-owned workspaces (floats and ReLU masks) laid out by ReadoutLayout. Why: at the quickstart's small
// batches the ~40 PyTorch calls, their dispatch and their allocations cost more than the arithmetic.

namespace {

// dims: N atoms, M molecule slots, C channels, H heads, E encoders, decoders, output width (0: none), input width
// (0: no input projection, x has C columns), threads.
struct ReadoutLayout {
    int64_t N, M, C, H, E, Dd, Cout, Cin, threads;
    int64_t x0, mask0, qkv, out, h, lse, y, mask, z, mask_z, q, u, a, pooled, att, h1, z1, hs, v, hh, zz;
    int64_t floats, bytes;
    explicit ReadoutLayout(const int64_t* d)
        : N(d[0]), M(d[1]), C(d[2]), H(d[3]), E(d[4]), Dd(d[5]), Cout(d[6]), Cin(d[7]), threads(d[8]) {
        int64_t f = 0, b = 0;
        auto take = [](int64_t& at, int64_t size) { int64_t o = at; at += (size + 15) / 16 * 16; return o; };
        const int64_t NC = N * C, MC = M * C, dec = std::max<int64_t>(Dd, 1);
        x0 = take(f, Cin ? NC : 0);
        mask0 = take(b, Cin ? NC : 0);
        qkv = take(f, E * 3 * NC);  // per encoder e at + e * 3NC (likewise below)
        out = take(f, E * NC);
        h = take(f, E * NC);
        y = take(f, E * NC);
        lse = take(f, E * N * H);
        mask = take(b, E * NC);
        z = take(f, NC);
        mask_z = take(b, NC);
        q = take(f, C);
        u = take(f, H * C);
        a = take(f, N * H);
        pooled = take(f, M * H * C);
        att = take(f, MC);
        h1 = take(f, MC);
        z1 = take(f, MC);
        hs = take(f, (Dd + 1) * MC);
        v = take(f, dec * MC);
        hh = take(f, dec * MC);
        zz = take(f, dec * MC);
        floats = f;
        bytes = b;
    }
    // index of the PMA's parameters in the parameter table (native_readout.parameters' order)
    int64_t pma() const { return (Cin ? 2 : 0) + 6 * E; }
};

// The PMA's, the seed's, the output projection's and the decoders' entries of a tail table (enum Slot) from a
// pointer array in native_readout.parameters' order: the parameters, or (grads) their gradients.
void tail_slots(std::vector<int64_t>& t, const ReadoutLayout& L, const int64_t* src, bool grads) {
    const int64_t i = L.pma(), last = i + 9 + 6 * L.Dd;
    static const int plain[9] = {W_IN, B_IN, W_O, B_O, W_L, B_L, SEED, W_OUT, B_OUT};
    static const int grad[9] = {GW_IN, GB_IN, GW_O, GB_O, GW_L, GB_L, G_SEED, GW_OUT, GB_OUT};
    const int* slot = grads ? grad : plain;
    for (int k = 0; k < 6; ++k) t[slot[k]] = src[i + k];
    t[slot[6]] = src[i + 8];
    if (L.Cout) {
        t[slot[7]] = src[last];
        t[slot[8]] = src[last + 1];
    }
    for (int64_t k = 0; k < 6 * L.Dd; ++k) t[DECODERS + (grads ? 6 * L.Dd : 0) + k] = src[i + 9 + k];
}

// A pointer as a tail-table entry.
inline int64_t address(const void* p) { return (int64_t) reinterpret_cast<intptr_t>(p); }

// The tail's pointer table (enum Slot) for a readout: its saved tensors in the float workspace.
std::vector<int64_t> tail_table(const ReadoutLayout& L, const int64_t* params, const int64_t* starts,
                                const int64_t* sizes, float* ws, float* out) {
    std::vector<int64_t> t((size_t)(DECODERS + 12 * L.Dd), 0);
    t[Z] = address(ws + L.z);
    t[STARTS] = address(starts);
    t[SIZES] = address(sizes);
    tail_slots(t, L, params, false);
    t[Q] = address(ws + L.q);
    t[U] = address(ws + L.u);
    t[A] = address(ws + L.a);
    t[POOLED] = address(ws + L.pooled);
    t[ATT] = address(ws + L.att);
    t[H1] = address(ws + L.h1);
    t[Z1] = address(ws + L.z1);
    t[HS] = address(ws + L.hs);
    t[V] = address(ws + L.v);
    t[HH] = address(ws + L.hh);
    t[ZZ] = address(ws + L.zz);
    t[OUT] = address(out);
    return t;
}

inline const float* cptr(const int64_t* table, int64_t k) { return reinterpret_cast<const float*>(table[k]); }
inline float* mptr(const int64_t* table, int64_t k) { return reinterpret_cast<float*>(table[k]); }

}  // namespace

extern "C" {

// out[0], out[1]: the float and byte workspace sizes of a readout call with these dims.
void abp_readout_workspace(const int64_t* dims, int64_t* out) {
    const ReadoutLayout L(dims);
    out[0] = L.floats;
    out[1] = L.bytes;
}

// params: the parameters' data pointers in native_readout.parameters' order; x [N, Cin or C]; starts/sizes: the
// molecule table (M slots, empty ones allowed); ws/wb: workspaces of abp_readout_workspace's sizes; out [M, Cout
// or C].
int abp_readout_forward(const int64_t* dims, const int64_t* params, const float* x, const int64_t* starts,
                        const int64_t* sizes, float* ws, uint8_t* wb, float* out) {
    if (!g_sgemm) return 4;
    const ReadoutLayout L(dims);
    const int64_t N = L.N, C = L.C, H = L.H, NC = N * C;
    const int T = (int)L.threads;
    if (H <= 0 || C % H) return 1;
    int64_t i = 0;
    const float* cur = x;
    if (L.Cin) {
        float* x0 = ws + L.x0;
        gemm(false, true, N, C, L.Cin, 1.0f, x, L.Cin, cptr(params, 0), L.Cin, 0.0f, x0, C);
        abp_relu_residual(x0, cptr(params, 1), nullptr, wb + L.mask0, N, C, T);
        cur = x0;
        i = 2;
    }
    const float scale = 1.0f / std::sqrt((float)(C / H));
    for (int64_t e = 0; e < L.E; ++e, i += 6) {
        float *qkv = ws + L.qkv + e * 3 * NC, *o = ws + L.out + e * NC, *h = ws + L.h + e * NC,
              *y = ws + L.y + e * NC, *lse = ws + L.lse + e * N * H;
        gemm(false, true, N, 3 * C, C, 1.0f, cur, C, cptr(params, i), C, 0.0f, qkv, 3 * C);  // bias-free q|k|v
        Problem P{qkv, cptr(params, i + 1), o, lse, nullptr, nullptr, nullptr, starts, sizes, L.M, C, H, scale};
        if (int code = launch(P, T, false)) return code;
        gemm(false, true, N, C, C, 1.0f, o, C, cptr(params, i + 2), C, 0.0f, h, C);
        abp_add_residual(h, cur, cptr(params, i + 3), N, C, T);
        gemm(false, true, N, C, C, 1.0f, h, C, cptr(params, i + 4), C, 0.0f, y, C);
        abp_relu_residual(y, cptr(params, i + 5), h, wb + L.mask + e * NC, N, C, T);
        cur = y;
    }
    float* z = ws + L.z;  // the PMA keys
    gemm(false, true, N, C, C, 1.0f, cur, C, cptr(params, i + 6), C, 0.0f, z, C);
    abp_relu_residual(z, cptr(params, i + 7), nullptr, wb + L.mask_z, N, C, T);
    const std::vector<int64_t> table = tail_table(L, params, starts, sizes, ws, out);
    const int64_t tdims[7] = {N, L.M, C, H, L.Dd, L.Cout, L.threads};
    return abp_pma_tail_forward(tdims, table.data());
}

// Its backward from grad_out [M, Cout or C]: every parameter gradient into grads (same order as params) and, if gx
// is not null, dL/dx [N, Cin or C]. ws, wb and out as the forward left them.
int abp_readout_backward(const int64_t* dims, const int64_t* params, const int64_t* grads, const float* x,
                         const int64_t* starts, const int64_t* sizes, float* ws, const uint8_t* wb, float* out,
                         const float* grad_out, float* gx) {
    if (!g_sgemm) return 4;
    const ReadoutLayout L(dims);
    const int64_t N = L.N, C = L.C, H = L.H, NC = N * C, pma = L.pma();
    const int T = (int)L.threads;
    // scratch kept per thread across calls (no allocation or zero-fill per step): dL/d(block output), two [N, C]
    // buffers, dL/dq|k|v and a column sum
    static thread_local std::vector<float> scratch;
    if ((int64_t)scratch.size() < 6 * NC + C) scratch.resize((size_t)(6 * NC + C));
    float *g = scratch.data(), *gz = g + NC, *gh = gz + NC, *grad = gh + NC, *sum_gy = grad + 3 * NC;
    // the tail: PMA, decoders, output projection; dL/dz into g
    std::vector<int64_t> table = tail_table(L, params, starts, sizes, ws, out);
    table[GRAD_OUT] = address(grad_out);
    table[GZ] = address(g);
    tail_slots(table, L, grads, true);
    const int64_t tdims[7] = {N, L.M, C, H, L.Dd, L.Cout, L.threads};
    if (int code = abp_pma_tail_backward(tdims, table.data())) return code;
    // the keys: z = relu(keys_in W_p^T + b_p)
    const float* keys_in = L.E ? ws + L.y + (L.E - 1) * NC : (L.Cin ? ws + L.x0 : x);
    abp_relu_backward(g, wb + L.mask_z, gz, mptr(grads, pma + 7), sum_gy, N, C, T);
    gemm(true, false, C, C, N, 1.0f, gz, C, keys_in, C, 0.0f, mptr(grads, pma + 6), C);
    gemm(false, false, N, C, C, 1.0f, gz, C, cptr(params, pma + 6), C, 0.0f, g, C);
    // the encoder SABs, last first; g holds dL/d(block output)
    const float scale = 1.0f / std::sqrt((float)(C / H));
    for (int64_t e = L.E - 1; e >= 0; --e) {
        const int64_t i = (L.Cin ? 2 : 0) + 6 * e;
        const float *xin = e ? ws + L.y + (e - 1) * NC : (L.Cin ? ws + L.x0 : x), *qkv = ws + L.qkv + e * 3 * NC,
                    *o = ws + L.out + e * NC, *h = ws + L.h + e * NC, *lse = ws + L.lse + e * N * H;
        const float *w_in = cptr(params, i), *w_o = cptr(params, i + 2), *w_l = cptr(params, i + 4);
        float *gw_in = mptr(grads, i), *gb_in = mptr(grads, i + 1), *gw_o = mptr(grads, i + 2),
              *gb_o = mptr(grads, i + 3), *gw_l = mptr(grads, i + 4), *gb_l = mptr(grads, i + 5);
        abp_relu_backward(g, wb + L.mask + e * NC, gz, gb_l, sum_gy, N, C, T);
        for (int64_t c = 0; c < C; ++c) gb_o[c] = sum_gy[c];  // column sums of gh = gy + gz W_l
        for (int64_t r = 0; r < C; ++r)
            for (int64_t c = 0; c < C; ++c) gb_o[c] += gb_l[r] * w_l[r * C + c];
        gemm(true, false, C, C, N, 1.0f, gz, C, h, C, 0.0f, gw_l, C);
        std::memcpy(gh, g, sizeof(float) * NC);
        gemm(false, false, N, C, C, 1.0f, gz, C, w_l, C, 1.0f, gh, C);  // dL/dh
        gemm(true, false, C, C, N, 1.0f, gh, C, o, C, 0.0f, gw_o, C);
        gemm(false, false, N, C, C, 1.0f, gh, C, w_o, C, 0.0f, gz, C);  // dL/d(attention output)
        Problem P{qkv, cptr(params, i + 1), const_cast<float*>(o), const_cast<float*>(lse), gz, grad,
                  gb_in, starts, sizes, L.M, C, H, scale};
        if (int code = launch(P, T, true)) return code;
        gemm(true, false, 3 * C, C, N, 1.0f, grad, 3 * C, xin, C, 0.0f, gw_in, C);
        gemm(false, false, N, C, 3 * C, 1.0f, grad, 3 * C, w_in, C, 1.0f, gh, C);  // + residual
        std::swap(g, gh);
    }
    if (L.Cin) {  // x0 = relu(x W_0^T + b_0)
        abp_relu_backward(g, wb + L.mask0, gz, mptr(grads, 1), sum_gy, N, C, T);
        gemm(true, false, C, L.Cin, N, 1.0f, gz, C, x, L.Cin, 0.0f, mptr(grads, 0), L.Cin);
        if (gx) gemm(false, false, N, L.Cin, C, 1.0f, gz, C, cptr(params, 0), L.Cin, 0.0f, gx, L.Cin);
    } else if (gx) {
        std::memcpy(gx, g, sizeof(float) * NC);
    }
    return 0;
}

}  // extern "C"

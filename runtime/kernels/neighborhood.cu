// Neighbourhood attention (NATTEN's na2d, dilation 1) on the GPU, forward and backward: the same
// algorithm as the CPU op (runtime/src/ops/neighborhood.rs, whose header gives the math and the
// window rule: along an axis of n, query i's window starts at clamp(i − ⌊k/2⌋, 0, n − k)).
// q, k, v, the output and the gradients are (B, H, W, heads·d), f32; under autocast (`round`
// 1 = bf16, 2 = fp16) every operand is rounded as it is read and every result as it is written,
// as the CPU op rounds its copies.
//
// One thread per (sample, query, head), the head's d values in registers; no scores are kept
// beyond one window's (k² floats per thread). The forward writes each query's output; the
// backward runs twice: by query (∂q, and each query's log-sum-exp and D = Σ p·dP), then by key,
// where each key gathers the queries whose window holds it (a rectangle: along an axis the
// queries attending key a are a contiguous range) so every thread owns what it writes: no
// atomics, the same numbers every run.
//
// The build lists the config's neighbourhood levels as (head size, kernel) pairs (SD_NA_SIZES,
// from the shape plan): those get a copy with both as compile-time constants (`na_fwd_64_7`);
// `_any` takes d ≤ MAX_NA_HEAD and k ≤ MAX_NA_KERNEL at run time.

constexpr int NA_THREADS = 128;
constexpr int MAX_NA_HEAD = 128;
constexpr int MAX_NA_KERNEL = 13;

struct NaGeometry {
    int b, h, w, heads, d, k;
    float scale;
    int round;
};

__device__ __forceinline__ int na_start(int i, int n, int k) { return min(max(i - k / 2, 0), n - k); }

// Offset of (sample s, row i, column j, head) in a (B, H, W, heads·d) tensor.
__device__ __forceinline__ size_t na_at(const NaGeometry& g, int s, int i, int j, int head) {
    return (((size_t)s * g.h + i) * g.w + j) * (size_t)g.heads * g.d + (size_t)head * g.d;
}

__device__ __forceinline__ float na_dot(const float* a, const float* __restrict__ b, int d, int round) {
    float acc = 0.0f;
    for (int e = 0; e < d; ++e) acc += a[e] * round_16(b[e], round);
    return acc;
}

// The (s, i, j, head) of thread item `idx`.
__device__ __forceinline__ void na_item(const NaGeometry& g, size_t idx, int* s, int* i, int* j,
                                        int* head) {
    *head = (int)(idx % g.heads);
    size_t pos = idx / g.heads;
    *j = (int)(pos % g.w);
    pos /= g.w;
    *i = (int)(pos % g.h);
    *s = (int)(pos / g.h);
}

// Query (s, i, j, head)'s window probabilities into p (k² of them, row by row of the window),
// from its query `qv` (d values, rounded); returns their log-sum-exp.
template <int D, int K>
__device__ __forceinline__ float na_probabilities(const NaGeometry& g, const float* __restrict__ k,
                                                  const float* qv, int s, int i, int j, int head,
                                                  float* p) {
    const int kk = K > 0 ? K : g.k, d = D > 0 ? D : g.d;
    const int r0 = na_start(i, g.h, kk), c0 = na_start(j, g.w, kk);
    float max_score = -INFINITY;
    for (int a = 0; a < kk; ++a)
        for (int c = 0; c < kk; ++c) {
            const float score = g.scale * na_dot(qv, k + na_at(g, s, r0 + a, c0 + c, head), d, g.round);
            p[a * kk + c] = score;
            max_score = fmaxf(max_score, score);
        }
    float sum = 0.0f;
    for (int t = 0; t < kk * kk; ++t) {
        p[t] = expf(p[t] - max_score);
        sum += p[t];
    }
    const float inv = 1.0f / sum;
    for (int t = 0; t < kk * kk; ++t) p[t] *= inv;
    return max_score + logf(sum);
}

template <int D, int K>
__device__ void na_fwd(const float* __restrict__ q, const float* __restrict__ k,
                       const float* __restrict__ v, float* __restrict__ o, NaGeometry g) {
    constexpr int DC = D > 0 ? D : MAX_NA_HEAD, KC = K > 0 ? K : MAX_NA_KERNEL;
    const int kk = K > 0 ? K : g.k, d = D > 0 ? D : g.d;
    const size_t items = (size_t)g.b * g.h * g.w * g.heads;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < items;
         idx += (size_t)gridDim.x * blockDim.x) {
        int s, i, j, head;
        na_item(g, idx, &s, &i, &j, &head);
        const size_t at = na_at(g, s, i, j, head);
        float qv[DC], acc[DC], p[KC * KC];
        for (int e = 0; e < d; ++e) {
            qv[e] = round_16(q[at + e], g.round);
            acc[e] = 0.0f;
        }
        na_probabilities<D, K>(g, k, qv, s, i, j, head, p);
        const int r0 = na_start(i, g.h, kk), c0 = na_start(j, g.w, kk);
        for (int a = 0; a < kk; ++a)
            for (int c = 0; c < kk; ++c) {
                const float* vv = v + na_at(g, s, r0 + a, c0 + c, head);
                const float pt = p[a * kk + c];
                for (int e = 0; e < d; ++e) acc[e] += pt * round_16(vv[e], g.round);
            }
        for (int e = 0; e < d; ++e) o[at + e] = round_16(acc[e], g.round);
    }
}

// ∂q of each query, and its log-sum-exp and D = Σ p·dP (B·H·W·heads each), from ∂L/∂o `go`.
template <int D, int K>
__device__ void na_bwd_query(const float* __restrict__ q, const float* __restrict__ k,
                             const float* __restrict__ v, const float* __restrict__ go,
                             float* __restrict__ dq, float* __restrict__ lse,
                             float* __restrict__ big_d, NaGeometry g) {
    constexpr int DC = D > 0 ? D : MAX_NA_HEAD, KC = K > 0 ? K : MAX_NA_KERNEL;
    const int kk = K > 0 ? K : g.k, d = D > 0 ? D : g.d;
    const size_t items = (size_t)g.b * g.h * g.w * g.heads;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < items;
         idx += (size_t)gridDim.x * blockDim.x) {
        int s, i, j, head;
        na_item(g, idx, &s, &i, &j, &head);
        const size_t at = na_at(g, s, i, j, head);
        float qv[DC], gov[DC], acc[DC], p[KC * KC], dp[KC * KC];
        for (int e = 0; e < d; ++e) {
            qv[e] = round_16(q[at + e], g.round);
            gov[e] = round_16(go[at + e], g.round);
            acc[e] = 0.0f;
        }
        lse[idx] = na_probabilities<D, K>(g, k, qv, s, i, j, head, p);
        const int r0 = na_start(i, g.h, kk), c0 = na_start(j, g.w, kk);
        float sum = 0.0f;
        for (int a = 0; a < kk; ++a)
            for (int c = 0; c < kk; ++c) {
                const int t = a * kk + c;
                dp[t] = na_dot(gov, v + na_at(g, s, r0 + a, c0 + c, head), d, g.round);
                sum += p[t] * dp[t];
            }
        big_d[idx] = sum;
        for (int a = 0; a < kk; ++a)
            for (int c = 0; c < kk; ++c) {
                const int t = a * kk + c;
                const float* kv = k + na_at(g, s, r0 + a, c0 + c, head);
                const float w = g.scale * p[t] * (dp[t] - sum);
                for (int e = 0; e < d; ++e) acc[e] += w * round_16(kv[e], g.round);
            }
        for (int e = 0; e < d; ++e) dq[at + e] = round_16(acc[e], g.round);
    }
}

// The queries along an axis of n whose window holds key a: [*lo, *hi). They lie within k of it.
__device__ __forceinline__ void na_attending(int a, int n, int k, int* lo, int* hi) {
    *lo = n;
    *hi = 0;
    for (int i = max(0, a - k); i < min(n, a + k + 1); ++i) {
        const int s = na_start(i, n, k);
        if (s <= a && a < s + k) {
            *lo = min(*lo, i);
            *hi = i + 1;
        }
    }
}

// ∂k and ∂v of each key from the queries whose windows hold it, with their log-sum-exp and D.
template <int D, int K>
__device__ void na_bwd_key(const float* __restrict__ q, const float* __restrict__ k,
                           const float* __restrict__ v, const float* __restrict__ go,
                           const float* __restrict__ lse, const float* __restrict__ big_d,
                           float* __restrict__ dk, float* __restrict__ dv, NaGeometry g) {
    constexpr int DC = D > 0 ? D : MAX_NA_HEAD;
    const int kk = K > 0 ? K : g.k, d = D > 0 ? D : g.d;
    const size_t items = (size_t)g.b * g.h * g.w * g.heads;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < items;
         idx += (size_t)gridDim.x * blockDim.x) {
        int s, a, c, head;
        na_item(g, idx, &s, &a, &c, &head);
        const size_t at = na_at(g, s, a, c, head);
        float kv[DC], vv[DC], dkv[DC], dvv[DC];
        for (int e = 0; e < d; ++e) {
            kv[e] = round_16(k[at + e], g.round);
            vv[e] = round_16(v[at + e], g.round);
            dkv[e] = dvv[e] = 0.0f;
        }
        int i0, i1, j0, j1;
        na_attending(a, g.h, kk, &i0, &i1);
        na_attending(c, g.w, kk, &j0, &j1);
        for (int i = i0; i < i1; ++i)
            for (int j = j0; j < j1; ++j) {
                const size_t qa = na_at(g, s, i, j, head);
                const size_t stat = (((size_t)s * g.h + i) * g.w + j) * g.heads + head;
                const float prob = expf(g.scale * na_dot(kv, q + qa, d, g.round) - lse[stat]);
                const float w = g.scale * prob * (na_dot(vv, go + qa, d, g.round) - big_d[stat]);
                for (int e = 0; e < d; ++e) {
                    dkv[e] += w * round_16(q[qa + e], g.round);
                    dvv[e] += prob * round_16(go[qa + e], g.round);
                }
            }
        for (int e = 0; e < d; ++e) {
            dk[at + e] = round_16(dkv[e], g.round);
            dv[at + e] = round_16(dvv[e], g.round);
        }
    }
}

#define SD_NA_KERNELS(NAME, D, K)                                                                \
    extern "C" __global__ void __launch_bounds__(NA_THREADS)                                   \
        na_fwd_##NAME(const float* q, const float* k, const float* v, float* o, NaGeometry g) {  \
        na_fwd<D, K>(q, k, v, o, g);                                                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(NA_THREADS) na_bwd_query_##NAME(               \
        const float* q, const float* k, const float* v, const float* go, float* dq, float* lse,  \
        float* big_d, NaGeometry g) {                                                            \
        na_bwd_query<D, K>(q, k, v, go, dq, lse, big_d, g);                                      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(NA_THREADS) na_bwd_key_##NAME(                 \
        const float* q, const float* k, const float* v, const float* go, const float* lse,       \
        const float* big_d, float* dk, float* dv, NaGeometry g) {                                \
        na_bwd_key<D, K>(q, k, v, go, lse, big_d, dk, dv, g);                                    \
    }
#define SD_NA_SIZED(D, K) SD_NA_KERNELS(D##_##K, D, K)
SD_NA_KERNELS(any, 0, 0)
SD_NA_SIZES(SD_NA_SIZED)

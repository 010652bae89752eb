// Mamba's selective scan on the GPU, forward and backward: the same recurrence and adjoint as the
// CPU op (runtime/src/ops/selective_scan.rs, whose header gives the math), on the same packed
// input [u | Δ | A | B | C | D | Δ bias] and packed gradient.
//
// One warp per block; each lane owns one channel of a group, so the block's 32 channels share
// that group's B and C. The sequence goes by in tiles of SCAN_CHUNK steps: B, C, u, Δ (and ∂L/∂y)
// of a tile are staged in shared memory with coalesced loads, each lane steps its own state
// (N floats in registers), and outputs go back through shared memory. The backward first runs
// the forward once, saving the state at each tile's start (one state per tile and channel), then
// walks the tiles from the end: it replays a tile from its saved state (each step's state kept
// per lane), and steps the adjoint λ back through it.
//
// ∂B and ∂C are sums over a group's channels: per step, the warp's 32 lanes reduce-scatter their
// 2N contributions (lane i ends with the sum of contribution i, 31 shuffles per 32 values), and
// each block writes its own partial row; ∂A, ∂D and ∂bias are per-sample partial rows. A last
// kernel adds the partials in a fixed order: no atomics, the same numbers every run.
//
// The build lists the config's state sizes (SD_SCAN_STATES, from the shape plan): those get a
// copy with N a compile-time constant (`selective_scan_fwd_16`); `_any` takes N ≤ MAX_SCAN_STATE
// at run time.

constexpr int SCAN_THREADS = 32;
constexpr int SCAN_CHUNK = 32;
constexpr int MAX_SCAN_STATE = 64;

// Offsets of u, Δ, A, B, C, D, bias in the packed vector (ops/selective_scan.rs `Dims::offsets`).
struct ScanLayout {
    size_t u, delta, a, b, c, d, bias, end;
};

__device__ __forceinline__ ScanLayout scan_layout(int batch, int channels, int groups, int n,
                                                  int len) {
    const size_t bdl = (size_t)batch * channels * len, bgnl = (size_t)batch * groups * n * len;
    ScanLayout o;
    o.u = 0;
    o.delta = bdl;
    o.a = 2 * bdl;
    o.b = o.a + (size_t)channels * n;
    o.c = o.b + bgnl;
    o.d = o.c + bgnl;
    o.bias = o.d + channels;
    o.end = o.bias + channels;
    return o;
}

// δ = softplus(v) with PyTorch's threshold (the identity above 20), or v; `slope` = ∂δ/∂v.
__device__ __forceinline__ float scan_delta(float v, int softplus, float* slope) {
    if (!softplus || v > 20.0f) {
        *slope = 1.0f;
        return v;
    }
    *slope = 1.0f / (1.0f + expf(-v));
    return log1pf(expf(v));
}

// Where a block is: sample b, group g, its first channel and how many of its lanes have one.
struct ScanBlock {
    int b, g, first, lanes, part, parts;
};

__device__ __forceinline__ ScanBlock scan_block(int channels, int groups) {
    const int per_group = channels / groups;
    const int parts = (per_group + SCAN_THREADS - 1) / SCAN_THREADS;
    ScanBlock s;
    s.b = blockIdx.y;
    s.g = blockIdx.x / parts;
    s.part = blockIdx.x % parts;
    s.parts = parts;
    s.first = s.g * per_group + s.part * SCAN_THREADS;
    s.lanes = min(SCAN_THREADS, per_group - s.part * SCAN_THREADS);
    return s;
}

// Stage steps [t0, t0 + steps) of this block's B and C rows ((N, T) tiles) and of `rows` (B, D,
// L) inputs (one (channel, T + 1) tile each) in shared memory; zeros past the end.
template <int CAP>
__device__ __forceinline__ void scan_stage(const float* __restrict__ x, const ScanLayout& o,
                                           const ScanBlock& s, int channels, int groups, int n,
                                           int len, int t0, int steps, float (*sb)[SCAN_CHUNK],
                                           float (*sc)[SCAN_CHUNK], const float* const* rows,
                                           float (*const* tiles)[SCAN_CHUNK + 1], int count) {
    const int lane = threadIdx.x;
    const size_t bc = ((size_t)s.b * groups + s.g) * n * len;
    for (int i = lane; i < n * SCAN_CHUNK; i += SCAN_THREADS) {
        const int k = i / SCAN_CHUNK, t = i % SCAN_CHUNK;
        const bool in = t < steps;
        sb[k][t] = in ? x[o.b + bc + (size_t)k * len + t0 + t] : 0.0f;
        sc[k][t] = in ? x[o.c + bc + (size_t)k * len + t0 + t] : 0.0f;
    }
    for (int r = 0; r < count; ++r)
        for (int c = 0; c < SCAN_THREADS; ++c) {
            const bool in = c < s.lanes && lane < steps;
            const size_t at = ((size_t)s.b * channels + s.first + c) * len + t0 + lane;
            tiles[r][c][lane] = in ? rows[r][at] : 0.0f;
        }
    __syncthreads();
}

// y = scan(u, δ, A, B, C) + D·u, (B, D, L). Grid (groups × ⌈(D/G)/32⌉, batch) of 32 threads.
template <int N>
__device__ void selective_scan_fwd(const float* __restrict__ x, float* __restrict__ y,
                                   int batch, int channels, int groups, int n_rt, int len,
                                   int softplus) {
    constexpr int CAP = N > 0 ? N : MAX_SCAN_STATE;
    const int n = N > 0 ? N : n_rt;
    __shared__ float sb[CAP][SCAN_CHUNK], sc[CAP][SCAN_CHUNK];
    __shared__ float su[SCAN_THREADS][SCAN_CHUNK + 1], sd[SCAN_THREADS][SCAN_CHUNK + 1];
    const ScanLayout o = scan_layout(batch, channels, groups, n, len);
    const ScanBlock s = scan_block(channels, groups);
    const int lane = threadIdx.x, ch = s.first + lane;
    const bool mine = lane < s.lanes;
    float a[CAP], h[CAP];
    for (int k = 0; k < n; ++k) {
        a[k] = mine ? x[o.a + (size_t)ch * n + k] : 0.0f;
        h[k] = 0.0f;
    }
    const float dd = mine ? x[o.d + ch] : 0.0f, bias = mine ? x[o.bias + ch] : 0.0f;
    const float* rows[2] = {x + o.u, x + o.delta};
    float (*tiles[2])[SCAN_CHUNK + 1] = {su, sd};
    for (int t0 = 0; t0 < len; t0 += SCAN_CHUNK) {
        const int steps = min(SCAN_CHUNK, len - t0);
        scan_stage<CAP>(x, o, s, channels, groups, n, len, t0, steps, sb, sc, rows, tiles, 2);
        for (int t = 0; t < steps; ++t) {
            float slope;
            const float u = su[lane][t], delta = scan_delta(sd[lane][t] + bias, softplus, &slope);
            float acc = 0.0f;
            for (int k = 0; k < n; ++k) {
                h[k] = expf(delta * a[k]) * h[k] + delta * u * sb[k][t];
                acc += sc[k][t] * h[k];
            }
            su[lane][t] = acc + dd * u;  // y replaces u in the tile
        }
        __syncthreads();
        for (int c = 0; c < s.lanes; ++c)
            if (lane < steps) y[((size_t)s.b * channels + s.first + c) * len + t0 + lane] = su[c][lane];
        __syncthreads();
    }
}

// Lane i of the warp gets Σ over lanes of v[i]; v (32 values per lane) is overwritten.
__device__ __forceinline__ float reduce_scatter(float* v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int half = 16; half > 0; half >>= 1) {
        const bool upper = lane & half;
#pragma unroll
        for (int j = 0; j < half; ++j) {
            const float send = upper ? v[j] : v[j + half];
            const float keep = upper ? v[j + half] : v[j];
            v[j] = keep + __shfl_xor_sync(0xffffffffu, send, half);
        }
    }
    return v[0];
}

// The backward, writing into `out` (the packed gradient) ∂u and ∂Δ, and the partial sums:
//   `bc`  (2, B·G, parts, N, L): per block, Σ over its channels of ∂B then ∂C;
//   `adb` (B, D·N + 2D): per sample, ∂A, ∂D and ∂bias;
//   `saved` (B, D, tiles, N): scratch, the state at each tile's start.
template <int N>
__device__ void selective_scan_bwd(const float* __restrict__ x, const float* __restrict__ dy,
                                   float* __restrict__ out, float* __restrict__ bc,
                                   float* __restrict__ adb, float* __restrict__ saved, int batch,
                                   int channels, int groups, int n_rt, int len, int softplus) {
    constexpr int CAP = N > 0 ? N : MAX_SCAN_STATE;
    constexpr int SLOTS = (2 * CAP + 31) / 32;  // groups of 32 reduced contributions
    const int n = N > 0 ? N : n_rt;
    __shared__ float sb[CAP][SCAN_CHUNK], sc[CAP][SCAN_CHUNK];
    __shared__ float su[SCAN_THREADS][SCAN_CHUNK + 1], sd[SCAN_THREADS][SCAN_CHUNK + 1],
        sg[SCAN_THREADS][SCAN_CHUNK + 1];
    __shared__ float sbc[2 * CAP][SCAN_CHUNK + 1];
    const ScanLayout o = scan_layout(batch, channels, groups, n, len);
    const ScanBlock s = scan_block(channels, groups);
    const int lane = threadIdx.x, ch = s.first + lane;
    const bool mine = lane < s.lanes;
    const int tiles_n = (len + SCAN_CHUNK - 1) / SCAN_CHUNK;
    float* my_saved = saved + ((size_t)s.b * channels + (mine ? ch : s.first)) * tiles_n * n;
    float a[CAP], h[CAP], lambda[CAP], da[CAP];
    for (int k = 0; k < n; ++k) {
        a[k] = mine ? x[o.a + (size_t)ch * n + k] : 0.0f;
        h[k] = lambda[k] = da[k] = 0.0f;
    }
    const float dd = mine ? x[o.d + ch] : 0.0f, bias = mine ? x[o.bias + ch] : 0.0f;
    const float* rows[3] = {x + o.u, x + o.delta, dy};
    float (*tiles[3])[SCAN_CHUNK + 1] = {su, sd, sg};

    // The forward, keeping the state at each tile's start.
    for (int tile = 0; tile < tiles_n; ++tile) {
        const int t0 = tile * SCAN_CHUNK, steps = min(SCAN_CHUNK, len - t0);
        if (mine)
            for (int k = 0; k < n; ++k) my_saved[(size_t)tile * n + k] = h[k];
        scan_stage<CAP>(x, o, s, channels, groups, n, len, t0, steps, sb, sc, rows, tiles, 2);
        for (int t = 0; t < steps; ++t) {
            float slope;
            const float u = su[lane][t], delta = scan_delta(sd[lane][t] + bias, softplus, &slope);
            for (int k = 0; k < n; ++k) h[k] = expf(delta * a[k]) * h[k] + delta * u * sb[k][t];
        }
        __syncthreads();
    }

    float d_d = 0.0f, d_bias = 0.0f;
    // The state before the tile being walked back, and after each of its steps.
    float h0[CAP], hs[SCAN_CHUNK][CAP];
    for (int tile = tiles_n - 1; tile >= 0; --tile) {
        const int t0 = tile * SCAN_CHUNK, steps = min(SCAN_CHUNK, len - t0);
        scan_stage<CAP>(x, o, s, channels, groups, n, len, t0, steps, sb, sc, rows, tiles, 3);
        for (int k = 0; k < n; ++k) h[k] = h0[k] = mine ? my_saved[(size_t)tile * n + k] : 0.0f;
        for (int t = 0; t < steps; ++t) {
            float slope;
            const float u = su[lane][t], delta = scan_delta(sd[lane][t] + bias, softplus, &slope);
            for (int k = 0; k < n; ++k) {
                h[k] = expf(delta * a[k]) * h[k] + delta * u * sb[k][t];
                hs[t][k] = h[k];
            }
        }
        for (int t = steps - 1; t >= 0; --t) {
            float slope;
            const float u = su[lane][t], delta = scan_delta(sd[lane][t] + bias, softplus, &slope);
            const float g = sg[lane][t];
            float v[SLOTS * 32];
            float lambda_b = 0.0f, d_delta = 0.0f;
            for (int k = 0; k < n; ++k) {
                lambda[k] += g * sc[k][t];
                const float decay = expf(delta * a[k]);
                const float h_prev = t > 0 ? hs[t - 1][k] : h0[k];
                v[n + k] = g * hs[t][k];  // ∂C
                lambda_b += lambda[k] * sb[k][t];
                d_delta += lambda[k] * a[k] * decay * h_prev;
                da[k] += lambda[k] * delta * decay * h_prev;
                v[k] = lambda[k] * delta * u;  // ∂B
                lambda[k] *= decay;
            }
            for (int k = 2 * n; k < SLOTS * 32; ++k) v[k] = 0.0f;
            d_delta += u * lambda_b;
            for (int slot = 0; slot < (2 * n + 31) / 32; ++slot) {
                const float sum = reduce_scatter(v + slot * 32);
                const int row = slot * 32 + lane;
                if (row < 2 * n) sbc[row][t] = sum;
            }
            const float du = delta * lambda_b + dd * g;
            d_d += g * u;
            const float draw = d_delta * slope;
            d_bias += draw;
            su[lane][t] = du;  // the tiles' u and Δ become ∂u and ∂Δ
            sd[lane][t] = draw;
        }
        __syncthreads();
        for (int c = 0; c < s.lanes; ++c)
            if (lane < steps) {
                const size_t at = ((size_t)s.b * channels + s.first + c) * len + t0 + lane;
                out[o.u + at] = su[c][lane];
                out[o.delta + at] = sd[c][lane];
            }
        // This block's partial ∂B, ∂C rows for the tile.
        const size_t bg = (size_t)batch * groups;
        for (int row = 0; row < 2 * n; ++row)
            if (lane < steps) {
                const int which = row / n, k = row % n;
                const size_t part = ((which * bg + (size_t)s.b * groups + s.g) * s.parts + s.part);
                bc[(part * n + k) * len + t0 + lane] = sbc[row][lane];
            }
        __syncthreads();
    }
    if (mine) {
        float* p = adb + (size_t)s.b * (channels * (size_t)n + 2 * channels);
        for (int k = 0; k < n; ++k) p[(size_t)ch * n + k] = da[k];
        p[(size_t)channels * n + ch] = d_d;
        p[(size_t)channels * n + channels + ch] = d_bias;
    }
}

// out[o·inner + i] = Σ_k in[(o·K + k)·row + i] for o < outer, i < inner: the partial rows added
// in order.
extern "C" __global__ void scan_sum_partials(const float* __restrict__ in, float* __restrict__ out,
                                  long long outer, int k_count, long long inner, long long row) {
    const long long total = outer * inner;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        const long long o = j / inner, i = j % inner;
        float acc = 0.0f;
        for (int k = 0; k < k_count; ++k) acc += in[(o * k_count + k) * row + i];
        out[j] = acc;
    }
}

#define SD_SCAN_KERNELS(NAME, N)                                                                 \
    extern "C" __global__ void __launch_bounds__(SCAN_THREADS)                                  \
        selective_scan_fwd_##NAME(const float* x, float* y, int batch, int channels, int groups, \
                                  int n, int len, int softplus) {                                \
        selective_scan_fwd<N>(x, y, batch, channels, groups, n, len, softplus);                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(SCAN_THREADS) selective_scan_bwd_##NAME(       \
        const float* x, const float* dy, float* out, float* bc, float* adb, float* saved,        \
        int batch, int channels, int groups, int n, int len, int softplus) {                     \
        selective_scan_bwd<N>(x, dy, out, bc, adb, saved, batch, channels, groups, n, len,       \
                              softplus);                                                         \
    }
#define SD_SCAN_SIZED(N) SD_SCAN_KERNELS(N, N)
SD_SCAN_KERNELS(any, 0)
SD_SCAN_STATES(SD_SCAN_SIZED)

// GroupNorm with one group (nn::GroupNorm1, torch.nn.GroupNorm(1, C)) and its per-channel affine,
// forward and backward. Each sample's N = C·HW values are standardised to zero mean and unit
// population variance (eps 1e-5), then y = x̂·w[c] + b[c].
//
// A sample is cut into slices of `cps` whole channels, one block each: grid (slices, batch), so
// small batches still fill the GPU (one block per sample left most SMs idle at batch 64). Two
// launches each way: the statistics kernel writes each slice's partial sums (double, one pass:
// sum and sum of squares, so N in the millions loses nothing to cancellation); the second
// kernel adds its sample's partials and writes its slice.
//
// The build lists the N of every GroupNorm in the config's model (SD_NORM_SIZES, from the shape
// plan); each gets its own kernels with N a compile-time constant. `_any` kernels take N at run
// time (other shapes, tests).

constexpr int NORM_THREADS = 1024;
constexpr float NORM_EPS = 1e-5f;

template <int N>
__device__ __forceinline__ int norm_size(int n_rt) { return N > 0 ? N : n_rt; }

// This block's slice of its sample: positions [lo, hi), channels [c0, c1).
struct Slice {
    int c0, c1, lo, hi;
};

__device__ __forceinline__ Slice norm_slice(int c, int cps, int hw) {
    const int c0 = blockIdx.x * cps, c1 = min(c0 + cps, c);
    return {c0, c1, c0 * hw, c1 * hw};
}

// The sample's K sums, from the partials of its gridDim.x slices (read by every thread: a few
// hundred bytes, from cache).
template <int K>
__device__ Sums<K> sample_sums(const double* __restrict__ partial) {
    Sums<K> t = {};
    const double* p = partial + (size_t)blockIdx.y * gridDim.x * K;
    for (int s = 0; s < (int)gridDim.x; ++s) {
#pragma unroll
        for (int k = 0; k < K; ++k) t.v[k] += p[s * K + k];
    }
    return t;
}

// Pass 1: the slice's partial sums at partial[(b·slices + s)·K]: Σx, Σx² (K = 2, forward) and,
// for the backward (K = 4), Σg' and Σg'·x with g' = g·w[c] (the gradient at x̂).
template <int N, int K>
__device__ void group_norm_stats(const float* __restrict__ x, const float* __restrict__ w,
                                 const float* __restrict__ g, double* __restrict__ partial, int c,
                                 int cps, int n_rt) {
    const int n = norm_size<N>(n_rt);
    const int hw = n / c;
    const Slice sl = norm_slice(c, cps, hw);
    const size_t off = (size_t)blockIdx.y * n;
    Sums<K> s = {};
    for (int i = sl.lo + threadIdx.x; i < sl.hi; i += NORM_THREADS) {
        const double xv = x[off + i];
        s.v[0] += xv;
        s.v[1] += xv * xv;
        if constexpr (K == 4) {
            const double gv = (double)g[off + i] * w[i / hw];
            s.v[2] += gv;
            s.v[3] += gv * xv;
        }
    }
    s = block_sum<K>(s);
    if (threadIdx.x == 0) {
        double* p = partial + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * K;
#pragma unroll
        for (int k = 0; k < K; ++k) p[k] = s.v[k];
    }
}

template <int N>
__device__ void group_norm_fwd(const float* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ b, const double* __restrict__ partial,
                               float* __restrict__ y, int c, int cps, int n_rt) {
    const int n = norm_size<N>(n_rt);
    const int hw = n / c;
    const Slice sl = norm_slice(c, cps, hw);
    const size_t off = (size_t)blockIdx.y * n;
    const Sums<2> s = sample_sums<2>(partial);
    const double mean = s.v[0] / n;
    const float m = (float)mean;
    const float r = (float)rsqrt(fmax(s.v[1] / n - mean * mean, 0.0) + NORM_EPS);
    for (int i = sl.lo + threadIdx.x; i < sl.hi; i += NORM_THREADS) {
        const int ch = i / hw;
        y[off + i] = (x[off + i] - m) * r * w[ch] + b[ch];
    }
}

// With g = ∂L/∂y and g' = g·w[c]:
//   ∂L/∂x = rstd · (g' − mean(g') − x̂ · mean(g'·x̂)),  Σ g'·x̂ = rstd · (Σ g'·x − mean · Σ g'),
//   ∂L/∂w[c] = Σ g·x̂ and ∂L/∂b[c] = Σ g over the channel's positions, summed over samples later.
// Channel by channel over the slice: ∂L/∂x and each channel's two sums. `out` packs
// [∂L/∂x (B·N) | Σ g·x̂ per (sample, channel) (B·C) | Σ g (B·C)].
template <int N>
__device__ void group_norm_bwd(const float* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ g, const double* __restrict__ partial,
                               float* __restrict__ out, int batch, int c, int cps, int n_rt) {
    const int n = norm_size<N>(n_rt);
    const int hw = n / c;
    const Slice sl = norm_slice(c, cps, hw);
    const size_t off = (size_t)blockIdx.y * n;
    const float* xs = x + off;
    const float* gs = g + off;
    float* dxs = out + off;
    float* dw = out + (size_t)batch * n + (size_t)blockIdx.y * c;
    float* db = dw + (size_t)batch * c;
    const Sums<4> s = sample_sums<4>(partial);
    const double mean = s.v[0] / n;
    const double rstd = rsqrt(fmax(s.v[1] / n - mean * mean, 0.0) + NORM_EPS);
    const double g_mean = s.v[2] / n;
    const double gx_mean = rstd * (s.v[3] / n - mean * g_mean);
    const float m = (float)mean, r = (float)rstd, gm = (float)g_mean, gxm = (float)gx_mean;
    for (int ch = sl.c0; ch < sl.c1; ++ch) {
        const float wc = w[ch];
        Sums<2> cs = {{0.0, 0.0}};
        for (int i = ch * hw + threadIdx.x; i < (ch + 1) * hw; i += NORM_THREADS) {
            const float xhat = (xs[i] - m) * r;
            const float gv = gs[i];
            dxs[i] = r * (gv * wc - gm - xhat * gxm);
            cs.v[0] += (double)gv * xhat;
            cs.v[1] += gv;
        }
        cs = block_sum<2>(cs);
        if (threadIdx.x == 0) {
            dw[ch] = (float)cs.v[0];
            db[ch] = (float)cs.v[1];
        }
    }
}

// Every kernel of one size N ("any": N at run time).
#define SD_GROUP_NORM_KERNELS_NAMED(NAME, N)                                                     \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) group_norm_stats_fwd_##NAME(      \
        const float* x, double* partial, int c, int cps, int n) {                               \
        group_norm_stats<N, 2>(x, nullptr, nullptr, partial, c, cps, n);                         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) group_norm_stats_bwd_##NAME(      \
        const float* x, const float* w, const float* g, double* partial, int c, int cps,        \
        int n) {                                                                                 \
        group_norm_stats<N, 4>(x, w, g, partial, c, cps, n);                                     \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) group_norm_fwd_##NAME(            \
        const float* x, const float* w, const float* b, const double* partial, float* y, int c, \
        int cps, int n) {                                                                        \
        group_norm_fwd<N>(x, w, b, partial, y, c, cps, n);                                       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) group_norm_bwd_##NAME(            \
        const float* x, const float* w, const float* g, const double* partial, float* out,      \
        int batch, int c, int cps, int n) {                                                      \
        group_norm_bwd<N>(x, w, g, partial, out, batch, c, cps, n);                              \
    }
#define SD_GROUP_NORM_KERNELS(N) SD_GROUP_NORM_KERNELS_NAMED(N, N)
SD_GROUP_NORM_KERNELS_NAMED(any, 0)
SD_NORM_SIZES(SD_GROUP_NORM_KERNELS)

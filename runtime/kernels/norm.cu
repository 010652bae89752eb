// GroupNorm with one group (nn::GroupNorm1, torch.nn.GroupNorm(1, C)) and its per-channel affine,
// forward and backward in one kernel each. Each sample's N = C·HW values are standardised to zero
// mean and unit population variance (eps 1e-5), then y = x̂·w[c] + b[c]. One block per sample,
// NORM_THREADS threads; statistics accumulate in double in one pass (sum and sum of squares), so N
// in the millions loses nothing to cancellation.
//
// The build lists the N of every GroupNorm in the config's model (SD_NORM_SIZES, from the shape
// plan); each gets its own kernels with N a compile-time constant, so the strided loops over the
// sample have a fixed trip count. `_any` kernels take N at run time (other shapes, tests).

constexpr int NORM_THREADS = 1024;
constexpr float NORM_EPS = 1e-5f;

template <int N>
__device__ __forceinline__ int norm_size(int n_rt) { return N > 0 ? N : n_rt; }

template <int N>
__device__ void group_norm_fwd(const float* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ b, float* __restrict__ y, int c,
                               int n_rt) {
    const int n = norm_size<N>(n_rt);
    const int hw = n / c;
    const float* xs = x + (size_t)blockIdx.x * n;
    float* ys = y + (size_t)blockIdx.x * n;
    Sums<2> s = {{0.0, 0.0}};
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) {
        const double v = xs[i];
        s.v[0] += v;
        s.v[1] += v * v;
    }
    s = block_sum<2>(s);
    const double mean = s.v[0] / n;
    const float m = (float)mean;
    const float r = (float)rsqrt(fmax(s.v[1] / n - mean * mean, 0.0) + NORM_EPS);
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) {
        const int ch = i / hw;
        ys[i] = (xs[i] - m) * r * w[ch] + b[ch];
    }
}

// With g = ∂L/∂y and g' = g·w[c] (the gradient at x̂):
//   ∂L/∂x = rstd · (g' − mean(g') − x̂ · mean(g'·x̂)),  Σ g'·x̂ = rstd · (Σ g'·x − mean · Σ g'),
//   ∂L/∂w[c] = Σ g·x̂ and ∂L/∂b[c] = Σ g over the channel's positions, summed over samples later.
// One pass gathers the statistics; a second, channel by channel, writes ∂L/∂x and each channel's
// two sums. `out` packs [∂L/∂x (B·N) | Σ g·x̂ per (sample, channel) (B·C) | Σ g (B·C)].
template <int N>
__device__ void group_norm_bwd(const float* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ g, float* __restrict__ out, int batch,
                               int c, int n_rt) {
    const int n = norm_size<N>(n_rt);
    const int hw = n / c;
    const size_t off = (size_t)blockIdx.x * n;
    const float* xs = x + off;
    const float* gs = g + off;
    float* dxs = out + off;
    float* dw = out + (size_t)batch * n + (size_t)blockIdx.x * c;
    float* db = dw + (size_t)batch * c;
    Sums<4> s = {{0.0, 0.0, 0.0, 0.0}};
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) {
        const double xv = xs[i], gv = (double)gs[i] * w[i / hw];
        s.v[0] += xv;
        s.v[1] += xv * xv;
        s.v[2] += gv;
        s.v[3] += gv * xv;
    }
    s = block_sum<4>(s);
    const double mean = s.v[0] / n;
    const double rstd = rsqrt(fmax(s.v[1] / n - mean * mean, 0.0) + NORM_EPS);
    const double g_mean = s.v[2] / n;
    const double gx_mean = rstd * (s.v[3] / n - mean * g_mean);
    const float m = (float)mean, r = (float)rstd, gm = (float)g_mean, gxm = (float)gx_mean;
    for (int ch = 0; ch < c; ++ch) {
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

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
group_norm_fwd_any(const float* x, const float* w, const float* b, float* y, int c, int n) {
    group_norm_fwd<0>(x, w, b, y, c, n);
}
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
group_norm_bwd_any(const float* x, const float* w, const float* g, float* out, int batch, int c,
                   int n) {
    group_norm_bwd<0>(x, w, g, out, batch, c, n);
}

#define SD_GROUP_NORM_KERNELS(N)                                                               \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) group_norm_fwd_##N(             \
        const float* x, const float* w, const float* b, float* y, int c, int n) {              \
        group_norm_fwd<N>(x, w, b, y, c, n);                                                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) group_norm_bwd_##N(             \
        const float* x, const float* w, const float* g, float* out, int batch, int c, int n) { \
        group_norm_bwd<N>(x, w, g, out, batch, c, n);                                          \
    }
SD_NORM_SIZES(SD_GROUP_NORM_KERNELS)

// GroupNorm with one group, before its per-channel affine (nn::GroupNorm1): each sample's
// N = C·H·W values are standardised to zero mean and unit population variance, eps 1e-5, as
// torch.nn.GroupNorm(1, C). One block per sample, NORM_THREADS threads. Statistics accumulate in
// double in one pass (sum and sum of squares), so N in the millions loses nothing to cancellation.
//
// The build lists the N of every GroupNorm in the config's model (SD_NORM_SIZES, from the shape
// plan); each gets its own kernels with N a compile-time constant, so the strided loops have a
// fixed trip count and no tail. `_any` kernels take N at run time (other shapes, tests).

constexpr int NORM_THREADS = 1024;
constexpr float NORM_EPS = 1e-5f;

template <int N>
__device__ __forceinline__ int norm_size(int n_rt) { return N > 0 ? N : n_rt; }

// y = (x − mean) · rstd
template <int N>
__device__ void standardize_fwd(const float* __restrict__ x, float* __restrict__ y, int n_rt) {
    const int n = norm_size<N>(n_rt);
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
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) ys[i] = (xs[i] - m) * r;
}

// dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)), with Σ g·x̂ = rstd · (Σ g·x − mean · Σ g), so one
// pass over x and g gathers everything and a second writes dx.
template <int N>
__device__ void standardize_bwd(const float* __restrict__ x, const float* __restrict__ g,
                                float* __restrict__ dx, int n_rt) {
    const int n = norm_size<N>(n_rt);
    const size_t off = (size_t)blockIdx.x * n;
    const float* xs = x + off;
    const float* gs = g + off;
    float* dxs = dx + off;
    Sums<4> s = {{0.0, 0.0, 0.0, 0.0}};
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) {
        const double xv = xs[i], gv = gs[i];
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
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) {
        const float xhat = (xs[i] - m) * r;
        dxs[i] = r * (gs[i] - gm - xhat * gxm);
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
standardize_fwd_any(const float* x, float* y, int n) { standardize_fwd<0>(x, y, n); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
standardize_bwd_any(const float* x, const float* g, float* dx, int n) { standardize_bwd<0>(x, g, dx, n); }

#define SD_STANDARDIZE_KERNELS(N)                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                 \
    standardize_fwd_##N(const float* x, float* y, int n) { standardize_fwd<N>(x, y, n); }      \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                 \
    standardize_bwd_##N(const float* x, const float* g, float* dx, int n) {                    \
        standardize_bwd<N>(x, g, dx, n);                                                       \
    }
SD_NORM_SIZES(SD_STANDARDIZE_KERNELS)

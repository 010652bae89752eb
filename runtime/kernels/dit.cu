// The DiT block's own layers on the GPU, forward and backward, f32 and contiguous (the same
// algorithms as the CPU ops in runtime/src/ops/{adaln,gelu,attention}.rs):
//   adaLN modulate   y = LayerNorm(x)·(1 + scale[b]) + shift[b]   (no affine of its own)
//   gated residual   out = x + y·gate[b]
//   GELU, tanh form  y = x·(1 + tanh(c·(x + k·x³)))/2
//   softmax rows     the attention probabilities between the two cuBLAS products
// x is (B, tokens, d) with per-sample (B, d) scale, shift and gate. Per-sample gradients of the
// (B, d) inputs are sums over tokens: each block of the backward sums its ROWS_PER_BLOCK tokens
// into its own partial row, and the host adds the partials (no atomics: the same numbers every
// run).
//
// The build lists the DiT's token width (SD_DIT_WIDTHS) and tokens per sample (SD_DIT_TOKENS)
// from the shape plan: the adaLN kernels get a copy with the width as a compile-time constant
// (`modulate_fwd_384`: fixed trip counts, the backward's column sums in registers), the softmax
// kernels one with the row length (`softmax_rows_fwd_1024`); `_any` kernels take the size at
// run time.

constexpr int ROW_THREADS = 128;
constexpr int ROWS_PER_BLOCK = 16;
// Columns one thread keeps in registers in the modulate backward: d ≤ ROW_THREADS·MAX_COLS.
constexpr int MAX_COLS = 16;

// Mean and 1/√(var + eps) of one row of d, in double, every thread of the block taking part.
__device__ __forceinline__ void row_stats(const float* __restrict__ xr, int d, float eps,
                                          float* mean, float* rstd) {
    Sums<1> s = {{0.0}};
    for (int j = threadIdx.x; j < d; j += ROW_THREADS) s.v[0] += xr[j];
    s = block_sum<1>(s);
    const double m = s.v[0] / d;
    Sums<1> q = {{0.0}};
    for (int j = threadIdx.x; j < d; j += ROW_THREADS) {
        const double c = xr[j] - m;
        q.v[0] += c * c;
    }
    q = block_sum<1>(q);
    *mean = (float)m;
    *rstd = (float)rsqrt(q.v[0] / d + (double)eps);
}

template <int N>
__device__ __forceinline__ int row_size(int n_rt) { return N > 0 ? N : n_rt; }

// One block per token row.
template <int D>
__device__ void modulate_fwd(const float* __restrict__ x, const float* __restrict__ scale,
                             const float* __restrict__ shift, float* __restrict__ y, int tokens,
                             int d_rt, float eps) {
    const int d = row_size<D>(d_rt);
    const size_t row = blockIdx.x;
    const size_t b = row / tokens;
    const float* xr = x + row * d;
    const float* sc = scale + b * d;
    const float* sh = shift + b * d;
    float mean, rstd;
    row_stats(xr, d, eps, &mean, &rstd);
    for (int j = threadIdx.x; j < d; j += ROW_THREADS)
        y[row * d + j] = (xr[j] - mean) * rstd * (1.0f + sc[j]) + sh[j];
}

// With x̂ = (x − μ)·r and g = ∂L/∂y·(1 + scale):
//   ∂L/∂x = r·(g − mean(g) − x̂·mean(g·x̂)),  ∂L/∂scale = Σ_tokens ∂L/∂y·x̂,  ∂L/∂shift = Σ ∂L/∂y.
// Grid (chunks of ROWS_PER_BLOCK tokens, B). `out` packs
//   [∂L/∂x (B·tokens·d) | ∂scale partials (B·chunks·d) | ∂shift partials (B·chunks·d)].
template <int D>
__device__ void modulate_bwd(const float* __restrict__ x, const float* __restrict__ scale,
                             const float* __restrict__ dy, float* __restrict__ out, int tokens,
                             int d_rt, float eps) {
    const int d = row_size<D>(d_rt);
    const int chunks = gridDim.x, chunk = blockIdx.x, b = blockIdx.y, batch = gridDim.y;
    const float* sc = scale + (size_t)b * d;
    float dscale[MAX_COLS] = {0.0f}, dshift[MAX_COLS] = {0.0f};
    const int first = chunk * ROWS_PER_BLOCK;
    const int last = min(first + ROWS_PER_BLOCK, tokens);
    for (int t = first; t < last; ++t) {
        const size_t row = (size_t)b * tokens + t;
        const float* xr = x + row * d;
        const float* gr = dy + row * d;
        float mean, rstd;
        row_stats(xr, d, eps, &mean, &rstd);
        Sums<2> s = {{0.0, 0.0}};
#pragma unroll
        for (int k = 0; k < MAX_COLS; ++k) {
            const int j = threadIdx.x + k * ROW_THREADS;
            if (j >= d) break;
            const float xhat = (xr[j] - mean) * rstd;
            const float g = gr[j] * (1.0f + sc[j]);
            s.v[0] += g;
            s.v[1] += (double)g * xhat;
            dscale[k] += gr[j] * xhat;
            dshift[k] += gr[j];
        }
        s = block_sum<2>(s);
        const float mg = (float)(s.v[0] / d), mgx = (float)(s.v[1] / d);
        for (int j = threadIdx.x; j < d; j += ROW_THREADS) {
            const float xhat = (xr[j] - mean) * rstd;
            out[row * d + j] = rstd * (gr[j] * (1.0f + sc[j]) - mg - xhat * mgx);
        }
    }
    float* partial_scale = out + (size_t)batch * tokens * d + ((size_t)b * chunks + chunk) * d;
    float* partial_shift = partial_scale + (size_t)batch * chunks * d;
#pragma unroll
    for (int k = 0; k < MAX_COLS; ++k) {
        const int j = threadIdx.x + k * ROW_THREADS;
        if (j >= d) break;
        partial_scale[j] = dscale[k];
        partial_shift[j] = dshift[k];
    }
}

#define SD_MODULATE_KERNELS(NAME, D)                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) modulate_fwd_##NAME(                \
        const float* x, const float* scale, const float* shift, float* y, int tokens, int d,   \
        float eps) {                                                                           \
        modulate_fwd<D>(x, scale, shift, y, tokens, d, eps);                         \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) modulate_bwd_##NAME(                \
        const float* x, const float* scale, const float* dy, float* out, int tokens, int d,    \
        float eps) {                                                                           \
        modulate_bwd<D>(x, scale, dy, out, tokens, d, eps);                          \
    }

// out = x + y·gate[b], one thread per value (grid-stride).
extern "C" __global__ void gated_residual_fwd(const float* __restrict__ x,
                                              const float* __restrict__ y,
                                              const float* __restrict__ gate,
                                              float* __restrict__ out, long long n,
                                              unsigned int tokens, unsigned int d) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / ((long long)tokens * d);
        out[i] = x[i] + y[i] * gate[b * d + i % d];
    }
}

// ∂L/∂y = g·gate[b]; ∂L/∂gate partials Σ g·y over each block's tokens. Grid (chunks, B), one
// thread per column (reads of a row are coalesced across the block). `out` packs
//   [∂L/∂y (B·tokens·d) | ∂gate partials (B·chunks·d)].
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
gated_residual_bwd(const float* __restrict__ g, const float* __restrict__ y,
                   const float* __restrict__ gate, float* __restrict__ out, int tokens, int d) {
    const int chunks = gridDim.x, chunk = blockIdx.x, b = blockIdx.y, batch = gridDim.y;
    const int first = chunk * ROWS_PER_BLOCK;
    const int last = min(first + ROWS_PER_BLOCK, tokens);
    float* partial = out + (size_t)batch * tokens * d + ((size_t)b * chunks + chunk) * d;
    for (int j = threadIdx.x; j < d; j += ROW_THREADS) {
        const float gt = gate[(size_t)b * d + j];
        float acc = 0.0f;
        for (int t = first; t < last; ++t) {
            const size_t i = ((size_t)b * tokens + t) * d + j;
            out[i] = g[i] * gt;
            acc += g[i] * y[i];
        }
        partial[j] = acc;
    }
}

// GELU's tanh form (nn.GELU(approximate="tanh"), DiT's feed-forward) and its derivative:
//   y = z·a,  dy/dz = a + z·(1 − t²)/2·c·(1 + 3k·z²),  a = (1 + t)/2,  t = tanh(c·(z + k·z³)),
// of z = x + bias[column]: the feed-forward's first linear layer leaves its bias add to this
// kernel, one pass and one tensor fewer (plain GELU-tanh passes a zero bias of width 1). Under
// autocast (`round` 1: bf16, 2: fp16) z is rounded as the 16-bit product's bias add would round
// it: z = round(x + round(b)).
__device__ __forceinline__ float gelu_tanh_z(const float* __restrict__ x,
                                             const float* __restrict__ bias, long long i,
                                             int width, int round) {
    return round_16(x[i] + round_16(bias[i % width], round), round);
}

__device__ __forceinline__ float gelu_tanh_t(float v) {
    return tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v));
}

extern "C" __global__ void gelu_tanh_fwd(const float* __restrict__ x,
                                         const float* __restrict__ bias, float* __restrict__ y,
                                         long long n, int width, int round) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = gelu_tanh_z(x, bias, i, width, round);
        y[i] = 0.5f * v * (1.0f + gelu_tanh_t(v));
    }
}

// ∂L/∂z, which is ∂L/∂x; the bias gradient is its column sums, which the caller takes.
extern "C" __global__ void gelu_tanh_bwd(const float* __restrict__ x,
                                         const float* __restrict__ bias,
                                         const float* __restrict__ dy, float* __restrict__ dz,
                                         long long n, int width, int round) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = gelu_tanh_z(x, bias, i, width, round), t = gelu_tanh_t(v);
        const float slope = 0.5f * (1.0f + t) +
                            v * 0.5f * (1.0f - t * t) * 0.7978845608028654f *
                                (1.0f + 3.0f * 0.044715f * v * v);
        dz[i] = dy[i] * slope;
    }
}

// −∞ without <cmath> (NVRTC compiles without the host headers).
#define NEG_INF __int_as_float(0xff800000)

// The block's maximum (every thread gets it), through shared memory once per warp.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float t = lane < warps ? partial[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    __syncthreads();
    return t;
}

// Softmax over rows of `len` (the attention scores, one row per query), one block per row:
// p = exp(s − max)/Σ exp(s − max), the sum in double.
template <int L>
__device__ void softmax_rows_fwd(const float* __restrict__ s, float* __restrict__ p, int len_rt) {
    const int len = row_size<L>(len_rt);
    const size_t row = blockIdx.x;
    const float* sr = s + row * len;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < len; j += ROW_THREADS) m = fmaxf(m, sr[j]);
    m = block_max(m);
    Sums<1> z = {{0.0}};
    for (int j = threadIdx.x; j < len; j += ROW_THREADS) z.v[0] += expf(sr[j] - m);
    z = block_sum<1>(z);
    const float inv = (float)(1.0 / z.v[0]);
    for (int j = threadIdx.x; j < len; j += ROW_THREADS) p[row * len + j] = expf(sr[j] - m) * inv;
}

// ∂L/∂s = p·(g − Σ g·p) per row, from the probabilities p and g = ∂L/∂p.
template <int L>
__device__ void softmax_rows_bwd(const float* __restrict__ p, const float* __restrict__ g,
                                 float* __restrict__ ds, int len_rt) {
    const int len = row_size<L>(len_rt);
    const size_t row = blockIdx.x;
    const float* pr = p + row * len;
    const float* gr = g + row * len;
    Sums<1> s = {{0.0}};
    for (int j = threadIdx.x; j < len; j += ROW_THREADS) s.v[0] += (double)pr[j] * gr[j];
    s = block_sum<1>(s);
    const float dot = (float)s.v[0];
    for (int j = threadIdx.x; j < len; j += ROW_THREADS) ds[row * len + j] = pr[j] * (gr[j] - dot);
}

#define SD_SOFTMAX_KERNELS(NAME, L)                                                                \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                  \
        softmax_rows_fwd_##NAME(const float* s, float* p, int len) {                              \
        softmax_rows_fwd<L>(s, p, len);                                              \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                  \
        softmax_rows_bwd_##NAME(const float* p, const float* g, float* ds, int len) {             \
        softmax_rows_bwd<L>(p, g, ds, len);                                          \
    }

// `_any` takes the size at run time (0); each size the build lists is its own constant.
SD_MODULATE_KERNELS(any, 0)
SD_SOFTMAX_KERNELS(any, 0)
#define SD_MODULATE_SIZED(D) SD_MODULATE_KERNELS(D, D)
#define SD_SOFTMAX_SIZED(L) SD_SOFTMAX_KERNELS(L, L)
SD_DIT_WIDTHS(SD_MODULATE_SIZED)
SD_DIT_TOKENS(SD_SOFTMAX_SIZED)

// Average pooling over (planes, H, W) with a kh × kw window and the same stride (trailing rows
// and columns dropped, PyTorch's floor), of dropout(a(x)) where a is GELU (erf) when `gelu` is
// set, else the identity: the end of every CNN block in one pass. The dropped (and activated)
// tensor is never written, so nothing of it is kept for the backward, which needs only the
// mask's seed (dropout.cu). Plain average pooling is threshold = 2^24, scale = 1 (every element
// kept). Window sums in double, in the CPU op's order (runtime/src/ops/pool.rs `pool_fwd`), so the
// numbers are the CPU's.
extern "C" __global__ void dropout_pool_fwd(const float* __restrict__ x, float* __restrict__ y,
                                            long long n_out, unsigned long long seed,
                                            unsigned int threshold, float scale, int h, int w,
                                            int kh, int kw, int gelu) {
    const int ho = h / kh, wo = w / kw;
    const double inv = 1.0 / (kh * kw);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_out;
         i += (long long)gridDim.x * blockDim.x) {
        const long long plane = i / ((long long)ho * wo);
        const int oi = (int)(i / wo % ho), oj = (int)(i % wo);
        const long long base = plane * h * w + (long long)oi * kh * w + (long long)oj * kw;
        double acc = 0.0;
        for (int u = 0; u < kh; ++u) {
            for (int v = 0; v < kw; ++v) {
                const long long at = base + (long long)u * w + v;
                const float a = gelu ? gelu_erf(x[at]) : x[at];
                acc += dropped(seed, at, threshold, scale, a);
            }
        }
        y[i] = (float)(acc * inv);
    }
}

// ∂L/∂(a(x)) at input element i from ∂L/∂y: the window's gradient over kh·kw, through the same
// mask; 0 in the rows and columns the pooling dropped.
__device__ __forceinline__ float dropout_pool_grad(const float* __restrict__ g, long long i,
                                                   unsigned long long seed,
                                                   unsigned int threshold, float scale, int h,
                                                   int w, int kh, int kw) {
    const int ho = h / kh, wo = w / kw;
    const long long plane = i / ((long long)h * w);
    const int oi = (int)(i / w % h) / kh, oj = (int)(i % w) / kw;
    const float pooled =
        oi < ho && oj < wo ? (float)(g[(plane * ho + oi) * wo + oj] * (1.0 / (kh * kw))) : 0.0f;
    return dropped(seed, i, threshold, scale, pooled);
}

// The backward without an activation, one thread per input element.
extern "C" __global__ void dropout_pool_bwd(const float* __restrict__ g, float* __restrict__ dx,
                                            long long n_in, unsigned long long seed,
                                            unsigned int threshold, float scale, int h, int w,
                                            int kh, int kw) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_in;
         i += (long long)gridDim.x * blockDim.x) {
        dx[i] = dropout_pool_grad(g, i, seed, threshold, scale, h, w, kh, kw);
    }
}

// With GELU first: ∂L/∂x = GELU'(x) · the above, in the same pass (the gradient at the
// activation is never written).
extern "C" __global__ void gelu_dropout_pool_bwd(const float* __restrict__ x,
                                                 const float* __restrict__ g,
                                                 float* __restrict__ dx, long long n_in,
                                                 unsigned long long seed, unsigned int threshold,
                                                 float scale, int h, int w, int kh, int kw) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_in;
         i += (long long)gridDim.x * blockDim.x) {
        const float d = dropout_pool_grad(g, i, seed, threshold, scale, h, w, kh, kw);
        dx[i] = d * gelu_erf_grad(x[i]);
    }
}

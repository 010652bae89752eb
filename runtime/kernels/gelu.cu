// GELU (exact, erf form: PyTorch's nn.GELU() default) and its derivative, one pass each.
// Candle's backward of gelu_erf is ten elementwise kernels over the activation.
//   y = x·Φ(x),  dy/dx = Φ(x) + x·φ(x),  Φ(x) = (1 + erf(x/√2))/2,  φ(x) = exp(−x²/2)/√(2π)

__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

// dy/dx = Φ(x) + x·φ(x).
__device__ __forceinline__ float gelu_erf_grad(float v) {
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    return cdf + v * pdf;
}

extern "C" __global__ void gelu_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = gelu_erf(x[i]);
    }
}

extern "C" __global__ void gelu_bwd(const float* __restrict__ x, const float* __restrict__ dy,
                                    float* __restrict__ dx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dx[i] = dy[i] * gelu_erf_grad(x[i]);
    }
}

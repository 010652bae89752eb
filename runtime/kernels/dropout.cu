// Inverted dropout with a counter-based mask: element i is kept when the top 24 bits of
// splitmix64(seed + i) fall below keep·2^24, and kept values are scaled by 1/keep. The mask is a
// function of (seed, i) alone, so nothing is stored for the backward (which is this same kernel
// applied to the gradient) and the CPU (runtime/src/ops/dropout.rs) draws exactly the same mask.

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Element i's value v after dropout: v·scale when kept, else 0.
__device__ __forceinline__ float dropped(unsigned long long seed, long long i,
                                         unsigned int threshold, float scale, float v) {
    const unsigned int r = (unsigned int)(splitmix64(seed + (unsigned long long)i) >> 40);
    return r < threshold ? v * scale : 0.0f;
}

extern "C" __global__ void dropout(const float* __restrict__ x, float* __restrict__ y,
                                   long long n, unsigned long long seed, unsigned int threshold,
                                   float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = dropped(seed, i, threshold, scale, x[i]);
    }
}

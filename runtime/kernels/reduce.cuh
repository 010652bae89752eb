// Block-wide sums in double, shared by the kernels below. Every thread of the block must call
// it; each gets the block's total. Partial sums go through shared memory once per warp.
template <int K>
struct Sums {
    double v[K];
};

template <int K>
__device__ Sums<K> block_sum(Sums<K> s) {
    __shared__ double partial[K][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        for (int o = 16; o > 0; o >>= 1) s.v[k] += __shfl_xor_sync(0xffffffffu, s.v[k], o);
        if (lane == 0) partial[k][warp] = s.v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        double t = lane < warps ? partial[k][lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        s.v[k] = t;
    }
    __syncthreads();  // `partial` may be reused by the next call
    return s;
}

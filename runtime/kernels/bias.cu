// The bias of a convolution (NCHW, C channels of HW values), added in place after cuDNN writes
// the output, and its gradient: the sum of ∂L/∂y over batch and positions, per channel. Candle's
// broadcast add made a second full-size tensor, and its reduction ran one block per channel.

extern "C" __global__ void bias_add(float* __restrict__ y, const float* __restrict__ bias, int c,
                                    long long hw, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] += bias[(i / hw) % c];
    }
}

// Block (b·C + c) sums the HW values of sample b, channel c into partial[b·C + c]; the caller
// sums over b (a small tensor), so the result does not depend on scheduling.
extern "C" __global__ void channel_sums(const float* __restrict__ dy, float* __restrict__ partial,
                                        long long hw) {
    const float* row = dy + (long long)blockIdx.x * hw;
    Sums<1> s = {{0.0}};
    for (long long i = threadIdx.x; i < hw; i += blockDim.x) s.v[0] += row[i];
    s = block_sum<1>(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = (float)s.v[0];
}

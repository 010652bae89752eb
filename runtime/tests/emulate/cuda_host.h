// CUDA's execution model on the host, enough to run runtime/kernels without a GPU
// (runtime/tests/emulated_kernels.rs). A launch runs its blocks one after another on blockDim.x
// OS threads, which meet at a std::barrier for __syncthreads(). Shared memory is a
// function-static array (blocks never overlap); a warp shuffle goes through a block-wide
// exchange buffer (every thread of a block calls it, as in our kernels); atomics are
// std::atomic_ref. What this cannot show: timing, coalescing, divergence, the GPU's math
// library ulps. It does show indexing, reductions and the packing of outputs.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct int2 {
    int x, y;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
inline std::barrier<>* barrier = nullptr;
inline std::vector<double> exchange;

// Runs `kernel` (a closure calling the kernel with its arguments) on a grid of blocks.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    blockDim = block;
    gridDim = grid;
    std::barrier<> bar(block.x);
    barrier = &bar;
    exchange.assign(block.x, 0.0);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned by = 0; by < grid.y; ++by) {
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    blockIdx = {bx, by, 0};
                    kernel();
                    bar.arrive_and_wait();  // the next block reuses the shared memory
                }
            }
        });
    }
    for (auto& t : threads) t.join();
}
}  // namespace emu

inline void __syncthreads() { emu::barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(double));
    __syncthreads();  // everyone has read the previous exchange
    std::memcpy(&emu::exchange[threadIdx.x], &v, sizeof(T));
    __syncthreads();
    T out;
    std::memcpy(&out, &emu::exchange[threadIdx.x ^ lane_mask], sizeof(T));
    return out;
}

inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline float __uint_as_float(unsigned i) { return std::bit_cast<float>(i); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
using std::max;
using std::min;

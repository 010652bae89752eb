// Rounding to autocast's 16-bit types inside kernels that compute in f32: the nearest bf16
// (`mode` 1) or fp16 (2) value, ties to even, kept in f32, as a cast there and back would give
// (mode 0: x itself). Bit operations, so the host emulation rounds exactly as the GPU does.
__device__ __forceinline__ float round_16(float x, int mode) {
    if (mode == 0 || x != x) return x;  // NaN stays NaN
    const unsigned u = __float_as_uint(x), sign = u & 0x80000000u, a = u ^ sign;
    if (mode == 1) {
        // bf16 is f32's top half: add half an ulp (less one when the kept part is even), clear.
        return __uint_as_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
    }
    if (a >= 0x7f800000u) return x;                                // ±∞
    if (a >= 0x477ff000u) return __uint_as_float(sign | 0x7f800000u);  // ≥ 65520: ∞
    if (a < 0x38800000u) {
        // Below 2⁻¹⁴ fp16 is subnormal, multiples of 2⁻²⁴: scaling by 2²⁴ is exact, and rintf
        // rounds to the nearest integer, ties to even.
        const float r = rintf(__uint_as_float(a) * 16777216.0f) * 5.9604644775390625e-8f;
        return __uint_as_float(sign | __float_as_uint(r));
    }
    // A normal fp16 keeps 10 of f32's 23 mantissa bits: drop 13, ties to even.
    return __uint_as_float(sign | ((a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu));
}

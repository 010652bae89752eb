// Host entry points for the emulated kernels: each launches one kernel as the runtime does
// (runtime/src/ops/cuda.rs: the same grids and block sizes). Appended after the translation unit,
// which the test builds with SD_DIT_WIDTHS(X) X(384) and SD_DIT_TOKENS(X) X(1024).
extern "C" {
void emu_modulate_fwd(int specialised, unsigned rows, const float* x, const float* scale,
                      const float* shift, float* y, int tokens, int d, float eps) {
    emu::launch({rows}, {128}, [=] {
        if (specialised) modulate_fwd_384(x, scale, shift, y, tokens, d, eps);
        else modulate_fwd_any(x, scale, shift, y, tokens, d, eps);
    });
}
void emu_modulate_bwd(int specialised, unsigned chunks, unsigned batch, const float* x,
                      const float* scale, const float* dy, float* out, int tokens, int d,
                      float eps) {
    emu::launch({chunks, batch}, {128}, [=] {
        if (specialised) modulate_bwd_384(x, scale, dy, out, tokens, d, eps);
        else modulate_bwd_any(x, scale, dy, out, tokens, d, eps);
    });
}
void emu_gated_residual_fwd(const float* x, const float* y, const float* gate, float* out,
                            long long n, unsigned tokens, unsigned d) {
    emu::launch({7}, {256}, [=] { gated_residual_fwd(x, y, gate, out, n, tokens, d); });
}
void emu_gated_residual_bwd(unsigned chunks, unsigned batch, const float* g, const float* y,
                            const float* gate, float* out, int tokens, int d) {
    emu::launch({chunks, batch}, {128}, [=] { gated_residual_bwd(g, y, gate, out, tokens, d); });
}
void emu_gelu_tanh(int backward, const float* x, const float* bias, const float* dy, float* out,
                   long long n, int width, int round) {
    emu::launch({5}, {256}, [=] {
        if (backward) gelu_tanh_bwd(x, bias, dy, out, n, width, round);
        else gelu_tanh_fwd(x, bias, out, n, width, round);
    });
}
void emu_round_16(const float* x, float* out, long long n, int mode) {
    for (long long i = 0; i < n; ++i) out[i] = round_16(x[i], mode);
}
void emu_softmax_rows(int backward, int specialised, unsigned rows, const float* a,
                      const float* b, float* out, int len) {
    emu::launch({rows}, {128}, [=] {
        if (backward && specialised) softmax_rows_bwd_1024(a, b, out, len);
        else if (backward) softmax_rows_bwd_any(a, b, out, len);
        else if (specialised) softmax_rows_fwd_1024(a, out, len);
        else softmax_rows_fwd_any(a, out, len);
    });
}
void emu_weighted_mse_fwd(unsigned batch, const float* out, const float* target, const float* w,
                          float* per_sample, long long m) {
    emu::launch({batch}, {128}, [=] { weighted_mse_fwd(out, target, w, per_sample, m); });
}
void emu_weighted_mse_bwd(const float* out, const float* target, const float* wg, float* d_out,
                          long long n, unsigned long long m) {
    emu::launch({3}, {256}, [=] { weighted_mse_bwd(out, target, wg, d_out, n, m); });
}
// Both launches of a GroupNorm direction, as cuda.rs's: `cps` channels per slice, a grid of
// (slices, batch) blocks, the partial sums in between.
void emu_group_norm(int backward, unsigned batch, const float* x, const float* w,
                    const float* b_or_g, float* out, int c, int cps, int n) {
    const unsigned slices = (unsigned)((c + cps - 1) / cps);
    std::vector<double> partial((size_t)batch * slices * 4);
    double* p = partial.data();
    emu::launch({slices, batch}, {NORM_THREADS}, [=] {
        if (backward) group_norm_stats_bwd_any(x, w, b_or_g, p, c, cps, n);
        else group_norm_stats_fwd_any(x, p, c, cps, n);
    });
    emu::launch({slices, batch}, {NORM_THREADS}, [=] {
        if (backward) group_norm_bwd_any(x, w, b_or_g, p, out, (int)batch, c, cps, n);
        else group_norm_fwd_any(x, w, b_or_g, p, out, c, cps, n);
    });
}
// Clipping and Adam/AdamW over (param, grad, m, v, n) slots, as cuda.rs's adam_step launches.
void emu_adam(const unsigned long long* table, const int* chunks, unsigned blocks, double* sq_norm,
              float max_norm, float lr, float beta1, float beta2, float eps, float weight_decay,
              float bc1, float bc2, int decoupled) {
    auto slots = reinterpret_cast<const Slot*>(table);
    auto pairs = reinterpret_cast<const int2*>(chunks);
    emu::launch({blocks}, {OPTIM_THREADS}, [=] { grad_sq_norm(slots, pairs, sq_norm); });
    emu::launch({blocks}, {OPTIM_THREADS}, [=] {
        adam_step(slots, pairs, sq_norm, max_norm, lr, beta1, beta2, eps, weight_decay, bc1, bc2,
                  decoupled);
    });
}
void emu_dropout(const float* x, float* y, long long n, unsigned long long seed,
                 unsigned threshold, float scale) {
    emu::launch({3}, {256}, [=] { dropout(x, y, n, seed, threshold, scale); });
}
void emu_gelu(int backward, const float* x, const float* dy, float* out, long long n) {
    emu::launch({5}, {256}, [=] {
        if (backward) gelu_bwd(x, dy, out, n);
        else gelu_fwd(x, out, n);
    });
}
// Forward of x (`in`), or backward of ∂L/∂y (`in`), through GELU at x when `gelu`.
void emu_dropout_pool(int backward, const float* x, const float* in, float* out, long long n,
                      unsigned long long seed, unsigned threshold, float scale, int h, int w,
                      int kh, int kw, int gelu) {
    emu::launch({5}, {256}, [=] {
        if (!backward) dropout_pool_fwd(in, out, n, seed, threshold, scale, h, w, kh, kw, gelu);
        else if (gelu) gelu_dropout_pool_bwd(x, in, out, n, seed, threshold, scale, h, w, kh, kw);
        else dropout_pool_bwd(in, out, n, seed, threshold, scale, h, w, kh, kw);
    });
}
// In place, as the convolution's bias; then the per-(sample, channel) sums of its gradient.
void emu_bias_add(float* y, const float* bias, int c, long long hw, long long n) {
    emu::launch({4}, {256}, [=] { bias_add(y, bias, c, hw, n); });
}
void emu_channel_sums(unsigned rows, const float* dy, float* partial, long long hw) {
    emu::launch({rows}, {256}, [=] { channel_sums(dy, partial, hw); });
}
// The EMA over (ema, param, n) slots as cuda.rs lays them out: 64-bit addresses and a length.
void emu_ema_update(const unsigned long long* table, const int* chunks, unsigned blocks,
                    float one_minus) {
    emu::launch({blocks}, {512}, [=] {
        ema_update(reinterpret_cast<const EmaSlot*>(table), reinterpret_cast<const int2*>(chunks),
                   one_minus);
    });
}
// The selective scan as cuda.rs's selective_scan_forward / _backward launch it: the forward into
// y, or the backward into the packed gradient `out` (the kernel, then the three partial sums).
void emu_selective_scan(int backward, int specialised, const float* x, const float* dy, float* out,
                        int batch, int channels, int groups, int n, int len, int softplus) {
    const unsigned parts = (unsigned)((channels / groups + SCAN_THREADS - 1) / SCAN_THREADS);
    const dim3 grid{(unsigned)groups * parts, (unsigned)batch};
    if (!backward) {
        emu::launch(grid, {SCAN_THREADS}, [=] {
            if (specialised) selective_scan_fwd_16(x, out, batch, channels, groups, n, len, softplus);
            else selective_scan_fwd_any(x, out, batch, channels, groups, n, len, softplus);
        });
        return;
    }
    const size_t bdl = (size_t)batch * channels * len, bgnl = (size_t)batch * groups * n * len;
    const size_t off_a = 2 * bdl, off_b = off_a + (size_t)channels * n, off_d = off_b + 2 * bgnl;
    const size_t tiles = (len + SCAN_CHUNK - 1) / SCAN_CHUNK, adb_row = (size_t)channels * n + 2 * channels;
    std::vector<float> bc(2 * (size_t)batch * groups * parts * n * len), adb(batch * adb_row),
        saved((size_t)batch * channels * tiles * n);
    float *pbc = bc.data(), *padb = adb.data(), *psaved = saved.data();
    emu::launch(grid, {SCAN_THREADS}, [=] {
        if (specialised)
            selective_scan_bwd_16(x, dy, out, pbc, padb, psaved, batch, channels, groups, n, len, softplus);
        else
            selective_scan_bwd_any(x, dy, out, pbc, padb, psaved, batch, channels, groups, n, len, softplus);
    });
    const long long nl = (long long)n * len, dn = (long long)channels * n;
    emu::launch({4}, {256}, [=] {
        scan_sum_partials(pbc, out + off_b, 2LL * batch * groups, (int)parts, nl, nl);
    });
    emu::launch({4}, {256}, [=] { scan_sum_partials(padb, out + off_a, 1, batch, dn, adb_row); });
    emu::launch({4}, {256}, [=] {
        scan_sum_partials(padb + dn, out + off_d, 1, batch, 2LL * channels, adb_row);
    });
}
// Neighbourhood attention as cuda.rs's neighborhood_forward / _backward launch it (3 blocks, so
// the grid-stride loops wrap): the output into `out`, or [∂q | ∂k | ∂v] with ∂L/∂o `go`.
void emu_neighborhood(int backward, int specialised, const float* q, const float* k, const float* v,
                      const float* go, float* out, int b, int h, int w, int heads, int d, int kernel,
                      float scale, int round) {
    const NaGeometry g{b, h, w, heads, d, kernel, scale, round};
    const size_t items = (size_t)b * h * w * heads, len = items * d;
    if (!backward) {
        emu::launch({3}, {NA_THREADS}, [=] {
            if (specialised) na_fwd_8_3(q, k, v, out, g);
            else na_fwd_any(q, k, v, out, g);
        });
        return;
    }
    std::vector<float> lse(items), big_d(items);
    float *pl = lse.data(), *pd = big_d.data();
    emu::launch({3}, {NA_THREADS}, [=] {
        if (specialised) na_bwd_query_8_3(q, k, v, go, out, pl, pd, g);
        else na_bwd_query_any(q, k, v, go, out, pl, pd, g);
    });
    emu::launch({3}, {NA_THREADS}, [=] {
        if (specialised) na_bwd_key_8_3(q, k, v, go, pl, pd, out + len, out + 2 * len, g);
        else na_bwd_key_any(q, k, v, go, pl, pd, out + len, out + 2 * len, g);
    });
}
}

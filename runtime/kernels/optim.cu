// The optimizer step on the GPU: global-norm clipping and Adam/AdamW over every parameter in two
// launches, with no copy to the host in between (the clip coefficient is computed on the device
// from the norm the first kernel accumulates).
//
// Multi-tensor: the parameters are cut into chunks of OPTIM_CHUNK values; block b works on chunk
// b, whose tensor and offset come from `chunks` (fixed for a model, uploaded once). `tensors` holds
// the device addresses of each tensor's parameter, gradient and two moments (the gradients change
// every step, so the table is uploaded per step: a few hundred bytes).

constexpr int OPTIM_THREADS = 512;
constexpr int OPTIM_CHUNK = 65536;

struct Slot {
    float* param;
    const float* grad;
    float* m;
    float* v;
    long long n;
};

// *sq_norm += Σ g² over all chunks (sq_norm starts at 0).
extern "C" __global__ void __launch_bounds__(OPTIM_THREADS)
grad_sq_norm(const Slot* __restrict__ tensors, const int2* __restrict__ chunks, double* sq_norm) {
    const int2 c = chunks[blockIdx.x];
    const Slot t = tensors[c.x];
    const long long start = (long long)c.y * OPTIM_CHUNK;
    const long long end = min(start + OPTIM_CHUNK, t.n);
    Sums<1> s = {{0.0}};
    for (long long i = start + threadIdx.x; i < end; i += OPTIM_THREADS) {
        const double g = t.grad[i];
        s.v[0] += g * g;
    }
    s = block_sum<1>(s);
    if (threadIdx.x == 0) atomicAdd(sq_norm, s.v[0]);
}

// PyTorch's Adam (decoupled = 0: weight decay added to the gradient) and AdamW (decoupled = 1:
// θ ← θ(1 − lr·wd)), with bias corrections bc1 = 1 − β1^t and bc2 = 1 − β2^t from the host.
// max_norm > 0 clips first, as torch.nn.utils.clip_grad_norm_: g · min(1, max_norm/(‖g‖ + 1e-6)).
extern "C" __global__ void __launch_bounds__(OPTIM_THREADS)
adam_step(const Slot* __restrict__ tensors, const int2* __restrict__ chunks,
          const double* __restrict__ sq_norm, float max_norm, float lr, float beta1, float beta2,
          float eps, float weight_decay, float bc1, float bc2, int decoupled) {
    const int2 c = chunks[blockIdx.x];
    const Slot t = tensors[c.x];
    const long long start = (long long)c.y * OPTIM_CHUNK;
    const long long end = min(start + OPTIM_CHUNK, t.n);
    float coef = 1.0f;
    if (max_norm > 0.0f) coef = fminf(1.0f, (float)(max_norm / (sqrt(*sq_norm) + 1e-6)));
    const float decay = decoupled ? 1.0f - lr * weight_decay : 1.0f;
    for (long long i = start + threadIdx.x; i < end; i += OPTIM_THREADS) {
        const float p = t.param[i];
        float g = t.grad[i] * coef;
        if (!decoupled) g += weight_decay * p;
        const float m = beta1 * t.m[i] + (1.0f - beta1) * g;
        const float v = beta2 * t.v[i] + (1.0f - beta2) * g * g;
        t.m[i] = m;
        t.v[i] = v;
        t.param[i] = p * decay - lr * (m / bc1) / (sqrtf(v / bc2) + eps);
    }
}

// The EMA update over every parameter in one launch (diffusers' EMAModel.step): with
// c = 1 − decay, ema ← ema − (ema − θ)·c, in place. Same chunking as above; `tensors` holds each
// pair's EMA and parameter addresses.
struct EmaSlot {
    float* ema;
    const float* param;
    long long n;
};

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS)
ema_update(const EmaSlot* __restrict__ tensors, const int2* __restrict__ chunks, float one_minus) {
    const int2 c = chunks[blockIdx.x];
    const EmaSlot t = tensors[c.x];
    const long long start = (long long)c.y * OPTIM_CHUNK;
    const long long end = min(start + OPTIM_CHUNK, t.n);
    for (long long i = start + threadIdx.x; i < end; i += OPTIM_THREADS) {
        const float e = t.ema[i];
        t.ema[i] = e - (e - t.param[i]) * one_minus;
    }
}

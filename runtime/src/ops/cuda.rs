//! Our CUDA kernels (runtime/kernels): how they are compiled and loaded, and their launches.
//!
//! The kernel sources are compiled once per binary with the shapes of the config's model (see
//! `signal_diffusion_config::cuda`): by nvcc in build.rs when the toolkit is there (the PTX for
//! sm_80 and sm_90 is embedded in the binary), else by NVRTC when the trainer starts (that needs
//! `libnvrtc.so.13` on the GPU machine). `train --plan` says which one a binary uses.
//! Every launch goes on Candle's stream for the device, so it is ordered with Candle's own kernels.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use crate::ops::KernelSizes;

const MODULE: &str = "signal_diffusion";

/// Where a binary's kernels came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// PTX compiled by nvcc at build time, embedded in the binary.
    Nvcc(u32),
    /// Compiled by NVRTC when the trainer started (nvcc was not found at build time).
    Nvrtc(u32),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Nvcc(a) => write!(f, "PTX for compute_{a} compiled by nvcc at build time"),
            Origin::Nvrtc(a) => write!(f, "compiled for compute_{a} by NVRTC at start-up"),
        }
    }
}

struct Kernels {
    ptx: String,
    origin: Origin,
    sizes: KernelSizes,
    /// The device's streaming multiprocessors: grids are sized by it.
    sms: usize,
}

static KERNELS: OnceLock<Kernels> = OnceLock::new();

/// Choose the kernels for `device`: the embedded PTX of the highest architecture the device runs
/// (`prebuilt`: (compute capability × 10, PTX)), else NVRTC on `source` (the translation unit,
/// `signal_diffusion_config::cuda::translation_unit`) for the device's own architecture.
/// The first call wins; later calls return what was installed.
pub fn install(
    device: &CudaDevice,
    sizes: KernelSizes,
    prebuilt: &[(u32, &'static str)],
    source: &str,
) -> Result<Origin> {
    if let Some(k) = KERNELS.get() {
        return Ok(k.origin);
    }
    let context = device.cuda_stream().context().clone();
    let (major, minor) = context.compute_capability().w()?;
    let cc = (major * 10 + minor) as u32;
    let sms = context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?
        .max(1) as usize;
    let kernels = match prebuilt
        .iter()
        .filter(|(arch, _)| *arch <= cc)
        .max_by_key(|(a, _)| *a)
    {
        Some((arch, ptx)) => Kernels {
            ptx: ptx.to_string(),
            origin: Origin::Nvcc(*arch),
            sizes,
            sms,
        },
        None => {
            let arch = nvrtc_arch(cc)?;
            let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
                arch: Some(arch),
                options: vec!["-std=c++17".into()],
                ..Default::default()
            };
            if source.is_empty() {
                candle_core::bail!("no CUDA kernels in this build: neither PTX nor source");
            }
            let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(source, opts)
                .map_err(|e| candle_core::Error::Cuda(format!("NVRTC: {e}").into()))?;
            Kernels {
                ptx: ptx.to_src(),
                origin: Origin::Nvrtc(cc),
                sizes,
                sms,
            }
        }
    };
    Ok(KERNELS.get_or_init(|| kernels).origin)
}

/// NVRTC wants a `&'static str` architecture.
fn nvrtc_arch(cc: u32) -> Result<&'static str> {
    Ok(match cc {
        70 => "compute_70",
        75 => "compute_75",
        80 => "compute_80",
        86 => "compute_86",
        87 => "compute_87",
        89 => "compute_89",
        90 => "compute_90",
        100 => "compute_100",
        120 => "compute_120",
        _ => candle_core::bail!("no kernels for a GPU of compute capability {cc}"),
    })
}

fn kernels() -> Result<&'static Kernels> {
    KERNELS.get().ok_or_else(|| {
        candle_core::Error::Cuda("the CUDA kernels are not loaded: call cuda::install first".into())
    })
}

/// `name_N` when the build specialised the kernel to N = `n` (one of `sizes`), else `name_any`.
fn specialised(name: &str, n: usize, sizes: &[usize]) -> String {
    match sizes.contains(&n) {
        true => format!("{name}_{n}"),
        false => format!("{name}_any"),
    }
}

fn launch_config(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<f32>()?.slice(a..b)),
        None => candle_core::bail!("a fused kernel needs a contiguous input"),
    }
}

/// How a GroupNorm splits each sample of `c` channels: (channels per slice, slices), enough
/// slices that the grid of (slices, batch) blocks is four per SM of a GPU with `sms` of them
/// even at small batches, each slice whole channels.
pub fn norm_slices(batch: usize, c: usize, sms: usize) -> (usize, usize) {
    let wanted = (4 * sms).div_ceil(batch.max(1)).clamp(1, c.max(1));
    let per_slice = c.max(1).div_ceil(wanted);
    (per_slice, c.max(1).div_ceil(per_slice))
}

/// Launch the GroupNorm kernel `name(inputs..., partial, [output,] ints..., c, cps, n)` (norm.cu)
/// on a (slices, batch) grid: `name_N` when the build specialised it to N = n, else `name_any`.
fn launch_norm(
    device: &CudaDevice,
    name: &str,
    (batch, c, n): (usize, usize, usize),
    inputs: &[&CudaView<'_, f32>],
    partial: &CudaSlice<f64>,
    output: Option<&CudaSlice<f32>>,
    ints: &[i32],
) -> Result<()> {
    let k = kernels()?;
    let full = specialised(name, n, k.sizes.norm);
    let f = device.get_or_load_custom_func(&full, MODULE, &k.ptx)?;
    let (per_slice, slices) = norm_slices(batch, c, k.sms);
    let [c_arg, cps_arg, n_arg] = [c as i32, per_slice as i32, n as i32];
    let mut b = f.builder();
    for x in inputs {
        b.arg(*x);
    }
    b.arg(partial);
    if let Some(y) = output {
        b.arg(y);
    }
    for i in ints {
        b.arg(i);
    }
    b.arg(&c_arg).arg(&cps_arg).arg(&n_arg);
    let config = LaunchConfig {
        grid_dim: (slices as u32, batch as u32, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the norm kernels take (inputs..., partial, [output,] ints..., c, cps, n), in this
    // order; `partial` holds K sums per block of this grid.
    unsafe { b.launch(config) }.w()?;
    Ok(())
}

const NORM_THREADS: u32 = 1024;

/// GroupNorm over (batch, c channels, n/c positions) (norm.cu), both launches of a direction:
/// the statistics, then forward y = x̂·w[c] + b[c] from (x, w, b), or `backward`
/// [∂L/∂x | per-(sample, channel) Σ g·x̂ | Σ g] from (x, w, g = ∂L/∂y).
pub fn group_norm(
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (ts, tl): (&CudaStorage, &Layout),
    (batch, c, n): (usize, usize, usize),
    backward: bool,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let (x, w, t) = (f32_view(xs, xl)?, f32_view(ws, wl)?, f32_view(ts, tl)?);
    let inputs = [&x, &w, &t];
    let (stats, stats_inputs, apply, sums, out_len, ints) = match backward {
        false => (
            "group_norm_stats_fwd",
            &inputs[..1],
            "group_norm_fwd",
            2,
            batch * n,
            vec![],
        ),
        true => {
            let len = batch * n + 2 * batch * c;
            (
                "group_norm_stats_bwd",
                &inputs[..],
                "group_norm_bwd",
                4,
                len,
                vec![batch as i32],
            )
        }
    };
    let slices = norm_slices(batch, c, kernels()?.sms).1;
    // SAFETY: the statistics kernel writes every partial sum before the second kernel reads it.
    let partial = unsafe { dev.alloc::<f64>(batch * slices * sums)? };
    let sizes = (batch, c, n);
    launch_norm(dev, stats, sizes, stats_inputs, &partial, None, &[])?;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(out_len)? };
    launch_norm(dev, apply, sizes, &inputs, &partial, Some(&out), &ints)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// A scalar kernel argument after the buffers.
enum Scalar {
    U64(u64),
    I64(i64),
    U32(u32),
    I32(i32),
    F32(f32),
}

/// Launch `name(inputs..., output, scalars...)` on a `grid` of ROW_THREADS-thread blocks into a
/// new output of `len` values (the row kernels of runtime/kernels/dit.cu).
fn launch_rows(
    dev: &CudaDevice,
    name: &str,
    grid: (u32, u32),
    inputs: &[&CudaView<'_, f32>],
    len: usize,
    scalars: &[Scalar],
) -> Result<CudaStorage> {
    // SAFETY: every element is written by the kernel (the callers' contracts).
    let out = unsafe { dev.alloc::<f32>(len)? };
    let k = kernels()?;
    let f = dev.get_or_load_custom_func(name, MODULE, &k.ptx)?;
    let mut b = f.builder();
    for x in inputs {
        b.arg(*x);
    }
    b.arg(&out);
    for s in scalars {
        match s {
            Scalar::U64(v) => b.arg(v),
            Scalar::I64(v) => b.arg(v),
            Scalar::U32(v) => b.arg(v),
            Scalar::I32(v) => b.arg(v),
            Scalar::F32(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernels take (inputs..., output, scalars...) with these types, in this order.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

const ROW_THREADS: u32 = 128;
/// Tokens per block in the backward kernels whose per-sample gradients are sums over tokens:
/// each block writes one partial row, `chunks(tokens)` per sample.
const ROWS_PER_BLOCK: usize = 16;
/// The modulate backward keeps a row's columns in registers: d ≤ 128 · 16.
const MAX_MODULATE_WIDTH: usize = 128 * 16;

/// Partial rows per sample of a token-summing backward.
pub fn chunks(tokens: usize) -> usize {
    tokens.div_ceil(ROWS_PER_BLOCK)
}

fn i32_arg(v: usize) -> Result<Scalar> {
    kernel_int(v).map(Scalar::I32)
}

/// A size as a kernel's `int`.
fn kernel_int(v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("{v} does not fit a kernel's int")))
}

/// adaLN modulate forward: LayerNorm(x)·(1 + scale) + shift for x (B, tokens, d).
pub fn modulate_forward(
    (xs, xl): (&CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
    (hs, hl): (&CudaStorage, &Layout),
    (b, tokens, d): (usize, usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    let (x, scale, shift) = (f32_view(xs, xl)?, f32_view(ss, sl)?, f32_view(hs, hl)?);
    let rows =
        u32::try_from(b * tokens).map_err(|_| candle_core::Error::Msg("too many rows".into()))?;
    let scalars = [i32_arg(tokens)?, i32_arg(d)?, Scalar::F32(eps)];
    let name = specialised("modulate_fwd", d, kernels()?.sizes.widths);
    launch_rows(
        xs.device(),
        &name,
        (rows, 1),
        &[&x, &scale, &shift],
        b * tokens * d,
        &scalars,
    )
}

/// adaLN modulate backward: [∂L/∂x | ∂scale partials | ∂shift partials] (see dit.cu), from
/// (x, scale, ∂L/∂y).
pub fn modulate_backward(
    (xs, xl): (&CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    (b, tokens, d): (usize, usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    if d > MAX_MODULATE_WIDTH {
        candle_core::bail!(
            "the adaLN backward kernel takes rows of at most {MAX_MODULATE_WIDTH}, not {d}"
        );
    }
    let (x, scale, g) = (f32_view(xs, xl)?, f32_view(ss, sl)?, f32_view(gs, gl)?);
    let c = chunks(tokens);
    let len = b * tokens * d + 2 * b * c * d;
    let scalars = [i32_arg(tokens)?, i32_arg(d)?, Scalar::F32(eps)];
    let name = specialised("modulate_bwd", d, kernels()?.sizes.widths);
    launch_rows(
        xs.device(),
        &name,
        (c as u32, b as u32),
        &[&x, &scale, &g],
        len,
        &scalars,
    )
}

/// Gated residual forward: x + y·gate for x, y (B, tokens, d) and gate (B, d).
pub fn gated_residual_forward(
    (xs, xl): (&CudaStorage, &Layout),
    (ys, yl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    (tokens, d): (usize, usize),
) -> Result<CudaStorage> {
    let (x, y, gate) = (f32_view(xs, xl)?, f32_view(ys, yl)?, f32_view(gs, gl)?);
    let extra = [Scalar::U32(tokens as u32), Scalar::U32(d as u32)];
    elementwise(
        xs.device(),
        "gated_residual_fwd",
        &[&x, &y, &gate],
        xl.shape().elem_count(),
        &extra,
    )
}

/// Gated residual backward: [∂L/∂y | ∂gate partials] from (∂L/∂out, y, gate).
pub fn gated_residual_backward(
    (gs, gl): (&CudaStorage, &Layout),
    (ys, yl): (&CudaStorage, &Layout),
    (ts, tl): (&CudaStorage, &Layout),
    (b, tokens, d): (usize, usize, usize),
) -> Result<CudaStorage> {
    let (g, y, gate) = (f32_view(gs, gl)?, f32_view(ys, yl)?, f32_view(ts, tl)?);
    let c = chunks(tokens);
    let len = b * tokens * d + b * c * d;
    let scalars = [i32_arg(tokens)?, i32_arg(d)?];
    launch_rows(
        gs.device(),
        "gated_residual_bwd",
        (c as u32, b as u32),
        &[&g, &y, &gate],
        len,
        &scalars,
    )
}

/// Softmax over the last axis (rows of `len`) of a contiguous tensor.
pub fn softmax_rows_forward(s: &CudaStorage, l: &Layout, len: usize) -> Result<CudaStorage> {
    let x = f32_view(s, l)?;
    let n = l.shape().elem_count();
    let rows =
        u32::try_from(n / len).map_err(|_| candle_core::Error::Msg("too many rows".into()))?;
    let name = specialised("softmax_rows_fwd", len, kernels()?.sizes.tokens);
    launch_rows(s.device(), &name, (rows, 1), &[&x], n, &[i32_arg(len)?])
}

/// Softmax backward: ∂L/∂s from the probabilities p and ∂L/∂p.
pub fn softmax_rows_backward(
    (ps, pl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    len: usize,
) -> Result<CudaStorage> {
    let (p, g) = (f32_view(ps, pl)?, f32_view(gs, gl)?);
    let n = pl.shape().elem_count();
    let rows =
        u32::try_from(n / len).map_err(|_| candle_core::Error::Msg("too many rows".into()))?;
    let name = specialised("softmax_rows_bwd", len, kernels()?.sizes.tokens);
    launch_rows(
        ps.device(),
        &name,
        (rows, 1),
        &[&p, &g],
        n,
        &[i32_arg(len)?],
    )
}

/// Launch an elementwise kernel `name(inputs..., output, n, extra...)` over `n` values with a
/// grid-stride loop; returns the new output.
fn elementwise(
    dev: &CudaDevice,
    name: &str,
    inputs: &[&CudaView<'_, f32>],
    n: usize,
    extra: &[Scalar],
) -> Result<CudaStorage> {
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<f32>(n)? };
    let k = kernels()?;
    let f = dev.get_or_load_custom_func(name, MODULE, &k.ptx)?;
    let n_arg = n as i64;
    let mut b = f.builder();
    for x in inputs {
        b.arg(*x);
    }
    b.arg(&y).arg(&n_arg);
    for e in extra {
        match e {
            Scalar::U64(v) => b.arg(v),
            Scalar::I64(v) => b.arg(v),
            Scalar::U32(v) => b.arg(v),
            Scalar::I32(v) => b.arg(v),
            Scalar::F32(v) => b.arg(v),
        };
    }
    // A few waves of blocks cover any size.
    let blocks = n.div_ceil(256).clamp(1, k.sms * 16);
    // SAFETY: the callers' kernels take (inputs..., output, n, extra...).
    unsafe { b.launch(launch_config(blocks, 256)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The dropout kernel (runtime/kernels/dropout.cu) over a contiguous f32 tensor.
pub fn dropout(
    s: &CudaStorage,
    l: &Layout,
    seed: u64,
    threshold: u32,
    scale: f32,
) -> Result<CudaStorage> {
    let x = f32_view(s, l)?;
    let extra = [
        Scalar::U64(seed),
        Scalar::U32(threshold),
        Scalar::F32(scale),
    ];
    elementwise(s.device(), "dropout", &[&x], l.shape().elem_count(), &extra)
}

/// Dropout (the mask `(seed, threshold, scale)`), then average pooling with a kh × kw window,
/// over the last two axes of a contiguous (…, h, w) tensor, `[h, w, kh, kw]`; of GELU(x) when
/// `gelu` (runtime/kernels/pool.cu).
pub fn dropout_pool_forward(
    (s, l): (&CudaStorage, &Layout),
    mask: (u64, u32, f32),
    [h, w, kh, kw]: [usize; 4],
    gelu: bool,
) -> Result<CudaStorage> {
    let x = f32_view(s, l)?;
    let n_out = planes(l) * (h / kh) * (w / kw);
    let mut extra = pool_args(mask, [h, w, kh, kw])?;
    extra.push(Scalar::I32(gelu as i32));
    elementwise(s.device(), "dropout_pool_fwd", &[&x], n_out, &extra)
}

/// ∂L/∂x of `dropout_pool_forward` from ∂L/∂y, (…, h/kh, w/kw) → (…, h, w); through GELU at
/// `gelu_of` (the forward's x) when given, in the same pass.
pub fn dropout_pool_backward(
    (s, l): (&CudaStorage, &Layout),
    mask: (u64, u32, f32),
    [h, w, kh, kw]: [usize; 4],
    gelu_of: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let g = f32_view(s, l)?;
    let extra = pool_args(mask, [h, w, kh, kw])?;
    let n_in = planes(l) * h * w;
    match gelu_of {
        None => elementwise(s.device(), "dropout_pool_bwd", &[&g], n_in, &extra),
        Some((xs, xl)) => {
            let x = f32_view(xs, xl)?;
            elementwise(s.device(), "gelu_dropout_pool_bwd", &[&x, &g], n_in, &extra)
        }
    }
}

/// The values of all axes but the last two.
fn planes(l: &Layout) -> usize {
    let d = l.dims();
    d[..d.len().saturating_sub(2)].iter().product()
}

/// The pooling kernels' arguments after n: the dropout mask, then h, w, kh, kw.
fn pool_args((seed, threshold, scale): (u64, u32, f32), sizes: [usize; 4]) -> Result<Vec<Scalar>> {
    let mut args = vec![
        Scalar::U64(seed),
        Scalar::U32(threshold),
        Scalar::F32(scale),
    ];
    for v in sizes {
        args.push(i32_arg(v)?);
    }
    Ok(args)
}

/// GELU forward: y = x·Φ(x) (runtime/kernels/gelu.cu).
pub fn gelu_forward(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let x = f32_view(s, l)?;
    elementwise(s.device(), "gelu_fwd", &[&x], l.shape().elem_count(), &[])
}

/// GELU backward: ∂L/∂x from (x, ∂L/∂y).
pub fn gelu_backward(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<CudaStorage> {
    let (x, g) = (f32_view(xs, xl)?, f32_view(gs, gl)?);
    elementwise(
        xs.device(),
        "gelu_bwd",
        &[&x, &g],
        xl.shape().elem_count(),
        &[],
    )
}

/// GELU-tanh of z = x + bias (along the last axis; rounded to autocast's `round` type as a
/// 16-bit bias add would be): y, or with `dy` ∂L/∂z (runtime/kernels/dit.cu).
pub fn gelu_tanh(
    (xs, xl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
    dy: Option<(&CudaStorage, &Layout)>,
    round: Option<candle_core::DType>,
) -> Result<CudaStorage> {
    let (x, bias) = (f32_view(xs, xl)?, f32_view(bs, bl)?);
    let extra = [
        Scalar::I32(bias.len() as i32),
        Scalar::I32(round_mode(round)?),
    ];
    let n = xl.shape().elem_count();
    match dy {
        None => elementwise(xs.device(), "gelu_tanh_fwd", &[&x, &bias], n, &extra),
        Some((gs, gl)) => {
            let g = f32_view(gs, gl)?;
            elementwise(xs.device(), "gelu_tanh_bwd", &[&x, &bias, &g], n, &extra)
        }
    }
}

/// The kernels' `round` argument (round.cuh): 0 none, 1 bf16, 2 fp16.
fn round_mode(round: Option<candle_core::DType>) -> Result<i32> {
    Ok(match round {
        None => 0,
        Some(candle_core::DType::BF16) => 1,
        Some(candle_core::DType::F16) => 2,
        Some(d) => candle_core::bail!("autocast to {d:?}: bf16 or f16 only"),
    })
}

/// y[b, c, ...] += bias[c], in place (runtime/kernels/bias.cu).
pub fn bias_add(
    dev: &CudaDevice,
    y: &mut CudaSlice<f32>,
    bias: &CudaView<'_, f32>,
    c: usize,
    hw: usize,
) -> Result<()> {
    let k = kernels()?;
    let f = dev.get_or_load_custom_func("bias_add", MODULE, &k.ptx)?;
    let n = y.len();
    let (c_arg, hw_arg, n_arg) = (c as i32, hw as i64, n as i64);
    let mut b = f.builder();
    b.arg(y).arg(bias).arg(&c_arg).arg(&hw_arg).arg(&n_arg);
    let blocks = n.div_ceil(256).clamp(1, k.sms * 16);
    // SAFETY: argument types match the kernel's signature; y has n = B·C·HW elements.
    unsafe { b.launch(launch_config(blocks, 256)) }.w()?;
    Ok(())
}

/// Per (sample, channel) sums of a contiguous (B, C, ...) tensor: (B·C) values.
pub fn channel_sums(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = s.device();
    let dims = l.dims();
    let rows = dims[0] * dims[1];
    let hw = l.shape().elem_count() / rows.max(1);
    let dy = f32_view(s, l)?;
    // SAFETY: one value per block, every block writes its own.
    let out = unsafe { dev.alloc::<f32>(rows)? };
    let k = kernels()?;
    let f = dev.get_or_load_custom_func("channel_sums", MODULE, &k.ptx)?;
    let hw_arg = hw as i64;
    let mut b = f.builder();
    b.arg(&dy).arg(&out).arg(&hw_arg);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(launch_config(rows, 256)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Hyper-parameters of one fused Adam/AdamW step.
pub struct AdamStep {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Bias corrections 1 − β^t.
    pub bias_corrections: [f64; 2],
    /// AdamW (decay applied to the weights) rather than Adam (decay added to the gradient).
    pub decoupled: bool,
    pub max_norm: Option<f64>,
}

/// One (parameter, gradient, first moment, second moment) of the fused step, all f32 and
/// contiguous on the same device.
pub struct Slot<'a> {
    pub param: &'a candle_core::Tensor,
    pub grad: &'a candle_core::Tensor,
    pub m: &'a candle_core::Tensor,
    pub v: &'a candle_core::Tensor,
}

const OPTIM_THREADS: u32 = 512;
const OPTIM_CHUNK: usize = 65536;

/// Clip by the global norm and update every slot in place, in two launches. Returns the squared
/// global norm (before clipping), still on the device.
pub fn adam_step(device: &CudaDevice, slots: &[Slot], hp: &AdamStep) -> Result<CudaSlice<f64>> {
    let stream = device.cuda_stream();
    let k = kernels()?;
    let groups: Vec<[&candle_core::Tensor; 4]> =
        slots.iter().map(|s| [s.param, s.grad, s.m, s.v]).collect();
    let (table, chunks) = slot_tables(&groups, "fused Adam")?;
    if chunks.is_empty() {
        return stream.alloc_zeros::<f64>(1).w();
    }
    let table = stream.clone_htod(&table).w()?;
    let chunk_table = stream.clone_htod(&chunks).w()?;
    let sq_norm = stream.alloc_zeros::<f64>(1).w()?;
    let blocks = chunks.len() / 2;

    let f = device.get_or_load_custom_func("grad_sq_norm", MODULE, &k.ptx)?;
    let mut b = f.builder();
    b.arg(&table).arg(&chunk_table).arg(&sq_norm);
    // SAFETY: argument types match the kernel's signature; the table's addresses are live
    // tensors held by the caller for the duration of the stream's work (Candle frees on the
    // same stream).
    unsafe { b.launch(launch_config(blocks, OPTIM_THREADS)) }.w()?;

    let f = device.get_or_load_custom_func("adam_step", MODULE, &k.ptx)?;
    let max_norm = hp.max_norm.unwrap_or(0.0) as f32;
    let (lr, b1, b2, eps, wd) = (
        hp.lr as f32,
        hp.betas[0] as f32,
        hp.betas[1] as f32,
        hp.eps as f32,
        hp.weight_decay as f32,
    );
    let (bc1, bc2) = (hp.bias_corrections[0] as f32, hp.bias_corrections[1] as f32);
    let decoupled = i32::from(hp.decoupled);
    let mut b = f.builder();
    b.arg(&table).arg(&chunk_table).arg(&sq_norm);
    b.arg(&max_norm)
        .arg(&lr)
        .arg(&b1)
        .arg(&b2)
        .arg(&eps)
        .arg(&wd);
    b.arg(&bc1).arg(&bc2).arg(&decoupled);
    // SAFETY: as above.
    unsafe { b.launch(launch_config(blocks, OPTIM_THREADS)) }.w()?;
    Ok(sq_norm)
}

/// The kernels' slot table for `groups` of same-length f32 tensors (each tensor's device address,
/// then the length, per group) and the chunk table (group, chunk of OPTIM_CHUNK) with one entry
/// per block.
fn slot_tables<const N: usize>(
    groups: &[[&candle_core::Tensor; N]],
    what: &str,
) -> Result<(Vec<u64>, Vec<i32>)> {
    let mut table: Vec<u64> = Vec::with_capacity(groups.len() * (N + 1));
    let mut chunks: Vec<i32> = vec![];
    for (i, group) in groups.iter().enumerate() {
        let n = group[0].elem_count();
        for t in group {
            if t.elem_count() != n || t.dtype() != candle_core::DType::F32 {
                candle_core::bail!("{what}: slot {i} has mismatched tensors");
            }
            table.push(device_address(t)?);
        }
        table.push(n as u64);
        for c in 0..n.div_ceil(OPTIM_CHUNK) {
            chunks.extend([i as i32, c as i32]);
        }
    }
    Ok((table, chunks))
}

/// ema ← ema − (ema − θ)·`one_minus` for every (EMA, parameter) pair, in place, in one launch.
pub fn ema_update(
    device: &CudaDevice,
    pairs: &[(&candle_core::Tensor, &candle_core::Tensor)],
    one_minus: f32,
) -> Result<()> {
    let groups: Vec<[&candle_core::Tensor; 2]> = pairs.iter().map(|(e, p)| [*e, *p]).collect();
    let (table, chunks) = slot_tables(&groups, "fused EMA")?;
    if chunks.is_empty() {
        return Ok(());
    }
    let stream = device.cuda_stream();
    let (table, chunk_table) = (
        stream.clone_htod(&table).w()?,
        stream.clone_htod(&chunks).w()?,
    );
    let f = device.get_or_load_custom_func("ema_update", MODULE, &kernels()?.ptx)?;
    let mut b = f.builder();
    b.arg(&table).arg(&chunk_table).arg(&one_minus);
    // SAFETY: argument types match the kernel's signature; the addresses are live tensors the
    // caller holds while the stream runs (Candle frees on the same stream).
    unsafe { b.launch(launch_config(chunks.len() / 2, OPTIM_THREADS)) }.w()?;
    Ok(())
}

/// Per-sample w[b]·mean((out − target)²) of contiguous (B, ...) tensors: (B) values.
pub fn weighted_mse_forward(
    (os, ol): (&CudaStorage, &Layout),
    (ts, tl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let (out, target, w) = (f32_view(os, ol)?, f32_view(ts, tl)?, f32_view(ws, wl)?);
    let b = wl.shape().elem_count();
    let m = (ol.shape().elem_count() / b.max(1)) as i64;
    let blocks = u32::try_from(b).map_err(|_| candle_core::Error::Msg("batch too large".into()))?;
    launch_rows(
        os.device(),
        "weighted_mse_fwd",
        (blocks, 1),
        &[&out, &target, &w],
        b,
        &[Scalar::I64(m)],
    )
}

/// ∂L/∂out of [`weighted_mse_forward`] from `wg` = w·(per-sample gradients).
pub fn weighted_mse_backward(
    (os, ol): (&CudaStorage, &Layout),
    (ts, tl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let (out, target, wg) = (f32_view(os, ol)?, f32_view(ts, tl)?, f32_view(gs, gl)?);
    let n = ol.shape().elem_count();
    let m = (n / gl.shape().elem_count().max(1)) as u64;
    elementwise(
        os.device(),
        "weighted_mse_bwd",
        &[&out, &target, &wg],
        n,
        &[Scalar::U64(m)],
    )
}

/// The device address of a contiguous f32 CUDA tensor's first element.
fn device_address(t: &candle_core::Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        candle_core::bail!("fused Adam: a tensor is not on the GPU");
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused Adam: a tensor is not contiguous");
    };
    let slice = s.as_cuda_slice::<f32>()?;
    let stream = s.device().cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr + (start * std::mem::size_of::<f32>()) as u64)
}

/// Copy a device scalar to the host (synchronises the stream).
pub fn read_scalar(device: &CudaDevice, s: &CudaSlice<f64>) -> Result<f64> {
    Ok(device.cuda_stream().clone_dtoh(s).w()?[0])
}

/// One warp per selective-scan block, a channel per lane (scan.cu).
const SCAN_THREADS: u32 = 32;
/// Steps per tile of scan.cu: the backward saves one state per tile and channel.
const SCAN_CHUNK: usize = 32;
/// The largest state size scan.cu's `_any` kernels take (their registers are sized for it).
pub const MAX_SCAN_STATE: usize = 64;

/// A selective scan's sizes (ops/selective_scan.rs packs its inputs for these).
#[derive(Debug, Clone, Copy)]
pub struct ScanDims {
    pub batch: usize,
    pub channels: usize,
    pub groups: usize,
    pub state: usize,
    pub len: usize,
    pub softplus: bool,
}

impl ScanDims {
    /// Blocks per group: each takes 32 of its channels.
    fn parts(&self) -> usize {
        (self.channels / self.groups).div_ceil(SCAN_THREADS as usize)
    }

    /// The kernels' int arguments after the buffers: batch, channels, groups, N, L, softplus.
    fn ints(&self) -> Result<[i32; 6]> {
        Ok([
            kernel_int(self.batch)?,
            kernel_int(self.channels)?,
            kernel_int(self.groups)?,
            kernel_int(self.state)?,
            kernel_int(self.len)?,
            self.softplus as i32,
        ])
    }

    fn launch(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((self.groups * self.parts()) as u32, self.batch as u32, 1),
            block_dim: (SCAN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `name_N` for a state size the build lists, else `name_any` (N ≤ [`MAX_SCAN_STATE`]).
    fn kernel(&self, name: &str) -> Result<String> {
        if self.state > MAX_SCAN_STATE && !kernels()?.sizes.scan_states.contains(&self.state) {
            candle_core::bail!(
                "selective scan: state size {} is above the GPU kernel's run-time limit of {MAX_SCAN_STATE} and this build was not specialised to it",
                self.state
            );
        }
        Ok(specialised(name, self.state, kernels()?.sizes.scan_states))
    }
}

/// y (B, D, L) of the selective scan of the packed [u | Δ | A | B | C | D | Δ bias] (scan.cu).
pub fn selective_scan_forward(
    (xs, xl): (&CudaStorage, &Layout),
    dims: ScanDims,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let x = f32_view(xs, xl)?;
    // SAFETY: every output element is written by the kernel (each channel by its lane).
    let y = unsafe { dev.alloc::<f32>(dims.batch * dims.channels * dims.len)? };
    let f =
        dev.get_or_load_custom_func(&dims.kernel("selective_scan_fwd")?, MODULE, &kernels()?.ptx)?;
    let ints = dims.ints()?;
    let mut b = f.builder();
    b.arg(&x).arg(&y);
    for i in &ints {
        b.arg(i);
    }
    // SAFETY: (x, y, batch, channels, groups, n, len, softplus), as scan.cu's kernel takes them.
    unsafe { b.launch(dims.launch()) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The packed gradient [∂u | ∂Δ | ∂A | ∂B | ∂C | ∂D | ∂bias] of the selective scan from its packed
/// input and ∂L/∂y: the backward kernel, then the partial sums added in order (scan.cu).
pub fn selective_scan_backward(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    dims: ScanDims,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let (x, dy) = (f32_view(xs, xl)?, f32_view(gs, gl)?);
    let ScanDims {
        batch: b,
        channels: d,
        groups: g,
        state: n,
        len: l,
        ..
    } = dims;
    let (bdl, bgnl) = (b * d * l, b * g * n * l);
    let (off_a, off_b, off_d) = (2 * bdl, 2 * bdl + d * n, 2 * bdl + d * n + 2 * bgnl);
    let packed_len = off_d + 2 * d;
    let parts = dims.parts();
    let adb_row = d * n + 2 * d;
    // SAFETY: each is written in full before it is read: ∂u and ∂Δ and the partials by the
    // backward kernel (every channel, step and block row), the rest of `out` by the sums below;
    // `saved` is the kernel's own scratch, written before read.
    let (mut out, bc, adb, saved) = unsafe {
        (
            dev.alloc::<f32>(packed_len)?,
            dev.alloc::<f32>(2 * b * g * parts * n * l)?,
            dev.alloc::<f32>(b * adb_row)?,
            dev.alloc::<f32>(b * d * l.div_ceil(SCAN_CHUNK) * n)?,
        )
    };
    let k = kernels()?;
    let f = dev.get_or_load_custom_func(&dims.kernel("selective_scan_bwd")?, MODULE, &k.ptx)?;
    let ints = dims.ints()?;
    {
        let mut launch = f.builder();
        launch
            .arg(&x)
            .arg(&dy)
            .arg(&out)
            .arg(&bc)
            .arg(&adb)
            .arg(&saved);
        for i in &ints {
            launch.arg(i);
        }
        // SAFETY: (x, dy, out, bc, adb, saved, batch, channels, groups, n, len, softplus), as
        // scan.cu's kernel takes them, the buffers of the sizes above.
        unsafe { launch.launch(dims.launch()) }.w()?;
    }
    // (input, output offset, outer, K, inner, input row): ∂B and ∂C over each group's blocks;
    // ∂A, then ∂D and ∂bias, over the batch.
    let sums = [
        (bc.slice(..), off_b, 2 * b * g, parts, n * l, n * l),
        (adb.slice(..), off_a, 1, b, d * n, adb_row),
        (adb.slice(d * n..), off_d, 1, b, 2 * d, adb_row),
    ];
    let f = dev.get_or_load_custom_func("scan_sum_partials", MODULE, &k.ptx)?;
    for (input, at, outer, count, inner, row) in sums {
        let blocks = (outer * inner).div_ceil(256).clamp(1, 4 * k.sms);
        let mut dst = out.slice_mut(at..at + outer * inner);
        let (outer, count, inner, row) = (outer as i64, count as i32, inner as i64, row as i64);
        let mut launch = f.builder();
        launch
            .arg(&input)
            .arg(&mut dst)
            .arg(&outer)
            .arg(&count)
            .arg(&inner)
            .arg(&row);
        // SAFETY: (in, out, outer, k_count, inner, row): `input` holds outer·K rows of `row`
        // values, `dst` outer·inner.
        unsafe { launch.launch(launch_config(blocks, 256)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Threads per block of the neighbourhood-attention kernels (neighborhood.cu).
const NA_THREADS: u32 = 128;
/// The largest head size and kernel neighborhood.cu's `_any` kernels take.
pub const MAX_NA_HEAD: usize = 128;
pub const MAX_NA_KERNEL: usize = 13;

/// neighborhood.cu's `NaGeometry`, passed by value: (B, H, W, heads·d) tensors, a k×k window,
/// the scores' scale and the autocast rounding.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NaGeometry {
    pub b: i32,
    pub h: i32,
    pub w: i32,
    pub heads: i32,
    pub d: i32,
    pub k: i32,
    pub scale: f32,
    pub round: i32,
}

// SAFETY: a #[repr(C)] struct of 4-byte scalars, laid out as the kernel's struct.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for NaGeometry {}

impl NaGeometry {
    /// For a (b, h, w, heads·d) op with a `kernel`×`kernel` window.
    pub fn new(
        (b, h, w, heads, d, kernel): (usize, usize, usize, usize, usize, usize),
        scale: f64,
        round: Option<candle_core::DType>,
    ) -> Result<Self> {
        Ok(NaGeometry {
            b: kernel_int(b)?,
            h: kernel_int(h)?,
            w: kernel_int(w)?,
            heads: kernel_int(heads)?,
            d: kernel_int(d)?,
            k: kernel_int(kernel)?,
            scale: scale as f32,
            round: round_mode(round)?,
        })
    }

    /// Whether the kernels take a head size `d` and kernel `k`: the build's pairs, or what the
    /// `_any` kernels hold in registers.
    pub fn supported(d: usize, k: usize) -> bool {
        let listed = KERNELS
            .get()
            .is_some_and(|kernels| kernels.sizes.neighborhoods.contains(&(d, k)));
        listed || (d <= MAX_NA_HEAD && k <= MAX_NA_KERNEL)
    }

    /// (sample, query, head) items: a thread each.
    fn items(&self) -> usize {
        [self.b, self.h, self.w, self.heads]
            .iter()
            .map(|&v| v as usize)
            .product()
    }

    /// `name_D_K` for a pair the build lists, else `name_any`.
    fn kernel(&self, name: &str) -> Result<String> {
        let (d, k) = (self.d as usize, self.k as usize);
        Ok(match kernels()?.sizes.neighborhoods.contains(&(d, k)) {
            true => format!("{name}_{d}_{k}"),
            false => format!("{name}_any"),
        })
    }

    /// A grid-stride launch over the items.
    fn launch(&self) -> Result<LaunchConfig> {
        let blocks = self
            .items()
            .div_ceil(NA_THREADS as usize)
            .clamp(1, 32 * kernels()?.sms);
        Ok(launch_config(blocks, NA_THREADS))
    }
}

/// Neighbourhood attention's output (neighborhood.cu `na_fwd`).
pub fn neighborhood_forward(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    g: NaGeometry,
) -> Result<CudaStorage> {
    let dev = qs.device();
    let (q, k, v) = (f32_view(qs, ql)?, f32_view(ks, kl)?, f32_view(vs, vl)?);
    // SAFETY: every element is written (a thread per query and head, all d values).
    let out = unsafe { dev.alloc::<f32>(q.len())? };
    let f = dev.get_or_load_custom_func(&g.kernel("na_fwd")?, MODULE, &kernels()?.ptx)?;
    let mut b = f.builder();
    b.arg(&q).arg(&k).arg(&v).arg(&out).arg(&g);
    // SAFETY: (q, k, v, o, geometry), as neighborhood.cu's kernel takes them.
    unsafe { b.launch(g.launch()?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// [∂q | ∂k | ∂v] of neighbourhood attention from the packed [q | k | v] and ∂L/∂o: by query
/// (∂q and each query's statistics), then by key (neighborhood.cu).
pub fn neighborhood_backward(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    g: NaGeometry,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let (qkv, go) = (f32_view(xs, xl)?, f32_view(gs, gl)?);
    let len = go.len();
    let (q, k, v) = (
        qkv.slice(..len),
        qkv.slice(len..2 * len),
        qkv.slice(2 * len..),
    );
    // SAFETY: the query kernel writes ∂q and every statistic, the key kernel ∂k and ∂v.
    let (out, lse, big_d) = unsafe {
        (
            dev.alloc::<f32>(3 * len)?,
            dev.alloc::<f32>(g.items())?,
            dev.alloc::<f32>(g.items())?,
        )
    };
    let ptx = &kernels()?.ptx;
    {
        let (dq, dk, dv) = (
            out.slice(..len),
            out.slice(len..2 * len),
            out.slice(2 * len..),
        );
        let f = dev.get_or_load_custom_func(&g.kernel("na_bwd_query")?, MODULE, ptx)?;
        let mut b = f.builder();
        b.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&go)
            .arg(&dq)
            .arg(&lse)
            .arg(&big_d)
            .arg(&g);
        // SAFETY: (q, k, v, go, dq, lse, big_d, geometry), as neighborhood.cu's kernel takes them.
        unsafe { b.launch(g.launch()?) }.w()?;
        let f = dev.get_or_load_custom_func(&g.kernel("na_bwd_key")?, MODULE, ptx)?;
        let mut b = f.builder();
        b.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&go)
            .arg(&lse)
            .arg(&big_d)
            .arg(&dk)
            .arg(&dv)
            .arg(&g);
        // SAFETY: (q, k, v, go, lse, big_d, dk, dv, geometry), as the kernel takes them.
        unsafe { b.launch(g.launch()?) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

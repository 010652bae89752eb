//! Convolutions with their own backward: stride 1, dilation 1, one group, zero padding — every
//! convolution of the CNNs here. A 1-D convolution is the 2-D one with height 1.
//!
//! On the CPU each is a GEMM over an im2col matrix (the `gemm` crate Candle's matmul uses):
//! forward `Y_b = W · col(X_b)`; the filter gradient `∂W = Σ_b ∂Y_b · col(X_b)ᵀ`; the input
//! gradient is the forward of `∂Y` with the flipped, transposed kernel, and is only computed
//! when something upstream needs it (never for the image). Forward and filter gradient alike
//! build the column matrix a band of output rows at a time (`COL_TILE`), so it stays in the
//! caches between im2col and the GEMM that reads it. Candle's own CPU convolution runs
//! its backward as a direct transposed convolution and always computes the input gradient; it
//! made the training step 7–9× slower than PyTorch's (spec/candle-notes.md). On CUDA the same
//! ops call cuDNN (cudnn.rs).

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::ops::precision::{operand, round_in_place, round_tensor};

use crate::ops::cpu::contiguous as values;
use crate::ops::winograd::{self, Float};
pub use signal_diffusion_config::plan::ConvAlgorithm;

/// Convolution of `x` (B, C, [H,] W) with `w` (O, C, [kh,] kw), zero padding `padding` on every
/// spatial side, plus `bias` (O) when given; differentiable in all of them. Under autocast the
/// ops take their operands, gradients and results to the 16-bit type themselves: rounded in f32
/// on the CPU (these kernels are f32), cast for cuDNN's 16-bit convolutions on a GPU
/// (precision.rs).
pub fn conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let (kernel, side) = match (x.dims(), w.dims()) {
        (&[_, _, h, wd], &[_, _, kh, kw]) => ([kh, kw], [h + 2 * padding, wd + 2 * padding]),
        (&[_, _, l], &[_, _, k]) => ([1, k], [1, l + 2 * padding]),
        _ => candle_core::bail!("convolution of {:?} with {:?}", x.dims(), w.dims()),
    };
    let side = [
        side[0] + 1 - kernel[0].min(side[0]),
        side[1] + 1 - kernel[1].min(side[1]),
    ];
    let algorithm = ConvAlgorithm::for_shape(x.dim(1)?, w.dim(0)?, kernel, side);
    conv_with(x, w, bias, padding, algorithm)
}

/// `conv` by the given algorithm on the CPU (the benchmarks compare them per shape; a GPU runs
/// cuDNN's whichever is given). Winograd needs a 3×3 kernel.
pub fn conv_with(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    algorithm: ConvAlgorithm,
) -> Result<Tensor> {
    conv_op(
        x,
        w,
        bias,
        padding,
        algorithm,
        crate::ops::precision::autocast_dtype(),
    )
}

/// The op, rounding operands, gradients and results to `round` itself (autocast).
fn conv_op(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    algorithm: ConvAlgorithm,
    round: Option<DType>,
) -> Result<Tensor> {
    if algorithm == ConvAlgorithm::WinogradF4x3 && w.dims()[w.rank() - 2..] != [3, 3] {
        candle_core::bail!("Winograd F(4x4,3x3) of a {:?} kernel", w.dims());
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (x4, w4, pad) = match x.rank() {
        4 => (x.clone(), w, [padding, padding]),
        3 => {
            let (b, c, l) = x.dims3()?;
            let (o, ci, k) = w.dims3()?;
            (
                x.reshape((b, c, 1, l))?,
                w.reshape((o, ci, 1, k))?,
                [0, padding],
            )
        }
        r => candle_core::bail!("convolution of a rank-{r} tensor"),
    };
    let y = match bias {
        Some(b) => x4.apply_op3(
            &w4,
            &b.contiguous()?,
            Conv {
                pad,
                algorithm,
                round,
            },
        )?,
        None => x4.apply_op2(
            &w4,
            Conv {
                pad,
                algorithm,
                round,
            },
        )?,
    };
    match x.rank() {
        3 => y.squeeze(2),
        _ => Ok(y),
    }
}

/// The forward op (with or without a bias); `pad` is (height, width). `round` (here and in the
/// backward ops): autocast's 16-bit type, to which the CPU passes round operands and results.
struct Conv {
    pad: [usize; 2],
    algorithm: ConvAlgorithm,
    round: Option<DType>,
}

/// ∂L/∂x from (∂L/∂y, w); the input's shape is not recoverable from those, so it travels here.
#[derive(Clone, Copy)]
struct BackwardData {
    pad: [usize; 2],
    x_dims: [usize; 4],
    w_dims: [usize; 4],
    algorithm: ConvAlgorithm,
    round: Option<DType>,
}

/// ∂L/∂w from (x, ∂L/∂y).
#[derive(Clone, Copy)]
struct BackwardFilter {
    pad: [usize; 2],
    w_dims: [usize; 4],
    x_dims: [usize; 4],
    algorithm: ConvAlgorithm,
    round: Option<DType>,
}

/// (B, C, ...) → the (B·C) per-sample, per-channel sums: the bias gradient before the batch sum.
struct ChannelSums;

fn dims4(l: &Layout) -> Result<[usize; 4]> {
    l.dims().try_into().map_err(|_| {
        candle_core::Error::Msg(format!("a convolution needs NCHW, got {:?}", l.dims()))
    })
}

fn out_dims(x: [usize; 4], w: [usize; 4], pad: [usize; 2]) -> [usize; 4] {
    [
        x[0],
        w[0],
        x[2] + 2 * pad[0] + 1 - w[2],
        x[3] + 2 * pad[1] + 1 - w[3],
    ]
}

impl Conv {
    /// ∂L/∂x (only when something upstream needs it: not for the image) and ∂L/∂w.
    fn grads(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let (x_dims, w_dims) = (dims4(x.layout())?, dims4(w.layout())?);
        let dx = match x.track_op() {
            true => Some(dy.apply_op2_no_bwd(
                w,
                &BackwardData {
                    pad: self.pad,
                    x_dims,
                    w_dims,
                    algorithm: self.algorithm,
                    round: self.round,
                },
            )?),
            false => None,
        };
        let dw = x.apply_op2_no_bwd(
            dy,
            &BackwardFilter {
                pad: self.pad,
                w_dims,
                x_dims,
                algorithm: self.algorithm,
                round: self.round,
            },
        )?;
        Ok((dx, dw))
    }
}

// ------------------------------------------------------------------------------------ CPU

/// `col[(c·kh + i)·kw + j][(oh − oh0)·Wo + ow] = x[c][oh + i − ph][ow + j − pw]` (0 outside),
/// for the output rows `oh0..oh1`.
#[allow(clippy::too_many_arguments)]
fn im2col<T: Copy + Default>(
    x: &[T],
    [c, h, w]: [usize; 3],
    [kh, kw]: [usize; 2],
    [ph, pw]: [usize; 2],
    wo: usize,
    (oh0, oh1): (usize, usize),
    col: &mut [T],
) {
    let n = (oh1 - oh0) * wo;
    for ci in 0..c {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for i in 0..kh {
            for j in 0..kw {
                let row = &mut col[((ci * kh + i) * kw + j) * n..][..n];
                // Output columns ow whose source ow + j − pw lies inside 0..w.
                let lo = pw.saturating_sub(j).min(wo);
                let hi = (w + pw).saturating_sub(j).min(wo).max(lo);
                for oh in oh0..oh1 {
                    let out = &mut row[(oh - oh0) * wo..(oh - oh0 + 1) * wo];
                    let src = (oh + i).checked_sub(ph).filter(|&r| r < h);
                    match src {
                        None => out.fill(T::default()),
                        Some(r) => {
                            out[..lo].fill(T::default());
                            out[hi..].fill(T::default());
                            let start = lo + j - pw;
                            out[lo..hi]
                                .copy_from_slice(&plane[r * w + start..r * w + start + hi - lo]);
                        }
                    }
                }
            }
        }
    }
}

/// A matrix operand of `matmul`: element (r, c) at `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Strided<'a, T> {
    /// Row-major rows `rs` apart.
    pub(super) fn rows(data: &'a [T], rs: usize) -> Self {
        Strided { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `rs` apart.
    pub(super) fn transposed(data: &'a [T], rs: usize) -> Self {
        Strided {
            data,
            rs: 1,
            cs: rs,
        }
    }

    /// Whether an r×c matrix at these strides lies inside `data`.
    fn holds(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, dst row-major with its rows `dst_rs` apart.
/// Single-threaded: the callers split work by sample across threads, which keeps both cores
/// busy through im2col too (the GEMM's own threading left one idle during it).
///
/// # Safety
/// `dst` must be valid for writes of m rows of n values, `dst_rs` apart, that no one else reads
/// or writes meanwhile.
pub(super) unsafe fn matmul<T: 'static + candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    lhs: Strided<T>,
    rhs: Strided<T>,
    accumulate: bool,
) {
    assert!(lhs.holds(m, k) && rhs.holds(k, n));
    // SAFETY: lhs and rhs hold m×k and k×n values at their strides (checked above); dst is the
    // caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Runs `work(sample, state)` for every sample of the batch on Candle's thread count, each
/// thread with its own `state` (buffers, partial sums); returns the states.
pub(super) fn per_sample<S: Send>(
    batch: usize,
    state: impl Fn() -> S + Sync,
    work: impl Fn(usize, &mut S) + Sync,
) -> Vec<S> {
    let threads = candle_core::utils::get_num_threads().clamp(1, batch.max(1));
    let mut states: Vec<Option<S>> = (0..threads).map(|_| None).collect();
    rayon::scope(|scope| {
        for (t, slot) in states.iter_mut().enumerate() {
            let (state, work) = (&state, &work);
            scope.spawn(move |_| {
                let mut s = state();
                for b in (t..batch).step_by(threads) {
                    work(b, &mut s);
                }
                *slot = Some(s);
            });
        }
    });
    states
        .into_iter()
        .map(|s| s.expect("every thread fills its state"))
        .collect()
}

/// Floats of one im2col tile: large images are convolved a band of output rows at a time, so
/// the column matrix stays in the caches (a 3×3 convolution of 128 channels at 256² would
/// otherwise expand to 300 MB per image, and the time go to page faults and memory traffic).
pub(super) const COL_TILE: usize = 1 << 21;

/// The forward on the CPU: per sample and band of output rows, im2col then one GEMM; `bias`
/// added per channel. The (sample, band) pairs are shared out to the threads.
fn forward_cpu<T: 'static + candle_core::WithDType + Default>(
    x: &[T],
    x_dims: [usize; 4],
    w: &[T],
    w_dims: [usize; 4],
    bias: Option<&[T]>,
    pad: [usize; 2],
) -> Vec<T> {
    let [b, c, h, wd] = x_dims;
    let [o, _, kh, kw] = w_dims;
    let [_, _, ho, wo] = out_dims(x_dims, w_dims, pad);
    let ck = c * kh * kw;
    let band = (COL_TILE / (ck * wo).max(1)).clamp(1, ho.max(1));
    let bands = ho.div_ceil(band);
    let mut y = vec![T::default(); b * o * ho * wo];
    let out = SharedOut(y.as_mut_ptr());
    per_sample(
        b * bands,
        || vec![T::default(); ck * band * wo],
        |item, col| {
            let (bi, oh0) = (item / bands, (item % bands) * band);
            let oh1 = (oh0 + band).min(ho);
            let n = (oh1 - oh0) * wo;
            im2col(
                &x[bi * c * h * wd..(bi + 1) * c * h * wd],
                [c, h, wd],
                [kh, kw],
                pad,
                wo,
                (oh0, oh1),
                col,
            );
            // Each (sample, band) is written by exactly one thread: the rows oh0..oh1 of each
            // output channel, n values every ho·wo.
            let first = bi * o * ho * wo + oh0 * wo;
            if let Some(bias) = bias {
                for (oc, &value) in bias.iter().enumerate() {
                    // SAFETY: channel oc's rows of this band, inside y, this thread's alone.
                    unsafe { out.block(first + oc * ho * wo, n) }.fill(value);
                }
            }
            // SAFETY: as the bias rows: o rows of n values, ho·wo apart, inside y.
            unsafe {
                matmul(
                    (o, n, ck),
                    out.0.add(first),
                    ho * wo,
                    Strided::rows(w, ck),
                    Strided::rows(col, n),
                    bias.is_some(),
                )
            };
        },
    );
    y
}

/// A pointer to an output that threads fill in disjoint blocks.
pub(crate) struct SharedOut<T>(pub(super) *mut T);

// SAFETY: only used to hand disjoint blocks of one buffer to the threads of `per_sample`.
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// # Safety
    /// No two live blocks may overlap, and the block must lie inside the buffer.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn block(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// ∂L/∂w = Σ_b ∂Y_b · col(X_b)ᵀ, a band of output rows at a time (as the forward: the band's
/// column matrix stays in the caches), each thread summing its (sample, band) pairs, then the
/// threads' sums.
fn backward_filter_cpu<T: 'static + candle_core::WithDType + Default>(
    x: &[T],
    x_dims: [usize; 4],
    dy: &[T],
    w_dims: [usize; 4],
    pad: [usize; 2],
) -> Vec<T> {
    let [b, c, h, wd] = x_dims;
    let [o, _, kh, kw] = w_dims;
    let [_, _, ho, wo] = out_dims(x_dims, w_dims, pad);
    let ck = c * kh * kw;
    let band = (COL_TILE / (ck * wo).max(1)).clamp(1, ho.max(1));
    let bands = ho.div_ceil(band);
    let partial = per_sample(
        b * bands,
        || {
            (
                vec![T::default(); ck * band * wo],
                vec![T::default(); o * ck],
                false,
            )
        },
        |item, (col, dw, started)| {
            let (bi, oh0) = (item / bands, (item % bands) * band);
            let oh1 = (oh0 + band).min(ho);
            let n = (oh1 - oh0) * wo;
            im2col(
                &x[bi * c * h * wd..(bi + 1) * c * h * wd],
                [c, h, wd],
                [kh, kw],
                pad,
                wo,
                (oh0, oh1),
                col,
            );
            // The band's rows of each output channel's gradient: o rows of n values, ho·wo apart.
            let dyb = &dy[bi * o * ho * wo + oh0 * wo..(bi + 1) * o * ho * wo];
            let col = &col[..ck * n];
            // SAFETY: this thread's own o×ck sum.
            unsafe {
                matmul(
                    (o, ck, n),
                    dw.as_mut_ptr(),
                    ck,
                    Strided::rows(dyb, ho * wo),
                    Strided::transposed(col, n),
                    *started,
                )
            };
            *started = true;
        },
    );
    sum_partials(partial.into_iter().map(|(_, dw, _)| dw))
}

/// The elementwise sum of the threads' partial filter gradients (at least one).
pub(super) fn sum_partials<T: candle_core::WithDType>(
    mut parts: impl Iterator<Item = Vec<T>>,
) -> Vec<T> {
    let mut sum = parts.next().expect("at least one thread's sum");
    for other in parts {
        for (a, b) in sum.iter_mut().zip(other) {
            *a += b;
        }
    }
    sum
}

/// ∂L/∂x: the forward of ∂L/∂y with the kernel flipped in space and its channel axes swapped,
/// padded by k − 1 − p (stride 1).
fn backward_data_cpu<T: Float>(
    dy: &[T],
    w: &[T],
    w_dims: [usize; 4],
    x_dims: [usize; 4],
    pad: [usize; 2],
    algorithm: ConvAlgorithm,
) -> Vec<T> {
    let [o, c, kh, kw] = w_dims;
    let mut flipped = vec![T::default(); w.len()];
    for oc in 0..o {
        for ci in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    flipped[((ci * o + oc) * kh + kh - 1 - i) * kw + kw - 1 - j] =
                        w[((oc * c + ci) * kh + i) * kw + j];
                }
            }
        }
    }
    let dy_dims = out_dims(x_dims, w_dims, pad);
    forward_by(
        algorithm,
        dy,
        dy_dims,
        &flipped,
        [c, o, kh, kw],
        None,
        [kh - 1 - pad[0], kw - 1 - pad[1]],
    )
}

/// A CPU pass, generic over the float type; inputs are contiguous slices in op order.
trait CpuPass {
    fn run<T: Float>(&self, inputs: &[&[T]]) -> Vec<T>;
}

/// The forward; a third input is the bias.
struct Forward {
    x: [usize; 4],
    w: [usize; 4],
    pad: [usize; 2],
    algorithm: ConvAlgorithm,
}

/// The forward of `x` with `w` by `algorithm`.
fn forward_by<T: Float>(
    algorithm: ConvAlgorithm,
    x: &[T],
    x_dims: [usize; 4],
    w: &[T],
    w_dims: [usize; 4],
    bias: Option<&[T]>,
    pad: [usize; 2],
) -> Vec<T> {
    match algorithm {
        ConvAlgorithm::Im2colGemm => forward_cpu(x, x_dims, w, w_dims, bias, pad),
        ConvAlgorithm::WinogradF4x3 => winograd::forward(x, x_dims, w, w_dims, bias, pad),
    }
}

impl CpuPass for Forward {
    fn run<T: Float>(&self, v: &[&[T]]) -> Vec<T> {
        let bias = v.get(2).copied();
        forward_by(self.algorithm, v[0], self.x, v[1], self.w, bias, self.pad)
    }
}

impl CpuPass for BackwardData {
    fn run<T: Float>(&self, v: &[&[T]]) -> Vec<T> {
        backward_data_cpu(
            v[0],
            v[1],
            self.w_dims,
            self.x_dims,
            self.pad,
            self.algorithm,
        )
    }
}

impl CpuPass for BackwardFilter {
    fn run<T: Float>(&self, v: &[&[T]]) -> Vec<T> {
        let (x, dy) = (v[0], v[1]);
        match self.algorithm {
            ConvAlgorithm::Im2colGemm => {
                backward_filter_cpu(x, self.x_dims, dy, self.w_dims, self.pad)
            }
            ConvAlgorithm::WinogradF4x3 => {
                winograd::backward_filter(x, self.x_dims, dy, self.w_dims, self.pad)
            }
        }
    }
}

/// Runs a pass in the inputs' float type (all alike: f32 or f64); in f32 with the inputs and
/// the result rounded to `round` (autocast).
fn on_cpu(
    inputs: &[(&CpuStorage, &Layout)],
    pass: &impl CpuPass,
    round: Option<DType>,
) -> Result<CpuStorage> {
    if inputs.iter().all(|(s, _)| matches!(s, CpuStorage::F32(_))) {
        let v = inputs
            .iter()
            .map(|(s, l)| Ok(operand(values::<f32>(s, l)?, round)))
            .collect::<Result<Vec<_>>>()?;
        let mut y = pass.run(&v.iter().map(|c| &**c).collect::<Vec<_>>());
        round_in_place(&mut y, round);
        return Ok(CpuStorage::F32(y));
    }
    if inputs.iter().all(|(s, _)| matches!(s, CpuStorage::F64(_))) {
        let v = inputs
            .iter()
            .map(|(s, l)| values::<f64>(s, l))
            .collect::<Result<Vec<_>>>()?;
        return Ok(CpuStorage::F64(pass.run(&v)));
    }
    candle_core::bail!("convolutions run in f32 or f64, all inputs alike")
}

/// A cuDNN pass under autocast `round`: the inputs cast to the 16-bit type (copies that live only
/// for the pass), cuDNN's 16-bit convolution (tensor cores, f32 accumulation, the result rounded
/// once) and its result widened to f32; outside autocast the pass in f32.
#[cfg(feature = "cuda")]
fn on_cuda<'a, const N: usize>(
    inputs: [(&'a candle_core::CudaStorage, &'a Layout); N],
    round: Option<DType>,
    pass: impl FnOnce(
        [(&candle_core::CudaStorage, &Layout); N],
    ) -> Result<(candle_core::CudaStorage, Shape)>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    let Some(low) = round else {
        return pass(inputs);
    };
    let cast = inputs
        .iter()
        .map(|&(s, l)| Ok((s.to_dtype(l, low)?, Layout::contiguous(l.shape()))))
        .collect::<Result<Vec<_>>>()?;
    let (y, shape) = pass(std::array::from_fn(|i| (&cast[i].0, &cast[i].1)))?;
    Ok((y.to_dtype(&Layout::contiguous(&shape), DType::F32)?, shape))
}

#[cfg(feature = "cuda")]
impl Conv {
    /// cuDNN's forward of x with w (without the bias), f32 out.
    fn cudnn_forward(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        w: (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        on_cuda([x, w], self.round, |[(xs, xl), (ws, wl)]| {
            let (y, dims) = crate::ops::cudnn::forward(xs, xl, ws, wl, self.pad)?;
            Ok((y, Shape::from(dims.to_vec())))
        })
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (dims4(xl)?, dims4(wl)?);
        let y = on_cpu(
            &[(xs, xl), (ws, wl)],
            &Forward {
                x,
                w,
                pad: self.pad,
                algorithm: self.algorithm,
            },
            self.round,
        )?;
        Ok((y, Shape::from(out_dims(x, w, self.pad).to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cudnn_forward((xs, xl), (ws, wl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, &dy.contiguous()?)?;
        Ok((dx, Some(dw)))
    }
}

/// With a bias: on the CPU written into the output before the GEMM accumulates onto it; on CUDA
/// added in place by our kernel after cuDNN's forward. Its gradient is the per-channel sum of
/// ∂L/∂y.
impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "conv-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (dims4(xl)?, dims4(wl)?);
        let y = on_cpu(
            &[(xs, xl), (ws, wl), (bs, bl)],
            &Forward {
                x,
                w,
                pad: self.pad,
                algorithm: self.algorithm,
            },
            self.round,
        )?;
        Ok((y, Shape::from(out_dims(x, w, self.pad).to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::ops::precision::round_storage;
        let (mut y, shape) = self.cudnn_forward((xs, xl), (ws, wl))?;
        // Under autocast the bias is rounded, added to the widened result in f32, and the sum
        // rounded: a 16-bit add.
        let rounded_bias = self
            .round
            .map(|low| round_storage(bs, bl, low))
            .transpose()?;
        let bias = match &rounded_bias {
            Some(b) => crate::ops::cudnn::view::<f32>(b, &Layout::contiguous(bl.shape()))?,
            None => crate::ops::cudnn::view::<f32>(bs, bl)?,
        };
        let (c, hw) = (shape.dims()[1], shape.dims()[2] * shape.dims()[3]);
        let dev = xs.device().clone();
        crate::ops::cuda::bias_add(&dev, y.as_cuda_slice_mut::<f32>()?, &bias, c, hw)?;
        match self.round {
            Some(low) => Ok((round_storage(&y, &Layout::contiguous(&shape), low)?, shape)),
            None => Ok((y, shape)),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = round_tensor(&dy.contiguous()?, self.round)?;
        let (dx, dw) = self.grads(x, w, &dy)?;
        let (batch, channels) = (dy.dim(0)?, dy.dim(1)?);
        let db = dy
            .apply_op1_no_bwd(&ChannelSums)?
            .reshape((batch, channels))?
            .sum(0)?;
        Ok((dx, Some(dw), Some(round_tensor(&db, self.round)?)))
    }
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = l.dims()[0] * l.dims()[1];
        let per = l.shape().elem_count() / rows.max(1);
        let sums = match s {
            CpuStorage::F32(_) => CpuStorage::F32(
                values::<f32>(s, l)?
                    .chunks(per)
                    .map(|c| c.iter().sum())
                    .collect(),
            ),
            CpuStorage::F64(_) => CpuStorage::F64(
                values::<f64>(s, l)?
                    .chunks(per)
                    .map(|c| c.iter().sum())
                    .collect(),
            ),
            _ => candle_core::bail!("channel sums run in f32 or f64"),
        };
        Ok((sums, Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = l.dims()[0] * l.dims()[1];
        Ok((crate::ops::cuda::channel_sums(s, l)?, Shape::from(rows)))
    }
}

impl CustomOp2 for BackwardData {
    fn name(&self) -> &'static str {
        "conv-backward-data"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let pass = BackwardData {
            w_dims: dims4(wl)?,
            ..*self
        };
        let dx = on_cpu(&[(dys, dyl), (ws, wl)], &pass, self.round)?;
        Ok((dx, Shape::from(self.x_dims.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dys: &candle_core::CudaStorage,
        dyl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        on_cuda(
            [(dys, dyl), (ws, wl)],
            self.round,
            |[(dys, dyl), (ws, wl)]| {
                let dx = crate::ops::cudnn::backward_data(dys, dyl, ws, wl, self.pad, self.x_dims)?;
                Ok((dx, Shape::from(self.x_dims.to_vec())))
            },
        )
    }
}

impl CustomOp2 for BackwardFilter {
    fn name(&self) -> &'static str {
        "conv-backward-filter"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let pass = BackwardFilter {
            x_dims: dims4(xl)?,
            ..*self
        };
        let dw = on_cpu(&[(xs, xl), (dys, dyl)], &pass, self.round)?;
        Ok((dw, Shape::from(self.w_dims.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        dys: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        on_cuda(
            [(xs, xl), (dys, dyl)],
            self.round,
            |[(xs, xl), (dys, dyl)]| {
                let dw =
                    crate::ops::cudnn::backward_filter(xs, xl, dys, dyl, self.pad, self.w_dims)?;
                Ok((dw, Shape::from(self.w_dims.to_vec())))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Our op against Candle's conv2d (its forward and its gradients are right for 2-D; only
    /// its padded conv1d kernel gradient is not): values and every gradient, f64, 1e-10.
    #[test]
    fn matches_candles_convolution_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (k, pad, bias) in [(3, 1, true), (5, 2, false), (3, 0, true), (1, 0, false)] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 7, 6), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 3, k, k), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &dev)?)?;
            let probe = Tensor::randn(
                0f64,
                1.0,
                out_dims([2, 3, 7, 6], [4, 3, k, k], [pad, pad]).to_vec(),
                &dev,
            )?;
            let ours = conv(
                x.as_tensor(),
                w.as_tensor(),
                bias.then_some(b.as_tensor()),
                pad,
            )?;
            let mut theirs = x.as_tensor().conv2d(w.as_tensor(), pad, 1, 1, 1)?;
            if bias {
                theirs = theirs.broadcast_add(&b.as_tensor().reshape((1, 4, 1, 1))?)?;
            }
            let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(d < 1e-10, "k {k} pad {pad}: {what} differs by {d}");
                Ok(())
            };
            close(&ours, &theirs, "forward")?;
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
            for (v, what) in [(&x, "dx"), (&w, "dw")] {
                close(
                    g_ours.get(v.as_tensor()).unwrap(),
                    g_theirs.get(v.as_tensor()).unwrap(),
                    what,
                )?;
            }
            if bias {
                close(
                    g_ours.get(b.as_tensor()).unwrap(),
                    g_theirs.get(b.as_tensor()).unwrap(),
                    "db",
                )?;
            }
        }
        Ok(())
    }

    /// An image whose column matrix exceeds `COL_TILE` is convolved in bands of output rows (here
    /// 3: 56, 56 and 18 rows), forward and input gradient alike, with Candle's numbers (f64).
    #[test]
    fn a_large_image_is_convolved_in_bands_with_the_same_result() -> Result<()> {
        let dev = Device::Cpu;
        let (c, h, w) = (32, 130, 128);
        assert_eq!(130usize.div_ceil(COL_TILE / (c * 9 * w)), 3);
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, c, h, w), &dev)?)?;
        let wt = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, c, 3, 3), &dev)?)?;
        let b = Tensor::randn(0f64, 1.0, 5, &dev)?;
        let ours = conv(x.as_tensor(), &wt, Some(&b), 1)?;
        let theirs = x
            .as_tensor()
            .conv2d(&wt, 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, 5, 1, 1))?)?;
        let d = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-10, "forward differs by {d}");
        let probe = Tensor::randn(0f64, 1.0, ours.shape(), &dev)?;
        let g_ours = (ours * &probe)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
        // The input gradient (the forward's bands) and the filter gradient (its own bands, the
        // last one short) both.
        for (what, t) in [("dx", x.as_tensor()), ("dw", wt.as_tensor())] {
            let d = (g_ours.get(t).unwrap() - g_theirs.get(t).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(d < 1e-9, "{what} differs by {d}");
        }
        Ok(())
    }

    /// An input that is not a variable (the image) gets no gradient computed.
    #[test]
    fn no_input_gradient_for_a_constant_input() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 5), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &dev)?)?;
        let g = conv(&x, w.as_tensor(), None, 1)?.sum_all()?.backward()?;
        assert!(g.get(&x).is_none());
        assert_eq!(g.get(w.as_tensor()).unwrap().dtype(), DType::F32);
        Ok(())
    }
}

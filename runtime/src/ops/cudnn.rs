//! The GPU side of `conv.rs`'s convolution ops, through cuDNN: forward, backward-data and
//! backward-filter, the three calls PyTorch makes. Candle's CUDA convolution is im2col + GEMM forward and a direct
//! transposed-convolution kernel backward; on the classification baseline that ran at 5 TFLOP/s
//! and used 2.6× PyTorch's memory (docs/benchmarks.md), so the conv ops route CUDA tensors here.
//!
//! Stride 1, dilation 1, one group, zero padding: every convolution of the CNNs here. A 1-D
//! convolution is the 2-D one with height 1. The algorithm of each pass is chosen the first time a
//! shape is seen by timing every one cuDNN accepts (what `torch.backends.cudnn.benchmark = True`
//! does; cuDNN's heuristics alone made the backward 8× the forward on an H100). TF32 is allowed
//! exactly when Candle's f32 GEMMs allow it (`set_gemm_reduced_precision_f32`).
//!
//! Each pass runs in its inputs' type: f32, or bf16/fp16 under autocast (conv.rs casts the
//! operands inside its ops), where cuDNN multiplies on the 16-bit tensor cores, accumulates in
//! f32 and rounds the result to the 16-bit type once (its "pseudo" half configurations).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result};
use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as DataAlgo, cudnnConvolutionBwdFilterAlgo_t as FilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t, cudnnMathType_t,
    cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};

/// The element types convolved here: f32, and bf16 and fp16 under autocast.
pub(crate) trait ConvType: CudnnDataType + CudaDType + DeviceRepr + Copy {
    const DTYPE: DType;
    const ONE: Self;
    const ZERO: Self;
}

impl ConvType for f32 {
    const DTYPE: DType = DType::F32;
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}

impl ConvType for half::bf16 {
    const DTYPE: DType = DType::BF16;
    const ONE: Self = half::bf16::ONE;
    const ZERO: Self = half::bf16::ZERO;
}

impl ConvType for half::f16 {
    const DTYPE: DType = DType::F16;
    const ONE: Self = half::f16::ONE;
    const ZERO: Self = half::f16::ZERO;
}

thread_local! {
    // cuDNN handles are neither Send nor Sync; the model runs on one thread per device.
    static CUDNN: RefCell<Option<Arc<Cudnn>>> = const { RefCell::new(None) };
}

fn cudnn(dev: &candle_core::CudaDevice) -> Result<Arc<Cudnn>> {
    CUDNN.with(|c| {
        if let Some(h) = c.borrow().as_ref() {
            return Ok(h.clone());
        }
        let h = wrap(Cudnn::new(dev.cuda_stream()))?;
        *c.borrow_mut() = Some(h.clone());
        Ok(h)
    })
}

/// Which pass, input dims, filter dims, padding, element type, TF32: what an algorithm choice
/// depends on.
type TuneKey = (
    &'static str,
    [usize; 4],
    [usize; 4],
    [usize; 2],
    DType,
    bool,
);

thread_local! {
    /// The chosen algorithm, as its position in the pass's list.
    static TUNED: RefCell<HashMap<TuneKey, usize>> = RefCell::new(HashMap::new());
}

/// Workspaces above this are not tried (cuDNN's FFT algorithms can ask for many GiB).
const MAX_WORKSPACE: usize = 2 << 30;

/// Run a pass with the fastest of `algos` for `key`: the first time, each algorithm cuDNN accepts
/// runs twice and the second run is timed (the first loads its kernels); the winner is cached.
fn run_tuned<A: Copy>(
    dev: &candle_core::CudaDevice,
    key: TuneKey,
    algos: &[A],
    workspace_size: impl Fn(A) -> std::result::Result<usize, CudnnError>,
    mut launch: impl FnMut(A, &mut CudaSlice<u8>) -> std::result::Result<(), CudnnError>,
) -> Result<()> {
    let cached = TUNED.with(|t| t.borrow().get(&key).copied());
    if let Some(i) = cached {
        let algo = algos[i];
        let mut ws = workspace(dev, wrap(workspace_size(algo))?)?;
        return wrap(launch(algo, &mut ws));
    }
    let stream = dev.cuda_stream();
    let sync = || {
        stream
            .synchronize()
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
    };
    let mut best: Option<(usize, Duration)> = None;
    for (i, &algo) in algos.iter().enumerate() {
        let Ok(bytes) = workspace_size(algo) else {
            continue;
        };
        if bytes > MAX_WORKSPACE {
            continue;
        }
        let mut ws = workspace(dev, bytes)?;
        if launch(algo, &mut ws).is_err() {
            continue;
        }
        sync()?;
        let started = Instant::now();
        if launch(algo, &mut ws).is_err() {
            continue;
        }
        sync()?;
        let took = started.elapsed();
        if best.is_none_or(|(_, b)| took < b) {
            best = Some((i, took));
        }
    }
    let Some((i, _)) = best else {
        candle_core::bail!("cuDNN ran no algorithm for the {} pass of {key:?}", key.0)
    };
    TUNED.with(|t| t.borrow_mut().insert(key, i));
    let algo = algos[i];
    // The output holds the last algorithm tried; write it with the chosen one.
    let mut ws = workspace(dev, wrap(workspace_size(algo))?)?;
    wrap(launch(algo, &mut ws))
}

const FWD_ALGOS: [FwdAlgo; 8] = [
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
];
const DATA_ALGOS: [DataAlgo; 6] = [
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
];
const FILTER_ALGOS: [FilterAlgo; 6] = [
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
];

fn wrap<T>(r: std::result::Result<T, CudnnError>) -> Result<T> {
    r.map_err(|e| candle_core::Error::Cuda(format!("cuDNN: {e:?}").into()))
}

fn dims4(l: &Layout) -> Result<[usize; 4]> {
    let d = l.dims();
    match d {
        [a, b, c, e] => Ok([*a, *b, *c, *e]),
        _ => candle_core::bail!("cuDNN convolution: expected 4 dims, got {d:?}"),
    }
}

pub(crate) fn view<'a, T: ConvType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("cuDNN convolution needs contiguous tensors"),
    }
}

/// The descriptors of one convolution: input x, filter w, output y, in `T`; the convolution
/// computes in f32 whatever `T` is.
struct Descriptors<T: ConvType> {
    tf32: bool,
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

fn descriptors<T: ConvType>(
    dev: &candle_core::CudaDevice,
    x: [usize; 4],
    w: [usize; 4],
    pad: [usize; 2],
) -> Result<Descriptors<T>> {
    let handle = cudnn(dev)?;
    let i = |d: [usize; 4]| d.map(|v| v as i32);
    let mut conv = wrap(handle.create_conv2d::<f32>(
        [pad[0] as i32, pad[1] as i32],
        [1, 1],
        [1, 1],
        cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    ))?;
    let tf32 = candle_core::cuda_backend::gemm_reduced_precision_f32();
    // Tensor cores for 16-bit types, and TF32 ones for f32 where allowed.
    let math = match tf32 || T::DTYPE != DType::F32 {
        true => cudnnMathType_t::CUDNN_DEFAULT_MATH,
        false => cudnnMathType_t::CUDNN_FMA_MATH,
    };
    wrap(conv.set_math_type(math))?;
    let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    Ok(Descriptors {
        conv,
        x: wrap(handle.create_4d_tensor::<T>(nchw, i(x)))?,
        w: wrap(handle.create_4d_filter::<T>(nchw, i(w)))?,
        y: wrap(handle.create_4d_tensor::<T>(nchw, i(out_dims(x, w, pad))))?,
        tf32,
    })
}

/// The output dims of the convolution of x with w (stride 1, dilation 1).
fn out_dims(x: [usize; 4], w: [usize; 4], pad: [usize; 2]) -> [usize; 4] {
    [
        x[0],
        w[0],
        x[2] + 2 * pad[0] + 1 - w[2],
        x[3] + 2 * pad[1] + 1 - w[3],
    ]
}

/// One cuDNN pass of the convolution of x with w, with its two inputs.
enum Pass<'a, T> {
    /// y from (x, w).
    Forward {
        x: CudaView<'a, T>,
        w: CudaView<'a, T>,
    },
    /// ∂L/∂x from (∂L/∂y, w).
    Data {
        dy: CudaView<'a, T>,
        w: CudaView<'a, T>,
    },
    /// ∂L/∂w from (x, ∂L/∂y).
    Filter {
        x: CudaView<'a, T>,
        dy: CudaView<'a, T>,
    },
}

/// Run `pass` for x of `x_dims` and w of `w_dims` with its tuned algorithm, into a new output
/// (y, ∂L/∂x or ∂L/∂w).
fn run_pass<T: ConvType>(
    dev: &candle_core::CudaDevice,
    pass: Pass<T>,
    x_dims: [usize; 4],
    w_dims: [usize; 4],
    pad: [usize; 2],
) -> Result<CudaSlice<T>> {
    let d = descriptors::<T>(dev, x_dims, w_dims, pad)?;
    let key = |name| (name, x_dims, w_dims, pad, T::DTYPE, d.tf32);
    let ones = (T::ONE, T::ZERO);
    // SAFETY (each launch): the views and outputs are contiguous NCHW buffers of `T` of the
    // descriptors' shapes, and cuDNN writes every output element (beta = 0).
    match pass {
        Pass::Forward { x, w } => {
            let mut y = output(dev, out_dims(x_dims, w_dims, pad))?;
            let op = ConvForward {
                conv: &d.conv,
                x: &d.x,
                w: &d.w,
                y: &d.y,
            };
            run_tuned(
                dev,
                key("forward"),
                &FWD_ALGOS,
                |a| op.get_workspace_size(a),
                |a, ws| unsafe { op.launch(a, Some(ws), ones, &x, &w, &mut y) },
            )?;
            Ok(y)
        }
        Pass::Data { dy, w } => {
            let mut dx = output(dev, x_dims)?;
            let op = ConvBackwardData {
                conv: &d.conv,
                dx: &d.x,
                w: &d.w,
                dy: &d.y,
            };
            run_tuned(
                dev,
                key("backward-data"),
                &DATA_ALGOS,
                |a| op.get_workspace_size(a),
                |a, ws| unsafe { op.launch(a, Some(ws), ones, &mut dx, &w, &dy) },
            )?;
            Ok(dx)
        }
        Pass::Filter { x, dy } => {
            let mut dw = output(dev, w_dims)?;
            let op = ConvBackwardFilter {
                conv: &d.conv,
                x: &d.x,
                dw: &d.w,
                dy: &d.y,
            };
            run_tuned(
                dev,
                key("backward-filter"),
                &FILTER_ALGOS,
                |a| op.get_workspace_size(a),
                |a, ws| unsafe { op.launch(a, Some(ws), ones, &x, &mut dw, &dy) },
            )?;
            Ok(dw)
        }
    }
}

fn workspace(dev: &candle_core::CudaDevice, bytes: usize) -> Result<CudaSlice<u8>> {
    // SAFETY: scratch memory cuDNN writes before it reads.
    Ok(unsafe { dev.alloc::<u8>(bytes.max(1))? })
}

fn output<T: ConvType>(dev: &candle_core::CudaDevice, dims: [usize; 4]) -> Result<CudaSlice<T>> {
    // SAFETY: cuDNN writes every element (beta = 0).
    Ok(unsafe { dev.alloc::<T>(dims.iter().product())? })
}

/// Which pass [`run`] makes of its two inputs.
#[derive(Clone, Copy)]
enum Kind {
    /// (x, w) → y.
    Forward,
    /// (∂L/∂y, w) → ∂L/∂x.
    Data,
    /// (x, ∂L/∂y) → ∂L/∂w.
    Filter,
}

/// A pass in its inputs' element type (both alike), into a new output of that type.
fn run(
    kind: Kind,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    x_dims: [usize; 4],
    w_dims: [usize; 4],
    pad: [usize; 2],
) -> Result<CudaStorage> {
    let dims = (x_dims, w_dims, pad);
    match (a.0.dtype(), b.0.dtype()) {
        (DType::F32, DType::F32) => run_in::<f32>(kind, a, b, dims),
        (DType::BF16, DType::BF16) => run_in::<half::bf16>(kind, a, b, dims),
        (DType::F16, DType::F16) => run_in::<half::f16>(kind, a, b, dims),
        (x, y) => {
            candle_core::bail!("cuDNN convolution of {x:?} and {y:?}: f32, bf16 or f16, both alike")
        }
    }
}

fn run_in<T: ConvType>(
    kind: Kind,
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    (x_dims, w_dims, pad): ([usize; 4], [usize; 4], [usize; 2]),
) -> Result<CudaStorage> {
    let (a_view, b_view) = (view::<T>(a, al)?, view::<T>(b, bl)?);
    let pass = match kind {
        Kind::Forward => Pass::Forward {
            x: a_view,
            w: b_view,
        },
        Kind::Data => Pass::Data {
            dy: a_view,
            w: b_view,
        },
        Kind::Filter => Pass::Filter {
            x: a_view,
            dy: b_view,
        },
    };
    let dev = a.device();
    let out = run_pass(dev, pass, x_dims, w_dims, pad)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// cuDNN's forward into a new output: (output, its dims).
pub(crate) fn forward(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    pad: [usize; 2],
) -> Result<(CudaStorage, [usize; 4])> {
    let (x_dims, w_dims) = (dims4(xl)?, dims4(wl)?);
    let y = run(Kind::Forward, (xs, xl), (ws, wl), x_dims, w_dims, pad)?;
    Ok((y, out_dims(x_dims, w_dims, pad)))
}

/// ∂L/∂x of the input of dims `x_dims` from (∂L/∂y, w).
pub(crate) fn backward_data(
    dys: &CudaStorage,
    dyl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    pad: [usize; 2],
    x_dims: [usize; 4],
) -> Result<CudaStorage> {
    run(Kind::Data, (dys, dyl), (ws, wl), x_dims, dims4(wl)?, pad)
}

/// ∂L/∂w of dims `w_dims` from (x, ∂L/∂y).
pub(crate) fn backward_filter(
    xs: &CudaStorage,
    xl: &Layout,
    dys: &CudaStorage,
    dyl: &Layout,
    pad: [usize; 2],
    w_dims: [usize; 4],
) -> Result<CudaStorage> {
    run(Kind::Filter, (xs, xl), (dys, dyl), dims4(xl)?, w_dims, pad)
}

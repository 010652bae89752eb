//! What the autograd graph holds and allocates, measured with a counting allocator.
//!
//! - Under autocast a forward keeps no more memory for its backward than in f32: the 16-bit casts
//!   and roundings live inside the ops (precision.rs), never in the graph. Measured as the bytes
//!   a forward leaves allocated while its output (and so its graph) is alive.
//! - A backward allocates the gradients its rules compute and nothing besides: the patched
//!   candle-core (vendor/README.md) stores the first gradient reaching a tensor instead of
//!   adding it into a fresh zero tensor.
//!
//! - Gradient checkpointing's forward keeps only the segments' outputs: a recorded hourglass
//!   holds a fraction of what the plain forward's graph holds.
//!
//! The tests take one lock, so nothing else in this binary allocates while one measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, Var};
use signal_diffusion_runtime::models::classifier::{Classifier, Transformer, TransformerShape};
use signal_diffusion_runtime::models::hourglass::{
    Hourglass, HourglassShape, LevelShape, SelfAttention,
};
use signal_diffusion_runtime::models::nn::{Activation, Mode, Params};
use signal_diffusion_runtime::models::tape::Tape;
use signal_diffusion_runtime::ops::precision::{matmul_add, Autocast};
use signal_diffusion_runtime::tasks::{TaskKind, TaskSpec};

struct Counting;

/// Bytes allocated and not yet freed.
static ALLOCATED: AtomicIsize = AtomicIsize::new(0);
/// Bytes ever allocated (reallocations count their growth).
static ALLOCATED_EVER: AtomicIsize = AtomicIsize::new(0);
static ONE_TEST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn count(bytes: isize) {
    ALLOCATED.fetch_add(bytes, Ordering::Relaxed);
    if bytes > 0 {
        ALLOCATED_EVER.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, size) };
        if !q.is_null() {
            count(size as isize - layout.size() as isize);
        }
        q
    }
}

/// How far `run` moves `counter`, the least of three runs (thread pools and caches allocate on
/// first use), measured while its result lives; and the last result.
fn least_of_three<T>(
    counter: &AtomicIsize,
    mut run: impl FnMut() -> Result<T>,
) -> Result<(isize, T)> {
    let mut least = isize::MAX;
    let mut last = None;
    for _ in 0..3 {
        let before = counter.load(Ordering::Relaxed);
        let out = run()?;
        least = least.min(counter.load(Ordering::Relaxed) - before);
        last = Some(out);
    }
    Ok((least, last.expect("three runs")))
}

/// Bytes `forward` leaves allocated while its output lives, under autocast `dtype`.
fn held_by(dtype: Option<DType>, forward: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    let (least, _) = least_of_three(&ALLOCATED, || {
        let _amp = Autocast::enter(dtype);
        forward()
    })?;
    Ok(least as f64)
}

#[test]
fn a_16_bit_forward_holds_no_more_memory_than_an_f32_one() -> Result<()> {
    let _alone = ONE_TEST_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    // Four linear layers through the product op (the GPU's path for linear layers and attention),
    // and the same with cast ops around Candle's products, as a control that the measure sees
    // 16-bit copies in the graph.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (256, 512), &dev)?)?;
    let layers = (0..4)
        .map(|_| {
            Ok((
                Var::from_tensor(&(Tensor::randn(0f32, 1.0, (512, 512), &dev)? / 22.6)?)?,
                Var::from_tensor(&Tensor::zeros(512, DType::F32, &dev)?)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let through_the_op = || {
        let mut h = x.as_tensor().clone();
        for (w, b) in &layers {
            h = matmul_add(&h, &w.as_tensor().t()?, b.as_tensor())?;
        }
        Ok(h)
    };
    let through_casts = || {
        let mut h = x.as_tensor().clone();
        for (w, b) in &layers {
            let low = |t: &Tensor| t.to_dtype(DType::BF16);
            h = low(&h)?
                .matmul(&low(&w.as_tensor().t()?)?)?
                .broadcast_add(&low(b.as_tensor())?)?
                .to_dtype(DType::F32)?;
        }
        Ok(h)
    };
    let f32_bytes = held_by(None, &through_the_op)?;
    eprintln!("held by four linear layers: f32 {f32_bytes}");
    // One (256, 512) f32 output per layer, and the graph's bookkeeping.
    let outputs = (4 * 256 * 512 * 4) as f64;
    assert!(
        (outputs..1.02 * outputs).contains(&f32_bytes),
        "four f32 linear layers hold {f32_bytes} bytes, not one output each ({outputs})"
    );
    let cast_bytes = held_by(None, &through_casts)?;
    assert!(
        cast_bytes > 1.15 * f32_bytes,
        "cast ops in the graph hold {cast_bytes} bytes, f32 {f32_bytes}"
    );
    for low in [DType::BF16, DType::F16] {
        let bytes = held_by(Some(low), &through_the_op)?;
        eprintln!("{low:?} {bytes}, cast ops {cast_bytes}");
        assert!(
            bytes <= 1.02 * f32_bytes,
            "{low:?} products hold {bytes} bytes against f32's {f32_bytes}"
        );
    }

    // A whole model whose attention is written as products around a softmax (nn.rs).
    let shape = TransformerShape {
        patch: 8,
        tokens: 64,
        token_dim: 64,
        hidden: 128,
        layers: 2,
        heads: 4,
        ff: 256,
        cls: true,
        embedding_dim: 16,
        activation: Activation::Gelu,
        dropout: 0.0,
    };
    let tasks = [TaskSpec {
        name: "gender",
        kind: TaskKind::Classification,
        outputs: 2,
        column: "gender",
        encoder: "gender",
    }];
    let mut p = Params::new(3, &dev);
    let model = Classifier::<Transformer>::new(&shape, &tasks, &mut p)?;
    let image = Tensor::randn(0f32, 1.0, (16, 1, 64, 64), &dev)?;
    let forward = || {
        let outs = model.forward(&image, &mut Mode::train(1))?;
        Tensor::cat(&outs, 1)
    };
    let f32_bytes = held_by(None, &forward)?;
    let bf16_bytes = held_by(Some(DType::BF16), &forward)?;
    eprintln!("held by the transformer: f32 {f32_bytes}, bf16 {bf16_bytes}");
    assert!(
        bf16_bytes <= 1.02 * f32_bytes,
        "the bf16 transformer holds {bf16_bytes} bytes against f32's {f32_bytes}"
    );
    Ok(())
}

#[test]
fn a_backward_allocates_only_the_gradients_it_computes() -> Result<()> {
    let _alone = ONE_TEST_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let n = 1 << 20;
    let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, n, &dev)? * 0.1)?)?;
    // Four gradient rules, each computing one (n) tensor: the sum's broadcast made contiguous,
    // the affine's scaled gradient, exp's product with its output, the first affine's again.
    let loss = ((x.as_tensor() * 2.0)?.exp()? + 1.0)?.sum_all()?;
    let (least, grads) = least_of_three(&ALLOCATED_EVER, || loss.backward())?;
    let rules = (4 * n * 4) as isize;
    eprintln!("a backward of four rules over {n} values allocated {least} bytes");
    // Candle 0.11.1 as published allocates a zero tensor and a sum besides each rule's result:
    // three times as much.
    assert!(
        (rules..rules + rules / 20).contains(&least),
        "the backward allocated {least} bytes, not the four rules' {rules}"
    );
    // d/dx Σ(exp(2x) + 1) = 2·exp(2x), to f32 rounding.
    let grad = grads.get(&x).expect("x has a gradient");
    let expected = ((x.as_tensor() * 2.0)?.exp()? * 2.0)?;
    let worst = (grad - expected)?.abs()?.max(0)?.to_scalar::<f32>()?;
    assert!(worst < 1e-6, "gradient off by {worst}");
    Ok(())
}

/// The hourglass forward recorded with checkpointing (models/tape.rs) holds less than a quarter
/// of what the plain forward keeps for its backward: each layer's attention scores, norms and
/// GEGLU halves are dropped, only the layers' outputs stay.
#[test]
fn a_checkpointed_forward_keeps_only_the_layer_outputs() -> Result<()> {
    let _alone = ONE_TEST_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let level = |width, attention| LevelShape {
        depth: 2,
        width,
        d_ff: 2 * width,
        attention,
        dropout: 0.1,
    };
    let shape = HourglassShape {
        in_channels: 3,
        out_channels: 3,
        patch: [2, 2],
        levels: vec![
            level(
                32,
                SelfAttention::Neighborhood {
                    d_head: 16,
                    kernel: 5,
                },
            ),
            level(64, SelfAttention::Global { d_head: 16 }),
        ],
        mapping_width: 32,
        mapping_depth: 1,
        mapping_d_ff: 64,
        class_rows: 0,
        mapping_cond_dim: 0,
        mapping_dropout: 0.0,
    };
    let mut p = Params::new(0, &dev);
    let model = Hourglass::new(&shape, &mut p)?;
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &dev)?;
    let sigma = Tensor::new(&[0.2f32, 0.4, 0.6, 0.8], &dev)?;
    let held = |checkpoint| -> Result<isize> {
        let (bytes, _tape) = least_of_three(&ALLOCATED, || {
            let mut tape = Tape::new(Some(1), checkpoint);
            model.record(&mut tape, &x, (&sigma, None, None))?;
            Ok(tape)
        })?;
        Ok(bytes)
    };
    let (plain, checkpointed) = (held(false)?, held(true)?);
    eprintln!("held by the hourglass forward: plain {plain}, checkpointed {checkpointed}");
    assert!(
        checkpointed * 4 < plain,
        "checkpointed {checkpointed} bytes, plain {plain}"
    );
    Ok(())
}

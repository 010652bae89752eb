//! Under autocast a forward keeps no more memory for its backward than in f32: the 16-bit casts
//! and roundings live inside the ops (precision.rs), never in the autograd graph. Measured with
//! a counting allocator as the bytes a forward leaves allocated while its output (and so its
//! graph) is alive. One test in this binary, so nothing else allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use signal_diffusion_runtime::models::{Classifier, Transformer, TransformerShape};
use signal_diffusion_runtime::nn::{Activation, Mode, Params};
use signal_diffusion_runtime::precision::{matmul_add, Autocast};
use signal_diffusion_runtime::tasks::{TaskKind, TaskSpec};

struct Counting;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

#[global_allocator]
static COUNTING: Counting = Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, size) };
        if !q.is_null() {
            ALLOCATED.fetch_add(size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

/// Bytes `forward` leaves allocated while its output lives, under autocast `dtype` (the least of
/// three runs: thread pools and caches allocate on first use).
fn held_by(dtype: Option<DType>, forward: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    let mut least = isize::MAX;
    for _ in 0..3 {
        let before = ALLOCATED.load(Ordering::Relaxed);
        let y = {
            let _amp = Autocast::enter(dtype);
            forward()?
        };
        least = least.min(ALLOCATED.load(Ordering::Relaxed) - before);
        drop(y);
    }
    Ok(least as f64)
}

#[test]
fn a_16_bit_forward_holds_no_more_memory_than_an_f32_one() -> Result<()> {
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

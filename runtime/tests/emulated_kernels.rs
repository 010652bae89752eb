//! The CUDA kernels of runtime/kernels run on the host, against our CPU ops: no GPU needed, so
//! this runs in every `cargo test`. The kernel sources are compiled as C++20 (`$CXX`, else `c++`)
//! with tests/emulate/cuda_host.h, which gives them CUDA's execution model on OS threads (see
//! there for what that can and cannot show), into a shared library called through libloading.
//! The GPU parity tests (tests/cuda.rs) check the same kernels on a real device.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Result, Tensor, Var};
use libloading::{Library, Symbol};
use signal_diffusion_config::cuda::{translation_unit, KernelSizes};
use signal_diffusion_runtime::ops::adaln::{gated_residual, modulate};

use crate::common::randn;

/// The kernels as a host library, built once per test run.
fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sizes = KernelSizes {
            norm: vec![],
            widths: vec![384],
            tokens: vec![1024],
            scan_states: vec![16],
            neighborhoods: vec![(8, 3)],
        };
        let tu = translation_unit(&root.join("kernels"), &sizes).unwrap();
        let emulate = root.join("tests/emulate");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emulated_kernels");
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("kernels.cpp");
        let text = format!(
            "#include \"{}\"\n{tu}\n#include \"{}\"\n",
            emulate.join("cuda_host.h").display(),
            emulate.join("exports.h").display()
        );
        std::fs::write(&source, text).unwrap();
        let lib = dir.join(format!("libkernels-{}.so", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-o"])
            .arg(&lib)
            .arg(&source)
            .output()
            .unwrap_or_else(|e| {
                panic!("these tests compile the CUDA kernels as C++20 with `{cxx}` ($CXX): {e}; install g++")
            });
        assert!(
            out.status.success(),
            "{cxx} failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: our library, whose initialisers only set up the emulator's globals.
        unsafe { Library::new(&lib) }.unwrap()
    })
}

/// The emulator's launch state is process-wide: one launch at a time.
fn launching() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a − b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let s = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    d / s.max(1e-30)
}

/// Per-sample sums of (B, chunks, d) partial rows.
fn sum_partials(p: &[f32], b: usize, chunks: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; b * d];
    for s in 0..b {
        for c in 0..chunks {
            for j in 0..d {
                out[s * d + j] += p[(s * chunks + c) * d + j];
            }
        }
    }
    out
}

/// Output and input gradients of `f` on the CPU ops, from Σ f·r.
fn cpu_reference(
    inputs: &[Tensor],
    r: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars.iter().map(|v| host(grads.get(v).unwrap())).collect();
    (host(&out), g)
}

const TOL: f64 = 1e-5;

#[test]
fn modulate_kernels_match_the_cpu_op() {
    let lib = library();
    type Fwd =
        unsafe extern "C" fn(i32, u32, *const f32, *const f32, *const f32, *mut f32, i32, i32, f32);
    type Bwd = unsafe extern "C" fn(
        i32,
        u32,
        u32,
        *const f32,
        *const f32,
        *const f32,
        *mut f32,
        i32,
        i32,
        f32,
    );
    // SAFETY: the signatures of tests/emulate/exports.h.
    let (fwd, bwd): (Symbol<Fwd>, Symbol<Bwd>) = unsafe {
        (
            lib.get(b"emu_modulate_fwd").unwrap(),
            lib.get(b"emu_modulate_bwd").unwrap(),
        )
    };
    let (b, n, eps) = (3usize, 19usize, 1e-6f32);
    // 384 has a specialised kernel (the header lists it), 24 goes through `_any`.
    for (d, specialised) in [(384usize, 1), (24, 0)] {
        let x = (randn(&[b, n, d], 2.0) + 0.5).unwrap();
        let (scale, shift) = (randn(&[b, d], 0.5), randn(&[b, d], 0.5));
        let r = randn(&[b, n, d], 1.0);
        let (want, grads) = cpu_reference(&[x.clone(), scale.clone(), shift.clone()], &r, |t| {
            modulate(&t[0], eps as f64, &t[2], &t[1])
        });
        let (xv, sv, hv, rv) = (host(&x), host(&scale), host(&shift), host(&r));
        let mut y = vec![0f32; b * n * d];
        let chunks = n.div_ceil(16);
        let mut packed = vec![0f32; b * n * d + 2 * b * chunks * d];
        {
            let _one = launching();
            // SAFETY: the buffers have the sizes the kernels index (cuda.rs's contract).
            unsafe {
                fwd(
                    specialised,
                    (b * n) as u32,
                    xv.as_ptr(),
                    sv.as_ptr(),
                    hv.as_ptr(),
                    y.as_mut_ptr(),
                    n as i32,
                    d as i32,
                    eps,
                );
                bwd(
                    specialised,
                    chunks as u32,
                    b as u32,
                    xv.as_ptr(),
                    sv.as_ptr(),
                    rv.as_ptr(),
                    packed.as_mut_ptr(),
                    n as i32,
                    d as i32,
                    eps,
                );
            }
        }
        let (dx, rest) = packed.split_at(b * n * d);
        let (ps, ph) = rest.split_at(b * chunks * d);
        let errs = [
            rel(&y, &want),
            rel(dx, &grads[0]),
            rel(&sum_partials(ps, b, chunks, d), &grads[1]),
            rel(&sum_partials(ph, b, chunks, d), &grads[2]),
        ];
        assert!(
            errs.iter().all(|e| *e < TOL),
            "d {d}: y, dx, dscale, dshift {errs:?}"
        );
    }
}

#[test]
fn gated_residual_kernels_match_the_cpu_op() {
    let lib = library();
    type Fwd = unsafe extern "C" fn(*const f32, *const f32, *const f32, *mut f32, i64, u32, u32);
    type Bwd =
        unsafe extern "C" fn(u32, u32, *const f32, *const f32, *const f32, *mut f32, i32, i32);
    // SAFETY: the signatures of tests/emulate/exports.h.
    let (fwd, bwd): (Symbol<Fwd>, Symbol<Bwd>) = unsafe {
        (
            lib.get(b"emu_gated_residual_fwd").unwrap(),
            lib.get(b"emu_gated_residual_bwd").unwrap(),
        )
    };
    let (b, n, d) = (3usize, 19usize, 24usize);
    let (x, y, gate, r) = (
        randn(&[b, n, d], 1.0),
        randn(&[b, n, d], 1.0),
        randn(&[b, d], 1.0),
        randn(&[b, n, d], 1.0),
    );
    let (want, grads) = cpu_reference(&[x.clone(), y.clone(), gate.clone()], &r, |t| {
        gated_residual(&t[0], &t[1], &t[2])
    });
    let (xv, yv, gv, rv) = (host(&x), host(&y), host(&gate), host(&r));
    let chunks = n.div_ceil(16);
    let mut out = vec![0f32; b * n * d];
    let mut packed = vec![0f32; b * n * d + b * chunks * d];
    {
        let _one = launching();
        // SAFETY: as above.
        unsafe {
            fwd(
                xv.as_ptr(),
                yv.as_ptr(),
                gv.as_ptr(),
                out.as_mut_ptr(),
                (b * n * d) as i64,
                n as u32,
                d as u32,
            );
            bwd(
                chunks as u32,
                b as u32,
                rv.as_ptr(),
                yv.as_ptr(),
                gv.as_ptr(),
                packed.as_mut_ptr(),
                n as i32,
                d as i32,
            );
        }
    }
    let (dy, partials) = packed.split_at(b * n * d);
    let errs = [
        rel(&out, &want),
        rel(dy, &grads[1]),
        rel(&sum_partials(partials, b, chunks, d), &grads[2]),
    ];
    assert!(errs.iter().all(|e| *e < TOL), "out, dy, dgate {errs:?}");
}

/// GELU-tanh with the linear layer's bias fused in, plain (a zero bias of width 1, as
/// ops::gelu::gelu_tanh launches it) and with a bias under no autocast, bf16 and fp16 (whose rounding
/// the kernel does itself), against the CPU op: the value and ∂L/∂z.
#[test]
fn gelu_tanh_kernels_match_the_cpu_op() {
    use candle_core::DType;
    use signal_diffusion_runtime::ops::precision::Autocast;
    let lib = library();
    type Gelu =
        unsafe extern "C" fn(i32, *const f32, *const f32, *const f32, *mut f32, i64, i32, i32);
    // SAFETY: the signature of tests/emulate/exports.h.
    let gelu: Symbol<Gelu> = unsafe { lib.get(b"emu_gelu_tanh").unwrap() };
    let (x, r) = (randn(&[7, 1000], 3.0), randn(&[7, 1000], 1.0));
    let zero = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let cases = [
        (zero, None, 0),
        (randn(&[1000], 1.0), None, 0),
        (randn(&[1000], 1.0), Some(DType::BF16), 1),
        (randn(&[1000], 1.0), Some(DType::F16), 2),
    ];
    for (bias, round, mode) in cases {
        let (want, grads) = cpu_reference(&[x.clone(), bias.clone()], &r, |t| {
            let _amp = Autocast::enter(round);
            signal_diffusion_runtime::ops::gelu::bias_gelu_tanh(&t[0], &t[1])
        });
        let (xv, bv, rv) = (host(&x), host(&bias), host(&r));
        let (mut y, mut dz) = (vec![0f32; xv.len()], vec![0f32; xv.len()]);
        {
            let _one = launching();
            let (n, width) = (xv.len() as i64, bv.len() as i32);
            // SAFETY: as above.
            unsafe {
                let (xp, bp) = (xv.as_ptr(), bv.as_ptr());
                gelu(0, xp, bp, std::ptr::null(), y.as_mut_ptr(), n, width, mode);
                gelu(1, xp, bp, rv.as_ptr(), dz.as_mut_ptr(), n, width, mode);
            }
        }
        let errs = [rel(&y, &want), rel(&dz, &grads[0])];
        assert!(errs.iter().all(|e| *e < TOL), "{round:?}: y, dz {errs:?}");
    }
}

/// The kernels' own rounding to bf16 and fp16 equals the `half` crate's casts there and back, on
/// random bit patterns and the edge cases: ties, subnormals, overflow, ±∞, NaN.
#[test]
fn kernel_rounding_equals_half_casts() {
    use rand::{Rng, SeedableRng};
    let lib = library();
    type Round = unsafe extern "C" fn(*const f32, *mut f32, i64, i32);
    // SAFETY: the signature of tests/emulate/exports.h.
    let round: Symbol<Round> = unsafe { lib.get(b"emu_round_16").unwrap() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut values: Vec<f32> = (0..200_000)
        .map(|_| f32::from_bits(rng.random::<u32>()))
        .collect();
    // fp16's range, densely: normals, subnormals, and exact ties of both.
    values.extend((0..100_000).map(|_| rng.random_range(-70000f32..70000.0)));
    values.extend((0..100_000).map(|_| rng.random_range(-1e-4f32..1e-4)));
    values.extend((0..2048u32).map(|m| f32::from_bits(0x3f80_0000 | (m << 12) | 0x1000)));
    values.extend((0..1024u32).map(|m| (m as f32 + 0.5) * 2f32.powi(-24)));
    values.extend([
        0.0,
        -0.0,
        65504.0,
        65519.996,
        65520.0,
        -65520.0,
        6.1035156e-5,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    type Cast = fn(f32) -> f32;
    let casts: [(i32, Cast); 2] = [
        (1, |x| half::bf16::from_f32(x).to_f32()),
        (2, |x| half::f16::from_f32(x).to_f32()),
    ];
    for (mode, cast) in casts {
        let mut ours = vec![0f32; values.len()];
        // SAFETY: as above; a host loop, no launch.
        unsafe {
            round(
                values.as_ptr(),
                ours.as_mut_ptr(),
                values.len() as i64,
                mode,
            )
        };
        for (&x, &got) in values.iter().zip(&ours) {
            let want = cast(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "mode {mode}: {x:e} ({:#x}) rounds to {got:e}, not {want:e}",
                x.to_bits()
            );
        }
    }
}

#[test]
fn softmax_kernels_match_the_cpu_op() {
    let lib = library();
    type Softmax = unsafe extern "C" fn(i32, i32, u32, *const f32, *const f32, *mut f32, i32);
    // SAFETY: the signature of tests/emulate/exports.h.
    let softmax: Symbol<Softmax> = unsafe { lib.get(b"emu_softmax_rows").unwrap() };
    for (len, specialised) in [(1024usize, 1), (257, 0)] {
        let rows = 2;
        let (s, r) = (randn(&[rows, len], 4.0), randn(&[rows, len], 1.0));
        let (want, grads) = cpu_reference(std::slice::from_ref(&s), &r, |t| {
            signal_diffusion_runtime::ops::attention::softmax_last(&t[0])
        });
        let (sv, rv) = (host(&s), host(&r));
        let (mut p, mut ds) = (vec![0f32; sv.len()], vec![0f32; sv.len()]);
        {
            let _one = launching();
            // SAFETY: as above.
            unsafe {
                softmax(
                    0,
                    specialised,
                    rows as u32,
                    sv.as_ptr(),
                    std::ptr::null(),
                    p.as_mut_ptr(),
                    len as i32,
                );
                softmax(
                    1,
                    specialised,
                    rows as u32,
                    p.as_ptr(),
                    rv.as_ptr(),
                    ds.as_mut_ptr(),
                    len as i32,
                );
            }
        }
        let errs = [rel(&p, &want), rel(&ds, &grads[0])];
        assert!(
            errs.iter().all(|e| *e < TOL),
            "rows of {len}: p, ds {errs:?}"
        );
    }
}

#[test]
fn weighted_mse_kernels_match_the_cpu_op() {
    let lib = library();
    type Fwd = unsafe extern "C" fn(u32, *const f32, *const f32, *const f32, *mut f32, i64);
    type Bwd = unsafe extern "C" fn(*const f32, *const f32, *const f32, *mut f32, i64, u64);
    // SAFETY: the signatures of tests/emulate/exports.h.
    let (fwd, bwd): (Symbol<Fwd>, Symbol<Bwd>) = unsafe {
        (
            lib.get(b"emu_weighted_mse_fwd").unwrap(),
            lib.get(b"emu_weighted_mse_bwd").unwrap(),
        )
    };
    let (b, m) = (3usize, 3 * 16 * 16);
    let (out, target) = (randn(&[b, 3, 16, 16], 1.0), randn(&[b, 3, 16, 16], 1.0));
    let w = Tensor::new(&[0.5f32, 2.0, 0.25], &Device::Cpu).unwrap();
    let r = Tensor::new(&[1.0f32, -3.0, 2.0], &Device::Cpu).unwrap();
    let (want, grads) = cpu_reference(std::slice::from_ref(&out), &r, |t| {
        signal_diffusion_runtime::ops::loss::weighted_mse(&t[0], &target, &w)
    });
    let (ov, tv, wv) = (host(&out), host(&target), host(&w));
    let wg: Vec<f32> = wv.iter().zip(host(&r)).map(|(a, b)| a * b).collect();
    let (mut per_sample, mut d_out) = (vec![0f32; b], vec![0f32; b * m]);
    {
        let _one = launching();
        // SAFETY: as above.
        unsafe {
            fwd(
                b as u32,
                ov.as_ptr(),
                tv.as_ptr(),
                wv.as_ptr(),
                per_sample.as_mut_ptr(),
                m as i64,
            );
            bwd(
                ov.as_ptr(),
                tv.as_ptr(),
                wg.as_ptr(),
                d_out.as_mut_ptr(),
                (b * m) as i64,
                m as u64,
            );
        }
    }
    let errs = [rel(&per_sample, &want), rel(&d_out, &grads[0])];
    assert!(errs.iter().all(|e| *e < TOL), "loss, d_out {errs:?}");
}

#[test]
fn ema_kernel_matches_the_cpu_update() {
    let lib = library();
    type Ema = unsafe extern "C" fn(*const u64, *const i32, u32, f32);
    // SAFETY: the signature of tests/emulate/exports.h.
    let ema_update: Symbol<Ema> = unsafe { lib.get(b"emu_ema_update").unwrap() };
    // Two tensors, one longer than a 65536-value chunk, laid out as cuda.rs's slot table.
    let mut emas = [host(&randn(&[70000], 1.0)), host(&randn(&[300], 1.0))];
    let params = [host(&randn(&[70000], 1.0)), host(&randn(&[300], 1.0))];
    let one_minus = 0.25f32;
    let want: Vec<Vec<f32>> = emas
        .iter()
        .zip(&params)
        .map(|(e, p)| {
            e.iter()
                .zip(p)
                .map(|(e, p)| e - (e - p) * one_minus)
                .collect()
        })
        .collect();
    let mut table = vec![];
    let mut chunks = vec![];
    for (i, (e, p)) in emas.iter_mut().zip(&params).enumerate() {
        table.extend([e.as_mut_ptr() as u64, p.as_ptr() as u64, e.len() as u64]);
        for c in 0..e.len().div_ceil(65536) {
            chunks.extend([i as i32, c as i32]);
        }
    }
    {
        let _one = launching();
        // SAFETY: the table holds live buffers of the stated lengths.
        unsafe {
            ema_update(
                table.as_ptr(),
                chunks.as_ptr(),
                (chunks.len() / 2) as u32,
                one_minus,
            )
        };
    }
    for (got, want) in emas.iter().zip(&want) {
        assert!(rel(got, want) < 1e-7, "{:.1e}", rel(got, want));
    }
}

/// The GroupNorm kernels, each sample cut into slices of 1, 2 and all 5 channels (an uneven last
/// slice among them), against the CPU op: y and every gradient within 1e-5.
#[test]
fn group_norm_kernels_match_the_cpu_op() {
    let lib = library();
    type Norm =
        unsafe extern "C" fn(i32, u32, *const f32, *const f32, *const f32, *mut f32, i32, i32, i32);
    // SAFETY: the signature of tests/emulate/exports.h.
    let norm: Symbol<Norm> = unsafe { lib.get(b"emu_group_norm").unwrap() };
    let (b, c, h, w) = (2usize, 5usize, 5usize, 7usize);
    let n = c * h * w;
    let x = (randn(&[b, c, h, w], 2.5) + 0.7).unwrap();
    let (wt, bias) = ((randn(&[c], 0.3) + 1.0).unwrap(), randn(&[c], 0.3));
    let r = randn(&[b, c, h, w], 1.0);
    let (want, grads) = cpu_reference(&[x.clone(), wt.clone(), bias.clone()], &r, |t| {
        signal_diffusion_runtime::ops::norm::group_norm(&t[0], &t[1], &t[2])
    });
    let (xv, wv, bv, rv) = (host(&x), host(&wt), host(&bias), host(&r));
    for per_slice in [1, 2, c] {
        let mut y = vec![0f32; b * n];
        let mut packed = vec![0f32; b * n + 2 * b * c];
        {
            let _one = launching();
            let (bb, cc, cps, nn) = (b as u32, c as i32, per_slice as i32, n as i32);
            // SAFETY: as above.
            unsafe {
                let (x, w) = (xv.as_ptr(), wv.as_ptr());
                norm(0, bb, x, w, bv.as_ptr(), y.as_mut_ptr(), cc, cps, nn);
                norm(1, bb, x, w, rv.as_ptr(), packed.as_mut_ptr(), cc, cps, nn);
            }
        }
        let (dx, rest) = packed.split_at(b * n);
        let (dw, db) = rest.split_at(b * c);
        let errs = [
            rel(&y, &want),
            rel(dx, &grads[0]),
            rel(&sum_partials(dw, 1, b, c), &grads[1]),
            rel(&sum_partials(db, 1, b, c), &grads[2]),
        ];
        let all = errs.iter().all(|e| *e < TOL);
        assert!(all, "{per_slice} channels a slice: y, dx, dw, db {errs:?}");
    }
}

/// One clipped AdamW step of the kernels against the CPU optimizer, the gradient norm (80) above
/// the clip limit (50): parameters within 1e-6.
#[test]
fn adam_kernels_match_the_cpu_optimizer() {
    use signal_diffusion_config::schema;
    use signal_diffusion_runtime::train::optim::Optimizer;
    let lib = library();
    type Adam = unsafe extern "C" fn(
        *const u64,
        *const i32,
        u32,
        *mut f64,
        f32,
        f32,
        f32,
        f32,
        f32,
        f32,
        f32,
        f32,
        i32,
    );
    // SAFETY: the signature of tests/emulate/exports.h.
    let adam: Symbol<Adam> = unsafe { lib.get(b"emu_adam").unwrap() };
    let cfg = schema::Optimizer {
        name: signal_diffusion_config::choice::OptimizerName::AdamW,
        learning_rate: 1e-2,
        weight_decay: 0.05,
        betas: [0.9, 0.999],
        eps: 1e-8,
        momentum: 0.9,
    };
    let init = [randn(&[70000], 1.0), randn(&[300], 1.0)];
    let grads = [randn(&[70000], 0.3), randn(&[300], 0.3)];
    let vars: Vec<(String, Var)> = init
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("p{i}"), Var::from_tensor(t).unwrap()))
        .collect();
    let mut opt = Optimizer::new(&cfg, vars.clone()).unwrap();
    let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
    for ((_, v), g) in vars.iter().zip(&grads) {
        loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    let mut store = loss.backward().unwrap();
    let norm = opt
        .step(&mut store, 1e-2, Some(50.0))
        .unwrap()
        .value()
        .unwrap();
    assert!(norm > 50.0, "the clip must act: norm {norm}");

    let mut params: Vec<Vec<f32>> = init.iter().map(host).collect();
    let gs: Vec<Vec<f32>> = grads.iter().map(host).collect();
    let mut ms: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.len()]).collect();
    let mut vs = ms.clone();
    let (mut table, mut chunks) = (vec![], vec![]);
    for (i, ((p, g), (m, v))) in params
        .iter_mut()
        .zip(&gs)
        .zip(ms.iter_mut().zip(vs.iter_mut()))
        .enumerate()
    {
        let n = p.len();
        table.extend([
            p.as_mut_ptr() as u64,
            g.as_ptr() as u64,
            m.as_mut_ptr() as u64,
            v.as_mut_ptr() as u64,
            n as u64,
        ]);
        for c in 0..n.div_ceil(65536) {
            chunks.extend([i as i32, c as i32]);
        }
    }
    let mut sq = 0f64;
    {
        let _one = launching();
        // SAFETY: the table holds live buffers of the stated lengths.
        unsafe {
            adam(
                table.as_ptr(),
                chunks.as_ptr(),
                (chunks.len() / 2) as u32,
                &mut sq,
                50.0,
                1e-2,
                0.9,
                0.999,
                1e-8,
                0.05,
                0.1,
                0.001,
                1,
            );
        }
    }
    assert!(
        (sq.sqrt() - norm).abs() < 1e-6 * norm,
        "norm {} vs {norm}",
        sq.sqrt()
    );
    for (got, (_, want)) in params.iter().zip(&vars) {
        let e = rel(got, &host(want.as_tensor()));
        assert!(e < 1e-6, "parameters differ by {e:.1e}");
    }
}

/// The counter-hash dropout kernel keeps exactly the CPU op's elements (p = 0.3), GELU (erf)
/// matches the CPU op forward and backward, and the convolution bias kernels add the bias and
/// sum its gradient per (sample, channel).
#[test]
fn dropout_gelu_and_bias_kernels_match_the_cpu() {
    let lib = library();
    type Dropout = unsafe extern "C" fn(*const f32, *mut f32, i64, u64, u32, f32);
    type Gelu = unsafe extern "C" fn(i32, *const f32, *const f32, *mut f32, i64);
    type BiasAdd = unsafe extern "C" fn(*mut f32, *const f32, i32, i64, i64);
    type ChannelSums = unsafe extern "C" fn(u32, *const f32, *mut f32, i64);
    // SAFETY: the signatures of tests/emulate/exports.h.
    let (dropout, gelu, bias_add, channel_sums): (
        Symbol<Dropout>,
        Symbol<Gelu>,
        Symbol<BiasAdd>,
        Symbol<ChannelSums>,
    ) = unsafe {
        (
            lib.get(b"emu_dropout").unwrap(),
            lib.get(b"emu_gelu").unwrap(),
            lib.get(b"emu_bias_add").unwrap(),
            lib.get(b"emu_channel_sums").unwrap(),
        )
    };
    let x = randn(&[7, 1000], 2.0);
    let r = randn(&[7, 1000], 1.0);
    let (xv, rv) = (host(&x), host(&r));
    let n = xv.len();
    let (seed, p) = (1234u64, 0.3f64);
    let want_drop = host(&signal_diffusion_runtime::ops::dropout::dropout(&x, p, seed).unwrap());
    let (want_gelu, grads) = cpu_reference(std::slice::from_ref(&x), &r, |t| {
        signal_diffusion_runtime::ops::gelu::gelu(&t[0])
    });
    let (b, c, hw) = (3usize, 5usize, 37usize);
    let y0 = randn(&[b, c, hw], 1.0);
    let bias = randn(&[c], 1.0);
    let want_biased = host(&y0.broadcast_add(&bias.reshape((c, 1)).unwrap()).unwrap());
    let want_sums = host(&y0.sum(2).unwrap());
    let mut dropped = vec![0f32; n];
    let (mut g, mut dg) = (vec![0f32; n], vec![0f32; n]);
    let mut biased = host(&y0);
    let mut sums = vec![0f32; b * c];
    {
        let _one = launching();
        let threshold = ((1.0 - p) * (1u64 << 24) as f64).round() as u32;
        // SAFETY: the buffers have the sizes the kernels index.
        unsafe {
            dropout(
                xv.as_ptr(),
                dropped.as_mut_ptr(),
                n as i64,
                seed,
                threshold,
                (1.0 / (1.0 - p)) as f32,
            );
            gelu(0, xv.as_ptr(), std::ptr::null(), g.as_mut_ptr(), n as i64);
            gelu(1, xv.as_ptr(), rv.as_ptr(), dg.as_mut_ptr(), n as i64);
            bias_add(
                biased.as_mut_ptr(),
                host(&bias).as_ptr(),
                c as i32,
                hw as i64,
                (b * c * hw) as i64,
            );
            let y0v = host(&y0);
            channel_sums((b * c) as u32, y0v.as_ptr(), sums.as_mut_ptr(), hw as i64);
        }
    }
    assert_eq!(dropped, want_drop, "dropout masks differ");
    let errs = [
        rel(&g, &want_gelu),
        rel(&dg, &grads[0]),
        rel(&biased, &want_biased),
        rel(&sums, &want_sums),
    ];
    assert!(
        errs.iter().all(|e| *e < TOL),
        "gelu, its gradient, bias, channel sums {errs:?}"
    );
}

/// The pooling kernels (pool.cu) against the CPU's fused ops: dropout + pooling forward and
/// backward keep exactly the CPU's numbers (the same mask, window sums in f64 in the same
/// order), with and without dropout (plain pooling), 2×2 and 1×2 windows, an odd height and
/// width (the dropped rows and columns get no gradient); with GELU first (the kernel's erff
/// against the CPU's polynomial erf) forward and the one-pass backward within 1e-5.
#[test]
fn dropout_pool_kernels_match_the_cpu() {
    use signal_diffusion_runtime::ops;
    let lib = library();
    type Pool = unsafe extern "C" fn(
        i32,
        *const f32,
        *const f32,
        *mut f32,
        i64,
        u64,
        u32,
        f32,
        i32,
        i32,
        i32,
        i32,
        i32,
    );
    // SAFETY: the signature of tests/emulate/exports.h.
    let pool: Symbol<Pool> = unsafe { lib.get(b"emu_dropout_pool").unwrap() };
    let (b, c, h, w) = (2usize, 3usize, 9usize, 11usize);
    let x = randn(&[b, c, h, w], 1.5);
    let xv = host(&x);
    let seed = 99u64;
    for (p, kh) in [(0.3, 2usize), (0.3, 1), (0.0, 2)] {
        let (ho, wo) = (h / kh, w / 2);
        let r = randn(&[b, c, ho, wo], 1.0);
        let rv = host(&r);
        let keep = 1.0 - p;
        let threshold = (keep * (1u64 << 24) as f64).round() as u32;
        let scale = (1.0 / keep) as f32;
        let (want, grads) = cpu_reference(std::slice::from_ref(&x), &r, |t| {
            ops::pool::dropout_avg_pool(&t[0], p, seed, kh, 2)
        });
        let (want_gelu, grads_gelu) = cpu_reference(std::slice::from_ref(&x), &r, |t| {
            ops::pool::gelu_dropout_avg_pool(&t[0], p, seed, kh, 2)
        });
        let n_out = b * c * ho * wo;
        let n_in = xv.len();
        let (mut y, mut y_gelu) = (vec![0f32; n_out], vec![0f32; n_out]);
        let (mut dx, mut dx_gelu) = (vec![0f32; n_in], vec![0f32; n_in]);
        {
            let _one = launching();
            let (hh, ww, kh) = (h as i32, w as i32, kh as i32);
            // SAFETY: the buffers have the sizes the kernels index.
            unsafe {
                let at = |backward: i32, input: &[f32], out: &mut [f32], g: i32| {
                    let n = out.len() as i64;
                    let (x, o) = (xv.as_ptr(), out.as_mut_ptr());
                    pool(
                        backward,
                        x,
                        input.as_ptr(),
                        o,
                        n,
                        seed,
                        threshold,
                        scale,
                        hh,
                        ww,
                        kh,
                        2,
                        g,
                    )
                };
                at(0, &xv, &mut y, 0);
                at(0, &xv, &mut y_gelu, 1);
                at(1, &rv, &mut dx, 0);
                at(1, &rv, &mut dx_gelu, 1);
            }
        }
        let case = format!("p {p}, window {kh}×2");
        assert_eq!(y, want, "{case}: forward");
        assert_eq!(dx, grads[0], "{case}: gradient");
        let errs = [rel(&y_gelu, &want_gelu), rel(&dx_gelu, &grads_gelu[0])];
        assert!(errs.iter().all(|e| *e < TOL), "{case}: with GELU {errs:?}");
    }
}

/// The selective scan's kernels (scan.cu: the state size the header lists, 16, and `_any` at 5)
/// against the CPU op, which equals mamba-ssm's reference (tests/selective_scan.rs): y and every
/// input's gradient, with and without the softplus, within 1e-5 relative (measured ≤ 3.3e-7). 40
/// channels per group make a full and a part-filled warp; 75 steps cross the 32-step tiles.
#[test]
fn selective_scan_kernels_match_the_cpu_op() {
    use signal_diffusion_runtime::ops::selective_scan::selective_scan;
    let lib = library();
    type Scan = unsafe extern "C" fn(
        i32,
        i32,
        *const f32,
        *const f32,
        *mut f32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
    );
    // SAFETY: the signature of tests/emulate/exports.h.
    let scan: Symbol<Scan> = unsafe { lib.get(b"emu_selective_scan").unwrap() };
    let (b, g, per_group, l) = (2usize, 3usize, 40usize, 75usize);
    let ch = g * per_group;
    for (n, specialised, softplus) in [(16usize, 1, true), (5, 0, true), (16, 1, false)] {
        // Without the softplus, positive steps (as mamba-ssm's tests): a negative δ grows the state.
        let (delta, bias) = match softplus {
            true => (randn(&[b, ch, l], 0.5), randn(&[ch], 0.2)),
            false => (
                randn(&[b, ch, l], 1.0)
                    .abs()
                    .unwrap()
                    .affine(0.1, 0.01)
                    .unwrap(),
                randn(&[ch], 0.05).abs().unwrap(),
            ),
        };
        let inputs = [
            randn(&[b, ch, l], 1.0),
            delta,
            randn(&[ch, n], 0.5).exp().unwrap().neg().unwrap(),
            randn(&[b, g, n, l], 1.0),
            randn(&[b, g, n, l], 1.0),
            randn(&[ch], 1.0),
            bias,
        ];
        let r = randn(&[b, ch, l], 1.0);
        let (want, grads) = cpu_reference(&inputs, &r, |t| {
            selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], softplus)
        });
        let packed: Vec<f32> = inputs.iter().flat_map(host).collect();
        let rv = host(&r);
        let mut y = vec![0f32; b * ch * l];
        let mut packed_grad = vec![f32::NAN; packed.len()];
        {
            let _one = launching();
            let ints = [b, ch, g, n, l].map(|v| v as i32);
            // SAFETY: the buffers have the sizes cuda.rs's selective scan gives them.
            unsafe {
                let [bi, ci, gi, ni, li] = ints;
                let sp = softplus as i32;
                let x = packed.as_ptr();
                scan(
                    0,
                    specialised,
                    x,
                    std::ptr::null(),
                    y.as_mut_ptr(),
                    bi,
                    ci,
                    gi,
                    ni,
                    li,
                    sp,
                );
                let g_out = packed_grad.as_mut_ptr();
                scan(
                    1,
                    specialised,
                    x,
                    rv.as_ptr(),
                    g_out,
                    bi,
                    ci,
                    gi,
                    ni,
                    li,
                    sp,
                );
            }
        }
        assert!(
            packed_grad.iter().all(|v| v.is_finite()),
            "N {n}: the backward left part of the packed gradient unwritten"
        );
        let mut errs = vec![("y", rel(&y, &want))];
        let mut at = 0;
        for (name, grad) in ["u", "delta", "A", "B", "C", "D", "bias"]
            .iter()
            .zip(&grads)
        {
            errs.push((name, rel(&packed_grad[at..at + grad.len()], grad)));
            at += grad.len();
        }
        assert!(
            errs.iter().all(|(_, e)| *e < TOL),
            "N {n}, softplus {softplus}: {errs:?}"
        );
    }
}

/// The neighbourhood-attention kernels (neighborhood.cu: heads of 8 with kernel 3 as the header
/// lists, and 6 with kernel 5 through `_any`) against the CPU op, which equals a naive gather
/// (tests/neighborhood.rs): the output and ∂q, ∂k, ∂v on a 9×11 grid (windows shifted at every
/// border), in f32 (within 1e-5 relative, measured ≤ 1.9e-7) and under bf16 autocast (operands
/// and results rounded as the CPU op rounds: measured equal, 1e-2 allowed for an f32 sum that
/// lands across a bf16 step).
#[test]
fn neighborhood_kernels_match_the_cpu_op() {
    use candle_core::DType;
    use signal_diffusion_runtime::ops::neighborhood::neighborhood_attention;
    use signal_diffusion_runtime::ops::precision::Autocast;
    let lib = library();
    type Na = unsafe extern "C" fn(
        i32,
        i32,
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        *mut f32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        f32,
        i32,
    );
    // SAFETY: the signature of tests/emulate/exports.h.
    let na: Symbol<Na> = unsafe { lib.get(b"emu_neighborhood").unwrap() };
    let (b, h, w, heads) = (2usize, 9usize, 11usize, 2usize);
    for (d, kernel, specialised, round) in [
        (8usize, 3usize, 1, None),
        (6, 5, 0, None),
        (8, 3, 1, Some(DType::BF16)),
    ] {
        let shape = [b, h, w, heads * d];
        let (q, k, v, r) = (
            randn(&shape, 1.0),
            randn(&shape, 1.0),
            randn(&shape, 1.0),
            randn(&shape, 1.0),
        );
        let scale = 0.4f32;
        let (want, grads) = cpu_reference(&[q.clone(), k.clone(), v.clone()], &r, |t| {
            let _amp = Autocast::enter(round);
            neighborhood_attention(&t[0], &t[1], &t[2], heads, kernel, scale as f64)
        });
        let (qv, kv, vv, rv) = (host(&q), host(&k), host(&v), host(&r));
        let len = qv.len();
        let mut o = vec![f32::NAN; len];
        let mut grad = vec![f32::NAN; 3 * len];
        let mode = match round {
            None => 0,
            _ => 1,
        };
        {
            let _one = launching();
            let dims = [b, h, w, heads, d, kernel].map(|x| x as i32);
            let [bi, hi, wi, ni, di, ki] = dims;
            let (qp, kp, vp) = (qv.as_ptr(), kv.as_ptr(), vv.as_ptr());
            // SAFETY: the buffers have the sizes cuda.rs's neighbourhood launches give them.
            unsafe {
                let nul = std::ptr::null();
                let s = specialised;
                na(
                    0,
                    s,
                    qp,
                    kp,
                    vp,
                    nul,
                    o.as_mut_ptr(),
                    bi,
                    hi,
                    wi,
                    ni,
                    di,
                    ki,
                    scale,
                    mode,
                );
                let g = grad.as_mut_ptr();
                na(
                    1,
                    s,
                    qp,
                    kp,
                    vp,
                    rv.as_ptr(),
                    g,
                    bi,
                    hi,
                    wi,
                    ni,
                    di,
                    ki,
                    scale,
                    mode,
                );
            }
        }
        assert!(
            o.iter().chain(&grad).all(|x| x.is_finite()),
            "d {d}, kernel {kernel}: a value left unwritten"
        );
        let errs = [
            rel(&o, &want),
            rel(&grad[..len], &grads[0]),
            rel(&grad[len..2 * len], &grads[1]),
            rel(&grad[2 * len..], &grads[2]),
        ];
        let tol = if round.is_some() { 1e-2 } else { TOL };
        assert!(
            errs.iter().all(|e| *e < tol),
            "d {d}, kernel {kernel}, {round:?}: o, dq, dk, dv {errs:?}"
        );
    }
}

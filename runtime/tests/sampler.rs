//! DPM-Solver++ 2M against diffusers' `DPMSolverMultistepScheduler` on the same model outputs
//! (fixtures/dpmpp_2m, written by its generate.py from diffusers 0.42.1): the grid, and the
//! sample after every step within 1e-5 (relative to the sample's largest value).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use signal_diffusion_config::choice::Objective;
use signal_diffusion_runtime::diffusion::path::Path as NoisePath;
use signal_diffusion_runtime::diffusion::sampler::{split_prediction, DpmSolver2M};

use crate::common::max_abs_diff;

fn fixture() -> HashMap<String, Tensor> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpmpp_2m/diffusers.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Runs our solver on the case's model outputs, checking the grid and every step's sample.
fn check(case: &str, path: NoisePath, objective: Objective, steps: usize) {
    let f = fixture();
    let get = |k: &str| f[&format!("{case}.{k}")].clone();
    let mut solver = DpmSolver2M::new(&path, steps);
    let timesteps: Vec<i64> = get("timesteps").to_vec1().unwrap();
    let sigmas: Vec<f32> = get("sigmas").to_vec1().unwrap();
    assert_eq!(solver.levels.len(), steps + 1);
    for (i, l) in solver.levels.iter().enumerate() {
        // diffusers' σ: the flow σ itself, or VP's √((1−ᾱ)/ᾱ) = s/a; f32 there.
        let sigma = match path {
            NoisePath::Flow { .. } => l.s,
            NoisePath::Vp { .. } => l.s / l.a,
        };
        let tol = 2e-6 * sigmas[i].abs().max(1.0) as f64;
        assert!(
            (sigma - sigmas[i] as f64).abs() < tol,
            "{case} σ[{i}] {sigma} vs {}",
            sigmas[i]
        );
        if i < steps {
            // The model's time: diffusers truncates σ·T to an integer, ours keeps it real.
            assert_eq!(l.t as i64, timesteps[i], "{case} timestep {i}");
        }
    }
    let outputs = get("outputs");
    let samples = get("samples");
    let mut x = get("x");
    for i in 0..steps {
        let l = solver.levels[i];
        let (x0, _) = split_prediction(objective, &outputs.get(i).unwrap(), &x, &l).unwrap();
        x = solver.step(i, x0, &x).unwrap();
        let expected = samples.get(i).unwrap();
        // Within 1e-5 of the sample's scale: the ε case's random outputs, taken as ε at
        // s/a = 157, drive its samples to |x| ≈ 500, where one f32 ulp is 6e-5 (both sides
        // compute in f32).
        let scale = max_abs_diff(&expected, &expected.zeros_like().unwrap()).max(1.0);
        let err = max_abs_diff(&x, &expected) / scale;
        assert!(
            err < 1e-5,
            "{case}: step {i} differs from diffusers by {err:e} of |x| ≤ {scale}"
        );
    }
    assert_eq!(x.dtype(), DType::F32);
}

#[test]
fn dpm_solver_2m_matches_diffusers_on_the_flow_path() {
    check("flow_v_8", NoisePath::flow(1000), Objective::VectorField, 8);
}

#[test]
fn dpm_solver_2m_matches_diffusers_on_the_vp_path_with_epsilon() {
    check(
        "vp_eps_10",
        NoisePath::vp_linear(1000),
        Objective::Epsilon,
        10,
    );
}

#[test]
fn dpm_solver_2m_matches_diffusers_on_the_vp_path_with_sample() {
    check(
        "vp_sample_20",
        NoisePath::vp_linear(1000),
        Objective::Sample,
        20,
    );
}

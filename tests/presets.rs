//! Every shipped preset compiles through `presets!()`: supported ones into a trainer module
//! whose model, built for real, has exactly the plan's parameter count; the others must fail
//! with nothing but the "not yet supported" gate (checked at expansion time).
signal_diffusion_macros::presets!();

//! `trainer!("config/….toml")` expands a config into the same generated trainer items that
//! build.rs writes for `SD_CONFIG`; an invalid config becomes a `compile_error!` carrying the
//! TOML location. `presets!()` compiles every shipped preset into a test, so `cargo test`
//! validates them all.
//!
//! Paths are relative to the directory of the source file that invokes the macro (like
//! `include_str!`), and so is the project root that bare `[settings].config` paths resolve
//! against: a config compiled by the macro reads the same files wherever the crate is built.

use std::path::{Path, PathBuf};

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use signal_diffusion_config::{self as config, settings::Env, Target};

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
}

fn caller_dir() -> PathBuf {
    proc_macro::Span::call_site()
        .local_file()
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .map(|d| {
            if d.is_absolute() {
                d
            } else {
                manifest_dir().join(d)
            }
        })
        .unwrap_or_else(manifest_dir)
}

/// In a CUDA build the macro has no nvcc step: the trainer compiles the kernels' translation
/// unit (runtime/kernels of the invoking package, with the config's shapes) with NVRTC.
fn cuda_kernels(r: &config::Resolved) -> Option<config::cuda::CudaBuild> {
    if !cfg!(feature = "cuda") {
        return None;
    }
    let sizes = config::cuda::KernelSizes::of(r.plan.as_ref()?);
    let text =
        config::cuda::translation_unit(&manifest_dir().join("runtime/kernels"), &sizes).ok()?;
    Some(config::cuda::CudaBuild {
        source: config::cuda::KernelText::Inline(text),
        ptx: vec![],
    })
}

fn error(msg: &str) -> TokenStream {
    quote! { compile_error!(#msg); }.into()
}

/// Expand a training config into trainer items (`run()`, `MODEL`, `TASKS`, shapes...).
#[proc_macro]
pub fn trainer(input: TokenStream) -> TokenStream {
    let lit: syn::LitStr = match syn::parse(input) {
        Ok(l) => l,
        Err(e) => return e.to_compile_error().into(),
    };
    let dir = caller_dir();
    let path = dir.join(lit.value());
    let mut env = Env::from_process(dir);
    env.settings_override = None;
    match config::resolve(
        &path,
        &env,
        Target {
            cuda: cfg!(feature = "cuda"),
        },
    ) {
        Ok(r) => {
            // include_str! makes cargo rebuild the invoking crate when any file of the config
            // chain changes; the macro itself runs only when the compiler asks again.
            let tracked = r.sources.paths().map(|p| p.display().to_string());
            let body = config::codegen::tokens(&r, cuda_kernels(&r).as_ref());
            quote! { #(const _: &str = include_str!(#tracked);)* #body }.into()
        }
        Err(e) => {
            // Show the path as the user wrote it, not the absolute one.
            let mut e = e;
            if let Some(f) = e.sources.files.first_mut() {
                if f.path.as_deref() == Some(path.as_path()) {
                    f.name = lit.value();
                }
            }
            error(&config::render(&e))
        }
    }
}

/// One test per shipped preset: trainer kinds this build supports expand into a module that
/// must type-check, whose model has the plan's parameter count and whose `config()` literal is
/// the resolved config; the rest must fail with nothing but the "not yet supported" error.
#[proc_macro]
pub fn presets(_input: TokenStream) -> TokenStream {
    let root = manifest_dir();
    // The latent-space presets find the SD 3.5 VAE's configuration in this Hugging Face cache.
    let mut env = Env::isolated(root.clone());
    env.hub_cache = Some(root.join("tests/fixtures/hub"));
    let mut items = vec![];
    for kind in ["classification", "diffusion"] {
        let dir = root.join("config").join(kind);
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) => return error(&format!("cannot list {}: {e}", dir.display())),
        };
        files.sort();
        for f in files {
            let rel = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
            let ident = format_ident!(
                "{}_{}",
                kind,
                f.file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .replace(['-', '.'], "_")
            );
            match config::resolve(Path::new(&rel), &env, Target::default()) {
                Ok(r) => {
                    let body = config::codegen::tokens(&r, cuda_kernels(&r).as_ref());
                    let test = format_ident!("{}_compiles", ident);
                    let built = match kind {
                        "classification" => {
                            quote! { ::signal_diffusion_runtime::count_classifier_parameters::<#ident::Model>(&#ident::MODEL, &#ident::TASKS) }
                        }
                        _ => {
                            quote! { ::signal_diffusion_runtime::count_denoiser_parameters(&#ident::MODEL) }
                        }
                    };
                    let json = r.config.to_json();
                    items.push(quote! {
                        #[allow(dead_code)]
                        mod #ident { #body }
                        #[test]
                        fn #test() {
                            let built = #built.unwrap();
                            assert_eq!(built as u64, #ident::PARAMETERS, "the model built differs from the shape plan");
                            // The typed literal of pipeline.rs states exactly what resolve() found.
                            let root = ::std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
                            assert_eq!(#ident::config(root).to_json(), #json, "config() differs from the resolved config");
                        }
                    });
                }
                Err(e) => {
                    let only_gate = e
                        .diagnostics
                        .errors()
                        .all(|d| d.message.starts_with("not yet supported"));
                    if !only_gate {
                        return error(&format!("preset {rel} is invalid:\n{}", config::render(&e)));
                    }
                }
            }
        }
    }
    quote! { #(#items)* }.into()
}

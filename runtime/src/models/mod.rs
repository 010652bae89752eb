//! The models, built from `ops` through the layers of `nn`: the classification backbones and
//! their multi-task heads (`classifier`), the diffusion transformer (`dit`), the hourglass
//! transformer (`hourglass`, whose skeleton `localmamba` shares), Stable Diffusion's denoisers
//! (`unet`: SD 1.5's UNet; `mmdit`: SD 3.5's MMDiT; equal to diffusers', not yet in the
//! trainer), LoRA's adapters on the linear layers of a pretrained model (`lora`), and the frozen
//! pretrained models: the VAE of latent space (`vae`) and the CLIP text encoders of captions
//! (`clip`, SD 3's pair of them too). A model is its shape struct (compile-time constants from
//! the generated trainer, or a pretrained config.json read at build time), a constructor taking
//! `nn::Params` (which names every tensor as the reference's or diffusers' `state_dict` does)
//! and a forward; it knows nothing of data, losses or loops. A new model family goes here, one
//! file, with its own ops in `ops/`.

pub mod classifier;
pub mod clip;
pub mod dit;
pub mod hourglass;
pub mod localmamba;
pub mod lora;
pub mod mmdit;
pub mod nn;
pub mod tape;
pub mod unet;
pub mod vae;

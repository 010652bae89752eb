//! The models, built from `ops` through the layers of `nn`: the classification backbones and
//! their multi-task heads (`classifier`), the diffusion transformer (`dit`) and the hourglass
//! transformer (`hourglass`, whose skeleton `localmamba` shares), LoRA's adapters on the linear
//! layers of a pretrained model (`lora`), and the frozen pretrained
//! models: the VAE of latent space (`vae`) and the CLIP text encoder of captions (`clip`). New model families (the
//! Stable Diffusion UNet and MMDiT) go here, one file each,
//! with their own ops in `ops/`. A model is its shape struct (compile-time constants from the
//! generated trainer), a constructor taking `nn::Params` (which names every tensor as the
//! reference's `state_dict` does) and a forward; it knows nothing of data, losses or loops.

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

"""Does diffusers load what our Stable Diffusion 1.5 LoRA run writes, and agree with it?

Run from the repository root with torch, diffusers and peft installed:
    python3 benches/sd15_lora_interop.py
It builds and runs our trainer on config/diffusion/sd15-lora-db-only-tiny.toml (LoRA on the
tiny random pipeline of tests/fixtures/sd15-tiny, 200 updates on the demo meta-dataset of
`sigdiff synth`), then:
  1. `UNet2DConditionModel.from_pretrained(final)` loads our merged UNet with no missing or
     unexpected key;
  2. `pipe.load_lora_weights(final/lora)` loads our adapters into the pipeline's UNet
     (`pytorch_lora_weights.safetensors`, diffusers' keys and LoRA config), every adapter key
     of the UNet present and none left over;
  3. the two give the same noise prediction on a random latent and caption (and not the
     pretrained UNet's: the adapters moved).
Our UNet equals diffusers' on the same weights by runtime/tests/unet.rs.
"""
import glob
import os
import subprocess

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
PIPE = "tests/fixtures/sd15-tiny"
PRESET = "config/diffusion/sd15-lora-db-only-tiny.toml"

if not os.path.exists("data/demo/meta"):
    subprocess.run(["cargo", "run", "--release", "--bin", "sigdiff", "--", "synth", "--overwrite"], check=True)
subprocess.run(["cargo", "build", "--release"], check=True, env={**os.environ, "SD_CONFIG": PRESET})
subprocess.run(["target/release/train-sd15-lora-db-only-tiny"], check=True)
final = sorted(glob.glob("runs/diffusion/sd15-lora-db-only-tiny-*/final"), key=os.path.getmtime)[-1]

merged, info = UNet2DConditionModel.from_pretrained(final, output_loading_info=True)
assert not any(info.values()), f"merged weights: {info}"
pipe = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None)
base = UNet2DConditionModel.from_pretrained(f"{PIPE}/unet")
pipe.load_lora_weights(f"{final}/lora")
adapter_keys = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
assert adapter_keys, "no adapter was loaded into the pipeline's UNet"

torch.manual_seed(0)
x = torch.randn(2, 4, 32, 32)
t = torch.tensor([50, 900])
with torch.no_grad():
    ids = pipe.tokenizer(["female", "a spectrogram image of a male subject"], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    a = pipe.unet.eval()(x, t, encoder_hidden_states=text).sample
    m = merged.eval()(x, t, encoder_hidden_states=text).sample
    b = base.eval()(x, t, encoder_hidden_states=text).sample
print(final)
print(f"{len(adapter_keys)} adapter tensors loaded by pipe.load_lora_weights")
print(f"adapters (diffusers) vs merged: max |diff| {float((a - m).abs().max()):.3e} of max |y| {float(a.abs().max()):.3f}")
print(f"adapted vs pretrained: max |diff| {float((a - b).abs().max()):.3e}")
assert float((a - m).abs().max()) < 1e-4 * float(a.abs().max())
assert float((a - b).abs().max()) > 1e-3
print("ok: diffusers loads the merged UNet and the adapters, and they agree")

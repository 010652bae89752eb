"""Does diffusers load what our Stable Diffusion 3.5 LoRA run writes, and agree with it?

Run from the repository root with torch, diffusers and peft installed:
    python3 benches/sd35_lora_interop.py
It builds and runs our trainer on config/diffusion/sd35-lora-db-only-tiny.toml (LoRA on the
tiny random pipeline of tests/fixtures/sd35-tiny, 200 updates on the demo meta-dataset of
`sigdiff synth`), then:
  1. `SD3Transformer2DModel.from_pretrained(final)` loads our merged transformer with no missing
     or unexpected key;
  2. `StableDiffusion3Pipeline.load_lora_weights(final/lora)` loads our adapters into the
     pipeline's transformer (`pytorch_lora_weights.safetensors`, `transformer.`-prefixed keys and
     LoRA config), every adapter of the transformer present;
  3. the two give the same velocity on a random latent and caption, conditioned as diffusers'
     pipeline conditions without T5 (`encode_prompt`: CLIP-L ‖ CLIP-G states, zeros for T5), and
     not the pretrained transformer's (the adapters moved).
Our MMDiT equals diffusers' on the same weights by runtime/tests/mmdit.rs, our text conditioning
diffusers' `encode_prompt` by runtime/tests/clip.rs.
"""
import glob
import os
import subprocess

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
PIPE = "tests/fixtures/sd35-tiny"
PRESET = "config/diffusion/sd35-lora-db-only-tiny.toml"

if not os.path.exists("data/demo/meta"):
    subprocess.run(["cargo", "run", "--release", "--bin", "sigdiff", "--", "synth", "--overwrite"], check=True)
subprocess.run(["cargo", "build", "--release"], check=True, env={**os.environ, "SD_CONFIG": PRESET})
subprocess.run(["target/release/train-sd35-lora-db-only-tiny"], check=True)
final = sorted(glob.glob("runs/diffusion/sd35-lora-db-only-tiny-*/final"), key=os.path.getmtime)[-1]

merged, info = SD3Transformer2DModel.from_pretrained(final, output_loading_info=True)
assert not any(info.values()), f"merged weights: {info}"
pipe = StableDiffusion3Pipeline.from_pretrained(PIPE, text_encoder_3=None, tokenizer_3=None)
base = SD3Transformer2DModel.from_pretrained(f"{PIPE}/transformer")
pipe.load_lora_weights(f"{final}/lora")
adapter_keys = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
assert adapter_keys, "no adapter was loaded into the pipeline's transformer"

torch.manual_seed(0)
x = torch.randn(2, 16, 16, 16)
t = torch.tensor([50.0, 900.0])
with torch.no_grad():
    text, _, pooled, _ = pipe.encode_prompt(
        ["female", "a spectrogram image of a male subject"], None, None,
        do_classifier_free_guidance=False, max_sequence_length=256)
    run = lambda m: m.eval()(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    a, m, b = run(pipe.transformer), run(merged), run(base)
print(final)
print(f"{len(adapter_keys)} adapter tensors loaded by pipe.load_lora_weights; text tokens {tuple(text.shape)}")
print(f"adapters (diffusers) vs merged: max |diff| {float((a - m).abs().max()):.3e} of max |y| {float(a.abs().max()):.3f}")
print(f"adapted vs pretrained: max |diff| {float((a - b).abs().max()):.3e}")
assert float((a - m).abs().max()) < 1e-4 * float(a.abs().max())
assert float((a - b).abs().max()) > 1e-3
print("ok: diffusers loads the merged transformer and the adapters, and they agree")

"""Do diffusers and peft load what our LoRA run writes, and agree with each other?

Run from the repository root with torch, diffusers and peft installed:
    python3 benches/lora_interop.py
It writes random weights of a small unconditional DiT in diffusers' layout
(target/lora_interop/base: the "pretrained" model), builds and runs our trainer on
benches/lora_interop.toml (rank-4 LoRA on to_q, to_k, to_v, to_out.0 and ff.net.2 with their
biases, 20 updates on the demo spectrograms of `sigdiff synth`), then:
  1. `DiTTransformer2DModel.from_pretrained(final)` loads our merged weights with no missing or
     unexpected key;
  2. `PeftModel.from_pretrained(base, final/lora)` loads our adapters with no unexpected key and
     every adapter key of the model present;
  3. the two give the same output on a random input (and not the base's: the adapters moved).
Our model equals diffusers + PEFT on the same weights by runtime/tests/lora.rs.
"""
import glob
import os
import subprocess

import torch
from diffusers import DiTTransformer2DModel
from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
OUT = "target/lora_interop"


def dit():
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                                 num_layers=2, patch_size=4, sample_size=32, num_embeds_ada_norm=1000)


torch.manual_seed(0)
dit().save_pretrained(f"{OUT}/base")
if not os.path.exists("data/demo/stfts"):
    subprocess.run(["cargo", "run", "--release", "--bin", "sigdiff", "--", "synth", "--overwrite"], check=True)
subprocess.run(["cargo", "build", "--release"], check=True, env={**os.environ, "SD_CONFIG": "benches/lora_interop.toml"})
subprocess.run(["target/release/train-lora_interop"], check=True)
final = sorted(glob.glob(f"{OUT}/runs/*/final"), key=os.path.getmtime)[-1]

merged, info = DiTTransformer2DModel.from_pretrained(final, output_loading_info=True)
assert not any(info.values()), f"merged weights: {info}"
base = DiTTransformer2DModel.from_pretrained(f"{OUT}/base")
adapted = PeftModel.from_pretrained(DiTTransformer2DModel.from_pretrained(f"{OUT}/base"), f"{final}/lora")
# The same adapters through the loader that reports keys.
check = get_peft_model(DiTTransformer2DModel.from_pretrained(f"{OUT}/base"), PeftConfig.from_pretrained(f"{final}/lora"))
result = set_peft_model_state_dict(check, load_file(f"{final}/lora/adapter_model.safetensors"))
assert not result.unexpected_keys, result.unexpected_keys
assert not [k for k in result.missing_keys if "lora_" in k], result.missing_keys
x = torch.randn(2, 3, 32, 32)
t = torch.tensor([50.0, 900.0])
y = torch.zeros(2, dtype=torch.long)
with torch.no_grad():
    a = adapted.eval()(x, timestep=t, class_labels=y).sample
    m = merged.eval()(x, timestep=t, class_labels=y).sample
    b = base.eval()(x, timestep=t, class_labels=y).sample
print(f"{final}")
print(f"adapters (peft) vs merged (diffusers): max |diff| {float((a - m).abs().max()):.3e} of max |y| {float(a.abs().max()):.3f}")
print(f"adapted vs base: max |diff| {float((a - b).abs().max()):.3e}")
assert float((a - m).abs().max()) < 1e-4 * float(a.abs().max())
assert float((a - b).abs().max()) > 1e-3
print("ok: diffusers loads the merged export, peft the adapters, and they agree")

"""Side-by-side CPU benchmark of one Stable Diffusion training step: ours vs diffusers + PEFT.

The SD 1.5 UNet and the SD 3.5 MMDiT at small sizes (the configs below, written as diffusers
config.json files under target/sd_bench/: SD 1.5's blocks at a quarter of its width with its
head sizes (2 heads: 40, 80, 160, 160 wide) and 10 channels per norm group, on 32×32 latents
with 77 text tokens; SD 3.5's blocks (dual attention in the first half, QK RMSNorm)
6 × 64 wide and 6 deep on 32×32 latents with 77 + 32 text tokens), random weights, batch 2:
forward, MSE against a random target, backward, clipped AdamW (lr 1e-4) on what trains, with
rank-16 LoRA on the attention projections (diffusers' SD LoRA scripts' targets; alpha 16) and as
a full fine-tune. Each side in its own process on --threads threads, one warm-up step then
--steps timed; --repeat alternating pairs (ours, theirs, ...); ours is
`cargo bench -p signal-diffusion-runtime --bench sd_lora_step` (its binary run directly, peak
RSS from /usr/bin/time), theirs this script's child (getrusage). Parameter counts are checked
equal.

usage: python3 benches/sd_lora_step.py [--steps 2] [--threads 2] [--repeat 3]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "sd_bench")
TEXT_TOKENS = {"unet": 77, "mmdit": 77 + 32}
CONFIGS = {
    "unet": dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[80, 160, 320, 320],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=768, attention_head_dim=2, norm_num_groups=8,
    ),
    "mmdit": dict(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6, attention_head_dim=64,
        num_attention_heads=6, joint_attention_dim=4096, caption_projection_dim=384, pooled_projection_dim=2048,
        pos_embed_max_size=64, dual_attention_layers=[0, 1, 2], qk_norm="rms_norm",
    ),
}
TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "mmdit": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


def child(kind, batch, rank, steps, threads):
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cls = UNet2DConditionModel if kind == "unet" else SD3Transformer2DModel
    model = cls(**CONFIGS[kind]).train()
    params = sum(p.numel() for p in model.parameters())
    if rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS[kind]))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    c = CONFIGS[kind]
    x = torch.randn(batch, c["in_channels"], c["sample_size"], c["sample_size"])
    t = torch.tensor([(37 + 311 * i) % 1000 for i in range(batch)], dtype=torch.float32)
    if kind == "unet":
        ctx = torch.randn(batch, TEXT_TOKENS[kind], c["cross_attention_dim"])
        forward = lambda: model(x, t, encoder_hidden_states=ctx).sample
    else:
        ctx = torch.randn(batch, TEXT_TOKENS[kind], c["joint_attention_dim"])
        pooled = torch.randn(batch, c["pooled_projection_dim"])
        forward = lambda: model(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    with torch.no_grad():
        target = torch.randn_like(forward())

    def step():
        loss = ((forward() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({"images_per_s": steps * batch / secs, "params": params,
                      "trained": sum(p.numel() for p in trained), "rss_gib": rss}))


def bench_binary():
    out = subprocess.run(
        ["cargo", "bench", "-p", "signal-diffusion-runtime", "--bench", "sd_lora_step", "--no-run",
         "--message-format=json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "sd_lora_step" and m.get("executable"):
            return m["executable"]
    raise SystemExit("no sd_lora_step bench binary")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--kinds", default="unet,mmdit", help="which models: unet, mmdit or both")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.batch, int(args.child[1]), args.steps, args.threads)
    binary = bench_binary()
    for kind, config in CONFIGS.items():
        os.makedirs(os.path.join(OUT, kind), exist_ok=True)
        with open(os.path.join(OUT, kind, "config.json"), "w") as f:
            json.dump(config, f)
    env = {"RAYON_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
    med = lambda v: sorted(v)[len(v) // 2]
    for kind in args.kinds.split(","):
        for rank in [16, 0]:
            rows = {"ours": ([], []), "theirs": ([], [])}
            ratios = []
            for _ in range(args.repeat if rank else 1):
                out = subprocess.run(
                    ["/usr/bin/time", "-f", "maxrss_kib %M", binary, kind, os.path.join(OUT, kind, "config.json"),
                     str(args.batch), str(rank), str(args.steps), str(TEXT_TOKENS[kind])],
                    capture_output=True, text=True, env=env, check=True)
                ours = json.loads(out.stdout.strip().splitlines()[-1])
                rss = int([l for l in out.stderr.splitlines() if l.startswith("maxrss_kib")][0].split()[1]) / 2**20
                theirs = json.loads(subprocess.run(
                    [sys.executable, __file__, "--child", kind, str(rank), "--steps", str(args.steps),
                     "--threads", str(args.threads), "--batch", str(args.batch)],
                    capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                assert ours["params"] == theirs["params"], (ours, theirs)
                rows["ours"][0].append(ours["images_per_s"]); rows["ours"][1].append(rss)
                rows["theirs"][0].append(theirs["images_per_s"]); rows["theirs"][1].append(theirs["rss_gib"])
                ratios.append(ours["images_per_s"] / theirs["images_per_s"])
            what = f"LoRA r {rank}" if rank else "full fine-tune"
            print(f"{kind} {what}: {ours['params']:,} parameters, {ours['trained']:,} trained (PEFT {theirs['trained']:,})")
            for side in ["ours", "theirs"]:
                ips, rss = rows[side]
                print(f"  {side:6} {', '.join(f'{v:.3f}' for v in ips)} images/s, peak RSS {max(rss):.2f} GiB")
            print(f"  ratio {med(ratios):.2f}x (pairs {', '.join(f'{r:.2f}' for r in ratios)}), memory "
                  f"{max(rows['ours'][1]) / max(rows['theirs'][1]):.2f}x")


if __name__ == "__main__":
    main()

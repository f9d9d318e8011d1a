"""Train the embedded tiny Stable Diffusion pipeline (boftvision/assets/tiny-sd) from scratch on
generated coloured shapes: first the VAE (reconstruction + a small KL), then the UNet (ε-prediction,
10 % empty captions for classifier-free guidance) under the frozen, randomly initialised CLIP text
encoder. Deterministic for a seed; writes the pipeline in diffusers' layout plus
boftvision_training.json (command, seed, steps, losses) and a sample grid.

    python train_scripts/train_tiny_sd.py --output_dir boftvision/assets/tiny-sd --overwrite_output_dir
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from boftvision.data.shapes import CLASS_PROMPT, COLOURS, SHAPES, WORDS, base_example, caption
from boftvision.files import write_text_atomic
from boftvision.integrations.diffusers import TINY, image_grid, pipeline_from_components, tiny_components
from boftvision.training import RENAMED, claim_output_dir, cosine_with_warmup, describe_flags, run_cli, seed_everything


def to_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])


def batch(rng: np.random.Generator, size: int, n: int) -> tuple[torch.Tensor, list[str]]:
    pairs = [base_example(rng, size) for _ in range(n)]
    return to_tensor([p[0] for p in pairs]), [p[1] for p in pairs]


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/tiny-sd",
                   help="the embedded copy is boftvision/assets/tiny-sd: replace it only on purpose "
                        "(make tiny-sd, which passes --overwrite_output_dir)")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--vae_steps", type=int, default=300, help="VAE training steps")
    p.add_argument("--vae_batch_size", type=int, default=16, help="VAE batch size")
    p.add_argument("--unet_steps", type=int, default=2000, help="UNet training steps")
    p.add_argument("--train_batch_size", "--batch_size", dest="batch_size", action=RENAMED, type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return describe_flags(p).parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    claim_output_dir(args.output_dir, args.overwrite_output_dir)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    parts = tiny_components(WORDS, args.seed)
    vae, unet, text_encoder, tokenizer, scheduler = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer",
                                                                        "scheduler"))
    text_encoder.requires_grad_(False).eval()
    size, log = TINY["image_size"], {"vae_loss": [], "unet_loss": []}
    start = time.time()

    optim = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate)
    for step in (bar := tqdm(range(args.vae_steps), desc="VAE")):
        x, _ = batch(rng, size, args.vae_batch_size)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        log["vae_loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = vae.encode(batch(rng, size, 256)[0]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))

    optim = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    schedule = cosine_with_warmup(optim, 100, args.unet_steps)
    for step in (bar := tqdm(range(args.unet_steps), desc="UNet")):
        x, captions = batch(rng, size, args.batch_size)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            cond = encode_text(tokenizer, text_encoder, captions)
        noise = torch.randn_like(z)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],))
        pred = unet(scheduler.add_noise(z, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optim.step()
        schedule.step()
        optim.zero_grad()
        log["unet_loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")

    out = Path(args.output_dir)
    pipe = pipeline_from_components(parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    every = lambda xs: [round(float(np.mean(xs[i:i + 100])), 4) for i in range(0, len(xs), 100)]
    card = {"command": "python train_scripts/train_tiny_sd.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
            "batch_size": args.batch_size, "vae_batch_size": args.vae_batch_size, "learning_rate": args.learning_rate,
            "minutes": round((time.time() - start) / 60, 1),
            "vae_loss_per_100": every(log["vae_loss"]), "unet_loss_per_100": every(log["unet_loss"]),
            "vocabulary": WORDS, "colours": list(COLOURS), "shapes": list(SHAPES), "torch": torch.__version__}
    write_text_atomic(out / "boftvision_training.json", json.dumps(card, indent=1))
    prompts = [caption(c, s) for s in SHAPES for c in COLOURS] + [CLASS_PROMPT] * 4
    images = pipe(prompts, num_inference_steps=25, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(args.seed)).images
    image_grid(images, cols=8).save(out / "samples.png")
    return card


if __name__ == "__main__":
    run_cli(main)

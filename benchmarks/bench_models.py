"""Training-step time and peak memory of real-size architectures (random weights, built from configs):
frozen base vs PEFT vs ours, printed as ratios, one run per model.

Models: Stable Diffusion 1.5's UNet (64×64 latents, attention targets), DINOv2-large (224×224, all
linear layers), a Llama-3.2-1B-shaped decoder (sequence 2048, all linear layers); ``--models sdxl``:
SDXL's UNet at 1024² (128×128 latents, added text/time conditions, attention targets). Base weights in
bf16, adapter parameters fp32 (both libraries), one step = forward + backward + AdamW. The input
(latents, pixels, token embeddings) requires grad, so the frozen base back-propagates through every
layer too. Also: merged-model inference against the base's, and the time to merge.

    python benchmarks/bench_models.py --models sd15 dinov2l llama1b            # on a GPU
    python benchmarks/bench_models.py --models tiny --device cpu --dtype fp32  # smoke run here
    python benchmarks/bench_models.py --lycoris --only "BOFT full" LyCORIS --json lycoris.json
    python benchmarks/bench_models.py --models sdxl --only "ours LoRA" "ours OFT" "ours BOFT m=2" --no-peft \
        --gradient_checkpointing --json sdxl.json

``--lycoris`` adds the full butterfly (b = 8), ours and lycoris-lora's (weight and bypass mode; LyCORIS
runs its fused Triton kernels on recent GPUs by itself, ``LYCORIS_KERNEL_BACKEND`` pins one). ``--json``
writes every row's numbers for reuse.

PEFT's BOFT silently runs with one butterfly factor when its CUDA extension does not build; the
"PEFT BOFT" row says which m it actually ran with.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import boftvision as bv
from boftvision.adapters import OrthogonalAdapter
from boftvision.inject import find_targets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DINO_TARGETS = (r".*\.(attention\.(q_proj|k_proj|v_proj|o_proj|attention\.(query|key|value)|output\.dense)"
                r"|mlp\.(fc1|fc2))")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- models: (module, make_inputs, loss) ------------------------------------------------------
def sd15_unet(batch: int, tiny: bool = False):
    from diffusers import UNet2DConditionModel

    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    else:  # SD 1.5: diffusers' defaults are its UNet except the text width
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim

    def inputs(device, dtype):
        return dict(sample=torch.randn(batch, 4, size, size, device=device, dtype=dtype).requires_grad_(True),
                    timestep=torch.randint(0, 1000, (batch,), device=device),
                    encoder_hidden_states=torch.randn(batch, 77, width, device=device, dtype=dtype))

    return unet, inputs, lambda m, i: m(**i).sample.float().square().mean(), UNET_TARGETS


def sdxl_unet(batch: int, tiny: bool = False):
    """SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json) at 1024² (128×128
    latents), with its added conditions: pooled text embeddings and the six time ids."""
    from diffusers import UNet2DConditionModel

    common = dict(addition_embed_type="text_time", addition_time_embed_dim=256 if not tiny else 8,
                  use_linear_projection=True, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
                                    projection_class_embeddings_input_dim=16 + 6 * 8, **common)
    else:
        common["down_block_types"] += ("CrossAttnDownBlock2D",)
        common["up_block_types"] = ("CrossAttnUpBlock2D", *common["up_block_types"])
        unet = UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                    cross_attention_dim=2048, projection_class_embeddings_input_dim=2816, **common)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim

    def inputs(device, dtype):
        pixels = size * 8  # original size, crop top-left (0, 0), target size
        time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device, dtype=dtype)
        return dict(sample=torch.randn(batch, 4, size, size, device=device, dtype=dtype).requires_grad_(True),
                    timestep=torch.randint(0, 1000, (batch,), device=device),
                    encoder_hidden_states=torch.randn(batch, 77, width, device=device, dtype=dtype),
                    added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                       "time_ids": time_ids})

    return unet, inputs, lambda m, i: m(**i).sample.float().square().mean(), UNET_TARGETS


def dinov2_large(batch: int, tiny: bool = False):
    from transformers import Dinov2Config, Dinov2Model

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256) if tiny else \
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    model = Dinov2Model(Dinov2Config(image_size=224, patch_size=14, **size))

    def inputs(device, dtype):
        return dict(pixel_values=torch.randn(batch, 3, 224, 224, device=device, dtype=dtype).requires_grad_(True))

    return model, inputs, lambda m, i: m(**i).last_hidden_state.float().square().mean(), DINO_TARGETS


def llama_1b(batch: int, tiny: bool = False, seq: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000) if tiny else \
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=seq, tie_word_embeddings=True, **size))
    vocab = model.config.vocab_size

    def inputs(device, dtype):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        return dict(inputs_embeds=embeds.to(dtype).requires_grad_(True), labels=ids)

    return model, inputs, lambda m, i: m(**i).loss, LLAMA_TARGETS


MODELS = {
    "sd15": lambda tiny: [("SD 1.5 UNet, batch 1", *sd15_unet(1, tiny)),
                          ("SD 1.5 UNet, batch 4", *sd15_unet(4, tiny))],
    "sdxl": lambda tiny: [("SDXL UNet 1024², batch 1", *sdxl_unet(1, tiny))],
    "dinov2l": lambda tiny: [("DINOv2-L, batch 64", *dinov2_large(64 if not tiny else 4, tiny))],
    "llama1b": lambda tiny: [("Llama 1B, seq 2048", *llama_1b(1, tiny, 2048 if not tiny else 64))],
}


# --- adapters ------------------------------------------------------------------------------------
def vector_length(model, targets) -> int:
    """Largest VB-LoRA sub-vector length (≤ 256) dividing every targeted width."""
    import math

    widths = [w for layer in find_targets(model, bv.LoRAConfig(target_modules=targets)).values()
              for w in layer.weight.shape[:2]]
    return math.gcd(256, *widths)


def our_configs(t, vlen=256):
    return {
        "ours LoRA r=16": bv.LoRAConfig(r=16, alpha=16, target_modules=t),
        "ours OFT b=16": bv.OFTConfig(block_size=16, target_modules=t),
        "ours BOFT m=2 b=8": bv.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=t),
        "ours BOFT m=4 b=4": bv.BOFTConfig(block_size=4, n_butterfly_factor=4, target_modules=t),
        "ours VB-LoRA": bv.VBLoRAConfig(r=4, num_vectors=256, vector_length=vlen, target_modules=t),
    }


def peft_configs(t):
    import peft

    return {
        "PEFT LoRA r=16": peft.LoraConfig(r=16, lora_alpha=16, target_modules=t),
        "PEFT OFT b=16": peft.OFTConfig(oft_block_size=16, r=0, target_modules=t),
        "PEFT BOFT m=2 b=8": peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=t),
    }


def peft_true_m(base, targets):
    """PEFT's BOFT with its requested m even without the CUDA extension (tests/peft_reference.py's
    patch: a torch block-diagonal stands in for the kernel); skipped when the extension built."""
    import peft.tuners.boft.layer as layer

    if layer.get_fbd_cuda():
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from peft_reference import peft_model

    return peft_model(base, peft_configs(targets)["PEFT BOFT m=2 b=8"])


def peft_boft_m(model) -> str:
    import peft.tuners.boft.layer as layer

    return "true m" if layer._FBD_CUDA else "ran with m=1: CUDA extension did not build"


# --- timing --------------------------------------------------------------------------------------
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model, inputs, loss_fn, device, dtype, iters, warmup, train=True):
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5) if params and train else None
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + iters):
        batch = inputs(device, dtype)
        sync(device)
        start = time.perf_counter()
        if train:
            loss_fn(model, batch).backward()
            if optim:
                optim.step()
                optim.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                loss_fn(model, batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times) * 1000, peak


def profile(model, inputs, loss_fn, device, dtype):
    """Top kernels of three training steps (self device time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        time_steps(model, inputs, loss_fn, device, dtype, iters=3, warmup=0)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15", "dinov2l", "llama1b"], choices=[*MODELS, "tiny"])
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the chosen models (`--models tiny`: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="row labels to run (substring match), besides the frozen base")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd ours (LoRA, BOFT m=2)")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--side", default="auto", choices=["auto", "input", "weight"],
                        help="pin the rotation side of our OFT/BOFT (default: chosen per layer by cost)")
    parser.add_argument("--profile", nargs="*", help="print a kernel profile of these rows (substring match)")
    parser.add_argument("--lycoris", action="store_true",
                        help="add the full-butterfly rows: ours and lycoris-lora's BOFT (weight and bypass mode)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute each block in the backward (diffusers' / transformers' own switch)")
    args = parser.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    OrthogonalAdapter.rotation_side = args.side
    tiny = args.tiny or "tiny" in args.models
    names = [n for n in args.models if n != "tiny"] or list(MODELS)
    warnings.simplefilter("ignore")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# device={gpu} dtype={args.dtype} torch={torch.__version__} iters={args.iters} (median) "
          f"rotation side={args.side} gradient checkpointing={args.gradient_checkpointing}", flush=True)
    lines, numbers = [], {}
    for key in names:
        for title, model, inputs, loss_fn, targets in MODELS[key](tiny):
            torch.manual_seed(0)
            base = model.to(device, dtype).requires_grad_(False).train()
            if args.gradient_checkpointing:  # adapted copies keep the switch
                (getattr(base, "enable_gradient_checkpointing", None) or base.gradient_checkpointing_enable)()
            frozen, frozen_peak = time_steps(base, inputs, loss_fn, device, dtype, args.iters, args.warmup)
            rows = [("frozen base", frozen, frozen_peak)]
            configs = our_configs(targets, vector_length(base, targets))
            builders = {k: (lambda c=c, base=base: bv.add_adapter(copy.deepcopy(base), c)) for k, c in configs.items()}
            if not args.no_peft:
                import peft

                builders.update({k: (lambda c=c, base=base: peft.get_peft_model(copy.deepcopy(base), c))
                                 for k, c in peft_configs(targets).items()})
                builders["PEFT BOFT m=2 b=8, true m forced"] = lambda base=base: peft_true_m(base, targets)
            if args.lycoris:
                from bench_layers import with_lycoris  # this script's folder is on sys.path

                full = bv.BOFTConfig(block_size=8, n_butterfly_factor=0, target_modules=targets)
                builders["ours BOFT full b=8"] = lambda full=full, base=base: bv.add_adapter(copy.deepcopy(base), full)
                for mode, bypass in (("weight mode", False), ("bypass mode", True)):
                    builders[f"LyCORIS BOFT full b=8 ({mode})"] = \
                        lambda bypass=bypass, base=base, targets=targets: with_lycoris(base, targets, bypass)
            if args.compile:
                for k in ("ours LoRA r=16", "ours BOFT m=2 b=8"):
                    builders[k + " compiled"] = lambda k=k: torch.compile(builders[k]())
            for label, build in builders.items():
                if args.only and not any(o in label for o in args.only):
                    continue
                model = build()
                if model is None:
                    continue
                model = model.to(device).train()
                if label == "PEFT BOFT m=2 b=8":
                    label += f" ({peft_boft_m(model)})"
                ms, peak = time_steps(model, inputs, loss_fn, device, dtype, args.iters, args.warmup)
                rows.append((label, ms, peak))
                if args.profile and any(p in label for p in args.profile):
                    profile(model, inputs, loss_fn, device, dtype)
                print(f"  {title} | {label}: {ms:.1f} ms, {peak:.2f} GiB", flush=True)
                del model
                free(device)
            lora = dict((r[0], r[1]) for r in rows).get("ours LoRA r=16", float("nan"))
            peft_boft = next((r[1] for r in rows if r[0].startswith("PEFT BOFT")), float("nan"))
            # merged inference equals the base's; time to merge
            merged = bv.add_adapter(copy.deepcopy(base), our_configs(targets)["ours BOFT m=2 b=8"]).eval()
            sync(device)
            start = time.perf_counter()
            bv.merge_adapter(merged)
            sync(device)
            merge_ms = (time.perf_counter() - start) * 1000
            base_inf, _ = time_steps(base.eval(), inputs, loss_fn, device, dtype, args.iters, args.warmup, train=False)
            merged_inf, _ = time_steps(merged, inputs, loss_fn, device, dtype, args.iters, args.warmup, train=False)
            del merged
            free(device)
            lines.append(f"\n### {title}\n\n"
                         "| variant | step ms | × frozen | × ours LoRA | PEFT BOFT ÷ this | peak GiB |")
            lines.append("|---|---|---|---|---|---|")
            for label, ms, peak in rows:
                lines.append(f"| {label} | {ms:.1f} | {ms / frozen:.2f} | {ms / lora:.2f} | {peft_boft / ms:.2f} "
                             f"| {peak:.2f} |")
            lines.append(f"| base inference (no grad) | {base_inf:.1f} | | | | |")
            lines.append(f"| ours BOFT m=2 b=8 merged, inference (merge took {merge_ms:.0f} ms) | {merged_inf:.1f} | "
                         f"{merged_inf / base_inf:.2f} × base inference | | | |")
            print("\n".join(lines[-(len(rows) + 5):]), flush=True)
            numbers[title] = {label: {"step_ms": ms, "x_frozen": ms / frozen,
                                      "peak_gib": None if peak != peak else peak}  # NaN off CUDA: null
                              for label, ms, peak in rows}
            numbers[title]["base inference"] = {"step_ms": base_inf}
            numbers[title]["ours BOFT m=2 b=8 merged, inference"] = {"step_ms": merged_inf, "merge_ms": merge_ms}
            del base
            free(device)
    print("\n## Summary\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "dtype": args.dtype, "torch": torch.__version__,
                                               "iters": args.iters, "rotation_side": args.side,
                                               "models": numbers}, indent=1))


if __name__ == "__main__":
    main()

"""The embedded tiny Stable Diffusion pipeline's architecture: a small VAE, UNet and CLIP text encoder
with a word-level BPE tokenizer, built from configs (random weights; trained by
``train_scripts/train_tiny_sd.py``)."""
from __future__ import annotations

import torch

TINY = {"image_size": 32, "latent_channels": 4, "width": 32, "text_width": 32, "max_length": 20}
# the text encoder is drawn with this many positions and then given the rest (see tiny_components)
DRAWN_POSITIONS = 16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (base symbols of the BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def build_clip_tokenizer(words: list[str], max_length: int):
    """A CLIP BPE tokenizer with merges learned word by word from ``words``; any other text still
    tokenizes (into byte-level pieces), as with CLIP's own vocabulary.

    Merges are ranked in the order they are learned, and BPE applies the best-ranked one first, so an
    earlier word's merge can split a later word: "r e" (from "red") leaves "green" as g·re·e·n, and the
    longest caption, "a photo of a green triangle", takes 17 tokens (``TINY["max_length"]`` leaves room
    for it). These multi-token spellings are kept on purpose: the embedded pipeline's frozen random text
    encoder tells the colours and shapes apart by them. A retrain with every word as one token (a merge
    order that cannot split later words) followed the 12 colour × shape prompts on 35 % of 16 seeds
    against 84–88 % with these pieces (measured with ``eval_dreambooth.py``'s shape scores); a single-token
    vocabulary needs a trained or wider text encoder first."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            if merged not in vocab:
                vocab.append(merged)
            symbols = [merged, *symbols[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=max_length)


def add_positions(text_encoder, positions: int, seed: int) -> None:
    """Extend a CLIP text encoder's position embeddings to ``positions``; the new rows are drawn as CLIP
    initialises them, from a generator of their own (the global random stream is left as it was)."""
    embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings  # transformers 4 nests it
    old = embeddings.position_embedding.weight.data
    std = 0.02 * text_encoder.config.initializer_factor
    extra = torch.randn(positions - old.shape[0], old.shape[1], generator=torch.Generator().manual_seed(seed)) * std
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(torch.cat([old, extra]), freeze=False)
    embeddings.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)
    text_encoder.config.max_position_embeddings = positions


def tiny_components(words: list[str], seed: int = 0) -> dict:
    """Untrained components of the embedded pipeline: VAE (32 px → 4×16×16 latents), UNet with
    cross-attention at both resolutions (width 32/64), 2-layer CLIP text encoder, tokenizer, DDPM.

    The frozen random text encoder is what the UNet learns to read, and how well it tells the prompts
    apart depends on its draw: it is drawn with ``DRAWN_POSITIONS`` (16) positions and then given the
    others by :func:`add_positions`, so that it and every later weight keep the draw of the first
    embedded pipeline (16 positions), whose base model drew its 12 colour × shape prompts right in 88 %
    of 16 seeds (84 % after the retrain with 20 positions); drawing all 20 positions at once shifted
    every later draw, and that retrain came out at 66 % (``train_scripts/eval_dreambooth.py``'s shape
    scores)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    t = TINY
    tokenizer = build_clip_tokenizer(words, t["max_length"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=t["text_width"], intermediate_size=2 * t["text_width"],
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=DRAWN_POSITIONS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=t["text_width"]))
    add_positions(text_encoder, t["max_length"], seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=t["latent_channels"],
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                        sample_size=t["image_size"])
    unet = UNet2DConditionModel(
        sample_size=t["image_size"] // 2, in_channels=t["latent_channels"], out_channels=t["latent_channels"],
        block_out_channels=(t["width"], 2 * t["width"]), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=t["text_width"], attention_head_dim=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def pipeline_from_components(components: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # steps_offset=1 is what StableDiffusionPipeline sets itself (with a deprecation warning) otherwise
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                   tokenizer=components["tokenizer"], unet=components["unet"], scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

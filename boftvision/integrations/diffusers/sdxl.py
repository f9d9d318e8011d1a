"""Stable Diffusion XL: what training needs beyond SD 1.x — two tokenizers and text encoders (the
penultimate hidden states of both, concatenated, plus the second one's pooled projection) and the
UNet's added conditions (pooled text embedding and ``time_ids``: original size, crop top-left, target
size), computed as diffusers' ``train_dreambooth_lora_sdxl.py`` computes them. Tiny SDXL components for
tests are built here too.
"""
from __future__ import annotations

import torch
from torch import nn


def is_sdxl(pipe) -> bool:
    """An SDXL pipeline: a second text encoder and a UNet with "text_time" added conditions."""
    return getattr(pipe, "text_encoder_2", None) is not None and \
        getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


class SDXLTokenizers:
    """Both tokenizers behind the one-tokenizer interface the datasets use: ``input_ids`` of a
    padded call are stacked (2, L) — row 0 for text encoder 1, row 1 for text encoder 2."""

    def __init__(self, tokenizer, tokenizer_2):
        self.tokenizers = (tokenizer, tokenizer_2)
        self.eos_token_id = tokenizer.eos_token_id

    @property
    def model_max_length(self) -> int:
        return min(t.model_max_length for t in self.tokenizers)

    @model_max_length.setter
    def model_max_length(self, value: int) -> None:
        for t in self.tokenizers:
            t.model_max_length = value

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizers[0].decode(ids, **kwargs)

    def __call__(self, prompt, **kwargs):
        first = self.tokenizers[0](prompt, **kwargs)
        if kwargs.get("return_tensors") != "pt":
            return first  # unpadded ids, for the length check
        kwargs["max_length"] = self.model_max_length
        second = self.tokenizers[1](prompt, **kwargs)
        first["input_ids"] = torch.stack([first.input_ids, second.input_ids], dim=1)  # (B, 2, L)
        return first


def add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
                 batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per example, (B, 6)."""
    row = torch.tensor([[*original_size, *crop_top_left, *target_size]], device=device, dtype=dtype)
    return row.expand(batch, 6)


class SDXLTextEncoder(nn.Module):
    """``ids (B, 2, L) → (context, added_cond_kwargs)`` from both text encoders: the conditioning the
    SDXL UNet takes (what ``denoising_loss`` passes on). ``time_ids`` as one fixed row (the training
    images are resized and center-cropped or cropped at ``crop_top_left``)."""

    def __init__(self, text_encoder, text_encoder_2, size: int, crop_top_left: tuple[int, int] = (0, 0)):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.size, self.crop_top_left = size, crop_top_left

    def forward(self, ids: torch.Tensor):
        first = self.text_encoder(ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(ids[:, 1], output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds if hasattr(second, "text_embeds") else second[0]
        time_ids = add_time_ids((self.size, self.size), self.crop_top_left, (self.size, self.size), ids.shape[0],
                                context.device, context.dtype)
        return context, {"text_embeds": pooled, "time_ids": time_ids}


def tiny_sdxl_components(tokenizer, seed: int = 0) -> dict:
    """An untrained tiny SDXL: two 2-layer CLIP text encoders (the second with a projection), a UNet
    with "text_time" added conditions, the tiny SD VAE, Euler scheduler; ``tokenizer`` serves both."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **text))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        norm_num_groups=16, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        transformer_layers_per_block=1, use_linear_projection=True)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer,
            "tokenizer_2": tokenizer, "unet": unet, "scheduler": scheduler}

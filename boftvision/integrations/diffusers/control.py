"""Control signals for controllable generation (ControlNet-style, BOFT paper §5): a light encoder whose
features are added after the UNet's ``conv_in``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...sharding import full_tensor, rank, unwrap


class ControlEncoder(torch.nn.Module):
    """The light control-signal encoder: conv + SiLU stages, each stage a 3×3 conv then a stride-2
    3×3 conv, down to the latent resolution, then a zero-initialised conv to the UNet's first feature
    width (``conv_in``'s output). Its output is added to ``conv_in``'s output, so at initialisation the
    UNet is unchanged; 8 convolutions for SD's ×8 VAE (PEFT's BOFT ControlNet example), 4 for ×2."""

    def __init__(self, out_channels: int, downsamples: int, in_channels: int = 3,
                 channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        widths = channels[:downsamples + 1]
        if len(widths) != downsamples + 1:
            raise ValueError(f"{downsamples} downsamplings need {downsamples + 1} channel widths, got {channels}")
        self.config = {"out_channels": out_channels, "downsamples": downsamples, "in_channels": in_channels,
                       "channels": list(channels)}
        layers = [torch.nn.Conv2d(in_channels, widths[0], 3, padding=1), torch.nn.SiLU()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Conv2d(a, a, 3, padding=1), torch.nn.SiLU(),
                       torch.nn.Conv2d(a, b, 3, padding=1, stride=2), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.out = torch.nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(control))

    @classmethod
    def for_unet(cls, unet, vae_scale_factor: int) -> "ControlEncoder":
        import math

        return cls(unet.config.block_out_channels[0], int(math.log2(vae_scale_factor)))

    def save(self, folder: str | Path) -> None:
        """Every process of a sharded run calls it (FSDP2's shards are gathered; under FSDP1 call it inside
        the prepared whole's ``full_parameters``); process 0 writes."""
        from safetensors.torch import save_file

        tensors = {k: full_tensor(v) for k, v in self.state_dict(keep_vars=True).items()}  # ZeRO-3: parameters
        if rank() != 0:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "control_encoder.safetensors")
        (folder / "control_encoder.json").write_text(json.dumps(self.config, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "ControlEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "control_encoder.json").is_file():
            raise FileNotFoundError(f"{folder} has no control_encoder.json: give the output_dir of "
                                    "train_controlnet_boft.py")
        encoder = cls(**json.loads((folder / "control_encoder.json").read_text()))
        encoder.load_state_dict(load_file(folder / "control_encoder.safetensors"))
        return encoder


class control_signal:  # a context manager, used like a function
    """``with control_signal(unet, features): unet(...)`` adds ``features`` (B, C, h, w) to the output of
    ``unet.conv_in`` on every call inside the block, repeated over the batch when the pipeline doubles
    it for classifier-free guidance. Where the features enter: after the UNet's first convolution, the
    point ControlNet's own hint enters its copy of the encoder — the cheapest place that every later
    block (and every adapted attention layer) sees."""

    def __init__(self, unet, features: torch.Tensor):
        self.unet, self.features, self.handle = unet, features, None

    def _add(self, module, args, output):
        features = self.features.to(output.dtype)
        if output.shape[0] != features.shape[0]:
            features = features.repeat(output.shape[0] // features.shape[0], 1, 1, 1)
        return output + features

    def __enter__(self):
        self.handle = unwrap(self.unet).conv_in.register_forward_hook(self._add)  # DDP's: on the UNet inside
        return self

    def __exit__(self, *exc):
        self.handle.remove()

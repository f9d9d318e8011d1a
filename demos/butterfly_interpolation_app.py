"""Gradio demo of butterfly weight interpolation (BOFT paper, Fig. 10).

A trained BOFT adapter's butterfly components are set to identity one at a time: the slider picks how
many (0 = the fine-tuned model, m = every component identity, "base" = also the output scale reset),
and the gallery shows the whole path from the fine-tuned model to the base model. Every image starts
from the same noise. Defaults: the embedded tiny pipeline and its bundled "sks shape" adapter.

    python demos/butterfly_interpolation_app.py [--model PATH] [--adapter DIR] [--port 7860]
"""
from __future__ import annotations

import argparse

import gradio as gr
import torch
from PIL import Image

from boftvision.generate import generate, interpolation_path, path_length, set_identity_components
from boftvision.integrations.diffusers import EMBEDDED, EMBEDDED_ADAPTER, attach_adapters, load_pipeline

_PIPELINES: dict[tuple[str, str], object] = {}  # (model, adapter) → pipeline, loaded once


def pipeline(model: str, adapter: str):
    key = (model, adapter)
    if key not in _PIPELINES:
        _PIPELINES.clear()  # one pipeline in memory at a time
        pipe = load_pipeline(model, device="cuda" if torch.cuda.is_available() else "cpu")
        attach_adapters(pipe, adapter)
        if path_length(pipe) == 0:
            raise gr.Error(f"{adapter} holds no BOFT/OFT adapter: interpolation needs butterfly components")
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def image_at(model: str, adapter: str, prompt: str, seed: int, steps: int, n_identity: int):
    """The image with ``n_identity`` components set to I (above m: the base model)."""
    pipe = pipeline(model, adapter)
    m = path_length(pipe)
    try:
        set_identity_components(pipe, min(int(n_identity), m), reset_scale=int(n_identity) > m)
        image = generate(pipe, prompt, int(seed), int(steps))[0]
    finally:
        set_identity_components(pipe, 0)
    label = "fine-tuned" if n_identity == 0 else "base model" if n_identity > m else f"{int(n_identity)}/{m} components → I"
    return image.resize((256, 256), Image.NEAREST), label


def path_gallery(model: str, adapter: str, prompt: str, seed: int, steps: int):
    path = interpolation_path(pipeline(model, adapter), prompt, int(seed), int(steps))
    return [(image.resize((256, 256), Image.NEAREST), label) for label, image in path]


def build(model: str = str(EMBEDDED), adapter: str = str(EMBEDDED_ADAPTER)) -> gr.Blocks:
    m = path_length(pipeline(model, adapter))
    with gr.Blocks(title="BOFT butterfly interpolation") as demo:
        gr.Markdown("# Butterfly weight interpolation\nSet butterfly components of a trained BOFT adapter to "
                    f"identity one by one. Slider: 0 = fine-tuned, {m} = all {m} components identity, "
                    f"{m + 1} = base model (output scale reset too).")
        with gr.Row():
            model_box = gr.Textbox(model, label="model (diffusers folder or hub id)")
            adapter_box = gr.Textbox(adapter, label="adapter directory")
        with gr.Row():
            prompt = gr.Textbox("a photo of sks shape", label="prompt")
            seed = gr.Number(0, label="seed", precision=0)
            steps = gr.Slider(2, 50, value=20, step=1, label="denoising steps")
        slider = gr.Slider(0, m + 1, value=0, step=1, label="butterfly components set to identity",
                           elem_id="components")
        with gr.Row():
            image = gr.Image(label="image", elem_id="result", type="pil", height=256)
            label = gr.Textbox(label="model along the path", elem_id="stage")
        gallery = gr.Gallery(label="the whole path: fine-tuned → base", columns=m + 2, height=300)
        inputs = [model_box, adapter_box, prompt, seed, steps]
        run = gr.Button("Generate path", elem_id="generate")
        slider.change(image_at, inputs + [slider], [image, label])
        run.click(image_at, inputs + [slider], [image, label]).then(path_gallery, inputs, gallery)
        demo.load(image_at, inputs + [slider], [image, label]).then(path_gallery, inputs, gallery)
    return demo


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED))
    parser.add_argument("--adapter", default=str(EMBEDDED_ADAPTER))
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    args = parser.parse_args()
    build(args.model, args.adapter).launch(server_port=args.port, share=args.share)

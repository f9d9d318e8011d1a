"""Gradio demo of butterfly weight interpolation (BOFT paper, Fig. 10).

A trained BOFT adapter's butterfly components are set to identity one at a time: the slider picks how
many (0 = the fine-tuned model, m = every component identity, "base" = also the output scale reset),
and the gallery shows the whole path from the fine-tuned model to the base model. Every image starts
from the same noise. Defaults: the embedded tiny pipeline and its bundled "sks shape" adapter.

The page serves only the models and adapters the app was started with (repeat
--pretrained_model_name_or_path / --adapter_path to offer several): visitors pick them by folder name
from a list, never type a path or a hub id, and errors reach them without server paths (the details go
to the server's log).

    python demos/butterfly_interpolation_app.py [--pretrained_model_name_or_path PATH ...] \
        [--adapter_path DIR ...] [--port 7860]
"""
from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from boftvision.generate import generate, interpolation_path, path_length, set_identity_components
from boftvision.integrations.diffusers import EMBEDDED, EMBEDDED_ADAPTER, attach_adapters, load_pipeline
from boftvision.training import RENAMED_APPEND

log = logging.getLogger(__name__)
_PIPELINES: dict[tuple[str, str], object] = {}  # (model, adapter) → pipeline, loaded once
# one generation at a time: the image and the path gallery are separate events that Gradio runs in
# parallel, and both set components to identity on the one pipeline (and SDXL's Euler scheduler keeps a
# step counter): without the lock they would draw with each other's settings
_GENERATING = threading.Lock()
MODELS: dict[str, str] = {}  # label shown on the page → model path or hub id (set by build)
ADAPTERS: dict[str, str] = {}  # label → adapter folder


def labelled(paths: list[str]) -> dict[str, str]:
    """Label each path by its last component (numbered when two share one): the page shows labels only."""
    out = {}
    for path in paths:
        name = Path(path).name or "model"
        out[name if name not in out else f"{name} ({len(out) + 1})"] = path
    return out


def pipeline(model_label: str, adapter_label: str):
    """The pipeline for two labels from the start-up lists; anything else is refused."""
    if model_label not in MODELS or adapter_label not in ADAPTERS:
        raise gr.Error("unknown model or adapter: pick one from the lists")
    key = (MODELS[model_label], ADAPTERS[adapter_label])
    if key not in _PIPELINES:
        _PIPELINES.clear()  # one pipeline in memory at a time
        try:
            pipe = load_pipeline(key[0], device="cuda" if torch.cuda.is_available() else "cpu")
            attach_adapters(pipe, key[1])
        except Exception as err:  # the details (paths) stay in the server's log
            log.exception("loading %s + %s failed", *key)
            raise gr.Error(f"could not load {model_label} with {adapter_label} ({type(err).__name__}); "
                           "see the server's log") from None
        if path_length(pipe) == 0:
            raise gr.Error(f"{adapter_label} holds no BOFT/OFT adapter: interpolation needs butterfly components")
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def checked_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise gr.Error("type a prompt first (e.g. \"a photo of sks shape\")")
    return prompt.strip()


def image_at(model: str, adapter: str, prompt: str, seed: int, steps: int, n_identity: int,
             progress=gr.Progress()):
    """The image with ``n_identity`` components set to I (above m: the base model)."""
    prompt = checked_prompt(prompt)
    pipe = pipeline(model, adapter)
    m = path_length(pipe)
    with _GENERATING:
        try:
            set_identity_components(pipe, min(int(n_identity), m), reset_scale=int(n_identity) > m)
            image = generate(pipe, prompt, int(seed), int(steps),
                             on_step=lambda i: progress((i, int(steps)), desc="denoising"))[0]
        finally:
            set_identity_components(pipe, 0)
    label = ("fine-tuned" if n_identity == 0 else "base model" if n_identity > m
             else f"{int(n_identity)}/{m} components → I")
    return image.resize((256, 256), Image.NEAREST), label


def path_gallery(model: str, adapter: str, prompt: str, seed: int, steps: int, progress=gr.Progress()):
    prompt = checked_prompt(prompt)
    pipe = pipeline(model, adapter)
    with _GENERATING:
        path = interpolation_path(pipe, prompt, int(seed), int(steps),
                                  on_step=lambda done, total: progress((done, total), desc="the path"))
    return [(image.resize((256, 256), Image.NEAREST), label) for label, image in path]


def build(models: str | list[str] = str(EMBEDDED), adapters: str | list[str] = str(EMBEDDED_ADAPTER)) -> gr.Blocks:
    """The app over the given models and adapters (paths or hub ids, the first of each shown first)."""
    MODELS.clear(), ADAPTERS.clear()
    MODELS.update(labelled([models] if isinstance(models, str) else list(models)))
    ADAPTERS.update(labelled([adapters] if isinstance(adapters, str) else list(adapters)))
    model, adapter = next(iter(MODELS)), next(iter(ADAPTERS))
    m = path_length(pipeline(model, adapter))
    with gr.Blocks(title="BOFT butterfly interpolation") as demo:
        gr.Markdown("# Butterfly weight interpolation\nSet butterfly components of a trained BOFT adapter to "
                    f"identity one by one. Slider: 0 = fine-tuned, {m} = all {m} components identity, "
                    f"{m + 1} = base model (output scale reset too).")
        with gr.Row():
            model_box = gr.Dropdown(list(MODELS), value=model, label="model")
            adapter_box = gr.Dropdown(list(ADAPTERS), value=adapter, label="adapter")
        with gr.Row():
            prompt = gr.Textbox("a photo of sks shape", label="prompt", elem_id="prompt")
            seed = gr.Number(0, label="seed", precision=0)
            steps = gr.Slider(2, 50, value=20, step=1, label="denoising steps")
        slider = gr.Slider(0, m + 1, value=0, step=1, label="butterfly components set to identity",
                           elem_id="components")
        run = gr.Button("Generate path", elem_id="generate", variant="primary")
        with gr.Row():
            image = gr.Image(label="image", elem_id="result", type="pil", height=256)
            label = gr.Textbox(label="model along the path", elem_id="stage")
        gallery = gr.Gallery(label="the whole path: fine-tuned → base", columns=m + 2, height=300)
        inputs = [model_box, adapter_box, prompt, seed, steps]
        slider.change(image_at, inputs + [slider], [image, label])
        run.click(image_at, inputs + [slider], [image, label]).success(path_gallery, inputs, gallery)
        demo.load(image_at, inputs + [slider], [image, label]).success(path_gallery, inputs, gallery)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", "--model", dest="model", action=RENAMED_APPEND,
                        help="a diffusers folder or hub id; repeat to offer several (default: the embedded tiny "
                             "pipeline)")
    parser.add_argument("--adapter_path", "--adapter", dest="adapter", action=RENAMED_APPEND,
                        help="an adapter folder or LyCORIS file; repeat to offer several (default: the bundled "
                             "sks-shape adapter)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public link: anyone with it can use this server")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    logging.basicConfig(level=logging.INFO)
    build(args.model or [str(EMBEDDED)], args.adapter or [str(EMBEDDED_ADAPTER)]).launch(
        server_port=args.port, share=args.share, show_error=True)

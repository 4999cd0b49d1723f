# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv/ and install the pins first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean-demo

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) utils/make_demo_base.py --out demo/base-qwen-image
	$(PY) utils/make_demo_dataset.py --out demo/dataset --concept
	$(PY) utils/validate_dataset.py --path demo/dataset --img_size 64
	rm -rf demo/output
	$(ACCELERATE) train.py --config train_configs/demo_qwen_image.yaml
	$(PY) inference.py --model_name demo/base-qwen-image --lora_weights demo/output \
		--prompt "a zkz star on a white background" --true_cfg_scale 1 \
		--width 64 --height 64 --num_inference_steps 20 --seed 0 --output_image demo/sample.png
	$(PY) utils/demo_before_after.py --model demo/base-qwen-image --lora demo/output --data demo/dataset --out demo/before_after.png
	@echo
	@echo "demo done:"
	@echo "  base model      demo/base-qwen-image/ (tiny Qwen-Image that draws shapes; built once, reused)"
	@echo "  dataset         demo/dataset/ (4 pictures of a new concept, trigger word zkz)"
	@echo "  LoRA            demo/output/pytorch_lora_weights.safetensors (+ checkpoints in demo/output/checkpoint-*)"
	@echo "  loss per step   demo/output/train_log.jsonl, loss_curve.png, training_summary.json"
	@echo "  tensorboard     tensorboard --logdir demo/output/logs"
	@echo "  before / after  demo/before_after.png (same prompts and seeds, base vs LoRA)"
	@echo "  sample image    demo/sample.png"

test: setup
	$(PY) -m pytest -q --durations=15 tests

clean-demo:
	rm -rf demo

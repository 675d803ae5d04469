# Two commands: `make train` (set-up, then train + evaluate DAB-DETR on the embedded dataset) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUTPUT ?= output/synthetic
PYTEST_ARGS ?=

.PHONY: setup train test test-fast clean
setup:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh

train: setup
	$(PY) tools/train_net.py --config-file configs/dn_dab_detr_synthetic.py --num-gpus 0 \
	    train.output_dir=$(OUTPUT)
	$(PY) tools/plot_metrics.py $(OUTPUT)/metrics.json --output $(OUTPUT)/learning_curve.png
	$(PY) tools/demo.py --config-file configs/dn_dab_detr_synthetic.py --dataset dab_synthetic_val --num-images 8 --confidence-threshold 0.4 \
	    --output $(OUTPUT)/predictions train.init_checkpoint=$(OUTPUT)/model_final.pth

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) output .pytest_cache

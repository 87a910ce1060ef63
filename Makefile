# mimkit: `make demo` and `make test` each do the whole set-up first (idempotent, quick when done).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MIMKIT := $(VENV)/bin/mimkit
READY := $(VENV)/.ready
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_DIR ?= runs/demo

.PHONY: setup data test test-full demo lint bench wheelhouse clean

setup: $(READY)

$(READY): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "mimkit needs Python >= 3.10 (found $$($(PYTHON) --version)); set PYTHON=python3.x"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(READY)

# Fashion-MNIST: the Debian package when we may install it, otherwise torchvision's download into mimkit's cache.
data: $(READY)
	@if [ ! -f $(FMNIST_SYSTEM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "apt-get could not install dataset-fashion-mnist; falling back to a download"; \
	fi
	@$(MIMKIT) data fetch fashion-mnist

test: data
	$(PY) -m pytest -q

# Every ImageNet recipe at its real shapes (2 steps at batch 2 on synthetic 224-px images, fp32 and bf16, then a
# resume): about 15 minutes on 2 cores and 9 GB of memory, not part of `make test`.
test-full: data
	$(PY) -m pytest -q --full-shapes tests/test_full_shapes.py

demo: data
	$(MIMKIT) pretrain -c cim/resnet_tiny_fmnist_demo output_dir=$(DEMO_DIR) resume=auto
	$(MIMKIT) eval knn $(DEMO_DIR) --baselines
	$(MIMKIT) viz $(DEMO_DIR)

# Step-time benchmarks on this machine's CPU (GPU tiers: benchmarks/gpu_tier.py). IBOT_REFERENCE=PATH: a checkout
# of github.com/bytedance/ibot to time against.
BENCH := --tier cpu-small --steps 5 --warmup 2 --repeats 2
bench: $(READY)
	$(PY) benchmarks/step_throughput.py --method ibot $(BENCH) $(if $(IBOT_REFERENCE),--reference $(IBOT_REFERENCE))
	$(PY) benchmarks/step_throughput.py --method dtm $(BENCH)
	$(PY) benchmarks/step_throughput.py --method cim --tier cpu-small --steps 10 --warmup 2 --repeats 3
	$(PY) benchmarks/step_throughput.py --method symmim --tier cpu-small --steps 3 --warmup 1 --repeats 2
	for m in ibot dtm symmim cim; do $(PY) benchmarks/speed_changes.py --method $$m || exit 1; done

# What a GPU machine without a package index lacks, for `benchmarks/gpu_tier.py --wheels wheelhouse` (carry it).
wheelhouse: $(READY)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -c constraints.txt -d wheelhouse omegaconf

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

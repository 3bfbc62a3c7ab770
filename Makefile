# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment $(VENV) and install the project from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
# The CPU build that lies on this workplace's disk; override for another platform, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.gradstore-installed

.PHONY: demo test install bench-extra clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gradstore demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# The optional `bench` extra (BackPACK, Opacus) without BackPACK's torchvision requirement, which
# would replace the CPU torch with a multi-GB build; only `gradstore bench capture` uses it.
bench-extra: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3 \
		opacus==1.6.0 opt-einsum==3.4.0

clean-venv:
	rm -rf $(VENV)

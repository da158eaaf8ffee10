# Set-up and everyday commands. Every target that runs Python first makes sure .venv exists and holds
# the package; the stamp file keeps re-runs fast (it is rebuilt only when the packaging files change).

PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.vila-hd-installed
# The CPU build of torch, installed only where the venv has no torch at all: an unpinned torch would pull
# a multi-GB CUDA build. The package itself keeps a loose requirement (torch>=2.5).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test lint demo reliability clean-venv

venv: $(STAMP)

# DeepSpeed ships only a source package on PyPI, whose isolated build would pull its own torch: use the
# pre-built wheel from ../shared when it is there, else build against the torch already installed.
DS_WHEEL := $(wildcard ../shared/gpu/wheels/deepspeed-0.19.8-py3-none-any.whl)
DS_SPEC := $(if $(DS_WHEEL),$(DS_WHEEL),deepspeed==0.19.8)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install -e '.[dev]' peft datasets tensorboard einops hjson msgpack ninja py-cpuinfo pydantic
	$(VPY) -m pip install --no-deps --no-build-isolation "$(DS_SPEC)"
	@touch $(STAMP)

test: venv
	$(VPY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .

demo: venv
	$(VPY) -m vila_hd.demo --out outputs/demo

# Fuzzers and fault injection at full counts; rewrites docs/reliability.md (about 5 minutes on 2 cores).
reliability: venv
	$(VPY) -m tests.reliability

clean-venv:
	rm -rf $(VENV)

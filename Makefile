# Set-up and everyday commands. Every target that runs Python first makes sure .venv exists and holds
# the package; the stamp file keeps re-runs fast (it is rebuilt only when the packaging files change).

PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.vila-hd-installed
# Every install takes the exact versions the suite passes with from constraints.txt (docs/development.md).
CONSTRAINTS ?= constraints.txt
# The CPU build of torch (constraints.txt's release), installed only where the venv has no torch at all: an
# unpinned torch would pull a multi-GB CUDA build. The package itself keeps a loose requirement (torch>=2.5).
TORCH_SPEC ?= $(shell grep -m1 '^torch==' $(CONSTRAINTS))
# What the suite needs beyond the package's dev and serve extras (deepspeed's own requirements included).
TEST_DEPS := peft datasets tensorboard einops hjson msgpack ninja py-cpuinfo pydantic
# A venv's packages as name==version lines (torch without its +cpu/+cuXXX build label).
FREEZE = -m pip list --format=freeze --exclude-editable --exclude pip --exclude setuptools --exclude wheel \
	| sed -E 's/^(torch==[^+]+)\+.*/\1/'

.PHONY: venv test test-latest constraints lint demo reliability clean-venv

venv: $(STAMP)

# DeepSpeed ships only a source package on PyPI, whose isolated build would pull its own torch: use the
# pre-built wheel from ../shared when it is there, else build against the torch already installed.
DS_VERSION := $(shell sed -n 's/^deepspeed==//p' $(CONSTRAINTS))
DS_WHEEL := $(wildcard ../shared/gpu/wheels/deepspeed-$(DS_VERSION)-py3-none-any.whl)
DS_SPEC := $(if $(DS_WHEEL),$(DS_WHEEL),deepspeed==$(DS_VERSION))

# The pins less torch's line, plus the torch the venv has: a GPU user's CUDA torch is kept, not replaced.
$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@grep -v '^torch==' $(CONSTRAINTS) > $(VENV)/constraints.txt
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -c $(VENV)/constraints.txt "$(TORCH_SPEC)"
	@$(VPY) -c "import torch; print('torch==' + torch.__version__)" >> $(VENV)/constraints.txt
	$(VPY) -m pip install -c $(VENV)/constraints.txt -e '.[dev,serve]' $(TEST_DEPS)
	$(VPY) -m pip install -c $(VENV)/constraints.txt --no-deps --no-build-isolation "$(DS_SPEC)"
	@touch $(STAMP)

test: venv
	$(VPY) -m pytest -q tests

# Upstream drift, found on purpose: a separate venv with the newest release of everything (no constraints,
# --upgrade), the same test command, and the versions it ran with. torch stays the CPU build: a newer one is
# taken only from local wheel folders (pip's find-links, --no-index), never a CUDA build from the index.
LATEST ?= .venv-latest
LPY := $(LATEST)/bin/python

test-latest:
	@test -x $(LPY) || $(PY) -m venv $(LATEST)
	@$(LPY) -c "import torch" 2>/dev/null || $(LPY) -m pip install "$(TORCH_SPEC)"
	-@$(LPY) -m pip install -q --upgrade --no-index torch 2>/dev/null
	@$(LPY) -c "import torch; print('torch==' + torch.__version__)" > $(LATEST)/torch.txt
	$(LPY) -m pip install --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e '.[dev,serve]' $(TEST_DEPS)
	$(LPY) -m pip install --upgrade --no-deps --no-build-isolation --find-links ../shared/gpu/wheels deepspeed
	@$(LPY) $(FREEZE) > $(LATEST)/versions.txt
	@grep -v '^#' $(CONSTRAINTS) > $(LATEST)/pinned.txt
	@grep -vxiF -f $(LATEST)/pinned.txt $(LATEST)/versions.txt > $(LATEST)/drift.txt || true
	@echo "test-latest runs with (differences from $(CONSTRAINTS); all in $(LATEST)/versions.txt):"
	@sed 's/^/  /' $(LATEST)/drift.txt; test -s $(LATEST)/drift.txt || echo "  (none: the pinned versions)"
	$(LPY) -m pytest -q tests

# Refresh constraints.txt: a fresh test-latest venv, and only when the suite passed there, its versions.
constraints:
	rm -rf $(LATEST)
	$(MAKE) test-latest
	{ sed -n '/^#/p' $(CONSTRAINTS); cat $(LATEST)/versions.txt; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

lint: venv
	$(VENV)/bin/ruff check .

demo: venv
	$(VPY) -m vila_hd.demo --out outputs/demo

# Fuzzers and fault injection at full counts; rewrites docs/reliability.md (about 5 minutes on 2 cores).
reliability: venv
	$(VPY) -m tests.reliability

clean-venv:
	rm -rf $(VENV) $(LATEST)

# sifpy: `make demo` builds and runs the example; `make test` runs the whole suite.
# Both set up what they need on a fresh Debian 12 machine (apt packages when root, a venv).
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests and the runtime use (installed only when missing, and only as root).
APT_PACKAGES := siftool golang-github-sylabs-sif-dev squashfs-tools squashfuse fuse3 umoci skopeo zstd \
	busybox-static python3-venv util-linux gpg gpgv docker-registry apache2-utils mmdebstrap \
	python3-pyfuse3 fuse-overlayfs libfuse3-dev pkg-config squashfs-tools-ng uidmap pigz \
	gcc libc6-dev slurm-wlm munge mpich libmpich-dev openmpi-bin libopenmpi-dev
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: all setup apt venv test lint demo golden clean

all: test

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages (install them as root): $$missing" >&2; exit 1; fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python pyproject.toml
	@# compat mode: a plain path entry in a .pth file. The default editable finder imports
	@# pathlib, re and more at every interpreter start (~10 ms on each `sifpy exec`).
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	@# Byte-compile now: `sifpy exec` starts once per MPI rank, and an environment with
	@# PYTHONDONTWRITEBYTECODE=1 would otherwise recompile sifpy on every start.
	$(BIN)/python -m compileall -q sifpy
	@# Replace pip's `sifpy` script (it imports the site module at every start) with the
	@# starter, compiled from sifpy/cli/starter.c: it serves the image for exec/run/shell/test
	@# before Python starts, then runs Python with -I -S (a script doing the latter without cc).
	$(BIN)/python -m sifpy.cli.launcher $(BIN)/sifpy
	@touch $(BIN)/python

lint: venv
	$(BIN)/ruff check sifpy tests integration bench
	$(BIN)/ruff format --check sifpy
	$(BIN)/mypy

test: setup
	$(BIN)/ruff check sifpy tests integration bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Regenerate the committed golden SIF files (only on purpose: tests compare against them).
golden: venv
	$(BIN)/python -m tests.sif.golden --write

demo: setup
	bash recipes/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

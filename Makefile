# sifpy: `make demo` builds and runs the example; `make test` runs the whole suite;
# `make install PREFIX=~/.local` puts `sifpy` (and `run-singularity`) in PREFIX/bin.
# All set up what they need on a fresh Debian 12 machine (apt packages when root, a venv).
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
BIN := $(VENV)/bin
PREFIX ?= /usr/local
# Debian packages sifpy needs to build and run images (installed only when missing, and only
# as root): squashfs tools, FUSE, a compiler and libraries for the starter and FUSE server, mmdebstrap for debootstrap
# recipes, busybox for the offline demo, gpg for signatures.
APT_RUN := squashfs-tools squashfs-tools-ng squashfuse fuse3 fuse-overlayfs zstd pigz \
	busybox-static python3-venv util-linux uidmap gpg gpgv mmdebstrap gcc libc6-dev make e2fsprogs fuse2fs \
	libsquashfuse-dev libfuse3-dev pkg-config
# ... and what only the tests need: the SIF reference tools, a real registry, independent
# OCI tools, the pure-Python FUSE fallback, Slurm and MPI for the HPC tests (iproute2: the
# virtual cluster's bridge and veth pairs).
APT_TEST := siftool golang-github-sylabs-sif-dev umoci skopeo docker-registry apache2-utils \
	python3-pyfuse3 slurm-wlm munge mpich libmpich-dev openmpi-bin libopenmpi-dev strace runc \
	iproute2
# ... and what the benchmarks compare with (bench/exec: ch-run; bench/build: ch-image).
APT_BENCH := charliecloud-runtime charliecloud-builders time
APT_PACKAGES := $(APT_RUN) $(APT_TEST) $(APT_BENCH)
# setuptools prints walls of deprecation notices (license tables, compat editable mode)
# while it builds the package; they concern the packaging, not the user.
PIP := PYTHONWARNINGS=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/pip
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: all setup apt apt-run venv test lint demo golden settings install clean

all: test

setup: apt venv

# `make apt` installs what the tests need too; `make install` only what running needs.
apt: APT_WANTED = $(APT_PACKAGES)
apt-run: APT_WANTED = $(APT_RUN)
apt apt-run:
	@missing=$$(for p in $(APT_WANTED); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages (install them as root): $$missing" >&2; exit 1; fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# A stamp, not $(BIN)/python: that is a symlink to the system's interpreter, which `touch`
# would follow (and an ordinary user can't touch).
venv: $(VENV)/.installed
# sifpy/cli/exec_options.py: its OPTIONS are the starter's option table (launcher.starter_config).
$(VENV)/.installed: pyproject.toml sifpy/cli/starter.c sifpy/cli/starter_join.c sifpy/cli/starter_fast.c sifpy/cli/starter_root.c sifpy/cli/starter_monitor.c sifpy/cli/starter_holder.c sifpy/runtime/sharens.py sifpy/runtime/sharens_holder.py sifpy/cli/launcher.py sifpy/runtime/action.py sifpy/runtime/env.py sifpy/runtime/seccomp.py sifpy/config.py sifpy/cli/exec_options.py bin/run-singularity | $(BIN)/python
	@# compat mode: a plain path entry in a .pth file. The default editable finder imports
	@# pathlib, re and more at every interpreter start (~10 ms on each `sifpy exec`).
	$(PIP) install -q -e '.[test]' --config-settings editable_mode=compat
	@# Byte-compile now: `sifpy exec` starts once per MPI rank, and an environment with
	@# PYTHONDONTWRITEBYTECODE=1 would otherwise recompile sifpy on every start.
	$(BIN)/python -m compileall -q sifpy
	@# Replace pip's `sifpy` script (it imports the site module at every start) with the
	@# starter, compiled from sifpy/cli/starter.c: it serves the image for exec/run/shell/test
	@# before Python starts, then runs Python with -I -S (a script doing the latter without cc).
	$(BIN)/python -m sifpy.cli.launcher $(BIN)/sifpy
	install -m 755 bin/run-singularity $(BIN)/run-singularity
	@touch $@

# `make install PREFIX=~/.local`: a private venv in PREFIX/lib/sifpy with the package (not
# editable: the checkout can go), the starter as PREFIX/bin/sifpy, and PREFIX/bin/run-singularity
# so that `./app.sif` runs the image. Needs only the APT_RUN packages.
install: apt-run
	$(PYTHON) -m venv --clear $(PREFIX)/lib/sifpy
	PYTHONWARNINGS=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 $(PREFIX)/lib/sifpy/bin/pip install -q .
	mkdir -p $(PREFIX)/bin
	$(PREFIX)/lib/sifpy/bin/python -m sifpy.cli.launcher $(PREFIX)/bin/sifpy
	install -m 755 bin/run-singularity $(PREFIX)/bin/run-singularity
	mkdir -p $(PREFIX)/share/bash-completion/completions
	$(PREFIX)/bin/sifpy completion bash > $(PREFIX)/share/bash-completion/completions/sifpy
	@echo "installed $(PREFIX)/bin/sifpy; make sure $(PREFIX)/bin is on your PATH"

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

# Rewrite the README's settings table from sifpy/config.py (tests/test_config.py checks they agree).
settings: venv
	$(BIN)/python -c 'from sifpy import config; config.write_readme("README.md")'

demo: setup
	bash recipes/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build sifpy.egg-info

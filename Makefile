# vmbatch developer and demo entry points (run as root on Debian 12).
#   make demo   install everything, start libvirtd, build the demo guest, run a job in a VM
#   make test   the same set-up, then lint, types and the whole test suite
# Both are idempotent: a second run rebuilds nothing that is already there.

SHELL      := /bin/bash
VENV       := .venv
GUESTS     := /var/cache/vmbatch/guests
CONF_DIR   := /etc/vmbatch
PYTEST_ARGS ?=

.PHONY: all deps venv daemons guest-tiny guest-debian guest-cloud config demo test lint unit bench soak clean

all: demo

deps:
	scripts/install-deps

# The venv uses Debian's python3 so libvirt-python builds against Debian's libvirt-dev.
$(VENV)/.installed: pyproject.toml | deps
	test -x $(VENV)/bin/python || /usr/bin/python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: deps $(VENV)/.installed

daemons: venv
	scripts/ensure-libvirtd $(VENV)/bin/python

guest-tiny: deps
	guests/tiny/build.sh $(GUESTS) >/dev/null

guest-debian: deps
	guests/debian/build.sh $(GUESTS) >/dev/null

# Made like a distribution's cloud image (partitioned disk, GRUB, kernel inside): the
# stand-in for stock cloud images, which CI cannot download. ~2-3 min when not cached.
guest-cloud: deps
	guests/cloud/build.sh $(GUESTS) >/dev/null

# Install the documented default config (never overwriting a site's own) and register the
# tiny guest as image "demo" in a drop-in.
config: venv guest-tiny
	install -d -m 0755 $(CONF_DIR) $(CONF_DIR)/vmbatch.d
	test -e $(CONF_DIR)/vmbatch.toml || install -m 0644 conf/vmbatch.toml $(CONF_DIR)/vmbatch.toml
	scripts/register-guest demo $(GUESTS)/tiny > $(CONF_DIR)/vmbatch.d/50-demo.toml.tmp
	mv $(CONF_DIR)/vmbatch.d/50-demo.toml.tmp $(CONF_DIR)/vmbatch.d/50-demo.toml
	$(VENV)/bin/vmbatch config check

demo: venv daemons guest-tiny config
	$(VENV)/bin/vmbatch run --image demo -- uname -a

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

test: venv daemons guest-tiny guest-debian guest-cloud lint
	VMBATCH_TEST_GUESTS=$(GUESTS) $(VENV)/bin/pytest -v --durations=40 tests $(PYTEST_ARGS)

bench: venv daemons guest-tiny guest-debian guest-cloud
	$(VENV)/bin/python bench/boot.py --guest $(GUESTS)/tiny
	$(VENV)/bin/python bench/images.py
	$(VENV)/bin/python bench/context.py --guest $(GUESTS)/debian
	$(VENV)/bin/python bench/cloud_boot.py --guests $(GUESTS)
	$(VENV)/bin/python bench/session.py --guest $(GUESTS)/debian
	$(VENV)/bin/python bench/slurm.py --guest $(GUESTS)/tiny
	$(VENV)/bin/python bench/suspend.py --guest $(GUESTS)/tiny

# The soak (docs/design.md, "Soak"): its own Slurm and libvirtd, ~40 min here.
SOAK_ARGS ?= --jobs 500 --fault-rate 0.1
soak: venv guest-tiny
	$(VENV)/bin/python bench/soak.py --guest $(GUESTS)/tiny $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

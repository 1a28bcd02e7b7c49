# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
#
# Which Python: PYTHON=/path/to/python3.x, else the one .venv was made with, else the first of python3.11,
# python3.12, python3.13, python3 (then pyenv's own 3.11-3.13) that runs and is one of those versions.
# Python 3.11 gets the pinned stack (requirements/pinned.txt: numpy 1.26), 3.12 and 3.13 the current one
# (requirements/current.txt: numpy 2.5). GPU=cuda12 | cuda13 | cuda12-cupy14 adds CuPy with its CUDA libraries
# from pip (requirements/gpu-*.txt; README, GPU); .venv remembers it, so later targets keep it.
VENV ?= .venv
GPU ?= $(shell cat $(VENV)/.gpu 2>/dev/null)
SUPPORTED := import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12), (3, 13)))
PYTHON ?= $(shell cat $(VENV)/.python 2>/dev/null || for p in python3.11 python3.12 python3.13 python3 \
	$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[123]*/bin/python3 2>/dev/null); do \
	$$p -c '$(SUPPORTED)' 2>/dev/null && $$p -c 'import sys; print(sys.executable)' && break; done)
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
STACK := $(if $(filter 3.11,$(PY_VERSION)),pinned,current)
ifneq ($(GPU),)
ifeq ($(wildcard requirements/gpu-$(GPU).txt),)
$(error GPU=$(GPU) is not one of: cuda12 (CuPy 13.6 with cuDNN 8), cuda13 or cuda12-cupy14 (CuPy 14, no cuDNN))
endif
endif
REQUIREMENTS := requirements/$(STACK).txt $(if $(GPU),requirements/gpu-$(GPU).txt)
STAMP := $(VENV)/.installed-$(PY_VERSION)-$(shell cat $(REQUIREMENTS) requirements/build-constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)
PY := $(VENV)/bin/python
comma := ,
# Chainer 7.8.1 builds from source and needs setuptools<74 for that build only (pip >= 25.3 reads it from here).
PIP := PIP_BUILD_CONSTRAINT=$(CURDIR)/requirements/build-constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1 $(VENV)/bin/pip

.PHONY: venv demo test faults bench doctor gpu-bundle gpu-check clean

venv: $(STAMP)

$(STAMP): $(REQUIREMENTS) requirements/build-constraints.txt
	@test -n "$(PY_VERSION)" || { echo 'make: $(if $(PYTHON),PYTHON=$(PYTHON) does not run,no Python 3.11$(comma) 3.12 or 3.13 found); set PYTHON=/path/to/python3.x'; exit 1; }
	@$(PYTHON) -c '$(SUPPORTED)' || { echo 'make: $(PYTHON) is Python $(PY_VERSION); the project runs on 3.11 (pinned stack) or 3.12/3.13 (current stack): set PYTHON=/path/to/python3.x'; exit 1; }
	@test "$(STACK)" != pinned -o -z "$(filter cuda13 cuda12-cupy14,$(GPU))" || { echo 'make: GPU=$(GPU) is CuPy 14, which needs numpy 2: use Python 3.12 or 3.13 (PYTHON=...), or GPU=cuda12'; exit 1; }
	@echo "make: $(VENV) from $(PYTHON) (Python $(PY_VERSION), the $(STACK) stack$(if $(GPU),$(comma) GPU=$(GPU)))"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==26.0.1
	$(PIP) install -q $(addprefix -r ,$(REQUIREMENTS))
	echo '$(PYTHON)' > $(VENV)/.python
	echo '$(GPU)' > $(VENV)/.gpu
	touch $@

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

faults: $(STAMP)
	$(PY) -m pytest -q tests/test_faults.py

# The other stack's interpreter (evaluated only here): make bench measures fast_conv on both, side by side.
OTHER_PYTHON = $(shell for v in $(if $(filter pinned,$(STACK)),3.12 3.13,3.11); do for p in python$$v \
	$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python3 2>/dev/null); do \
	$$p -c 'import sys; print(sys.executable)' 2>/dev/null && exit 0; done; done)

bench: $(STAMP)
	$(eval OTHER := $(OTHER_PYTHON))
	$(if $(OTHER),$(MAKE) venv VENV=.venv-other PYTHON=$(OTHER) GPU=)
	$(PY) tools/bench.py --stacks $(PY) $(if $(OTHER),.venv-other/bin/python)

doctor: $(STAMP)
	$(PY) tools/doctor.py

# What the GPU check needs on a node without network (gpu_bundle/: wheels and pre-encoded clips; README, GPU).
gpu-bundle: $(STAMP)
	$(PY) tools/gpucheck.py --make-bundle gpu_bundle

gpu-check: $(STAMP)
	$(PY) tools/gpucheck.py

clean:
	rm -rf $(VENV) .venv-other demo bench gpu_bundle gpucheck

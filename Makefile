# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt constraints-build.txt | cksum | cut -d' ' -f1)
# Old pip reads the build constraint from PIP_CONSTRAINT, new pip (>=25.3) from PIP_BUILD_CONSTRAINT.
PIP_ENV := PIP_CONSTRAINT=$(CURDIR)/constraints-build.txt PIP_BUILD_CONSTRAINT=$(CURDIR)/constraints-build.txt PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: venv demo test faults bench doctor clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints-build.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Chainer 7.8.1 needs Python 3.11; set PYTHON=/path/to/python3.11")'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(VENV)/bin/pip install -q -r requirements.txt
	touch $@

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

faults: $(STAMP)
	$(PY) -m pytest -q tests/test_faults.py

bench: $(STAMP)
	$(PY) bench.py

doctor: $(STAMP)
	$(PY) doctor.py

clean:
	rm -rf $(VENV) demo bench

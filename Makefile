# Two commands for a fresh machine: `make demo` and `make test`. Each builds what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnlab-installed
# An experiment writes into a folder of its own: each demo gets a new one.
OUT ?= runs/compare-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch goes first and pinned: a bare `torch` requirement would pull the CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnlab run compare --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .attnlab-cache

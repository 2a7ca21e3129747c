# `make demo` runs the example end to end; `make test` runs the test suite. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean-venv

install: $(STAMP)

# --system-site-packages: a Paddle already installed (CPU or GPU build) is used, never replaced.
$(STAMP): setup.py requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import paddle" 2>/dev/null || $(BIN)/python -m pip install "paddlepaddle>=3.2"
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

demo: install
	$(BIN)/python tools/demo.py

clean-venv:
	rm -rf $(VENV)

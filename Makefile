# Two commands: `make demo` trains a pair on the built-in demo model; `make test` runs the tests.
# Both create .venv on first use (torch and torchvision pinned to the builds these machines carry).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: .ci/requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r .ci/requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m dreamartist train --image examples/reference.png --name demo-robot --out demo-output \
		--steps 40 --width 64 --height 64 --preview-every 20 --overwrite

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

.PHONY: demo test

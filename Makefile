# Two commands: `make demo` trains a pair on the built-in demo model; `make test` runs the tests.
# Both create .venv on first use: the demo installs only what it needs, the tests add their own tools.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.demo: .ci/requirements-demo.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r .ci/requirements-demo.txt
	touch $@

$(VENV)/.test: $(VENV)/.demo .ci/requirements.txt
	$(PY) -m pip install -q -r .ci/requirements.txt
	touch $@

demo: $(VENV)/.demo
	$(PY) -m dreamartist train --image examples/reference.png --name demo-robot --out demo-output/embeddings \
		--previews demo-output/previews --steps 40 --width 64 --height 64 --preview-every 20 --overwrite

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

.PHONY: demo test

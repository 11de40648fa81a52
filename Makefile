# Two commands: `make demo` trains a pair on the built-in toy-world model and draws it in new contexts;
# `make test` runs the tests.
# Both create .venv on first use: the demo installs only what it needs, the tests add their own tools.
VENV ?= .venv
DEMO_STEPS ?= 1500
PY := $(VENV)/bin/python

$(VENV)/.demo: .ci/requirements-demo.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r .ci/requirements-demo.txt
	touch $@

$(VENV)/.test: $(VENV)/.demo .ci/requirements.txt
	$(PY) -m pip install -q -r .ci/requirements.txt
	touch $@

demo: $(VENV)/.demo
	$(PY) -m dreamartist train --image examples/toy-reference.png --name demo-star --out demo-output/embeddings \
		--previews demo-output/previews --steps $(DEMO_STEPS) --preview-every 500 --overwrite
	$(PY) -m dreamartist.toyworld.preview --embeddings demo-output/embeddings --name demo-star \
		--reference examples/toy-reference.png --out demo-output/demo-star-contexts.png

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

.PHONY: demo test

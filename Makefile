# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/stillroom: pyproject.toml
	bash infra/setup.sh

setup: $(BIN)/stillroom

demo: setup
	$(BIN)/stillroom demo

lint: setup
	$(BIN)/ruff check pipelines student services tests bench docs stillroom/__init__.py
	$(BIN)/mypy
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d $$(mktemp -d)  # the docs site (no -q: it hides what strict counts)

test: lint
	$(BIN)/pytest -q --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Every target sets up what it needs: a local virtual environment in .venv, made on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
# The docs tools (the `docs` dependency group) have a stamp of their own: `make install` and
# `make pytest` do not need them, the docs targets install them on first use.
DOCS_STAMP := $(VENV)/.installed-docs
# The official openai npm package (pinned in tests/node), for the gateway's Node test.
NODE_DIR   := $(VENV)/node
NODE_STAMP := $(NODE_DIR)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test lint typecheck pytest package bench docs docs-build cassettes conformance mutation clean

help: ## Show the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-11s %s\n", $$1, $$2}'

# The project in editable mode with the `dev` dependency group of pyproject.toml (every extra,
# plus the test and lint tools; `--group` needs pip 25.1 or newer). examples/nimbus is a provider
# package of its own, installed as a user would install one: pip puts its entry point where
# flux-adapters finds "nimbus" (see docs/validating-a-provider.md).
$(STAMP): pyproject.toml examples/nimbus/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip>=25.1'
	$(BIN)/python -m pip install --quiet -e . --group dev
	$(BIN)/python -m pip install --quiet -e 'examples/nimbus[sandbox]'
	@touch $(STAMP)

install: $(STAMP) $(NODE_STAMP) ## Create .venv: the project (editable), every extra, the test and lint tools, examples/nimbus (and, where npm is, the Node test's openai package).

# Where Node.js and npm are installed, the openai npm package at the version tests/node pins
# (npm ci: exactly the lock file); without them the Node test is skipped and says why.
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json | $(STAMP)
	@if command -v npm >/dev/null && command -v node >/dev/null; then \
		mkdir -p $(NODE_DIR) && cp tests/node/package.json tests/node/package-lock.json $(NODE_DIR)/ && \
		npm ci --prefix $(NODE_DIR) --no-audit --no-fund --silent && touch $(NODE_STAMP); \
	else echo "Node.js or npm not found: the gateway's Node test will be skipped"; fi

$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet --group docs
	@touch $(DOCS_STAMP)

demo: $(STAMP) ## The main job offline: edit two bundled images on the emulator, save out/demo.png.
	$(BIN)/python examples/demo.py

lint: $(STAMP) ## ruff lint and format check.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict over the package, tests, benchmarks and examples.
	$(BIN)/mypy

# Worker processes (pytest-xdist), each taking whole files, so that a module's fixtures (an
# emulator, a table of CLI runs) are made once. Half of the suite's time is spent waiting on a
# server, a deadline or a child process, so twice as many workers as the two cores of the CI
# machine overlap those waits: 2 min 20 s to 2 min 31 s against 3 min 8 s with two (2026-11-23).
# PYTEST_WORKERS=auto gives one per CPU. Plain `pytest` (a file, a -k selection) runs in one.
PYTEST_WORKERS ?= 4
pytest: $(STAMP) $(NODE_STAMP) ## The test suite (no network: MockTransport, loopback, and a redis-server it starts).
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile

package: $(STAMP) ## Build the sdist and wheel, check their contents, use the wheel in fresh venvs (no extra, each extra).
	PYTHON=$(BIN)/python bash .ci/package-check

test: lint typecheck pytest mutation package docs-build ## Every check: ruff, mypy --strict, pytest, the mutation score, the built package, the docs site.

bench: $(STAMP) ## Benchmarks against a loopback server, side by side with plain httpx.
	$(BIN)/python benchmarks/run.py

# Without -p, conformance takes the built-in providers, whose cassettes live in cassettes/. An
# installed provider package (examples/nimbus) keeps its own, and the emulator does not speak it.
cassettes: $(STAMP) ## Re-record the built-in providers' conformance cassettes against the emulator.
	$(BIN)/flux-adapters conformance --record --emulator --cassettes cassettes --report-dir out

conformance: $(STAMP) ## Replay the conformance cassettes; report in out/conformance.{md,json} (Nimbus: out/nimbus/).
	$(BIN)/flux-adapters conformance --cassettes cassettes --report-dir out
	$(BIN)/flux-adapters conformance -p nimbus --cassettes examples/nimbus/tests/cassettes --report-dir out/nimbus

# Part of `test`: it exits 1 when a built-in provider's kill rate is below 95 % (each is at 97 %
# or more now, 98.0 % overall; docs/conformance.md has the table and explains each survivor).
# 10 to 15 s on two CPUs.
mutation: $(STAMP) ## Mutation score: the suite against wire mutants of each built-in adapter.
	$(BIN)/flux-adapters conformance --mutate --cassettes cassettes --report-dir out

docs: $(DOCS_STAMP) ## Regenerate the tables (limits, billing rule) in README.md and docs/, then build the site.
	$(BIN)/python -m flux_adapters._tables README.md docs/routing.md docs/providers/*.md
	$(MAKE) docs-build

# `test` builds the site without regenerating the tables first: a table that no longer matches
# the code fails tests/test_docs.py instead of being rewritten in place. --strict turns every
# warning (a broken link or anchor, a page outside the nav, a docstring griffe cannot read) into
# a failure. Nothing is fetched: no fonts, no social cards, no external inventories (it builds
# with the network unplugged). NO_MKDOCS_2_WARNING hides Material's banner announcing its end of
# life (May 2027, succeeded by Zensical): news about the theme, not a problem in the docs.
docs-build: $(DOCS_STAMP) ## Build the docs site into site/ with mkdocs --strict (offline, about 5 s).
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean: ## Remove .venv, caches, out/ and the built site.
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache out site

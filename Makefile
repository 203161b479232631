# Every target works from a fresh clone: `make serve` and `make test` install what they need first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

serve: install
	$(BIN)/threadbridge serve

test: install
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

# Prints one table of every figure, its target and PASS/FAIL (also in .bench-results.json).
# Shorter runs: BENCH_SLACK_RATES=50,100,200 BENCH_SLACK_SECONDS=4 BENCH_AGENT_SECONDS=10
# BENCH_BURST_MESSAGES=500 BENCH_STARTS=3 (see each tests/bench/test_bench_*.py).
bench: install
	$(BIN)/python -m pytest -q -s tests/bench -p no:cacheprovider --override-ini="addopts="

lint: install
	$(BIN)/ruff check core adapters bots tests
	$(BIN)/ruff format --check core adapters bots tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

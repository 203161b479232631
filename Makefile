# Every target works from a fresh clone: `make serve` and `make test` install what they need first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install bytecode serve test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Our own modules' bytecode, written ahead (in a moment when it is up to date). Where
# PYTHONDONTWRITEBYTECODE is set, as on the machine the README's figures come from, Python
# never writes it, and every start compiled them again: importing the bot took 1.40 s without
# it and 1.03 s with it; a start's median, 8 alternating: 1.42 -> 1.32 s. (An installed wheel
# brings its bytecode.)
bytecode: install
	@$(BIN)/python -m compileall -q core adapters bots

serve: bytecode
	$(BIN)/threadbridge serve

test: bytecode
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

# Prints one table of every figure, its target and PASS/FAIL (also in .bench-results.json).
# Shorter runs: BENCH_SLACK_RATES=50,100,200 BENCH_SLACK_SECONDS=4 BENCH_AGENT_SECONDS=10
# BENCH_BURST_MESSAGES=500 BENCH_STARTS=3 (see each tests/bench/test_bench_*.py).
bench: bytecode
	$(BIN)/python -m pytest -q -s tests/bench -p no:cacheprovider --override-ini="addopts="

lint: install
	$(BIN)/ruff check core adapters bots tests
	$(BIN)/ruff format --check core adapters bots tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

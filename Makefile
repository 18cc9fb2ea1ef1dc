# jobq — two commands: `make run` starts everything, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
# Test modules are independent (each has a database of its own): run them on this many
# processes, whole modules each (TEST_PROCESSES=0 runs them in this process).
TEST_PROCESSES ?= 2

.PHONY: run test lint typecheck unit browser pgbouncer bench bench-flow bench-hooks bench-peers bench-storage bench-soak bench-cron chaos clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "jobq needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.installed

## Start the embedded database, the API on http://127.0.0.1:$(PORT) and a worker with the examples.
run: $(VENV)/.installed
	$(BIN)/jobq dev --port $(PORT)

## Lint, type-check and run the whole suite against a real PostgreSQL.
test: lint typecheck unit

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev browser pgbouncer
	$(BIN)/pytest -q -n $(TEST_PROCESSES) --dist loadfile

## Debian's Chromium for the dashboard's browser tests: installed when missing and possible
## (root with apt-get); without it those tests are skipped and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -x "$${JOBQ_CHROMIUM:-/usr/bin/chromium}" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing chromium for the browser tests" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed and cannot be: the browser tests will be skipped"

## Debian's PgBouncer for the pooler tests, on the same terms as Chromium; it runs as an
## unprivileged user with its configuration in a temporary directory (tests/realparts.py).
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing pgbouncer for the pooler tests" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; } || \
	  echo "pgbouncer is not installed and cannot be: the pooler tests will be skipped"

## Kill workers and restart the database while N jobs run (default 2000); nothing may be lost.
N ?= 2000
chaos: $(VENV)/.installed
	$(BIN)/jobq chaos --jobs $(N)

## Benchmarks (not part of `make test`): the suite against the embedded PostgreSQL (or
## DATABASE_URL), the integration benchmarks (transactional enqueue, batch, waiters), the
## scale-out benchmarks (PgBouncer, a fleet of workers, added RTT), then
## the chart. BENCH_ARGS=--quick for a smoke run. See BENCHMARKS.md.
bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.suite $(BENCH_ARGS)
	$(MAKE) --no-print-directory bench-hooks
	$(BIN)/python -m bench.integration $(BENCH_ARGS)
	$(MAKE) --no-print-directory pgbouncer
	$(BIN)/python -m bench.scaleout $(BENCH_ARGS)
	$(BIN)/python -m bench.flow $(BENCH_ARGS)
	$(BIN)/python -m bench.chart

## Middleware and OpenTelemetry when used: drain and enqueue with none, a no-op middleware and
## OpenTelemetry on, interleaved (HOOKS_ARGS="--rounds 5"). Unused, against the revision before
## them: python -m bench.hot_path_ab BEFORE AFTER. See BENCHMARKS.md.
HOOKS_ARGS ?= --rounds 3
bench-hooks: $(VENV)/.installed-dev
	$(BIN)/python -m bench.hooks $(HOOKS_ARGS)

## Storage: WAL per job, history scale, soak (opt-in: STORAGE_ARGS="--only soak"), layouts.
## bench/storage_ab.sh BEFORE AFTER runs it on two revisions in one run. See BENCHMARKS.md.
STORAGE_ARGS ?=
bench-storage: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.storage $(STORAGE_ARGS)

## The long storage soak (opt-in, ~21 min): 1,000 jobs/s for 20 min with JOBQ_RETENTION=2m;
## size over time into bench/results/soak.{jsonl,png}, the summary into storage-soak.jsonl.
SOAK_ARGS ?=
bench-soak: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.storage --only soak --rate 1000 --soak-seconds 20m --retention 2m \
	  --out bench/results/storage-soak.jsonl $(SOAK_ARGS)

## Flow control alone: limits, rate limits, fair share (bench/flow.py; FLOW_ARGS=--only rate).
## bench/flow_ab.sh BEFORE AFTER: the drain on two revisions, alternating ("free when unused").
FLOW_ARGS ?=
bench-flow: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.flow $(FLOW_ARGS)

## Periodic jobs on several hosts (opt-in, ~11 min): 3 workers, each on a host of its own
## (UTS + network namespaces as root, else processes), run a `* * * * *` and an `every=5s`
## schedule for 10 minutes; ticks missed or doubled, from the handlers' own records.
CRON_ARGS ?=
bench-cron: $(VENV)/.installed-dev
	$(BIN)/python -m bench.cron $(CRON_ARGS)

## jobq, PgQueuer and procrastinate side by side through ../shared/peers (RUNS=3).
bench-peers: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q -e '.[bench]'
	bench/peers.sh
	$(BIN)/python -m bench.chart

clean:
	rm -rf $(VENV) .jobq .pytest_cache .mypy_cache .ruff_cache

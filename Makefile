# Ollama Autoscaler: `make run` starts the whole local stack, `make test` runs the test suite.
PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12.1/bin/python3.12) $(shell command -v python3.12))
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run test test-cluster test-fast prepare lint clean bench-planner bench-sched bench-overhead bench-dashboard bench-gpu fuzz faults gateway

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

prepare: install  ## build llama-server once (about 6 min on 2 cores, cached) and the Gemma GGUF
	$(BIN)/ollama-autoscaler prepare

run: prepare  ## the whole system on embedded defaults; Ctrl-C stops it
	$(BIN)/ollama-autoscaler up

DOMAIN := domain events/codec.py events/keys.py events/types.py events/outcome.py stores

test: prepare lint  ## everything CI runs
	$(BIN)/python -m pytest -q

RUNS ?= 5
test-cluster: install  ## the 3-server cluster fail-over test, $(RUNS) times in a row (flakiness hunt)
	@for i in $$(seq $(RUNS)); do echo "fail-over run $$i/$(RUNS)"; \
	  $(BIN)/python -m pytest -q -m cluster_failover tests/test_cluster.py || exit 1; done

test-fast: install  ## no llama-server: planner, codec, fleet, Ollama fake, reconcile
	$(BIN)/python -m pytest -q -m "not e2e and not cluster_failover"

lint: install  ## ruff on everything, mypy --strict on the pure domain and the stores
	$(BIN)/python -m ruff check events gateway domain stores runtimes functions agent stack autoscaler ui tests bench
	$(BIN)/python -m mypy --strict $(DOMAIN)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis

bench-planner: install  ## exact planner vs the seed's brute force; CSV in docs/bench/
	$(BIN)/python -m bench.planner

bench-sched: install  ## scheduling quality on real traces (simulation); CSV + plots in docs/bench/
	$(BIN)/python -m bench.sched

bench-overhead: prepare  ## control-plane overhead on the real stack + throughput with a stub runtime
	$(BIN)/python -m bench.overhead

bench-dashboard: prepare  ## real traffic through the gateway, /metrics scraped; the dashboard's panels plotted (docs/bench/dashboard.png)
	$(BIN)/python -m bench.dashboard

gateway: install  ## the HTTP gateway alone, against a running stack's NATS (make run starts one itself)
	$(BIN)/ollama-autoscaler gateway

EVENTS ?= 10000
fuzz: prepare  ## $(EVENTS) generated and mutated events through the real stack; figures in docs/bench/fuzz.csv
	$(BIN)/python -m bench.fuzz --events $(EVENTS)

CHATS ?= 200
faults: prepare  ## $(CHATS) chats under memory pressure while parts are killed, + a 3-server cluster; table in docs/bench/faults.csv
	$(BIN)/python -m bench.faults --chats $(CHATS)

# bench-gpu needs PyTorch (the host->GPU copy rate, the foreign-memory process), which the project
# does not pin: BENCH_PY is a python that has it and the project's dependencies.
BENCH_PY ?= $(BIN)/python
bench-gpu: install  ## on an NVIDIA GPU with PyTorch: CUDA build, then the four GPU results; CSV + plot in docs/bench/
	$(BENCH_PY) -m autoscaler.cli prepare --cuda
	$(BENCH_PY) -m bench.gpu --phase setup
	$(BENCH_PY) -m bench.gpu --phase accounting
	$(BENCH_PY) -m bench.gpu --phase trace --trace-seconds 120
	$(BENCH_PY) -m bench.gpu --phase report

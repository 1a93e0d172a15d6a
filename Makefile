# The two commands: `make run` (server on the default model) and `make test`; `make docs`
# serves the documentation site locally.
# torch is installed first and pinned: a looser spec pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install run test test-slow tools lint format docs docs-build bench-ops bench-model bench-cpu bench-engine bench-serving bench-sessions bench-quality clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/lln-serve serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the default run leaves out the tests marked slow (the real default model end to end, ~5
# minutes on 2 cores); CI runs them too (`.ci/run`), and `make test-slow` runs them alone
test: lint tools
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)
	$(MAKE) docs-build

# the documentation site (mkdocs-material, docs/ and mkdocs.yml): a strict build fails on a
# broken link, a missing page or a results file an include names but cannot find; the
# configuration, metrics and HTTP API references are generated from the code as it builds
docs-build: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8001

test-slow: install tools
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# promtool (Debian's prometheus package) checks the /metrics output, alert rules and dashboard
# queries; redis-server (Debian's) backs the state-store tests, which start their own on loopback;
# chromium and chromium-driver run the playground's browser tests (they skip, saying so, without)
tools:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
		|| missing="$$missing chromium chromium-driver"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			{ apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
				|| echo "could not install$$missing: their tests will say so (the browser tests skip)" >&2; \
		else echo "missing Debian packages:$$missing (promtool, redis-server, chromium): install them" >&2; fi; \
	fi

bench-model: install
	$(PY) benchmarks/bench_model.py

# llama.cpp's side needs llama-cpp-python in its own environment (see benchmarks/bench_cpu.py)
bench-cpu: install
	$(PY) benchmarks/bench_cpu.py

bench-engine: install
	$(PY) benchmarks/bench_engine.py

bench-serving: install
	$(PY) benchmarks/bench_serving.py

bench-sessions: install tools
	$(PY) benchmarks/bench_sessions.py

bench-ops: install
	$(PY) benchmarks/bench_ops.py

bench-quality: install
	$(PY) benchmarks/eval_perplexity.py
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

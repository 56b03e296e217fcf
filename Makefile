# Set-up and common tasks. `make install` builds .venv on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
# Ray binds every interface by default: where we may make a network namespace, run inside a loopback-only one.
NS := $(shell if [ "$$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1; then echo 'unshare -n sh -c'; else echo 'sh -c'; fi)
LO := ip link set lo up 2>/dev/null;
TEST_ENV := RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true

.PHONY: install wordnet test demo bench bench-quick clean

install: $(BIN)/.installed wordnet

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Without CUDA an unpinned torch resolves to a multi-GB CUDA build: take the CPU wheel first.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q $(TORCH_CPU); fi
	$(BIN)/pip install -q -e '.[test,tune]'
	touch $@

# WordNet from Debian (read through NLTK); skipped where apt is absent or the data is already there.
wordnet:
	@if [ -d /usr/share/wordnet ] || [ -n "$$NLTK_DATA" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index >/dev/null)); \
	else echo "WordNet missing: install Debian's wordnet-base or set NLTK_DATA to a dir holding corpora/wordnet"; fi

test: install
	$(NS) '$(LO) $(TEST_ENV) $(BIN)/python -m pytest -q --timeout=900'

demo: install
	$(NS) '$(LO) RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m jobs.demo'

bench: install
	$(NS) '$(LO) $(TEST_ENV) $(BIN)/python -m benchmarks.run'

bench-quick: install
	$(NS) '$(LO) $(TEST_ENV) $(BIN)/python -m benchmarks.run --quick'

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

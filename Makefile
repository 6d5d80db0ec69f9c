# rnnserve: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ADDRESS ?= localhost:50051
DATA_DIR ?= data
PROTO := proto/rnnserve/v1/rnn_service.proto
GEN_DIR := client/src/rnnserve/v1

.DEFAULT_GOAL := help
.PHONY: help install proto proto-check lint test run demo bench image image-test clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): client/pyproject.toml server/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e 'client[plot]' -e 'server[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the client, the server and the dev tools

proto: $(STAMP) ## regenerate the Python code in client/src/rnnserve/v1 from proto/
	$(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=client/src --pyi_out=client/src \
	  --grpc_python_out=client/src \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=client/src \
	  $(PROTO)

proto-check: proto ## fail if the committed generated code differs from proto/
	git diff --exit-code -- $(GEN_DIR)
	@test -z "$$(git status --porcelain -- $(GEN_DIR))" || { echo "untracked generated files in $(GEN_DIR)"; exit 1; }

# npm devDependencies: buf (make lint) and @grpc/grpc-js + @grpc/proto-loader (the Node
# interop test in make test).
NODE_STAMP := node_modules/.installed
$(NODE_STAMP): package.json package-lock.json
	npm install --no-audit --no-fund --silent
	touch $@

lint: $(STAMP) $(NODE_STAMP) ## buf lint (STANDARD), ruff, mypy --strict
	node_modules/.bin/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy client/src server/src tests bench

test: $(STAMP) $(NODE_STAMP) ## run the test suite (unit, integration against a real server, persistence, a Node client)
	$(BIN)/pytest

run: $(STAMP) ## serve on localhost:50051, sessions kept in ./data (override ADDRESS=, DATA_DIR=)
	$(BIN)/rnnserve-server --address $(ADDRESS) --data-dir $(DATA_DIR)

demo: $(STAMP) ## start a server, train a session on Python's own source, plot (docs/loss.png), generate, stop
	$(BIN)/python scripts/demo.py

bench: $(STAMP) ## run the benchmarks in bench/ (prints tables); installs the bench extra (torch)
	$(BIN)/pip install -q -e 'server[bench]'
	$(BIN)/python bench/engine.py
	@if test -f bench/service.py; then $(BIN)/python bench/service.py; \
	else echo "bench/service.py not present: skipped"; fi

image: ## build the container image (docker if an engine answers, else buildah)
	bash scripts/image.sh build

image-test: ## build the image with buildah and test it end to end
	bash scripts/image.sh test

clean: ## remove the venv, caches and build output
	rm -rf $(VENV) node_modules build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis

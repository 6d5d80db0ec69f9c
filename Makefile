# rnnserve: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ADDRESS ?= localhost:50051
DATA_DIR ?= data
PROTO := proto/rnnserve/v1/rnn_service.proto
GEN_DIR := client/src/rnnserve/v1
# Debian packages the tests and `make cluster` run as real processes (the cluster and
# Prometheus tests): `make test` and `make cluster` install the missing ones (add a package
# here and both get it). Each is named like its command, which counts as installed where there
# is no dpkg.
DEB_DEPS := redis-server nginx prometheus openssl
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

.DEFAULT_GOAL := help
.PHONY: help install compiler deps proto proto-check proto-breaking lint test run cluster cluster-restart demo bench image image-test clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# The server's engine kernel is C that pip compiles: a change to it reinstalls, and `compiler`
# makes sure there is something to compile it with.
KERNEL_SRC := $(wildcard $(addprefix server/src/rnnserve_server/engine/cells/,_kernel.c _kernel_step.h))

$(STAMP): client/pyproject.toml server/pyproject.toml server/setup.py pyproject.toml $(KERNEL_SRC) | compiler
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade 'pip>=25.1'
	$(BIN)/pip install -q -e 'client[plot,onnx,tensorboard]' -e server --group dev
	touch $(STAMP)

install: $(STAMP) ## create .venv with the client, the server and the dev tools

# A C compiler and $(PYTHON)'s headers for the server's kernel (engine/cells/_kernel.c): on a
# machine without them, apt-get installs gcc, libc6-dev and python3-dev, as `deps` does its
# packages.
compiler: ## apt-get install a C compiler and Python's headers if missing (pip builds the server's C kernel)
	@missing=""; \
	command -v cc >/dev/null || missing="gcc libc6-dev"; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_path("include"), "Python.h")))' \
	  || missing="$$missing python3-dev"; \
	if test -n "$$missing"; then \
	  command -v apt-get >/dev/null \
	    || { echo "no apt-get: install$$missing (a C compiler, Python's headers) with this system's package manager"; exit 1; }; \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq \
	  && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

deps: ## apt-get install the Debian packages the tests run (DEB_DEPS: redis-server, nginx, prometheus, openssl) if missing
	@missing=""; for p in $(DEB_DEPS); do \
	  if command -v dpkg-query >/dev/null; then \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed'; \
	  else PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v $$p >/dev/null; fi \
	    || missing="$$missing $$p"; \
	done; \
	if test -n "$$missing"; then \
	  command -v apt-get >/dev/null \
	    || { echo "no apt-get: install$$missing with this system's package manager"; exit 1; }; \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq \
	  && $(SUDO) env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

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

# The proto as of BREAKING_AGAINST (a git revision; default the previous commit), taken with
# git archive so buf compares two directories and needs none of the history itself. A shallow
# clone is deepened by one commit first; a revision without proto/ (the first commit) passes.
BREAKING_AGAINST ?= HEAD~1
proto-breaking: $(NODE_STAMP) ## buf breaking: proto/ against BREAKING_AGAINST (default HEAD~1)
	@set -e; \
	if ! git rev-parse -q --verify '$(BREAKING_AGAINST)^{commit}' > /dev/null \
	    && test "$$(git rev-parse --is-shallow-repository)" = true; then \
	  git fetch -q --deepen=1; \
	fi; \
	rev=$$(git rev-parse -q --verify '$(BREAKING_AGAINST)^{commit}') \
	  || { echo "proto-breaking: no revision '$(BREAKING_AGAINST)' to compare against (set BREAKING_AGAINST=)"; exit 1; }; \
	if ! git cat-file -e "$$rev:proto"; then echo "proto-breaking: $$rev has no proto/: nothing to break"; exit 0; fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	git archive "$$rev" proto buf.yaml | tar -x -C "$$tmp"; \
	echo "buf breaking against $$rev"; \
	node_modules/.bin/buf breaking --against "$$tmp"

$(NODE_STAMP): package.json package-lock.json
	npm install --no-audit --no-fund --silent
	touch $@

lint: $(STAMP) $(NODE_STAMP) ## buf lint (STANDARD), ruff, mypy --strict, import-linter (the server's layers)
	node_modules/.bin/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy client/src server/src tests bench
	$(BIN)/lint-imports

# Everything the tests need is set up first: the venv, the npm packages, the Debian services.
test: $(STAMP) $(NODE_STAMP) deps ## install what is missing, then run the test suite (unit, integration, persistence, cluster, Prometheus, a Node client)
	$(BIN)/pytest

run: $(STAMP) ## serve on localhost:50051, sessions kept in ./data (override ADDRESS=, DATA_DIR=)
	$(BIN)/rnnserve-server --address $(ADDRESS) --data-dir $(DATA_DIR)

cluster: $(STAMP) deps ## redis-server + 3 replicas + nginx on loopback (scripts/cluster.sh; PORT=50051)
	bash scripts/cluster.sh

REPLICA ?=
cluster-restart: $(STAMP) ## start a replica of `make cluster` again after it died (REPLICA=2)
	bash scripts/cluster.sh restart $(REPLICA)

# DEMO_ARGS: more scripts/demo.py flags, e.g. --plot-output docs/loss.png (the README's picture).
DEMO_ARGS ?=
demo: $(STAMP) ## start a server, train a session on Python's own source, plot (a PNG in the temp dir), generate, stop
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

bench: $(STAMP) ## run the benchmarks in bench/ (prints tables); installs the bench group (torch)
	$(BIN)/pip install -q --group bench
	$(BIN)/python bench/engine.py
	@if test -f bench/service.py; then $(BIN)/python bench/service.py; \
	else echo "bench/service.py not present: skipped"; fi

image: ## build the container image (docker if an engine answers, else buildah)
	bash scripts/image.sh build

image-test: ## build the image with buildah and test it end to end
	bash scripts/image.sh test

clean: ## remove the venv, caches and build output
	rm -rf $(VENV) node_modules build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis .import_linter_cache

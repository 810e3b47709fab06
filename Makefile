# Lingkar: `make serve` runs the server on the memory store; `make cluster` runs N of them
# (N=3) behind Caddy on one Redis; `make test` sets up and runs every test. They install what
# they need when it is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_UPDATED := /tmp/.lingkar-apt-updated
PYTEST_ARGS ?=
N ?= 3

.PHONY: serve cluster cluster-restart cluster-revive test lint bench loadtest fuzz setup system web clean

serve: setup web
	$(VENV)/bin/lingkar serve

# N `lingkar serve` behind Caddy on http://127.0.0.1:8000, one redis-server with AOF, all
# stopped by Ctrl-C; data and keys in .cluster/ (server/cluster.py, deploy/cluster/Caddyfile).
cluster: setup system web
	$(VENV)/bin/lingkar cluster -n $(N) $(if $(STORE),--store $(STORE))

# Restarts the running cluster's processes one by one (each drains, comes back, is ready).
cluster-restart: setup
	$(VENV)/bin/lingkar cluster restart

# Starts only the cluster's processes that are not running (after a crash); the others stay.
cluster-revive: setup
	$(VENV)/bin/lingkar cluster revive

test: setup system web
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict rooms storage signaling

bench: setup system web
	$(PY) -m storage.bench
	$(PY) -m server.media.bench
	$(PY) -m loadtest.fanout
	$(PY) -m loadtest.fanout --store redis --rooms 400
	$(PY) -m loadtest.soak --store memory --circles 100 --rounds 20
	$(PY) -m loadtest.soak --store redis --circles 100 --rounds 20

# The numbers of several processes (loadtest/cluster.py, README "Numbers: several processes"):
# the home killed 20 times, redirect shares, acked writes over Redis kills (one redis-server with
# AOF, then a Redis Cluster master), fan-out for 1, 2 and 4 processes. Each starts and stops its
# own `lingkar cluster` (or processes); about 20 minutes; reported, never asserted; not in `make test`.
.PHONY: bench-cluster
bench-cluster: setup system
	$(PY) -m loadtest.cluster failover --kills 20
	$(PY) -m loadtest.cluster redirects --circles 100 --members 4
	$(PY) -m loadtest.cluster acked --restarts 5
	$(PY) -m loadtest.cluster acked --restarts 5 --store redis-cluster
	$(PY) -m loadtest.cluster fanout --processes 1,2,4 --rooms 400,800 --members 8

# A million frames through the real session, manager and rules in process (as a member, then
# as a moderator), and a hundred thousand over real sockets to uvicorn (tests/fuzz).
fuzz: setup system web
	$(PY) -m tests.fuzz --frames 1000000 --seconds 900 --socket 100000
	$(PY) -m tests.fuzz --frames 200000 --seconds 300 --role moderator --seed 2

loadtest: setup system web
	$(VENV)/bin/lingkar loadtest --rooms 20 --members 8 --duration 30 --media-rooms 2 --out loadtest-out

# The signaling path compiled with mypyc for the sources as they are (server/compiled.py): about
# a minute after a change to rooms/, storage/ or signaling/, nothing otherwise; where it cannot
# be built the server runs the same sources as Python.
setup: $(STAMP)
	@$(PY) -m server.compiled

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c 'from server.media.native import main; main()'
	touch $(STAMP)

# Debian packages: redis-server for the Redis tests, chromium for the browser tests; for the
# network tests (tests/net) iproute2, nftables and coturn; caddy for the HTTPS recipe and
# `make cluster`; openssl
# for the Redis TLS test.
system:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v turnserver >/dev/null || missing="$$missing coturn"; \
	command -v caddy >/dev/null || missing="$$missing caddy"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

web: web/node_modules/.package-lock.json

web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	@command -v npm >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; }
	cd web && npm ci --no-audit --no-fund --silent
	touch $@

clean:
	rm -rf $(VENV) web/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis

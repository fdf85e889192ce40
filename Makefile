# prelabel: `make demo` and `make test` work on a fresh machine (they install first).

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
PRELABEL   := $(BIN)/prelabel
# The default weights; on a machine without internet pass a local checkpoint file:
#   make demo PRETRAINED=/path/to/open_clip_pytorch_model.bin
MODEL      ?= ViT-B-32
PRETRAINED ?= laion2b_s34b_b79k
DEMO_OUT   ?= out/demo

.PHONY: install test demo lint clean prelabel setup review bench bench-memory bench-preprocess eval calibrate workers bench-scale bench-queue bench-big gpu-check

install: $(VENV)/.installed

# torch and torchvision are pinned here, in the install step, to the builds that install
# from this machine's local disk; pyproject.toml only sets a lower bound.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Every test, two at a time (pytest-xdist; the CLI tests run in-process, see tests/conftest.py),
# and the 15 slowest at the end. TEST_WORKERS=0 runs them one by one in this process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

# Pre-label the bundled photographs. Without internet the default weights cannot be
# downloaded (exit code 3): the demo then says so loudly and runs with random weights,
# which shows the pipeline working but gives meaningless tags.
demo: install
	@$(PRELABEL) folder samples/images --config configs/demo.yaml --out $(DEMO_OUT) \
		--model $(MODEL) --pretrained $(PRETRAINED); rc=$$?; \
	if [ $$rc -eq 3 ]; then \
		echo ""; \
		echo "*** The $(MODEL)/$(PRETRAINED) weights are not available here (offline?)."; \
		echo "*** Running the demo with RANDOM weights instead: the pipeline runs, the tags are meaningless."; \
		echo "*** For real tags: make demo PRETRAINED=/path/to/checkpoint (or run where the weights can be downloaded)."; \
		echo ""; \
		$(PRELABEL) folder samples/images --config configs/demo.yaml --out $(DEMO_OUT) \
			--model $(MODEL) --pretrained none; \
	else exit $$rc; fi

# Pre-label a CVAT project: make prelabel PROJECT=12 [CONFIG=configs/my.yaml] [ARGS="--dry-run"]
# Credentials come from CVAT_HOST and CVAT_ACCESS_TOKEN (or a cvat-cli profile); see README.
CONFIG ?=
ARGS   ?=
prelabel: install
	@test -n "$(PROJECT)" || { echo "usage: make prelabel PROJECT=<project id> [CONFIG=file.yaml] [ARGS=...]"; exit 2; }
	$(PRELABEL) run --project-id $(PROJECT) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

setup: install
	@test -n "$(PROJECT)" || { echo "usage: make setup PROJECT=<project id>"; exit 2; }
	$(PRELABEL) setup --project-id $(PROJECT)

# Measure the model on a project's reviewed frames, and learn thresholds for a target precision:
#   make eval PROJECT=12 [OUT=report]     make calibrate PROJECT=12 TARGET=0.95
OUT    ?= prelabel-report
TARGET ?= 0.95
eval: install
	@test -n "$(PROJECT)" || { echo "usage: make eval PROJECT=<project id> [OUT=folder]"; exit 2; }
	$(PRELABEL) eval --project-id $(PROJECT) --out $(OUT) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

calibrate: install
	@test -n "$(PROJECT)" || { echo "usage: make calibrate PROJECT=<project id> [TARGET=0.95]"; exit 2; }
	$(PRELABEL) calibrate --project-id $(PROJECT) --target-precision $(TARGET) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

# Throughput against the bare model and cvat-sdk's annotate_task, on the test server made as
# slow as a real CVAT 2.73 (ARGS="--latency none" turns that off); appends dated rows to
# docs/benchmarks.md. make bench ARGS="--frames 128 --repeats 2"
bench: install
	$(BIN)/python -m benchmarks.throughput $(ARGS)

# Peak RSS at N and 8N frames and its slope per frame (tiny model and ViT-B-32, folder and
# CVAT test server); --trace finds what grows with memray. make bench-memory ARGS="--frames 32"
bench-memory: install
	$(BIN)/python -m benchmarks.memory $(ARGS)

# CPU ms per frame of decoding and preprocessing, open_clip's transform next to crop_first's
bench-preprocess: install
	$(BIN)/python -m benchmarks.preprocess $(ARGS)

# On a machine with a CUDA GPU: the GPU tests (tests/test_gpu.py, skipped elsewhere), then
# make bench's GPU rows for ViT-B-32 and ViT-L-14. GPU_PYTHON is an interpreter that has
# prelabel's dependencies (default: this checkout's venv). make gpu-check [GPU_FRAMES=2048]
GPU_PYTHON ?= $(BIN)/python
GPU_FRAMES ?= 1024
gpu-check:
	$(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_gpu.py
	for model in ViT-B-32 ViT-L-14; do \
		$(GPU_PYTHON) -m benchmarks.throughput --device cuda --model $$model --frames $(GPU_FRAMES) \
			--segment-size $$(($(GPU_FRAMES) / 4)) --repeats 2 --cases accepted,review-30% $(ARGS) || exit; \
	done

# ruff (lint rules and formatting), and the layering contracts of pyproject.toml
# [tool.importlinter] (lint-imports)
lint: install
	$(BIN)/ruff check prelabel connectors tests benchmarks
	$(BIN)/ruff format --check prelabel connectors tests benchmarks
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info

# The review queue (from the state file of the last runs): make review [ARGS="--format csv"]
review: install
	$(PRELABEL) review list $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

# Scale-out: one queue worker per GPU on this machine, until Ctrl+C (or SIGTERM), which
# lets each finish its current CVAT job. make workers N=4 QUEUE=redis://HOST:6379/0
# [DEVICE=cuda] [ARGS="--batch-size 256"]; DEVICE=cpu runs N workers on the CPU.
N      ?= 1
QUEUE  ?=
DEVICE ?= cuda
workers: install
	@test -n "$(QUEUE)$$PRELABEL_QUEUE" || { echo "usage: make workers N=<workers> QUEUE=redis://HOST:PORT/DB"; exit 2; }
	@trap 'kill -TERM $$(jobs -p) 2>/dev/null; wait' INT TERM; \
	for i in $$(seq 0 $$(($(N) - 1))); do \
		$(PRELABEL) worker $(if $(QUEUE),--queue $(QUEUE)) \
			--device $(if $(filter cpu,$(DEVICE)),cpu,$(DEVICE):$$i) $(ARGS) & \
	done; wait

# The queue's overhead with 1, 2 and 4 workers and a stand-in model stage; appends to
# docs/benchmarks.md. make bench-scale ARGS="--jobs 48 --standin 0.25"
bench-scale: install
	$(BIN)/python -m benchmarks.scale $(ARGS)

# enqueue, status and review list at scale (real redis-server, a synthetic state file); prints
# the figures. make bench-queue ARGS="--jobs 2000 --frames 100000"
bench-queue: install
	$(BIN)/python -m benchmarks.queue_scale $(ARGS)

# Big projects (issue 18): enqueue, status, run and rerun of a 200- and a 2,000-job project on
# the latency-modelled test server, through the CLI; appends to docs/benchmarks.md.
# make bench-big ARGS="--jobs 20,60 --timeout 300"
bench-big: install
	$(BIN)/python -m benchmarks.big_project $(ARGS)

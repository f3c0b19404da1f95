# Two commands: `make demo` (the whole pipeline on the embedded CPU sample) and `make test` (what CI runs); on a rented
# GPU, `make gpu-check` before paying for the run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the venv's Python after `make setup`, else the machine's own (a bare CUDA image with torch runs gpu-check and ablation)
ANY_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

DEMO := data/demo
DEMO_PREPARE := --output_base=$(DEMO)/tokenized --tokenizer=packaged
DEMO_SFT_TOKENS := 2500       # the first ~30 of the sample's 400 problems: the demo's SFT takes seconds
DEMO_QUESTION := Ana shares 47 pencils among 5 friends equally and keeps the rest. How many does each friend get?

.PHONY: setup demo test gpu-check ablation clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# prepare -> train -> sft -> eval -> analyze (the base model, its run over time, what SFT changed) -> a chat turn with
# the SFT model -> its export, on the embedded sample; each stage reuses what an earlier run finished
demo: setup
	@test -f $(DEMO)/raw/sft.jsonl || $(PY) prepare.py --sample=$(DEMO)/raw
	@for source in math stem code; do \
		$(PY) prepare.py --source=$$source --input=$(DEMO)/raw/$$source.jsonl $(DEMO_PREPARE) || exit 1; done
	@$(PY) prepare.py --source=sft --input=$(DEMO)/raw/sft.jsonl --max_tokens=$(DEMO_SFT_TOKENS) $(DEMO_PREPARE)
	$(PY) train.py config/tiny.py
	$(PY) sft.py config/tiny_sft.py
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(PY) eval.py config/tiny_eval.py
	$(PY) analyze.py config/tiny_analyze.py
	$(PY) analyze.py config/tiny_analyze.py --run=checkpoints/demo --output=figures/demo/run
	$(PY) analyze.py config/tiny_analyze.py --shift=checkpoints/demo/portable_final.pt,checkpoints/demo/portable_sft_final.pt \
		--output=figures/demo/shift
	echo "$(DEMO_QUESTION)" | $(PY) sample.py --checkpoint=checkpoints/demo/portable_sft_final.pt --tokenizer=packaged \
		--max_new_tokens=60
	$(PY) export.py --checkpoint=checkpoints/demo/portable_sft_final.pt --out_dir=checkpoints/demo/export \
		--tokenizer=packaged --name=PolychromaticLM-demo-sft

# one pytest worker a core and one more: a worker waiting on a script it started leaves its core to the others
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(5, (os.cpu_count() or 1) + 1))")

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# tests/gpu_check.py, in at most 8 minutes: the CUDA tests, the speed levers side by side at full size, train.py
# stopped and resumed, exact generation; tables, JSON and log in results/gpu_check/ ($$GPU_CHECK_DIR), rewritten after
# every stage. ARGS: e.g. --stages=levers,train --levers=lean_mix. A bare CUDA image with torch, numpy and
# pytest runs it too. GPU_CHECK_DRY=1: on the CPU, tiny.
gpu-check:
	@$(ANY_PY) tests/gpu_check.py $(ARGS)

# PolyGLU against VanillaLM (README, "Is PolyGLU better?"): both arms x SEEDS init seeds on the same data, one run after
# another, each in $(ABLATION_DIR)/{arm}-seed{n}; a finished run is skipped, an interrupted one resumes; then the paired
# comparison in $(ABLATION_DIR)/comparison. LAUNCH='deepspeed --num_gpus=8' spreads each run over eight GPUs; ARGS are
# added to every train.py command line.
SEEDS ?= 3
ABLATION_CONFIG ?= config/ablation.py
ABLATION_DIR ?= checkpoints/ablation
LAUNCH ?= $(ANY_PY)
ARGS ?=

ablation:
	@for seed in $$(seq 1 $(SEEDS)); do for arm in polyglu vanilla; do \
		run=$(ABLATION_DIR)/$$arm-seed$$seed; \
		if [ -f $$run/portable_final.pt ]; then echo "$$run: finished, skipped"; continue; fi; \
		echo "$$run: train.py $(ABLATION_CONFIG) --model_type=$$arm --init_seed=$$seed"; \
		$(LAUNCH) train.py $(ABLATION_CONFIG) --model_type=$$arm --init_seed=$$seed --out_dir=$$run \
			--wandb_run_name=ablation-$$arm-seed$$seed $(ARGS) || exit 1; \
		test -f $$run/portable_final.pt || { echo "$$run stopped before its end: make ablation resumes it"; exit 1; }; \
	done; done
	@runs() { seq -s, -f "$(ABLATION_DIR)/$$1-seed%g" $(SEEDS); }; \
		$(ANY_PY) analyze.py --compare="polyglu=$$(runs polyglu) vanilla=$$(runs vanilla)" \
		--output=$(ABLATION_DIR)/comparison

clean:
	rm -rf data/demo checkpoints/demo results/demo figures/demo

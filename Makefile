# Two commands: `make demo` (the whole pipeline on the embedded CPU sample) and `make test` (what CI runs); on a rented
# GPU, `make gpu-check` before paying for the run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

DEMO := data/demo
DEMO_PREPARE := --output_base=$(DEMO)/tokenized --tokenizer=packaged
DEMO_QUESTION := Ana shares 47 pencils among 5 friends equally and keeps the rest. How many does each friend get?

.PHONY: setup demo test gpu-check clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# prepare -> train -> sft -> eval -> analyze -> a chat turn with the SFT model -> its export, on the embedded sample;
# each stage reuses what an earlier run finished
demo: setup
	@test -f $(DEMO)/raw/sft.jsonl || $(PY) prepare.py --sample=$(DEMO)/raw
	@for source in math stem code sft; do \
		$(PY) prepare.py --source=$$source --input=$(DEMO)/raw/$$source.jsonl $(DEMO_PREPARE) || exit 1; done
	$(PY) train.py config/tiny.py
	$(PY) sft.py config/tiny_sft.py
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(PY) eval.py config/tiny_eval.py
	$(PY) analyze.py config/tiny_analyze.py
	echo "$(DEMO_QUESTION)" | $(PY) sample.py --checkpoint=checkpoints/demo/portable_sft_final.pt --tokenizer=packaged \
		--max_new_tokens=60
	$(PY) export.py --checkpoint=checkpoints/demo/portable_sft_final.pt --out_dir=checkpoints/demo/export \
		--tokenizer=packaged --name=PolychromaticLM-demo-sft

test: setup
	$(PY) -m pytest -q

# bench.py --gpu_check=True: the CUDA tests, the full-size step on every attention kernel, train.py stopped and resumed,
# exact generation; table, JSON and log in results/gpu_check/ ($$GPU_CHECK_DIR). The venv's Python after `make setup`,
# else the machine's own: a bare CUDA image with torch, numpy and pytest runs it too. GPU_CHECK_DRY=1: on the CPU, tiny.
gpu-check:
	@$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench.py --gpu_check=True

clean:
	rm -rf data/demo checkpoints/demo results/demo figures/demo

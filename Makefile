# One entry point for set-up, tests and the demo. `make test` and `make demo` install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparqle-setup
# CPU machines take the CPU wheel of torch; GPU users: make setup TORCH_SPEC=torch (any CUDA build).
TORCH_SPEC ?= torch==2.13.0
TORCHAUDIO_SPEC ?= torchaudio==2.11.0
# command:Debian package; the demo's TTS voices (festival's needs its voice package too)
APT_NEEDS := espeak-ng:espeak-ng flite:flite text2wave:festival /usr/share/festival/voices/us/cmu_us_slt_arctic_hts:festvox-us-slt-hts

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup system-deps test lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@# torchaudio's wheel pins another torch and ships a CUDA-built extension that cannot load
	@# beside the CPU torch; its pure-Python parts (resample, kaldi fbank, transforms) work
	@# without it, so install it without deps and drop the unloadable libraries.
	$(PY) -m pip install -q --no-deps "$(TORCHAUDIO_SPEC)"
	@if ! $(PY) -c "import torchaudio" 2>/dev/null; then \
	  rm -f $(VENV)/lib/python*/site-packages/torchaudio/lib/*.so; \
	  $(PY) -c "import torchaudio.functional"; fi
	$(PY) -m pip install -q -e ".[dev,wandb,cluster,demo,assets]"
	touch $(STAMP)

# Debian packages the synthetic-speech tests and the demo need.
system-deps:
	@missing=""; for need in $(APT_NEEDS); do what=$${need%%:*}; pkg=$${need##*:}; \
	  if ! command -v $$what >/dev/null && [ ! -e $$what ]; then missing="$$missing $$pkg"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || { echo "apt-get install$$missing failed"; exit 1; }; \
	  else \
	    echo "missing system packages:$$missing -- install them with: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .cache logs outputs

DEMO_DIR ?= data/demo
# The whole pipeline on tiny random models: speech synthesis -> stage 1 -> stage 2 -> eval.
demo: setup
	$(PY) -m data_prep.synth_speech --out $(DEMO_DIR) --n 96 --seed 0 --val-fraction 0.25
	$(PY) train.py experiment=tiny stage=pretrain task_name=demo_pretrain \
	  data.train_manifest=$(DEMO_DIR)/train.jsonl data.val_manifest=$(DEMO_DIR)/val.jsonl \
	  hydra.run.dir=logs/demo/pretrain trainer.max_steps=60 trainer.val_check_interval=30
	$(PY) train.py experiment=tiny stage=instruct task_name=demo_instruct \
	  data.train_manifest=$(DEMO_DIR)/train.jsonl data.val_manifest=$(DEMO_DIR)/val.jsonl \
	  stage.init_from=logs/demo/pretrain/checkpoints/last.ckpt \
	  hydra.run.dir=logs/demo/instruct trainer.max_steps=60 trainer.val_check_interval=30
	$(PY) eval.py ckpt=logs/demo/instruct/checkpoints/last.ckpt data.test_manifest=$(DEMO_DIR)/val.jsonl \
	  'tasks=[asr,translate_de]' out=logs/demo/report hydra.run.dir=logs/demo/eval
	@echo "demo: checkpoints, logs and report under logs/demo/ (tiny random models: the numbers show the pipeline runs, not quality)"

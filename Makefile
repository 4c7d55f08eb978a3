# `make quickstart` and `make test` each create .venv when it is missing (pinned versions from pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

# The quickstart: the whole pipeline on the synthetic `shapes` dataset with a small U-Net at 16x16, on the CPU,
# as a DVC experiment whose overrides are visible in `dvc exp show` (params.yaml keeps the CIFAR-10 default).
# Its recipe is the winner of the ablations in README *Results*: v-prediction on the cosine schedule with
# min-SNR-5 weighting, 900 steps (60 % of the earlier 1,500), DPM-Solver++(2M) with 10 time-uniform steps at
# guidance 1. The progress grids keep DDIM-25 at guidance 4 (classes show early; they do not affect the weights).
QUICKSTART_BASE := \
	-S data.dataset=shapes -S data.image_size=16 -S data.shapes_per_class=600 \
	-S model.channels=32 -S 'model.channel_mult=[1,2,2]' -S model.num_res_blocks=1 \
	-S 'model.attention_resolutions=[8]' -S model.dropout=0.0 \
	-S train.device=cpu -S train.precision=fp32 -S train.compile=false -S train.channels_last=false \
	-S train.batch_size=64 -S train.steps=900 -S train.lr=0.001 -S train.warmup_steps=100 \
	-S train.ema_decay=0.995 -S train.sample_every=500 -S train.checkpoint_every=250 -S train.min_snr_gamma=5.0 \
	-S train.progress_steps=25 -S train.progress_guidance_scale=4.0 \
	-S sample.num_samples=500 -S sample.batch_size=500 -S sample.grid_per_class=8 \
	-S evaluate.fid=false -S evaluate.classifier.epochs=3 -S evaluate.classifier.width=16 \
	-S 'evaluate.guidance_sweep=[0.0,1.0,2.0,4.0]' -S evaluate.sweep_samples=200 \
	-S tracking.log_every=25
QUICKSTART_RECIPE   := -S schedule=cosine -S diffusion.prediction=v -S train.loss_weighting=min_snr
QUICKSTART_SAMPLING := -S sample.sampler=dpm_solver -S sample.spacing=time -S sample.steps=10 -S sample.guidance_scale=1.0
QUICKSTART_PARAMS   := $(QUICKSTART_BASE) $(QUICKSTART_RECIPE) $(QUICKSTART_SAMPLING) -S tracking.experiment=quickstart

# The CPU CIFAR-10 experiment: real CIFAR-10 classes at 16x16 (4x cheaper than 32x32, so ~4x the steps in the
# same budget), the quickstart's 1.1M-parameter U-Net, v-prediction on the cosine schedule with min-SNR
# weighting (the quickstart grid's best; README *Results* compares it with the linear schedule on CIFAR-10),
# DPM-Solver++(2M) on log-SNR steps at guidance 2 (the sweep's best fd, colours within 10 %); 4,500 steps
# (better than 3,000 at every guidance up to 2): 8.4 minutes of training on a quiet 2-core AVX-512 machine
# (573 img/s), about 2.3x that (~19 min) on AVX2, inside the 30-minute budget.
# `make cifar-cpu CIFAR=path/to/folder-or-archive` reads class folders (e.g. a CIFAR-10 JPEG .tar.gz);
# without CIFAR the `cifar10` dataset is used (torchvision download into data/raw/, as params.yaml).
CIFAR ?=
CIFAR_DATA := $(if $(CIFAR),-S data.dataset=folder -S data.folder=$(CIFAR),-S data.dataset=cifar10)
CIFAR_CPU_BASE := \
	$(CIFAR_DATA) -S data.image_size=16 \
	-S model.channels=32 -S 'model.channel_mult=[1,2,2]' -S model.num_res_blocks=1 \
	-S 'model.attention_resolutions=[8]' -S model.dropout=0.0 \
	-S diffusion.prediction=v -S train.loss_weighting=min_snr -S train.min_snr_gamma=5.0 \
	-S train.device=cpu -S train.precision=fp32 -S train.compile=false -S train.channels_last=false \
	-S train.batch_size=64 -S train.lr=0.001 -S train.warmup_steps=100 \
	-S train.ema_decay=0.999 -S train.sample_every=500 -S train.checkpoint_every=250 \
	-S train.progress_sampler=dpm_solver -S train.progress_spacing=logsnr -S train.progress_steps=25 \
	-S train.progress_guidance_scale=3.0 \
	-S sample.num_samples=1000 -S sample.batch_size=500 -S sample.grid_per_class=8 \
	-S evaluate.fid=false -S evaluate.classifier.epochs=3 -S evaluate.classifier.width=16 \
	-S evaluate.sweep_samples=500 -S tracking.log_every=50
CIFAR_SWEEP      := -S 'evaluate.guidance_sweep=[0.0,1.0,2.0,3.0,4.0]'
CIFAR_SAMPLING   := -S sample.sampler=dpm_solver -S sample.spacing=logsnr -S sample.steps=25
CIFAR_GUIDANCE   ?= 2.0
CIFAR_STEPS      ?= 4500
CIFAR_CPU_PARAMS := $(CIFAR_CPU_BASE) -S schedule=cosine -S train.steps=$(CIFAR_STEPS) $(CIFAR_SAMPLING) -S sample.guidance_scale=$(CIFAR_GUIDANCE) \
	$(CIFAR_SWEEP) -S tracking.experiment=cifar-cpu

# Ablations through DVC's own queue (README *Results*): each grid point is a queued `dvc exp run` in a
# temporary copy, one MLflow run each in the experiment named by tracking.experiment; `ablate-guidance` and
# `ablate-samplers` re-sample the cached training of ABLATE_RECIPE (only the sample and evaluate stages run).
# Each target waits for the queue; `python -m ddpm compare --experiment ablate-quickstart --markdown ...`
# prints the tables (the README's *Results* gives the exact commands).
ABLATE_DDIM25   := -S sample.sampler=ddim -S sample.spacing=time -S sample.steps=25
ABLATE_GUIDANCE ?= 1.0
ABLATE_JOBS     ?= 1
# start the queue's workers and wait for them
ABLATE_RUN      := dvc queue start -j $(ABLATE_JOBS) && \
	while dvc queue status | grep -qE 'Queued|Running'; do sleep 20; done; dvc queue status
# (each target names every key once, so the command line shows exactly what each grid point runs)
ABLATE_QS       := dvc exp run --queue $(QUICKSTART_BASE) -S tracking.experiment=ablate-quickstart
ABLATE_CIFAR    := dvc exp run --queue $(CIFAR_CPU_BASE) -S tracking.experiment=ablate-cifar

ablate-quickstart: venv
	$(ABLATE_QS) $(ABLATE_DDIM25) -S sample.guidance_scale=4.0 \
		-S 'schedule=linear,cosine' -S 'diffusion.prediction=eps,v' -S 'train.loss_weighting=uniform,min_snr'
	$(ABLATE_RUN)

ablate-guidance: venv
	$(ABLATE_QS) $(QUICKSTART_RECIPE) $(ABLATE_DDIM25) -S 'evaluate.guidance_sweep=[]' \
		-S 'sample.guidance_scale=1.0,1.5,2.0,3.0,4.0'
	$(ABLATE_RUN)

ablate-samplers: venv
	$(ABLATE_QS) $(QUICKSTART_RECIPE) -S 'evaluate.guidance_sweep=[]' -S sample.guidance_scale=$(ABLATE_GUIDANCE) \
		-S 'sample.sampler=ddim,dpm_solver' -S 'sample.steps=10,25,50' -S 'sample.spacing=time,logsnr'
	$(ABLATE_RUN)

# The quickstart grid's best two recipes on the CPU CIFAR-10 experiment (both v-prediction with min-SNR-5;
# they differ in the schedule). Same CIFAR=... as cifar-cpu.
ablate-cifar: venv
	$(ABLATE_CIFAR) $(CIFAR_SAMPLING) -S sample.guidance_scale=3.0 $(CIFAR_SWEEP) \
		-S train.steps=3000 -S 'schedule=cosine,linear'
	$(ABLATE_RUN)

# The training budget: the winner at 3,000 and 4,500 steps (the 3,000-step point is ablate-cifar's cosine run).
ablate-cifar-budget: venv
	$(ABLATE_CIFAR) $(CIFAR_SAMPLING) -S sample.guidance_scale=3.0 $(CIFAR_SWEEP) \
		-S schedule=cosine -S 'train.steps=3000,4500'
	$(ABLATE_RUN)

# Samplers x steps on the cached 3,000-step CIFAR-10 training of the cifar-cpu recipe, at CIFAR_GUIDANCE.
ablate-cifar-samplers: venv
	$(ABLATE_CIFAR) -S schedule=cosine -S train.steps=3000 \
		-S 'evaluate.guidance_sweep=[]' -S sample.guidance_scale=$(CIFAR_GUIDANCE) \
		-S 'sample.sampler=ddim,dpm_solver' -S 'sample.steps=10,25,50' -S 'sample.spacing=time,logsnr'
	$(ABLATE_RUN)

.PHONY: venv quickstart cifar-cpu ablate-quickstart ablate-guidance ablate-samplers ablate-cifar ablate-cifar-budget ablate-cifar-samplers docs-figures test test-fast bench bench-gpu mlflow-ui tensorboard clean-outputs

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	@touch $@

quickstart: venv
	@git rev-parse --verify HEAD >/dev/null 2>&1 || { echo "quickstart needs a git checkout with a commit (dvc exp run records experiments in git)"; exit 2; }
	time dvc exp run $(QUICKSTART_PARAMS)
	dvc metrics show
	@echo "Samples: samples/grid.png, samples/denoise.png. Compare runs: make mlflow-ui; dvc exp show"

cifar-cpu: venv
	@git rev-parse --verify HEAD >/dev/null 2>&1 || { echo "cifar-cpu needs a git checkout with a commit (dvc exp run records experiments in git)"; exit 2; }
	time dvc exp run $(CIFAR_CPU_PARAMS)
	dvc metrics show
	@echo "Figures: samples/progression.png, samples/grid.png. Then: make docs-figures"

# The README's figures: the last experiment's progression and final grid, copied into docs/ as PNGs
# (small already: 16x16 cells are drawn 3x, the grid is 8 samples x 10 classes).
docs-figures:
	@test -f samples/progression.png -a -f samples/grid.png || { echo "no samples/progression.png or samples/grid.png: run make cifar-cpu first"; exit 2; }
	mkdir -p docs
	$(BIN)/python -c "from PIL import Image; Image.open('samples/progression.png').save('docs/cifar_cpu_progression.png', optimize=True)"
	$(BIN)/python -c "from PIL import Image; Image.open('samples/grid.png').save('docs/cifar_cpu_grid.png', optimize=True)"  # already enlarged to >= 256 px
	@ls -l docs/cifar_cpu_progression.png docs/cifar_cpu_grid.png

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

# The CPU check: the reference network in fp32 against diffusers, both layouts, 4 interleaved rounds of one
# step each (20 timed calls per network and layout; about 4 minutes on a 2-core AVX2 CPU, README).
bench: venv
	$(BIN)/python -m ddpm bench --reference --vs diffusers --device cpu --precision fp32 --batch-size 16 \
		--steps 1 --warmup 1 --rounds 4 --channels-last both

# The GPU check, one command (about 10 minutes on an H100): eager vs compiled, bf16 vs TF32, two batch sizes,
# against diffusers; then CUDA graphs (reduce-overhead) for ours alone.
bench-gpu: venv
	$(BIN)/python -m ddpm bench --reference --device cuda --vs diffusers --precision bf16,fp32 \
		--batch-size 128,512 --compile both --steps 10 --warmup 3
	$(BIN)/python -m ddpm bench --reference --device cuda --precision bf16 --batch-size 128,512 \
		--compile on --compile-mode reduce-overhead --steps 10 --warmup 3

# First the address of each experiment's runs table (MLflow 3 would open an experiment on its GenAI overview),
# or only EXPERIMENT's: make mlflow-ui EXPERIMENT=quickstart
MLFLOW_PORT ?= 5000
EXPERIMENT  ?=
mlflow-ui: venv
	@$(BIN)/python -m ddpm.tracking.ui --store $(CURDIR)/mlflow.db --base http://127.0.0.1:$(MLFLOW_PORT) \
		$(if $(EXPERIMENT),--experiment '$(EXPERIMENT)')
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

tensorboard: venv
	$(BIN)/tensorboard --logdir logs/tensorboard --host 127.0.0.1 --port 6006

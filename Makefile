# `make quickstart` and `make test` each create .venv when it is missing (pinned versions from pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

# Recipes are files (recipes/*.yaml): the overrides of params.yaml, nested like it, run as one
# `dvc exp run -S key=value ...` (so `dvc exp show` lists every override) by `python -m ddpm recipe FILE`;
# `python -m ddpm recipe FILE --print` shows the command. Extra `-S key=value` flags add or replace overrides.
RECIPE_RUN := python -m ddpm recipe

# `make cifar-cpu CIFAR=path/to/folder-or-archive` reads class folders (e.g. a CIFAR-10 JPEG .tar.gz);
# without CIFAR the recipe's `cifar10` dataset is used (torchvision download into data/raw/, as params.yaml).
# CIFAR_STEPS / CIFAR_GUIDANCE replace the recipe's train.steps / sample.guidance_scale when given.
CIFAR ?=
CIFAR_STEPS ?=
CIFAR_GUIDANCE ?=
CIFAR_DATA := $(if $(CIFAR),-S data.dataset=folder -S data.folder=$(CIFAR))
CIFAR_GUIDE := $(if $(CIFAR_GUIDANCE),-S sample.guidance_scale=$(CIFAR_GUIDANCE))
CIFAR_OPTS := $(CIFAR_DATA) $(if $(CIFAR_STEPS),-S train.steps=$(CIFAR_STEPS)) $(CIFAR_GUIDE)

# Ablations through DVC's own queue (docs/ablations.md): each grid point is a queued `dvc exp run` in a
# temporary copy, one MLflow run each in the experiment named by tracking.experiment; `ablate-guidance` and
# `ablate-samplers` re-sample the cached training of the quickstart recipe (only the sample and evaluate
# stages run). Each target waits for the queue; `python -m ddpm compare --experiment ablate-quickstart
# --markdown ...` prints the tables (docs/ablations.md gives the exact commands).
ABLATE_DDIM25   := -S sample.sampler=ddim -S sample.spacing=time -S sample.steps=25
ABLATE_GUIDANCE ?= 1.0
ABLATE_JOBS     ?= 1
# start the queue's workers and wait for them
ABLATE_RUN      := dvc queue start -j $(ABLATE_JOBS) && \
	while dvc queue status | grep -qE 'Queued|Running'; do sleep 20; done; dvc queue status
# a recipe queued with the target's -S flags, which replace the recipe's values of the same keys (each key
# appears once in the queued command, so it shows exactly what each grid point runs)
ABLATE_QS       := $(RECIPE_RUN) recipes/quickstart.yaml --queue -S tracking.experiment=ablate-quickstart
ABLATE_CIFAR    := $(RECIPE_RUN) recipes/cifar-cpu.yaml --queue $(CIFAR_DATA) -S tracking.experiment=ablate-cifar

ablate-quickstart: venv
	$(ABLATE_QS) $(ABLATE_DDIM25) -S sample.guidance_scale=4.0 \
		-S 'schedule=linear,cosine' -S 'diffusion.prediction=eps,v' -S 'train.loss_weighting=uniform,min_snr'
	$(ABLATE_RUN)

ablate-guidance: venv
	$(ABLATE_QS) $(ABLATE_DDIM25) -S 'evaluate.guidance_sweep=[]' \
		-S 'sample.guidance_scale=1.0,1.5,2.0,3.0,4.0'
	$(ABLATE_RUN)

ablate-samplers: venv
	$(ABLATE_QS) -S 'evaluate.guidance_sweep=[]' -S sample.guidance_scale=$(ABLATE_GUIDANCE) \
		-S 'sample.sampler=ddim,dpm_solver' -S 'sample.steps=10,25,50' -S 'sample.spacing=time,logsnr'
	$(ABLATE_RUN)

# The quickstart grid's best two recipes on the CPU CIFAR-10 experiment (both v-prediction with min-SNR-5;
# they differ in the schedule). Same CIFAR=... as cifar-cpu.
ablate-cifar: venv
	$(ABLATE_CIFAR) -S sample.guidance_scale=3.0 -S train.steps=3000 -S 'schedule=cosine,linear'
	$(ABLATE_RUN)

# The training budget: the winner at 3,000 and 4,500 steps (the 3,000-step point is ablate-cifar's cosine run).
ablate-cifar-budget: venv
	$(ABLATE_CIFAR) -S sample.guidance_scale=3.0 -S 'train.steps=3000,4500'
	$(ABLATE_RUN)

# Samplers x steps on the cached 3,000-step CIFAR-10 training of the cifar-cpu recipe, at its guidance
# (or CIFAR_GUIDANCE).
ablate-cifar-samplers: venv
	$(ABLATE_CIFAR) -S train.steps=3000 -S 'evaluate.guidance_sweep=[]' $(CIFAR_GUIDE) \
		-S 'sample.sampler=ddim,dpm_solver' -S 'sample.steps=10,25,50' -S 'sample.spacing=time,logsnr'
	$(ABLATE_RUN)

.PHONY: venv quickstart cifar-cpu experiment ablate-quickstart ablate-guidance ablate-samplers ablate-cifar ablate-cifar-budget ablate-cifar-samplers docs-figures test test-fast bench bench-gpu mlflow-ui tensorboard clean-outputs

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	@touch $@

quickstart: venv
	@git rev-parse --verify HEAD >/dev/null 2>&1 || { echo "quickstart needs a git checkout with a commit (dvc exp run records experiments in git)"; exit 2; }
	time $(RECIPE_RUN) recipes/quickstart.yaml
	dvc metrics show
	@echo "Samples: samples/grid.png, samples/denoise.png. Compare runs: make mlflow-ui; dvc exp show"

cifar-cpu: venv
	@git rev-parse --verify HEAD >/dev/null 2>&1 || { echo "cifar-cpu needs a git checkout with a commit (dvc exp run records experiments in git)"; exit 2; }
	time $(RECIPE_RUN) recipes/cifar-cpu.yaml $(CIFAR_OPTS)
	dvc metrics show
	@echo "Figures: samples/progression.png, samples/grid.png. Then: make docs-figures"

# Your own recipe: `make experiment RECIPE=path/to/recipe.yaml` (overrides nested like params.yaml; see recipes/).
experiment: venv
	@test -n "$(RECIPE)" || { echo "usage: make experiment RECIPE=path/to/recipe.yaml (see recipes/)"; exit 2; }
	@git rev-parse --verify HEAD >/dev/null 2>&1 || { echo "experiment needs a git checkout with a commit (dvc exp run records experiments in git)"; exit 2; }
	time $(RECIPE_RUN) $(RECIPE)
	dvc metrics show

# The README's figures: the last experiment's progression and final grid, copied into docs/ as PNGs
# (small already: 16x16 cells are drawn 3x, the grid is 8 samples x 10 classes).
docs-figures:
	@test -f samples/progression.png -a -f samples/grid.png || { echo "no samples/progression.png or samples/grid.png: run make cifar-cpu first"; exit 2; }
	mkdir -p docs
	$(BIN)/python -c "from PIL import Image; Image.open('samples/progression.png').save('docs/cifar_cpu_progression.png', optimize=True)"
	$(BIN)/python -c "from PIL import Image; Image.open('samples/grid.png').save('docs/cifar_cpu_grid.png', optimize=True)"  # already enlarged to >= 256 px
	@test ! -f samples/progress_curve.png || $(BIN)/python -c "from PIL import Image; Image.open('samples/progress_curve.png').save('docs/cifar_cpu_progress_curve.png', optimize=True)"
	@ls -l docs/cifar_cpu_progression.png docs/cifar_cpu_grid.png

# -n auto: one pytest-xdist worker per usable core (tests/conftest.py); loadgroup keeps a module whose fixtures
# are module-scoped on one worker. Most tests wait on subprocesses (dvc, stages), so one process used one core.
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto --dist loadgroup

test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto --dist loadgroup -m "not slow"

# The CPU check: the reference network in fp32 against diffusers, both layouts, 4 interleaved rounds of one
# step each (20 timed calls per network and layout; about 4 minutes on a 2-core AVX2 CPU, docs/performance.md).
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

# recycler — every target sets itself up from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch by default; e.g. `make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install lint test demo bench bench-startup exp-recycle exp-mwa exp-fisher exp-samplers exp-objectives exp-fidelity exp-stratified clean

# setup.py and the C kernel too: an edited kernel is rebuilt before the tests run.
$(STAMP): pyproject.toml setup.py recycler/merge/_fused.c
	$(MAKE) install

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check recycler tests experiments tools
	$(BIN)/mypy

# mergekit in a venv of its own, for the parity tests and the benchmark; where it
# cannot be installed those compare against tests/reference_merge.py alone.
MERGEKIT := .venv-mergekit/.mergekit-installed
$(MERGEKIT):
	bash experiments/mergekit_env.sh || echo "mergekit unavailable: comparing against the reference merge only"

# A throwaway PostgreSQL server for the tests that need one (.ci/with-postgres installs
# it as root; where it cannot, it says so and those tests are skipped).
# The project's venv and mergekit's are built side by side (two jobs): independent, and
# mostly waiting on pip.
test:
	$(MAKE) -j2 lint $(MERGEKIT)
	bash .ci/with-postgres $(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

demo: $(STAMP)
	$(BIN)/recycler demo

# bench_ray measures a study on PostgreSQL too where a server can be started here.
# The methods and mergekit's recipe styles (slices) are reported apart:
# results/bench_merge.* and results/bench_recipes.*.
bench: $(STAMP) $(MERGEKIT)
	$(BIN)/python experiments/bench_merge.py --methods linear,ties,model_stock
	$(BIN)/python experiments/bench_merge.py --methods gradient_slerp,frankenmerge \
		--out experiments/results/bench_recipes
	bash .ci/with-postgres $(BIN)/python experiments/bench_ray.py

# Seconds from `recycler search` to its first finished trial on the micro pool, by phase.
bench-startup: $(STAMP)
	$(BIN)/python experiments/bench_startup.py

# Experiments: each builds what it needs, scores on the test split, and
# writes CSV, Markdown and PNG to experiments/results/.
# Experiments 1, 4 and 5 share their searches (experiments/searchkit.py, stored under
# experiments/_runs/): the first target run pays for them, the others read them back.
exp-recycle: $(STAMP)
	$(BIN)/python experiments/exp_recycle.py

exp-samplers: $(STAMP)
	$(BIN)/python experiments/exp_samplers.py

exp-objectives: $(STAMP)
	$(BIN)/python experiments/exp_objectives.py

exp-mwa: $(STAMP)
	$(BIN)/python experiments/exp_mwa.py

exp-fisher: $(STAMP)
	$(BIN)/python experiments/exp_fisher.py

exp-fidelity: $(STAMP)
	$(BIN)/python experiments/exp_fidelity.py

# Builds two Qwen2 demo pools besides the Llama one (~2 min each).
exp-stratified: $(STAMP)
	$(BIN)/python experiments/exp_stratified.py

clean:
	rm -rf $(VENV) .venv-mergekit .mypy_cache .ruff_cache .pytest_cache

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup test demo reproduce ggam bench clean mutation

# One stamp file: the venv is rebuilt when the dependencies change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q --durations=15

# Mutation testing of the numeric core (docs/testing.md): every operator and constant changed one
# at a time, each change run against the tests that reach it. Long: each survivor runs every test
# that reaches its function; MUTANTS="camlens.combine*" runs one module. One thread: mutmut's
# workers hang on torch's thread pool otherwise.
MUTANTS ?=
mutation: setup
	OMP_NUM_THREADS=1 $(BIN)/mutmut run $(MUTANTS)
	$(BIN)/python tools/mutation_score.py --survivors

# The main job on the sample photos, with the embedded model: see demo-out/*/comparison.png and
# demo-out/report.html.
demo: setup
	$(BIN)/camlens explain samples --out demo-out --html

# The Score-CAM paper's comparison on the embedded model: crops and flips of the samples.
reproduce: setup
	rm -rf eval-data && $(BIN)/python benchmarks/sample_dataset.py eval-data
	$(BIN)/camlens evaluate eval-data --out eval-out

# The GGAM ablation (README, "Training with GGAM"): the generated fine-grained data, then
# 8 configurations x 5 seeds on the frozen embedded backbone; 11-17 minutes on 2 shared CPU cores.
ggam: setup
	rm -rf ggam-data ggam-experiment
	$(BIN)/python benchmarks/ggam_dataset.py ggam-data --size 224
	$(BIN)/python benchmarks/ggam_experiment.py ggam-data --out ggam-experiment

bench: setup
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache demo-out eval-data eval-out ggam-data ggam-experiment

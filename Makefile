# `make sweep` and `make test` set everything up on first use (venv, PyTorch, the project, the data package).
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DATA_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser cluster postgres sweep notebook test ui dashboard tensorboard disk

setup: $(VENV)/.installed data

# PyTorch's x86_64 wheel is its CUDA build: the venv takes ~6.3 GB. Say so before pip fills the disk halfway.
NEED_MB ?= 6500
disk:
	@free=$$(df -Pm "$$(dirname "$(abspath $(VENV))")" | awk 'NR==2 {print $$4}'); \
	if [ "$$free" -lt $(NEED_MB) ]; then \
	  echo "make: the venv needs about $(NEED_MB) MB free (PyTorch's CUDA build) and $(abspath $(VENV))'s disk has $$free MB: free some space and rerun"; \
	  exit 1; fi

$(VENV)/.installed: pyproject.toml
	@[ -d $(VENV) ] || $(MAKE) --no-print-directory disk  # a first install only
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,launchers]' --config-settings editable_mode=compat  # compat: Hydra's plugin scan sees hydra_plugins/
	touch $@

# Debian/Ubuntu ship the real Fashion-MNIST; elsewhere the first run downloads it with torchvision.
data:
	@if [ ! -f $(DATA_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }; fi

# headless Chromium renders the MLflow UI in the tests
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y chromium || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }; fi

sweep: setup  ## the design-card sweep: SGD/Adam x batch 16/100
	$(PY) -m fmnist_exp -m optimizer=sgd,adam data.batch_size=16,100

notebook: setup  ## the notebook's full 16-run grid
	$(PY) -m fmnist_exp +experiment=notebook

# a one-node SLURM cluster (munged, slurmctld, slurmd) runs the hydra/launcher=slurm tests (tests/slurm_cluster.py)
cluster:
	@if ! command -v slurmctld >/dev/null && [ ! -x /usr/sbin/slurmctld ] && command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y slurm-wlm munge || { $(SUDO) apt-get update && $(SUDO) apt-get install -y slurm-wlm munge; } || \
	  echo "SLURM could not be installed: tests/test_slurm.py will say so and skip"; fi

# a PostgreSQL server for the search's shared-storage test (tests/postgres_server.py starts its own on 127.0.0.1)
postgres:
	@if [ ! -d /usr/lib/postgresql ] && command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y postgresql || { $(SUDO) apt-get update && $(SUDO) apt-get install -y postgresql; } || \
	  echo "PostgreSQL could not be installed: tests/test_search.py will say so"; fi

# every tier (pyproject.toml's markers; `pytest` alone runs the fast one), the 15 slowest tests listed at the end;
# in TEST_WORKERS pytest-xdist workers (0: in this process), tests sharing a module's fixture in one (loadgroup)
TEST_WORKERS ?= 2
test: setup browser cluster postgres
	$(PY) -m pytest -m "" -n $(TEST_WORKERS) --dist loadgroup --durations=15

ui:  ## MLflow UI on this store, bound to 127.0.0.1
	@echo "Runs: http://127.0.0.1:5000/#/experiments/1/runs (the experiment 'fmnist'; its plain page opens MLflow's GenAI overview)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

dashboard:  ## optuna-dashboard on the searches' studies (hydra/sweeper=search), bound to 127.0.0.1
	$(VENV)/bin/optuna-dashboard --server wsgiref --host 127.0.0.1 --port 8080 sqlite:///mlruns/optuna.db

tensorboard:
	$(VENV)/bin/tensorboard --logdir_spec sweeps:multirun,runs:outputs --host 127.0.0.1 --port 6006  # sweeps' jobs and single runs

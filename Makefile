# Two commands do everything on a fresh machine:
#   make run    the main job: the quickstart notebook (QM9, sum vs WA vs ABP, attention next to orbitals)
#   make test   the test suite (pytest + nbval on the notebooks in smoke mode)
# Both create .venv and install into it first (idempotent: re-runs only when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.abp-installed
OUT    ?= outputs
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install run test lab clean browser-deps

install: $(STAMP)

# torch==2.13.0 goes in first (a CPU wheel lies on disk); constraints.txt then stops any
# dependency from pulling a newer, multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[dev,dft]"
	$(BIN)/python -c "import abp_core.models, torch; print('abp installed; torch', torch.__version__)"
	bash scripts/fetch_3dmol.sh           # local 3Dmol.js (npm) for offline 3D views: abp_core/static/3dmol/
	$(BIN)/python -m abp_core.jupyter_static  # Jupyter server extension that serves it to notebooks
	touch $(STAMP)

run: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/papermill notebooks/00_quickstart.ipynb $(OUT)/00_quickstart.ipynb --log-output -p output_dir $(OUT)/quickstart
	$(BIN)/jupyter trust $(OUT)/00_quickstart.ipynb  # saved 3D views run their scripts when opened later

# headless Chromium (apt-get, as root) + a local 3Dmol.js (npm 3dmol, git-ignored abp_core/static/3dmol)
# for the real-browser tests (exported views, JupyterLab); idempotent.
browser-deps:
	bash scripts/browser_deps.sh

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest

# JupyterLab offline: 3Dmol.js from the server extension, no news or update checks; opens the main
# job's output once `make run` has written it, else the quickstart itself.
LAB_NOTEBOOK ?= $(if $(wildcard $(OUT)/00_quickstart.ipynb),$(OUT)/00_quickstart.ipynb,notebooks/00_quickstart.ipynb)
lab: $(STAMP)
	$(BIN)/jupyter lab $(LAB_NOTEBOOK) --LabApp.news_url=None \
		--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) $(OUT) runs .pytest_cache .cache

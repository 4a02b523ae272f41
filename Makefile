# polymodal: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup browser test test-slow demo bench clean

# torch is pinned (2.13.0). Which build pip picks is the index's: set TORCH_INDEX to choose, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu     (the CPU build, ~200 MB)
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126   (a CUDA build)
# Left empty, pip's own configuration decides (on PyPI: the CUDA build on Linux x86-64).
TORCH_INDEX ?=

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q torch==2.13.0 --index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c "import torch; print('torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
	touch $@

setup: $(BIN)/.installed

# The browser tests (report and search pages) use Debian's chromium; they skip where none can be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] || { echo "chromium not installed (installing it needs root): the browser tests will be skipped"; exit 0; } ; \
	    command -v apt-get >/dev/null 2>&1 || { echo "chromium not installed (no apt-get here): the browser tests will be skipped"; exit 0; } ; \
	    (apt-get install -y -q chromium >$(VENV)/browser-install.log 2>&1 || \
	     (apt-get update -q >>$(VENV)/browser-install.log 2>&1 && apt-get install -y -q chromium >>$(VENV)/browser-install.log 2>&1)) || \
	    echo "chromium not installed: apt-get said: $$(grep -E '^(E|W):' $(VENV)/browser-install.log | tail -1) (full log: $(VENV)/browser-install.log); the browser tests will be skipped" ; }

test: setup browser
	$(BIN)/python -m pytest -q -rs

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

demo: setup
	$(BIN)/polymodal demo --out runs/demo

bench: setup
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/torchrun --nproc_per_node=4 benchmarks/grouped_itc.py

clean:
	rm -rf $(VENV) runs .pytest_cache

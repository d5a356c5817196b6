# Set-up and everyday commands. Each target creates (or reuses) the virtual environment in
# $(VENV) and installs what it needs, so a fresh clone needs nothing else.
#   make demo   - the main job: a short CapsNet training on the CPU, prints test accuracy
#   make test   - the test suite (what CI runs)
#   make bench  - the quick benchmark suite
VENV ?= .venv
PYTHON ?= python3
# torch==2.13.0 is the release the project is tested with; set TORCH_SPEC to use another one
# (an already-installed torch in the environment is kept as it is).
TORCH_SPEC ?= torch==2.13.0
# Triton 3.6.0 is what torch 2.11 pins and the GPU machines run; its compiler is stricter than
# later releases' (tl.dot needs K >= 16 for every dtype), so the tests compile every kernel for
# sm_90 with it (tests/test_triton_compile.py) and run the interpreter tests on it.
TRITON_SPEC ?= triton==3.6.0
# Triton 3.6's interpreter turns a loop bound computed in a kernel into a one-element array and
# calls int() on it, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted").
NUMPY_SPEC ?= numpy<2.4
PY := $(VENV)/bin/python
STAMP := $(VENV)/.capsnet_ext-installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TRITON_SPEC)" "$(NUMPY_SPEC)" pytest ninja pybind11 tqdm matplotlib tensorboard scikit-learn scipy
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/capsnet-ext demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/capsnet-ext bench --quick

clean:
	rm -rf build *.egg-info

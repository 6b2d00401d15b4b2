# Two commands do all the set-up themselves:
#   make demo   synthetic data -> pack -> train -> export -> infer -> evaluate
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every version fixed by the lock (a pip constraints file): our venv and CI are
# reproducible while pyproject.toml keeps the ranges users install with.
LOCK   := requirements.lock
EXTRAS ?= test,timm,slides,tensorboard,fastgz,mutate
WHEELHOUSE ?= wheelhouse
WHEEL_CONSTRAINTS ?= $(LOCK)

.PHONY: demo test bench fuzz gpu-check install wheelhouse clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pcamtool demo demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-columns=min,median,ops --benchmark-sort=name

# The TIFF reader fuzzed for FUZZ_SECONDS (default 600): mutated real headers
# and IFDs, each read in a bounds-checked worker process (tests/test_fuzz_tiff.py).
fuzz: $(STAMP)
	PCAMTOOL_FUZZ_SECONDS=$${FUZZ_SECONDS:-600} $(BIN)/python -m pytest -q -s tests/test_fuzz_tiff.py -k fuzzed

# The GPU paths, measured on a machine with an NVIDIA GPU (benchmarks/gpu-results.md
# and .json); elsewhere one line and exit 0. A GPU machine whose python3 already
# has torch, h5py, numba and onnxruntime (the lent ones, which reach no package
# index) runs it with that python3; any other installs the venv first. Carry an
# onnxruntime-gpu wheel there for the CUDA/TensorRT providers (see README).
gpu-check:
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
	  echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing measured"; exit 0; fi; \
	if python3 -c "import torch, h5py, numba, tifffile, click, onnx, onnxruntime, sklearn, tqdm" 2>/dev/null; then \
	  PYTHONPATH="$(CURDIR):$$PYTHONPATH" python3 benchmarks/gpu_check.py; \
	else $(MAKE) install && $(BIN)/python benchmarks/gpu_check.py; fi

# Wheels of pcamtool and every non-torch dependency, for an internet-off
# notebook (attach the folder as a Kaggle data set; docs/install.md).
# WHEEL_PY=3.12 makes them for another CPython (Colab).
wheelhouse: $(STAMP)
	$(BIN)/python .ci/wheelhouse.py --out $(WHEELHOUSE) -c $(WHEEL_CONSTRAINTS) $(if $(WHEEL_PY),--python-version $(WHEEL_PY)) $(if $(WHEEL_CUDA),--cuda $(WHEEL_CUDA))

clean:
	rm -rf $(VENV) demo demo-slides $(WHEELHOUSE)

# Mutation testing (mutmut, one worker; minutes per module): each mutant of the modules listed
# in pyproject's [tool.mutmut] against the tests that reach it; `$(BIN)/mutmut results` lists
# the survivors, `$(BIN)/mutmut show NAME` shows one. Scores: benchmarks/mutation.md.
.PHONY: mutate
mutate: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1
	$(BIN)/python benchmarks/mutation_score.py

# Whole slides on synthetic slides: trains the demo's model (or MODEL=path.onnx), paints three
# pyramidal TIFFs, runs 'pcamtool slide' and prints slides.csv and each slide's tile AUC.
.PHONY: demo-slides
demo-slides: $(STAMP)
	$(BIN)/python -m pcamtool.slide.demo demo-slides $(if $(MODEL),--model $(MODEL))

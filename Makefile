# Two commands do all the set-up:  make train  (set up, then run train.py)
#                                  make test   (set up, then run the whole test suite)
# make lab runs the whole lab (lab.py) and writes runs/lab/REPORT.md; make lab-extended adds the runs that
# choose CIFAR-10's settings (lab.py --extended).
# Both create .venv, install requirements.txt and build the Cython extension, each only when
# its inputs changed, so the second call starts at once. Pass script flags with ARGS="...".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BUILT := .im2col_built

.PHONY: setup train test bench lab lab-extended clean

setup: $(BUILT)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(BUILT): $(INSTALLED) im2col_cython.pyx fast_kernels.pyx fast_kernels.hpp setup_cython.py
	$(PY) setup_cython.py build_ext --inplace --quiet
	touch $@

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) bench_layers.py $(ARGS)

lab: setup
	$(PY) lab.py $(ARGS)

lab-extended: setup
	$(PY) lab.py --extended $(ARGS)

clean:
	rm -rf build im2col_cython*.so fast_kernels*.so $(BUILT)

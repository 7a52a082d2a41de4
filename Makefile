# glm5: two commands. `make demo` runs the main job, `make test` the whole suite.
# Both create .venv with the Python they find (3.11+) and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly: the CPU wheel of 2.13 (a looser spec pulls a CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(MAKE) --no-print-directory llama-cpp || echo "llama-cpp-python could not be built: the llama.cpp parity tests will skip"
	touch $(STAMP)

# llama.cpp through llama-cpp-python: the oracle of the GGUF parity tests and the peer of bench/llamacpp.py.
# PyPI has only its source, so the wheel is built once (about 7 min on 2 cores, more on a busy machine) into a
# cache keyed by this CPU's flags (the build is native) and installed from there afterwards. The source
# archive is kept beside it: its vendored convert_hf_to_gguf.py is the second writer the tests compare with.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CACHE := $(HOME)/.cache/glm5/llama-cpp/$(shell grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12)
.PHONY: llama-cpp
llama-cpp:
	@mkdir -p $(LLAMA_CACHE)
	@ls $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz >/dev/null 2>&1 || \
	  $(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(LLAMA_CACHE)
	@ls $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (once per CPU; cached in $(LLAMA_CACHE))"; \
	  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
	  $(PY) -m pip wheel --quiet --no-deps $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -w $(LLAMA_CACHE); }
	$(PY) -m pip install --quiet --find-links $(LLAMA_CACHE) llama-cpp-python==$(LLAMA_CPP_VERSION)

demo: $(STAMP)
	$(PY) -m glm5.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check glm5 tests bench

bench: $(STAMP)
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

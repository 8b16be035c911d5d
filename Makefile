# Make drives the pipeline; the pipeline itself decides what is stale (see docs/reference.md, "Caching").
# Variables: CONFIG=FILE  DATASETS="a b"  BACKBONES="a b"  HEADS="a b"  LIMIT=N  GPU=1  RAY=1  FORCE=1
#            THREADS=N (cores the heads may use in all: fewer on a shared machine)
#            RUNTIME=auto|tensorflow|openvino|onnxruntime (what runs the backbone)
#            ENGINE=ray (run on a Ray cluster; installs Ray)  ADDRESS=auto|ray://HOST:PORT

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
CONFIG   ?= experiments/default.toml
comma    := ,
# On a CPU machine both CPU runtimes come with the install: `auto` runs ONNX Runtime for the
# MobileNets and OpenVINO for the others (measured fastest here: docs/benchmarks.md); on
# x86-64, oneDAL (the intel extra) too, for the exact RBF SVC.
CPU_RUNTIMES := openvino$(comma)onnx$(if $(filter x86_64,$(shell uname -m)),$(comma)intel)
EXTRAS   := $(if $(GPU),gpu,cpu$(comma)$(CPU_RUNTIMES)),dev$(if $(RAY)$(ENGINE),$(comma)ray)
TEST_EXTRAS := $(if $(GPU),gpu,cpu$(comma)$(CPU_RUNTIMES)),dev,ray  # the tests cover Ray too

# Offline machines: a writable copy of ../shared/keras becomes KERAS_HOME unless one is set.
ifeq ($(KERAS_HOME),)
ifneq ($(wildcard ../shared/keras/models),)
export KERAS_HOME := $(CURDIR)/.keras-home
KERAS_SETUP := $(KERAS_HOME)/.ready
endif
endif

RUN_ARGS := --config $(CONFIG) \
	$(if $(DATASETS),--datasets "$(DATASETS)") \
	$(if $(BACKBONES),--backbones "$(BACKBONES)") \
	$(if $(HEADS),--heads "$(HEADS)") \
	$(if $(LIMIT),--limit $(LIMIT)) \
	$(if $(ENGINE),--engine $(ENGINE)) \
	$(if $(RUNTIME),--runtime $(RUNTIME)) \
	$(if $(ADDRESS),--address $(ADDRESS)) \
	$(if $(THREADS),--threads $(THREADS))

.PHONY: install install-test features heads compare all dry-run test test-fast reliability bench \
	bench-extract bench-conversions bench-heads bench-ray bench-cache lint clean-heads clean-features

install: $(VENV)/.installed-$(EXTRAS) $(KERAS_SETUP)

install-test: $(VENV)/.installed-$(TEST_EXTRAS) $(KERAS_SETUP)

$(VENV)/.installed-%: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$*]"
	touch $@

$(KERAS_HOME)/.ready:
	mkdir -p "$(KERAS_HOME)" && cp -r ../shared/keras/. "$(KERAS_HOME)/" && chmod -R u+w "$(KERAS_HOME)"
	@if [ -d /usr/share/datasets/fashion-mnist ]; then mkdir -p "$(KERAS_HOME)/datasets/fashion-mnist" && \
		cp /usr/share/datasets/fashion-mnist/*.gz "$(KERAS_HOME)/datasets/fashion-mnist/"; fi
	touch $@

features: install
	$(PY) -m pipeline run $(RUN_ARGS) --stage features

heads: install
	$(PY) -m pipeline run $(RUN_ARGS) --stage heads

compare: install
	$(PY) -m pipeline compare

all: install
	$(PY) -m pipeline run $(RUN_ARGS) --stage all

dry-run: install
	$(PY) -m pipeline run $(RUN_ARGS) --dry-run

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow and not reliability"

reliability: install-test
	$(PY) -m pytest -q -m "reliability or bad_input"

bench: bench-extract bench-conversions bench-heads bench-ray bench-cache

bench-extract: install   # MobileNet 0.25, MobileNetV2 0.35 (N = 2,000 and 8,000), ResNet50 (N = 400) at 224
	$(PY) benchmarks/bench_extract.py --sizes 2000,8000 --out benchmarks/extract.json

# One backbone per family, for the modes other than avg (bench-conversions' second part).
MODES_BACKBONES := mobilenet,mobilenet_v3_small,resnet50,resnet50_v2,densenet121,vgg16,xception,$\
	inception_v3,inception_resnet_v2,nasnet_mobile,efficientnet_b0,efficientnet_v2_b0,convnext_tiny

bench-conversions: install   # every registered backbone on each CPU runtime (about 1.5 hours)
	$(PY) benchmarks/bench_conversions.py --out benchmarks/conversions.json
	$(PY) benchmarks/bench_conversions.py --modes max,layers,bottleneck,spatial \
		--backbone $(MODES_BACKBONES) --out benchmarks/conversions-modes.json

# Every head against the extraction of its file, this checkout against the code before the
# heads-speed work (quiet and under load); then Fashion-MNIST and the 1,280-wide MobileNetV2
# 0.35 file (about 50 minutes in all; ../shared/data/cifar10, Debian's Fashion-MNIST).
bench-heads: install
	$(PY) benchmarks/bench_heads.py --rounds 2 --out benchmarks/heads.json
	$(PY) benchmarks/bench_heads.py --dataset idx:/usr/share/datasets/fashion-mnist \
		--old-heads logreg,linear_svm,mlp,sgd_linear --loaded-heads "" --out benchmarks/heads-fashion-mnist.json
	$(PY) benchmarks/bench_heads.py --backbone mobilenet_v2 --alpha 0.35 --old-heads "" \
		--loaded-heads "" --out benchmarks/heads-1280.json

bench-ray: install-test   # one process vs Ray on the same cores: N = 8,000 and ../shared/data/cifar10, MobileNet 0.25 and V2 0.35, shard cost, two nodes, heads
	$(PY) benchmarks/bench_ray.py --out benchmarks/ray.json

bench-cache: install   # ../shared/data/cifar10 (52,000 images): scans, no-op reruns, filter costs; the scan index at 1.28M entries
	$(PY) benchmarks/bench_cache.py --out benchmarks/cache.json
	$(PY) benchmarks/scan_index_scale.py --out benchmarks/scan_index_scale.json

lint: install
	$(PY) -m ruff check pipeline tests benchmarks

clean-heads:
	rm -rf results

clean-features:
	@if [ "$(FORCE)" != 1 ]; then \
		printf 'Delete every cached feature file in features_cache/ (they may cost GPU-hours)? [y/N] '; \
		read answer; [ "$$answer" = y ] || { echo "kept; FORCE=1 skips this question"; exit 1; }; fi
	find features_cache -mindepth 1 ! -name .gitkeep -exec rm -rf {} +

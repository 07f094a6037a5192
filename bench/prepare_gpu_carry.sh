#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what bench/gpu_check.py needs on the GPU
# image, which reaches no package index: the wheels it lacks (.gpu/whl), the
# reference's MS3 code (.gpu/ref/avs_ms3) and the reference's own imports
# (.gpu/refpath: timm 0.4.12, easydict).
#
#   bash bench/prepare_gpu_carry.sh /path/to/AVSBench   # a clone or a bare git dir
#
# Then, on the GPU machine (the device tool carries .gpu):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl \
#     && export PYTHONPATH=/tmp/site && python3 bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
avsbench=${1:?usage: $0 /path/to/AVSBench (clone or bare git dir)}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/ref .gpu/refpath
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any)
get() {  # wheels for the image's Python 3.12, no dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$1" "${@:2}"
}
# Missing there (2026-12-04): ml-collections; grain and what its import needs.
get .gpu/whl ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
get /tmp/gpu_refwheels timm==0.4.12 easydict==1.14
for w in /tmp/gpu_refwheels/*.whl; do python3 -m zipfile -e "$w" .gpu/refpath; done
if [ -d "$avsbench/.git" ]; then git_dir="$avsbench/.git"; else git_dir="$avsbench"; fi
git --git-dir="$git_dir" archive HEAD avs_scripts/avs_ms3 | tar -x -C .gpu/ref --strip-components=1
du -sh .gpu

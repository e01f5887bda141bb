#!/usr/bin/env bash
# Optional: mmdetection 3.3.0 (with mmengine 0.10.7 and a CPU build of mmcv 2.1.0's
# compiled ops) in the project's environment, for detectors/mmdet (`make mmdet`).
#
# PyPI has only mmcv's source, which does not build as published against torch 2.14:
# its setup.py imports pkg_resources (setuptools < 81) and torch (no build isolation),
# and asks for C++14/17 where torch's headers need C++20. This script patches the
# flags, builds the wheel once in a throwaway virtual environment that sees the
# project's torch, and keeps it in $OVD_WHEEL_CACHE (~/.cache/ovdistill/wheels) keyed
# by Python and torch version; a rerun with the wheel cached installs in seconds.
# The build takes ~33 minutes on 2 idle cores (MAX_JOBS=2); 76 minutes here at nice 10
# beside other jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
MMCV=2.1.0
MMENGINE=0.10.7
MMDET=3.3.0

if "$PY" - <<EOF 2>/dev/null
import mmcv, mmdet, mmengine
from mmcv.ops import RoIAlign  # the compiled ops, not mmcv-lite
assert (mmcv.__version__, mmengine.__version__, mmdet.__version__) == ("$MMCV", "$MMENGINE", "$MMDET")
EOF
then
    echo "mmcv $MMCV, mmengine $MMENGINE and mmdet $MMDET are installed in $VENV"
    exit 0
fi

TAG=$("$PY" -c 'import sys, torch; v = torch.__version__.split("+")[0]; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-torch{v}")')
CACHE=${OVD_WHEEL_CACHE:-$HOME/.cache/ovdistill/wheels}/$TAG
wheel=$(ls "$CACHE"/mmcv-$MMCV-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    echo "building mmcv $MMCV with its ops for $TAG in $build (about 33 minutes on 2 cores)"
    "$PY" -m venv "$build/venv"
    # the build environment sees the project's packages (torch) after its own (setuptools < 81)
    "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        > "$("$build/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/project.pth"
    "$build/venv/bin/pip" install -q "setuptools>=77.0.3,<81" wheel
    "$build/venv/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation \
        "mmcv==$MMCV" -d "$build"
    tar -xzf "$build/mmcv-$MMCV.tar.gz" -C "$build"
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$build/mmcv-$MMCV/setup.py"
    grep -q -- '-std=c++20' "$build/mmcv-$MMCV/setup.py" \
        || { echo "error: mmcv $MMCV setup.py has no -std=c++14/17 flag to raise" >&2; exit 1; }
    MAX_JOBS=${MAX_JOBS:-2} MMCV_WITH_OPS=1 FORCE_CUDA=0 \
        "$build/venv/bin/pip" wheel --no-build-isolation --no-deps -w "$build/dist" "$build/mmcv-$MMCV"
    built=$(ls "$build"/dist/mmcv-$MMCV-*.whl)
    mkdir -p "$CACHE"
    cp "$built" "$CACHE/.partial.whl"
    mv "$CACHE/.partial.whl" "$CACHE/$(basename "$built")"  # atomic: no half wheel is ever cached
    wheel="$CACHE/$(basename "$built")"
fi
"$PY" -m pip install -q "$wheel" "mmengine==$MMENGINE" "mmdet==$MMDET"
"$PY" -c "from mmcv.ops import RoIAlign; import mmdet; print('mmdet', mmdet.__version__, 'with mmcv ops from $wheel')"

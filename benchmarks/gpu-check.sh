#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, from the repository's root with the data mirror at
# ../shared/datasets (or $DATASET_MIRROR), it installs what it needs and prints, within about 10 minutes: the
# device and precision chosen, a quick `dvc exp run` of every model on CUDA and the export parity of those
# GPU-trained models, full-size epoch times of cnn and tuned_cnn with their host-device syncs, the speed
# benchmark on CUDA, and infer's core on CUDA against the CPU. One line and status 1 on the first failure.
# Without a GPU it says so and exits 0, running nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU on this machine; nothing run"
    exit 0
fi
mirror="$(cd "${DATASET_MIRROR:-../shared/datasets}" 2>/dev/null && pwd)" || {
    echo "gpu-check: FAILED: no data mirror at ${DATASET_MIRROR:-../shared/datasets} (set DATASET_MIRROR)" >&2; exit 1; }
export DATASET_MIRROR="$mirror"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}
# torch with CUDA and onnxruntime-gpu: an environment that has them is used as it is; else one is made
if ! "$PYTHON" -c "import torch, dvc, fastapi, onnxruntime as ort; assert torch.cuda.is_available(); \
assert 'CUDAExecutionProvider' in ort.get_available_providers()" 2>/dev/null; then
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e '.[train,serve]'
    # onnxruntime and onnxruntime-gpu install the same package: the CPU build out, the GPU build in
    .venv-gpu/bin/pip uninstall -q -y onnxruntime
    .venv-gpu/bin/pip install -q onnxruntime-gpu
    PYTHON=.venv-gpu/bin/python
fi
export PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
exec "$PYTHON" -m benchmarks.gpu_check

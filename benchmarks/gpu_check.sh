#!/usr/bin/env bash
# The GPU checks in one go, on a machine whose python3 has a CUDA build of torch: the
# `gpu` tests, then the GPU benchmark (benchmarks/bench_gpu.py), every screen.
#   OUT=/some/folder benchmarks/gpu_check.sh     (logs and the results JSON land there)
# Pyro, when the machine lacks it, comes from wheels in .whl/ (pure Python:
#   pip download --no-deps -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ! python3 -c "import pyro" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia.txt"
python3 -c "import torch, pyro, numpy; print('torch', torch.__version__, 'pyro', pyro.__version__, 'numpy', numpy.__version__, 'threads', torch.get_num_threads())"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/model/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=$?
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_gpu.py \
    --screens "${SCREENS:-benchmark,deep,droplet,large,genome}" \
    --out "$OUT/gpu_negbinom.json" 2>&1 | tee "$OUT/bench_gpu.log"
bench=$?
echo "gpu tests rc=$tests, benchmark rc=$bench"
exit $((tests || bench))

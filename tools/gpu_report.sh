#!/usr/bin/env bash
# Every GPU figure the project reports, one phase per call (each well under 10 minutes on an H100):
#
#   tools/gpu_report.sh wheels       # on a machine with PyPI: the wheels a bare CUDA-torch box lacks, into .whl/
#   tools/gpu_report.sh smoke        # on the GPU: the CUDA tests (tests/test_trainer.py -k gpu)
#   tools/gpu_report.sh memory       # peak memory of the output head + log-probs, seq 4096/8192, vocab 128k
#   tools/gpu_report.sh attention    # compiled flex_attention on packed rows vs padded SDPA, same pairs
#   tools/gpu_report.sh fixed        # benchmark vs TRL: 1.5B Llama shape, 8 pairs of 256+256 tokens
#   tools/gpu_report.sh realistic    # benchmark vs TRL: UltraFeedback-like lengths, packing, max length 1024
#
# Results go to $OUT (default gpu_report/) as <phase>.txt and <phase>.json. A machine with
# megatron-core and the other dependencies installed (an NGC image plus `pip install -e .[bench]`)
# needs no wheels; a bare one gets them from .whl/ (Python 3.12 builds; copy the folder along).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_report}
PYTHON=${PYTHON:-python3}
phase=${1:?usage: tools/gpu_report.sh wheels|smoke|memory|attention|fixed|realistic}

# What a CUDA-torch image with transformers, pyarrow and pandas still lacks. hydra-core 1.3 wants
# omegaconf < 2.4 and antlr4 4.9 (published as a source archive only, so built into a wheel here).
WHEELS=("megatron-core>=0.16.1,<0.20" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" datasets dill multiprocess trl)

if [[ $phase == wheels ]]; then
    mkdir -p .whl
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    "$PYTHON" -m pip wheel --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
    du -sh .whl
    exit 0
fi

if ! "$PYTHON" -c "import megatron.core, hydra, datasets" 2>/dev/null; then
    [[ -d .whl ]] || { echo "megatron-core etc. missing and no .whl/: run 'tools/gpu_report.sh wheels' first" >&2; exit 2; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"$PYTHON" -c "import torch, megatron.core; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '|', torch.cuda.get_device_name())" | tee "$OUT/$phase.txt"

case $phase in
    smoke)
        "$PYTHON" -m pytest -q -rs tests/test_trainer.py -k gpu 2>&1 | tee -a "$OUT/$phase.txt" ;;
    memory)
        "$PYTHON" tools/logprob_memory.py --tokens 4096,8192 --chunks 512,1024,2048 --json "$OUT/$phase.json" 2>&1 | tee -a "$OUT/$phase.txt" ;;
    attention)
        "$PYTHON" tools/attention_benchmark.py --pairs 16 --pack-length 8192 --json "$OUT/$phase.json" 2>&1 | tee -a "$OUT/$phase.txt" ;;
    fixed)
        "$PYTHON" tools/benchmark.py --model llama_1p5b_bench --pairs 8 --lengths 256+256 --vs-trl \
            --json "$OUT/$phase.json" 2>&1 | tee -a "$OUT/$phase.txt" ;;
    realistic)
        # Against TRL's online reference and its fastest mode (precompute_ref_log_probs): the target is 2x the latter.
        "$PYTHON" tools/benchmark.py --model llama_1p5b_bench --pairs 8 --realistic --packing --max-length 1024 \
            --vs-trl --trl-reference online,precompute --json "$OUT/$phase.json" 2>&1 | tee -a "$OUT/$phase.txt" ;;
    *)
        echo "unknown phase $phase: use wheels, smoke, memory, attention, fixed or realistic" >&2; exit 2 ;;
esac

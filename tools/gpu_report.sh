#!/usr/bin/env bash
# Every GPU figure the project reports. Phases (each well under 10 minutes on an H100):
#
#   tools/gpu_report.sh wheels       # on a machine with PyPI: the kit a bare CUDA-torch box lacks, into .whl/
#   tools/gpu_report.sh all          # on the GPU: smoke, fixed, realistic, memory, attention, each under its
#                                    # own time limit (PHASE_LIMITS), about 8 minutes in all, unattended
#   tools/gpu_report.sh smoke        # the CUDA tests (tests/test_trainer.py -k gpu)
#   tools/gpu_report.sh fixed        # benchmark vs TRL: 1.5B Llama shape, 8 pairs of 256+256 tokens
#   tools/gpu_report.sh realistic    # benchmark vs TRL: UltraFeedback-like lengths, packing, max length 1024
#   tools/gpu_report.sh memory       # peak memory of the output head + log-probs, seq 4096/8192, vocab 128k
#   tools/gpu_report.sh attention    # compiled flex_attention on packed rows vs padded SDPA, same pairs
#
# Results go to $OUT (default gpu_report/) as they are made: <phase>.json, and the output of every
# phase in <phase>.txt (for `all`: one gpu_report.log, so that a call's few returned files hold it
# all). A phase that fails or runs out of time is logged and the next one starts; a run stopped
# early leaves what finished. A machine with megatron-core and the rest installed (an NGC image plus
# `pip install -e .[bench]`) needs no kit; a bare one installs .whl/ with --no-index
# (tools/gpu_kit.py: the dependency closure for Python 3.12, less torch and the image's own large
# packages; `tools/gpu_kit.py check` proves it complete here).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-gpu_report}
PYTHON=${PYTHON:-python3}
phase=${1:?usage: tools/gpu_report.sh wheels|all|smoke|fixed|realistic|memory|attention}
# Seconds per phase under `all`, in order: about 8 minutes of the 9 a call may take.
PHASE_LIMITS=${PHASE_LIMITS:-"smoke:150 fixed:90 realistic:120 memory:60 attention:60"}

if [[ $phase == wheels ]]; then
    exec "$PYTHON" tools/gpu_kit.py wheels  # from tools/gpu_kit.lock (`tools/gpu_kit.py lock` renews it)
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/$phase.txt"
[[ $phase == all ]] && log="$OUT/gpu_report.log"
: > "$log"
# What the machine holds of what the kit leaves to it (tools/gpu_kit.py): read here, for the next kit.
"$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|numpy|transformers|huggingface.hub|tokenizers|safetensors|accelerate|pyarrow|pandas|pillow|grpcio|tensorboard) ' | tee -a "$log"
if ! "$PYTHON" -c "import megatron.core, hydra, datasets, trl" 2>/dev/null; then
    [[ -d .whl ]] || { echo "megatron-core etc. missing and no .whl/: run 'tools/gpu_report.sh wheels' first" | tee -a "$log" >&2; exit 2; }
    "$PYTHON" tools/gpu_kit.py install 2>&1 | tee -a "$log"
    [[ ${PIPESTATUS[0]} == 0 ]] || { echo "the kit in .whl/ did not install (pip named what is missing)" | tee -a "$log" >&2; exit 2; }
fi

run_phase() {  # run_phase PHASE LOGFILE: one phase's command, its output appended to LOGFILE
    local name=$1 log=$2
    echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$log"
    case $name in
        smoke)
            "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_trainer.py -k gpu ;;
        fixed)
            "$PYTHON" tools/benchmark.py --model llama_1p5b_bench --pairs 8 --lengths 256+256 --vs-trl \
                --json "$OUT/$name.json" ;;
        realistic)
            # Against TRL's online reference and its fastest mode (precompute_ref_log_probs): the target is 2x the latter.
            "$PYTHON" tools/benchmark.py --model llama_1p5b_bench --pairs 8 --realistic --packing --max-length 1024 \
                --vs-trl --trl-reference online,precompute --json "$OUT/$name.json" ;;
        memory)
            "$PYTHON" tools/logprob_memory.py --tokens 4096,8192 --chunks 512,1024,2048 --json "$OUT/$name.json" ;;
        attention)
            "$PYTHON" tools/attention_benchmark.py --pairs 16 --pack-length 8192 --json "$OUT/$name.json" ;;
        *)
            echo "unknown phase $name: use wheels, all, smoke, fixed, realistic, memory or attention" >&2; return 2 ;;
    esac 2>&1 | tee -a "$log"
    local code=${PIPESTATUS[0]}
    echo "=== $name: exit $code ($(date -u +%H:%M:%S))" | tee -a "$log"
    return "$code"
}

versions() {
    "$PYTHON" -c "import torch, megatron.core; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| megatron-core', megatron.core.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
}

if [[ $phase == all ]]; then
    versions | tee -a "$log"
    failed=0
    for entry in $PHASE_LIMITS; do
        name=${entry%%:*} limit=${entry##*:}
        # A phase past its limit is stopped (TERM, then KILL 10 s later); the next one starts.
        export -f run_phase
        export OUT PYTHON
        timeout -k 10 "$limit" bash -c "run_phase $name '$log'"
        code=$?
        [[ $code == 124 || $code == 137 ]] && echo "=== $name: stopped after its $limit s" | tee -a "$log"
        [[ $code != 0 ]] && failed=$((failed + 1))
    done
    echo "=== done: $failed phase(s) failed or stopped" | tee -a "$log"
    exit $((failed > 0))
fi

versions | tee -a "$log"
run_phase "$phase" "$log"

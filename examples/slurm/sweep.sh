#!/usr/bin/env bash
# The paper's sweep: MMPO, DPO and SimPO at beta 0.01, 0.05, 0.1 and 0.5, one Slurm job and one run
# folder each, all sharing one reference cache (its key holds the data, weights and model, not the
# loss or beta). The jobs start together: the first to reach the reference scores it under a lock
# on the cache entry, the others wait for it and load it, so the grid scores it once. Then compare:
#   examples/slurm/sweep.sh smollm2_135m_mmpo /workspace/sweeps/135m data.tokenizer=/models/SmolLM2-135M-Instruct
#   python tools/compare_runs.py /workspace/sweeps/135m/*-beta* --png sweep.png
# Learning rates per loss are the paper's (its table); SimPO's gamma is 1.6 x beta. Each job is one
# node with one GPU (the 135M and 360M recipes' size); SBATCH_ARGS replaces that (e.g.
# "--nodes=1 --gpus-per-node=8"). DRY_RUN=1 prints the sbatch commands instead of submitting them.
set -euo pipefail
recipe=${1:?usage: examples/slurm/sweep.sh RECIPE OUTPUT_ROOT [overrides...]}
root=${2:?usage: examples/slurm/sweep.sh RECIPE OUTPUT_ROOT [overrides...]}
shift 2
case $root in
    /*) ;;
    *) root=$PWD/$root ;;  # the run folders are where the caller meant, not under the repository
esac
cd "$(dirname "$0")/../.." || exit 2

declare -A lr
case $recipe in
    smollm2_135m_mmpo) lr=([mmpo]=5e-4 [dpo]=5e-4 [simpo]=1e-4) ;;
    smollm2_360m_mmpo) lr=([mmpo]=5e-4 [dpo]=5e-5 [simpo]=1e-4) ;;
    *) lr=([mmpo]=${LR_MMPO:?set LR_MMPO, LR_DPO and LR_SIMPO for $recipe} [dpo]=${LR_DPO:?} [simpo]=${LR_SIMPO:?}) ;;
esac
read -r -a extra <<< "${SBATCH_ARGS:---nodes=1 --gpus-per-node=1}"

for loss in mmpo dpo simpo; do
    for beta in 0.01 0.05 0.1 0.5; do
        args=(--config-name "$recipe" "loss=$loss" "loss.beta=$beta" "optim.lr=${lr[$loss]}"
              "train.output_dir=$root/$loss-beta$beta" "reference.cache_dir=$root/reference_cache")
        if [[ $loss == simpo ]]; then
            args+=("loss.gamma=$(python3 -c "print(round(1.6 * $beta, 6))")")
        fi
        command=(sbatch --job-name "$loss-$beta" ${extra[@]+"${extra[@]}"} examples/slurm/train_mmpo.sbatch "${args[@]}" "$@")
        if [[ ${DRY_RUN:-0} == 1 ]]; then
            printf '%q ' "${command[@]}"
            echo
        else
            "${command[@]}"
        fi
    done
done

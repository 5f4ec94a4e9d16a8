#!/bin/bash
# Multi-node training under Slurm: one `accelerate launch` per node, which starts one process per GPU. The node
# count, this node's rank and the main node's address come from Slurm, so only the sbatch line changes.
#
#   sbatch --nodes=4 scripts/slurm_multinode.sh recipes/sft_lora.py --model_name_or_path meta-llama/Llama-3.1-70B \
#       --use_peft false --gradient_checkpointing true
#   ACCELERATE_CONFIG=accelerate_configs/fsdp2.yaml sbatch --nodes=2 scripts/slurm_multinode.sh recipes/reward_model.py
#
# Submit from the repository root (the DeepSpeed configs are named relative to it), with the environment
# installed on every node. Environment: ACCELERATE_CONFIG (default accelerate_configs/multi_node_zero3.yaml),
# GPUS_PER_NODE (default: the GPUs nvidia-smi lists), MAIN_PROCESS_PORT (default 29500).
# DRY_RUN=1 prints this node's command instead of running it.
#SBATCH --job-name=chatgpt-recipes
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch [--nodes=N] $0 RECIPE [RECIPE OPTIONS...]" >&2
    exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}"
[[ -f scripts/slurm_multinode.sh ]] || { echo "$0: submit from the repository root" >&2; exit 2; }
CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node_zero3.yaml}
[[ -f "$CONFIG" ]] || { echo "$0: launcher config $CONFIG not found (submit from the repository root)" >&2; exit 2; }

# The batch script runs once, on the first node: start one copy of this script per node through srun. By its
# repository path ($0 is Slurm's private copy, which exists on the first node only; the repo is on a shared disk).
if [[ -z "${CHATGPT_RECIPES_NODE_TASK:-}" && -z "${DRY_RUN:-}" ]]; then
    export CHATGPT_RECIPES_NODE_TASK=1  # srun passes the environment on: the per-node copies skip this branch
    exec srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash scripts/slurm_multinode.sh "$@"
fi

NUM_NODES=${SLURM_NNODES:?not inside a Slurm job (SLURM_NNODES unset)}
NODE_RANK=${SLURM_NODEID:?not inside a Slurm job (SLURM_NODEID unset)}
MAIN_IP=${MAIN_PROCESS_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
GPUS=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
COMMAND=(accelerate launch --config_file "$CONFIG"
         --num_machines "$NUM_NODES" --num_processes "$((NUM_NODES * GPUS))" --machine_rank "$NODE_RANK"
         --main_process_ip "$MAIN_IP" --main_process_port "${MAIN_PROCESS_PORT:-29500}"
         "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${COMMAND[@]}"
    echo
else
    echo "node $NODE_RANK of $NUM_NODES ($(hostname)), main $MAIN_IP: ${COMMAND[*]}" >&2
    exec "${COMMAND[@]}"
fi

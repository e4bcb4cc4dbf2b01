#!/usr/bin/env bash
# Start one process per GPU for a cluster-tier run, with torchrun's environment (RANK, LOCAL_RANK,
# WORLD_SIZE, GROUP_RANK, MASTER_ADDR, ...), which impl.common.launcher.init_from_env reads (NCCL
# on GPUs; ranks node-major, as the topologies number them).
#
#   workflows/scripts/launch_cluster.sh --gpus-per-node G [--srun CMD] [--port P] -- -m MODULE ARGS...
#
# * Inside a Slurm allocation (SLURM_JOB_ID set): one torchrun per node under srun,
#     CMD --nodes=N --ntasks=N --ntasks-per-node=1 --kill-on-bad-exit=1 \
#         torchrun --nnodes=N --nproc-per-node=G --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d \
#                  --rdzv-endpoint=<first host of the allocation>:P ARGS...
#   N is SLURM_JOB_NUM_NODES; CMD is the rule's `{resources.mpi}` (default: srun).
# * Outside one: torchrun --standalone --nproc-per-node=G ARGS... on this machine.
# Everything after `--` is torchrun's: `-m module args` or `script.py args`.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

gpus_per_node="" srun_cmd="srun" port="29500"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus-per-node) gpus_per_node="${2:-}"; shift 2 ;;
    --srun) srun_cmd="${2:-}"; shift 2 ;;
    --port) port="${2:-}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch_cluster.sh: error: unknown option '$1'; allowed: --gpus-per-node, --srun, --port, then -- and torchrun's arguments" >&2; exit 2 ;;
  esac
done
if ! [[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch_cluster.sh: error: --gpus-per-node '${gpus_per_node}' is not allowed; allowed: a positive integer (GPUs, i.e. ranks, per node)" >&2
  exit 2
fi
if ! [[ "$port" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch_cluster.sh: error: --port '${port}' is not allowed; allowed: a port number" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "launch_cluster.sh: error: nothing to run; give torchrun's arguments after --, e.g. -- -m impl.experiments.layer_bench ..." >&2
  exit 2
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
  head_node="$(scontrol show hostnames "$nodelist" | head -n 1)"
  if [[ -z "$head_node" ]]; then
    echo "launch_cluster.sh: error: could not read the first host of the allocation ('$nodelist') with scontrol" >&2
    exit 2
  fi
  read -r -a srun_argv <<< "$srun_cmd"
  exec "${srun_argv[@]}" --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    torchrun --nnodes="$nodes" --nproc-per-node="$gpus_per_node" --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:$port" "$@"
fi
exec torchrun --standalone --nproc-per-node="$gpus_per_node" "$@"

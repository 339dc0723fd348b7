#!/bin/bash
# SimZSS on SLURM: one `accelerate launch` per node (it starts one training process per GPU).
#   sbatch docs/slurm.sh                                   # configs/coco_vitb14.yaml
#   CONFIG=configs/laion_vitb14.yaml sbatch docs/slurm.sh run_name=laion_b14 batch_size=512
# Extra arguments are config overrides. Before the time limit SLURM sends USR1 to this script
# (--signal=B:USR1@300); it is forwarded to every training process, which finishes its step, writes
# a checkpoint and exits 0; the job then requeues itself and continues with resume=latest.
#SBATCH --job-name=simzss
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail  # no -e: `wait` returns non-zero when a trapped signal interrupts it

export CONFIG=${CONFIG:-configs/coco_vitb14.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# export WANDB_MODE=online   # the trainer logs to wandb offline unless WANDB_MODE says otherwise

# Runs once per node (srun task). The accelerate launcher does not handle USR1 itself, so the
# signal goes to its children: the training processes.
read -r -d '' NODE_CMD <<'EOS'
accelerate launch --config_file docs/accelerate_multinode.yaml \
    --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    train.py --config "$CONFIG" resume=latest "$@" &
launcher=$!
trap 'pkill -USR1 -P "$launcher"' USR1
trap 'pkill -TERM -P "$launcher"' TERM
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; done
wait "$launcher"
EOS

requeue=0
on_signal() {
    echo "$(date -Is) batch script got $1: checkpoint, then requeue"
    requeue=1
    kill -USR1 "$srun_pid" 2>/dev/null  # srun forwards USR1 to its tasks on every node
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

mkdir -p logs
srun --kill-on-bad-exit=1 bash -c "$NODE_CMD" bash "$@" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
status=$?
echo "$(date -Is) training exited with status $status"
if [ "$requeue" = 1 ] && [ "$status" = 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"

#!/bin/bash
# DGP colorization on the 1k ImageNet-val benchmark (BigGAN 128), 2 nodes x 4 GPUs.
#
#   sbatch scripts/slurm_evaluate.sh                      # first run, and every resume
#   sbatch scripts/slurm_evaluate.sh data.root=/data/imagenet/val   # extra overrides pass through
#
# srun starts one task per GPU; Lightning reads the ranks from SLURM (SLURM_PROCID, ...), so
# trainer.devices must equal --ntasks-per-node and trainer.num_nodes must equal --nodes.
# output.dir must be on a filesystem every node sees: each rank appends its rows there, and
# rank 0 reads them all. Submitting the same script again resumes where the last job stopped.
# If a node dies, the other tasks finish their images, then exit 1 at the final barrier
# ("another rank stopped before the end"): resubmit. A node lost without closing its
# connections keeps them waiting up to eval.dist_timeout_s (48 h; lower it with an override).
# The rendezvous is the first host of SLURM_NODELIST, port 15000 + the job id's last 4 digits.
# tests/test_multinode.py runs this on one machine (2 simulated nodes, CPU, gloo).
#SBATCH --job-name=dgp1k-colorization
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"

srun .venv/bin/python evaluate.py \
    prior=biggan128 task=colorization data=imagenet_val_1k data.root=data/imagenet/val \
    trainer=slurm trainer.devices="${SLURM_NTASKS_PER_NODE:-4}" \
    trainer.num_nodes="${SLURM_JOB_NUM_NODES:-2}" trainer.enable_progress_bar=false \
    logger=wandb output.dir=outputs/dgp1k-colorization "$@"

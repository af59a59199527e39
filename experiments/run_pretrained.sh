#!/usr/bin/env bash
# Issue 14: train the shipped QM9 models, one command from the repository root:
#   bash experiments/run_pretrained.sh            # all models the budget allows, in priority order
# Sequential, one torch thread, resumable (finished runs are reused, an interrupted one resumes from
# last.ckpt). flock keeps it from running beside another long training on this shared machine, and
# `export` turns each finished run into package data (abp_core/pretrained/) + its model card.
set -euo pipefail
cd "$(dirname "$0")/.."
export ABP_DATA_DIR="${ABP_DATA_DIR:-$PWD/../shared/data}"
export ABP_CACHE_DIR="${ABP_CACHE_DIR:-$PWD/.cache/processed}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p runs/pretrained
flock /tmp/abp-train.lock .venv/bin/python experiments/train_pretrained.py train "$@" \
    >> runs/pretrained/train.log 2>> runs/pretrained/train.err
.venv/bin/python experiments/train_pretrained.py export "$@"

#!/usr/bin/env bash
# Issue 12 evidence, one command from the repository root:  bash experiments/run_explain_evidence.sh
# Trains the 28 models sequentially with one torch thread (resumable: finished runs are reused), then
# writes results/explain/. The flock keeps it from running beside another long training on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export ABP_DATA_DIR="${ABP_DATA_DIR:-$PWD/../shared/data}"
export ABP_CACHE_DIR="${ABP_CACHE_DIR:-$PWD/.cache/processed}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p runs/explain
flock /tmp/abp-train.lock .venv/bin/python experiments/explain_evidence.py train >> runs/explain/train.log 2>> runs/explain/train.err
.venv/bin/python experiments/explain_evidence.py analyse

#!/usr/bin/env bash
# Issue 6 evidence, one command from the repository root:  bash experiments/run_evidence.sh
# Trains the QM9 + QM7b grids sequentially (resumable; finished runs are reused), then writes results/.
# ABP_DEADLINE=HH:MM stops starting runs that would end after that local time (default 02:19, the
# budget of the original session; set e.g. ABP_DEADLINE=23:59 for the full grid).
set -euo pipefail
cd "$(dirname "$0")/.."
export ABP_DATA_DIR="${ABP_DATA_DIR:-$PWD/../shared/data}"
export ABP_CACHE_DIR="${ABP_CACHE_DIR:-$PWD/.cache/processed}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p runs/evidence
.venv/bin/python experiments/evidence.py train >> runs/evidence/train.log 2>> runs/evidence/train.err
.venv/bin/python experiments/analyse.py

"""Shared start-up of the experiment scripts: repository root as working directory and on ``sys.path``,
data and cache locations (``../shared/data`` beside the repository unless ``ABP_DATA_DIR`` is set), 2 torch
threads. Imported first by ``evidence.py`` and ``analyse.py``."""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ABP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("ABP_CACHE_DIR", str(ROOT / ".cache" / "processed"))
torch.set_num_threads(2)

"""Session-wide settings for pytest and nbval (which runs every notebook in notebooks/)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Tests never download: loaders read the real data in ../shared/data beside the checkout.
os.environ.setdefault("ABP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
# ../shared/data is read-only: processed caches go to a git-ignored folder of the checkout.
os.environ.setdefault("ABP_CACHE_DIR", str(ROOT / ".cache" / "processed"))
# nbval executes the committed notebooks as they are: smoke mode (tiny data, 1-2 epochs) via the env.
os.environ.setdefault("ABP_SMOKE", "1")

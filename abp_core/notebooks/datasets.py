"""Dataset status for the notebooks: where the data is, and what is missing, said in plain words.

:func:`load_dataset` returns a :class:`DataStatus`: the dataset, or a message naming the missing file
and where to put it (a notebook shows the message and the paper's numbers instead of a traceback).
:func:`resolve_data_root` finds the data root from a parameter or ``$ABP_DATA_DIR``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

__all__ = ["DATASET_LABELS", "resolve_data_root", "DataStatus", "load_dataset"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(data_root: Optional[str] = None) -> Optional[Path]:
    """The data root for the loaders: ``data_root``, else ``$ABP_DATA_DIR``, else None (user cache).

    A relative path is taken relative to the current directory if it exists there, else relative to
    the repository root or the parent directory (nbval starts kernels inside ``notebooks/``, papermill
    and JupyterLab wherever they were started), so ``ABP_DATA_DIR=../shared/data`` works from both.
    """
    raw = data_root if data_root not in (None, "") else os.environ.get("ABP_DATA_DIR")
    if not raw:
        return None
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), _REPO_ROOT, Path.cwd().parent):
        if (base / path).exists():
            return (base / path).resolve()
    return (Path.cwd() / path).resolve()



#: Display names of the registry datasets, for messages and tables.
DATASET_LABELS = {"qm7b": "QM7b", "qm8": "QM8", "qm9": "QM9", "qmugs": "QMugs", "md17": "MD17", "oe62": "OE62"}


@dataclass
class DataStatus:
    """Outcome of :func:`load_dataset`: the dataset, or why it is not available."""

    name: str
    kwargs: Dict[str, Any]
    dataset: Any = None
    message: str = ""

    @property
    def available(self) -> bool:
        return self.dataset is not None


def load_dataset(name: str, root: Optional[Union[str, Path]] = None, *, download: bool = True,
                 **kwargs: Any) -> DataStatus:
    """Load a dataset, or explain in plain words why it is not here (never raises for missing data).

    ``download=False`` never touches the network (smoke mode, tests): a missing raw file gives a
    message saying which file to put where. Format/checksum problems of files that ARE present are
    reported the same way (the message starts with "could not load").
    """
    from ..data import DataNotFoundError, DatasetError, get_dataset

    label = DATASET_LABELS.get(name.lower(), name)
    what = label + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")
    try:
        ds = get_dataset(name, root=root, download=download, progress=False, **kwargs)
    except DataNotFoundError as exc:
        how = ("downloading is switched off (smoke mode or download=False)" if not download
               else "it could not be downloaded")
        return DataStatus(name, dict(kwargs), None,
                          f"{what}: data not present on this machine, and {how}.\n{exc}")
    except (DatasetError, OSError) as exc:
        return DataStatus(name, dict(kwargs), None, f"{what}: could not load the data: {exc}")
    return DataStatus(name, dict(kwargs), ds, "")


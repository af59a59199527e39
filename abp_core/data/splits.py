"""Train/validation/test splits and target standardisation.

* :func:`random_split` -- the project's own 80/10/10 splits: a permutation from
  ``numpy.random.Generator(numpy.random.PCG64(seed))``. NumPy guarantees that a ``PCG64`` stream for a
  given seed is the same on every platform and NumPy version (the bit generator is versioned, and
  ``Generator.permutation`` has been stable since NumPy 1.17), so the same seed gives the same split on
  every machine and every run. Sizes: ``floor(0.8 n)``, ``floor(0.1 n)``, and the rest for test.
* The paper's own splits belong to the datasets (``paper_split`` in each dataset module, and the
  datasets' ``paper_split(seed)`` methods; :func:`abp_core.data.paper_split` looks one up by name):
  QM7b and OE62 from their released files, MD17 from the official train/test files; QM9, QM8 and
  QMugs have no files, but the paper's code and seeds are public: ``torch.utils.data.random_split``
  with ``torch.Generator().manual_seed(seed)`` and each dataset's lengths, which
  :func:`paper_torch_split` reproduces (with :func:`torch_random_split`).
* :class:`Standardizer` -- per-target mean/std fitted on the training rows only.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch


def random_split(n: int, seed: int, frac: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (train, val, test) indices of ``range(n)``: PCG64(seed) permutation, then cut.

    ``len(train) = floor(frac[0] n)``, ``len(val) = floor(frac[1] n)``; test takes the rest when the
    fractions sum to 1, else ``floor(frac[2] n)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(frac) != 3 or any(f < 0 for f in frac) or sum(frac) > 1 + 1e-9:
        raise ValueError(f"frac must be three non-negative fractions summing to <= 1, got {tuple(frac)}")
    perm = np.random.Generator(np.random.PCG64(int(seed))).permutation(n).astype(np.int64)
    n_train = int(math.floor(frac[0] * n + 1e-9))
    n_val = int(math.floor(frac[1] * n + 1e-9))
    n_test = n - n_train - n_val if abs(sum(frac) - 1) < 1e-9 else int(math.floor(frac[2] * n + 1e-9))
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:n_train + n_val + n_test]


def torch_random_split(n: int, lengths: Sequence[int], seed: int) -> list[np.ndarray]:
    """Indices of ``torch.utils.data.random_split(range(n), lengths, torch.Generator().manual_seed(seed))``."""
    if sum(lengths) != n:
        raise ValueError(f"lengths {list(lengths)} do not sum to n={n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy().astype(np.int64)
    out, start = [], 0
    for length in lengths:
        out.append(perm[start:start + length])
        start += length
    return out


def check_paper_lengths(dataset: str, lengths: Sequence[int], n: int) -> list[int]:
    """``lengths`` (the split sizes a dataset's paper code asks for) if they add up to ``n``, else ValueError."""
    lengths = [int(x) for x in lengths]
    if sum(lengths) != n:
        raise ValueError(f"the paper's {dataset} lengths {lengths} do not add up to n={n}; "
                         f"its code would fail on this dataset size")
    return lengths


def paper_torch_split(dataset: str, seeds: Sequence[int], lengths: Sequence[int],
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper code's seeded torch split: :func:`torch_random_split` with ``lengths``, if ``seed`` is published.

    ``seeds`` are the dataset's published seeds; any other seed raises ``ValueError`` (a run would not be
    on the paper's split).
    """
    if seed not in tuple(seeds):
        raise ValueError(f"{seed} is not one of the paper's {dataset} seeds {tuple(seeds)}")
    a, b, c = torch_random_split(sum(lengths), lengths, seed)
    return a, b, c


def check_disjoint(*splits: np.ndarray, n: int | None = None) -> None:
    """Raise ``ValueError`` if the index arrays overlap or leave ``range(n)``."""
    seen: set[int] = set()
    for s in splits:
        s = np.asarray(s).tolist()
        if len(set(s)) != len(s) or seen.intersection(s):
            raise ValueError("split index sets overlap or repeat indices")
        seen.update(s)
        if n is not None and s and (min(s) < 0 or max(s) >= n):
            raise ValueError(f"split indices out of range(0, {n})")


class Standardizer:
    """Per-target standardisation ``(y - mean) / std`` fitted on the training rows only.

    ``std`` is the population standard deviation (ddof=0, like scikit-learn's ``StandardScaler`` the
    paper used); a constant target gets std 1. Works on torch tensors and NumPy arrays of shape [N, T]
    (or [T]); ``state_dict()`` / ``load_state_dict()`` / ``from_state_dict()`` for checkpoints.
    """

    def __init__(self, mean: Any = None, std: Any = None):
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float64).reshape(-1)

    @property
    def fitted(self) -> bool:
        return self.mean is not None and self.std is not None

    def fit(self, y: Any) -> "Standardizer":
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(torch.float64)
        if y.dim() == 1:
            y = y.unsqueeze(1)
        if y.shape[0] == 0:
            raise ValueError("cannot fit a Standardizer on zero rows")
        if not torch.isfinite(y).all():
            raise ValueError("cannot fit a Standardizer on non-finite targets")
        self.mean = y.mean(0)
        std = y.std(0, unbiased=False)
        self.std = torch.where(std > 0, std, torch.ones_like(std))
        return self

    @classmethod
    def fit_dataset(cls, dataset: Any, train_idx: Sequence[int] | np.ndarray | torch.Tensor,
                    targets: Sequence[int | str] | None = None) -> "Standardizer":
        """Fit on ``dataset``'s targets at the rows ``train_idx`` (and optionally some columns) only."""
        if hasattr(dataset, "targets"):
            y = dataset.targets(train_idx)
        else:
            y = torch.cat([dataset[int(i)].y.reshape(1, -1) for i in np.asarray(train_idx)])
        if targets is not None:
            cols = [dataset.target_index(t) for t in targets]
            y = y[:, cols]
        return cls().fit(y)

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("Standardizer is not fitted")

    def _cast(self, y: Any, stat: torch.Tensor):
        if isinstance(y, torch.Tensor):
            return stat.to(device=y.device, dtype=y.dtype if y.is_floating_point() else torch.float32)
        return stat.numpy()

    def transform(self, y: Any):
        self._check()
        return (y - self._cast(y, self.mean)) / self._cast(y, self.std)

    def inverse_transform(self, y: Any):
        self._check()
        return y * self._cast(y, self.std) + self._cast(y, self.mean)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check()
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> "Standardizer":
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float64).reshape(-1)
        self.std = torch.as_tensor(state["std"], dtype=torch.float64).reshape(-1)
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Standardizer":
        return cls().load_state_dict(state)

    def __repr__(self) -> str:
        if not self.fitted:
            return "Standardizer(unfitted)"
        return f"Standardizer(mean={self.mean.tolist()}, std={self.std.tolist()})"

r"""Per-molecule agreement between a readout's atom weights and orbital coefficients.

Do the atoms a weighted readout (WA, OWA, ABP) attends to coincide with where the frontier orbital
lives? For every molecule we compare the readout weights :math:`w_i` with the per-atom orbital
coefficients :math:`l_i` (e.g. GFN2-xTB HOMO Mulliken shares from :mod:`abp_core.orbitals`), then
summarise over molecules and compare with readouts that put *random* weights on the atoms::

    df = per_molecule_agreement(weights, batch.homo_coeff, batch.batch)   # one row per molecule
    base = random_baseline(batch.homo_coeff, batch.batch)                  # same columns, random w
    table = summarise(df, base)                                            # mean, bootstrap CI, test

Statistics (one value per molecule)
-----------------------------------
``pearson_r``
    Pearson correlation of ``w`` and ``l`` over the molecule's atoms (:func:`scipy.stats.pearsonr`).
``spearman_rho``
    Spearman rank correlation (:func:`scipy.stats.spearmanr`; average ranks for ties).
``top1_match``
    1.0 if the atom with the largest weight (``argmax``, first one on ties among the weights) is
    one of the atoms with the largest coefficient, else 0.0. Coefficients within ``tie_atol`` of
    the maximum all count as maxima (degenerate orbitals give several equal shares); ``n_max``
    is how many there are.
``l1``
    :math:`\sum_i |w_i - l_i|`: for two distributions over the atoms this is twice the total
    variation distance (0 = identical, 2 = disjoint supports).

**Undefined correlations are NaN, not errors.** A correlation is undefined when the weights or the
coefficients are constant over a molecule (exactly equal values, e.g. a uniform readout, or a
molecule such as H2 whose atoms are equivalent) and for 1-atom molecules. Those molecules get
``NaN`` in ``pearson_r``/``spearman_rho``, keep their ``top1_match`` and ``l1`` (for a 1-atom
molecule ``top1_match`` is trivially 1, as it is for the random baseline), and are left out of the
correlation summaries (:func:`summarise` reports how many molecules each mean is over).

Random baseline
---------------
:func:`random_baseline` draws, for every molecule independently, ``n_draws`` weight vectors from the
flat Dirichlet distribution **Dirichlet(1, ..., 1)** (uniform on the simplex: normalised Exp(1)
draws) and reports, per molecule, the mean of each statistic over the draws. Because these weights
are exchangeable over the atoms, the expected correlations are exactly 0 and the expected top-1
match rate is exactly ``n_max / n_atoms`` (also given, as ``top1_expected``); the Monte Carlo
values agree within their sampling error.

Summary and test
----------------
:func:`summarise` gives, per statistic, the mean over molecules with a percentile bootstrap
confidence interval (resampling molecules), the same for the baseline, and a **one-sided paired
test of "the readout beats random"**:

* ``pearson_r``, ``spearman_rho``: by default the Wilcoxon signed-rank test of the per-molecule
  differences readout - baseline (alternative: greater), over molecules where both are defined;
  ``method="ttest"`` uses the paired t-test of the mean difference instead;
* ``l1``: the same test with alternative "less" (smaller distance is better);
* ``top1_match``: exact Poisson-binomial test of the number of matches against the random
  readout's per-molecule match probabilities ``n_max / n_atoms`` (alternative: more matches).

``beats_random`` is ``p_value < alpha``. The confidence intervals are reported for reading, the
decision does not use them.

*Calibration.* Under the null (the readout's weights are themselves Dirichlet(1) draws), 300
simulated readouts on 300 molecules of 3-24 atoms gave a rejection rate at ``alpha = 0.05`` of
0.3-2 % for the Wilcoxon test on ``pearson_r`` (conservative: the null distribution of r is
right-skewed, its median lies below its mean 0), 5-8 % on ``spearman_rho``, 1-5 % on ``l1``; the
t-test gave 4-7 % on all three. The Wilcoxon default therefore rarely claims a readout beats
random when it does not, at some cost in power; the t-test targets the mean exactly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["STATISTICS", "per_molecule_agreement", "random_baseline", "summarise", "bootstrap_ci"]

#: The per-molecule statistics and whether larger values mean better agreement.
STATISTICS = {"pearson_r": True, "spearman_rho": True, "top1_match": True, "l1": False}

_MAX_BLOCK = 2_000_000  # elements per vectorised block (keeps memory ~16 MB per array)


def _to_numpy(x: Any, name: str, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a 1-D array of numbers: {err}") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per atom), got shape {arr.shape}")
    return arr


def _check_batch(batch: Any, n: int) -> np.ndarray:
    if hasattr(batch, "detach"):
        batch = batch.detach().cpu().numpy()
    b = np.asarray(batch)
    if b.ndim != 1 or b.shape[0] != n:
        raise ValueError(f"batch must be 1-D with one entry per atom ({n}), got shape {b.shape}")
    if n == 0:
        raise ValueError("no atoms: weights, coefficients and batch are empty")
    if not np.issubdtype(b.dtype, np.integer):
        if np.issubdtype(b.dtype, np.floating) and np.all(np.isfinite(b)) and np.all(b == np.round(b)):
            b = b.astype(np.int64)
        else:
            raise ValueError(f"batch must hold integer molecule indices, got dtype {b.dtype}")
    if np.any(b[1:] < b[:-1]):
        raise ValueError("batch must be sorted (atoms of one molecule contiguous, molecules in order)")
    return b.astype(np.int64)


def _segments(batch: np.ndarray):
    """(molecule labels, start offsets, sizes) of the contiguous runs of ``batch``."""
    starts = np.flatnonzero(np.r_[True, batch[1:] != batch[:-1]])
    sizes = np.diff(np.r_[starts, batch.size])
    return batch[starts], starts, sizes


def _check_values(x: np.ndarray, name: str, n: int) -> None:
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries but there are {n} atoms")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x))[:5].tolist()
        raise ValueError(f"{name} contains NaN or infinite values (atoms {bad}...)")


def _prepare(weights, coefficients, batch):
    w = _to_numpy(weights, "weights")
    c = _to_numpy(coefficients, "coefficients")
    if w.shape[0] != c.shape[0]:
        raise ValueError(f"weights ({w.shape[0]}) and coefficients ({c.shape[0]}) differ in length")
    b = _check_batch(batch, c.shape[0])
    _check_values(w, "weights", b.size)
    _check_values(c, "coefficients", b.size)
    return w, c, b


def _coefficient_maxima(c: np.ndarray, tie_atol: float) -> np.ndarray:
    return c >= c.max(axis=-1, keepdims=True) - tie_atol


def _ids(labels: np.ndarray, mol_ids: Optional[Sequence]) -> np.ndarray:
    if mol_ids is None:
        return labels
    ids = np.asarray(list(mol_ids), dtype=object)
    if ids.shape[0] != labels.shape[0]:
        raise ValueError(f"mol_ids has {ids.shape[0]} entries but the batch holds {labels.shape[0]} molecules")
    return ids


def per_molecule_agreement(weights, coefficients, batch, *, mol_ids: Optional[Sequence] = None,
                           tie_atol: float = 1e-8) -> pd.DataFrame:
    """Agreement of readout weights with orbital coefficients, one row per molecule.

    Args:
        weights: per-atom readout weights ``[n_atoms]`` (tensor, array or list).
        coefficients: per-atom orbital coefficients ``[n_atoms]`` (e.g. HOMO Mulliken shares).
        batch: sorted molecule index of every atom ``[n_atoms]`` (PyG's ``batch.batch``).
        mol_ids: optional label per molecule (in batch order) for the ``molecule`` column;
            default: the molecule's value in ``batch``.
        tie_atol: coefficients within this of a molecule's maximum count as maxima for top-1.

    Returns:
        DataFrame with columns ``molecule, n_atoms, n_max, pearson_r, spearman_rho, top1_match,
        l1`` (see the module docstring; undefined correlations are NaN).

    Raises:
        ValueError: lengths differ, ``batch`` is unsorted or not integer, or a value is NaN/inf.
    """
    w, c, b = _prepare(weights, coefficients, batch)
    labels, starts, sizes = _segments(b)
    m = labels.size
    r, rho, top1, l1 = np.full(m, np.nan), np.full(m, np.nan), np.zeros(m), np.zeros(m)
    n_max = np.zeros(m, dtype=np.int64)
    # Vectorised over molecules of equal size; identical to scipy.stats.pearsonr / spearmanr
    # (Spearman = Pearson of the average ranks, scipy.stats.rankdata) molecule by molecule.
    for n in np.unique(sizes):
        mols = np.flatnonzero(sizes == n)
        idx = starts[mols, None] + np.arange(n)                          # [k, n]
        wk, ck = w[idx], c[idx]
        maxima = _coefficient_maxima(ck, tie_atol)
        n_max[mols] = maxima.sum(-1)
        top1[mols] = np.take_along_axis(maxima, wk.argmax(-1)[:, None], axis=-1)[:, 0]
        l1[mols] = np.abs(wk - ck).sum(-1)
        if n < 2:
            continue
        defined = (np.ptp(wk, axis=-1) > 0) & (np.ptp(ck, axis=-1) > 0)
        r[mols] = np.where(defined, np.clip(_rowwise_pearson(wk, ck), -1.0, 1.0), np.nan)
        rk = _rowwise_pearson(stats.rankdata(wk, axis=-1), stats.rankdata(ck, axis=-1))
        rho[mols] = np.where(defined, np.clip(rk, -1.0, 1.0), np.nan)
    rows = {"n_atoms": sizes.astype(np.int64), "n_max": n_max, "pearson_r": r, "spearman_rho": rho,
            "top1_match": top1, "l1": l1}
    df = pd.DataFrame(rows)
    df.insert(0, "molecule", _ids(labels, mol_ids))
    return df


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r between every row of ``x [..., n]`` and ``y [..., n]`` (broadcast)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / den, np.nan)


def random_baseline(coefficients, batch, n_draws: int = 1000, seed: int = 0, *,
                    mol_ids: Optional[Sequence] = None, tie_atol: float = 1e-8) -> pd.DataFrame:
    """The agreement statistics of a readout with random weights, per molecule.

    For each molecule, ``n_draws`` weight vectors are drawn from the flat Dirichlet(1, ..., 1)
    distribution (uniform on the simplex) and each statistic of :func:`per_molecule_agreement` is
    averaged over the draws. The result has the same columns (``top1_match`` is then the match
    *rate*), plus ``top1_expected = n_max / n_atoms``, the exact expected rate. Correlations are
    NaN where the coefficients are constant or the molecule has one atom.

    Vectorised over draws and over molecules of equal size: about 6 s for 10,000 molecules of
    1-24 atoms at ``n_draws=1000`` on one core (time and memory grow with ``n_draws``).
    """
    if int(n_draws) < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    n_draws = int(n_draws)
    c = _to_numpy(coefficients, "coefficients")
    b = _check_batch(batch, c.shape[0])
    _check_values(c, "coefficients", b.size)
    labels, starts, sizes = _segments(b)
    m = labels.size
    out = {k: np.full(m, np.nan) for k in ("pearson_r", "spearman_rho", "top1_match", "l1")}
    n_max = np.zeros(m, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for n in np.unique(sizes):
        mols = np.flatnonzero(sizes == n)
        idx = starts[mols, None] + np.arange(n)                         # [k, n]
        cc = c[idx]
        maxima = _coefficient_maxima(cc, tie_atol)
        n_max[mols] = maxima.sum(-1)
        chunk = max(1, _MAX_BLOCK // (n_draws * n))
        for lo in range(0, mols.size, chunk):
            sl = slice(lo, lo + chunk)
            ck, mk, k = cc[sl], maxima[sl], mols[sl]
            e = rng.exponential(size=(k.size, n_draws, n))
            wk = e / e.sum(-1, keepdims=True)                            # Dirichlet(1) draws
            top = np.take_along_axis(mk[:, None, :], wk.argmax(-1)[..., None], axis=-1)[..., 0]
            out["top1_match"][k] = top.mean(-1)
            out["l1"][k] = np.abs(wk - ck[:, None, :]).sum(-1).mean(-1)
            if n < 2:
                continue
            const = np.ptp(ck, axis=-1) == 0
            r = _rowwise_pearson(wk, ck[:, None, :]).mean(-1)
            ranks_w = np.empty_like(wk)                                  # no ties (continuous)
            np.put_along_axis(ranks_w, wk.argsort(-1), np.arange(n, dtype=np.float64), axis=-1)
            ranks_c = stats.rankdata(ck, axis=-1)
            rho = _rowwise_pearson(ranks_w, ranks_c[:, None, :]).mean(-1)
            out["pearson_r"][k] = np.where(const, np.nan, r)
            out["spearman_rho"][k] = np.where(const, np.nan, rho)
    df = pd.DataFrame({"molecule": _ids(labels, mol_ids), "n_atoms": sizes.astype(np.int64), "n_max": n_max,
                       **out, "top1_expected": n_max / sizes})
    df.attrs.update(distribution="Dirichlet(1)", n_draws=n_draws, seed=seed)
    return df


def bootstrap_ci(values, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """Mean of ``values`` (NaNs dropped) and its percentile bootstrap interval.

    Returns ``(mean, low, high, n)``; with no finite value all three are NaN, with one value the
    interval collapses onto it.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    mean = float(x.mean())
    if n == 1:
        return mean, mean, mean, 1
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot))
    chunk = max(1, _MAX_BLOCK // n)
    for lo in range(0, means.size, chunk):
        hi = min(lo + chunk, means.size)
        means[lo:hi] = x[rng.integers(0, n, size=(hi - lo, n))].mean(-1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(low), float(high), n


def _poisson_binomial_sf(k: int, p: np.ndarray) -> float:
    """P(X >= k) for X a sum of independent Bernoulli(p_i) (exact, by convolution)."""
    pmf = np.zeros(p.size + 1)
    pmf[0] = 1.0
    for i, pi in enumerate(p, start=1):
        pmf[1:i + 1] = pmf[1:i + 1] * (1 - pi) + pmf[:i] * pi
        pmf[0] *= 1 - pi
    return float(min(1.0, pmf[k:].sum()))


def _paired_test(stat: str, df: pd.DataFrame, base: pd.DataFrame, method: str):
    if stat == "top1_match":
        p = base["top1_expected"].to_numpy(dtype=float)
        k = int(round(df["top1_match"].to_numpy(dtype=float).sum()))
        return "Poisson-binomial exact, one-sided (more matches)", _poisson_binomial_sf(k, p)
    a = df[stat].to_numpy(dtype=float)
    r = base[stat].to_numpy(dtype=float)
    ok = np.isfinite(a) & np.isfinite(r)
    d = a[ok] - r[ok]
    alternative = "greater" if STATISTICS[stat] else "less"
    if method == "ttest":
        name = f"paired t-test, one-sided ({alternative})"
        if d.size < 2 or np.all(d == d[0]):
            return name, np.nan
        return name, float(stats.ttest_1samp(d, 0.0, alternative=alternative).pvalue)
    name = f"Wilcoxon signed-rank, paired, one-sided ({alternative})"
    if d.size == 0 or np.all(d == 0):
        return name, np.nan
    return name, float(stats.wilcoxon(d, alternative=alternative, zero_method="wilcox").pvalue)


def summarise(df: pd.DataFrame, baseline: Optional[pd.DataFrame] = None, confidence: float = 0.95,
              n_boot: int = 2000, seed: int = 0, *, alpha: float = 0.05,
              method: str = "wilcoxon") -> pd.DataFrame:
    """Tidy summary: per statistic, mean with bootstrap CI, the baseline's, and a test.

    Args:
        df: output of :func:`per_molecule_agreement`.
        baseline: output of :func:`random_baseline` for the same molecules (same order), or None.
        confidence: level of the percentile bootstrap intervals (resampling molecules).
        n_boot: bootstrap resamples.
        seed: seed of the resampling.
        alpha: level of the one-sided "beats random" test (see the module docstring).
        method: ``"wilcoxon"`` (signed-rank, default) or ``"ttest"`` (paired t-test) for the
            correlation and L1 statistics; top-1 always uses the exact Poisson-binomial test.

    Returns:
        One row per statistic with ``statistic, higher_is_better, n_molecules, mean, ci_low,
        ci_high, baseline_mean, baseline_ci_low, baseline_ci_high, test, p_value, beats_random``
        (baseline columns NaN and ``beats_random`` None without a baseline).
    """
    if method not in ("wilcoxon", "ttest"):
        raise ValueError(f"method must be 'wilcoxon' or 'ttest', got {method!r}")
    missing = [s for s in STATISTICS if s not in df.columns]
    if missing:
        raise ValueError(f"df lacks the columns {missing}; pass the output of per_molecule_agreement")
    if baseline is not None:
        if len(baseline) != len(df) or not np.array_equal(baseline["n_atoms"].to_numpy(), df["n_atoms"].to_numpy()):
            raise ValueError("baseline does not describe the same molecules as df "
                             "(compute both from the same coefficients and batch)")
    rows = []
    for stat, higher in STATISTICS.items():
        mean, lo, hi, n = bootstrap_ci(df[stat], confidence, n_boot, seed)
        row = dict(statistic=stat, higher_is_better=higher, n_molecules=n, mean=mean, ci_low=lo, ci_high=hi,
                   baseline_mean=np.nan, baseline_ci_low=np.nan, baseline_ci_high=np.nan, test=None,
                   p_value=np.nan, beats_random=None)
        if baseline is not None:
            bm, blo, bhi, _ = bootstrap_ci(baseline[stat], confidence, n_boot, seed)
            test, p = _paired_test(stat, df, baseline, method)
            row.update(baseline_mean=bm, baseline_ci_low=blo, baseline_ci_high=bhi, test=test, p_value=p,
                       beats_random=bool(p < alpha) if np.isfinite(p) else False)
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(confidence=confidence, n_boot=n_boot, alpha=alpha, method=method)
    return out

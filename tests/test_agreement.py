"""abp_core.agreement: per-molecule agreement of readout weights with orbital coefficients."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from abp_core.agreement import (STATISTICS, _poisson_binomial_sf, bootstrap_ci, per_molecule_agreement,
                                random_baseline, summarise)


def _batch(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def _distributions(rng, sizes, alpha=1.0):
    return np.concatenate([rng.dirichlet(np.full(n, alpha)) for n in sizes])


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def test_identical_weights_and_coefficients(rng):
    sizes = [3, 9, 20, 5]
    c = _distributions(rng, sizes)
    df = per_molecule_agreement(torch.tensor(c), c, torch.tensor(_batch(sizes)))
    assert list(df.columns) == ["molecule", "n_atoms", "n_max", "pearson_r", "spearman_rho", "top1_match", "l1"]
    assert df["n_atoms"].tolist() == sizes and df["molecule"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(df["pearson_r"], 1.0)
    np.testing.assert_allclose(df["spearman_rho"], 1.0)
    assert (df["top1_match"] == 1.0).all() and np.allclose(df["l1"], 0.0)


def test_reversed_ranks_give_minus_one():
    c = np.array([0.1, 0.2, 0.3, 0.4, 0.05, 0.15, 0.8])
    w = np.array([0.4, 0.3, 0.2, 0.1, 0.8, 0.15, 0.05])       # same values, ranks reversed per molecule
    df = per_molecule_agreement(w, c, [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(df["spearman_rho"], -1.0)
    assert df.loc[0, "pearson_r"] == pytest.approx(-1.0)        # linear in the first molecule
    assert (df["top1_match"] == 0.0).all()
    assert df.loc[0, "l1"] == pytest.approx(0.8)


def test_matches_scipy_per_molecule(rng):
    sizes = rng.integers(2, 25, size=60)
    c = _distributions(rng, sizes)
    w = _distributions(rng, sizes)
    w[:4] = 0.25                                          # ties inside the first molecule's weights
    b = _batch(sizes)
    df = per_molecule_agreement(w, c, b, mol_ids=[f"m{i}" for i in range(60)])
    assert df["molecule"].iloc[5] == "m5"
    for i in range(60):
        m = b == i
        if np.ptp(w[m]) == 0:
            continue
        assert df.loc[i, "pearson_r"] == pytest.approx(stats.pearsonr(w[m], c[m])[0], abs=1e-10)
        assert df.loc[i, "spearman_rho"] == pytest.approx(stats.spearmanr(w[m], c[m])[0], abs=1e-10)
        assert df.loc[i, "top1_match"] == float(np.argmax(w[m]) == np.argmax(c[m]))
        assert df.loc[i, "l1"] == pytest.approx(np.abs(w[m] - c[m]).sum())


def test_top1_ties_among_coefficient_maxima():
    c = [0.4, 0.4, 0.2, 0.4, 0.4 - 1e-12, 0.2]             # second molecule: maxima equal within tie_atol
    df = per_molecule_agreement([0.1, 0.6, 0.3, 0.2, 0.7, 0.1], c, [0, 0, 0, 1, 1, 1])
    assert df["n_max"].tolist() == [2, 2]
    assert df["top1_match"].tolist() == [1.0, 1.0]          # weight argmax is one of the maxima
    df = per_molecule_agreement([0.1, 0.2, 0.7], [0.4, 0.4, 0.2], [0, 0, 0])
    assert df["top1_match"].tolist() == [0.0]


def test_constant_inputs_and_single_atoms_give_nan_not_errors():
    w = [0.5, 0.5, 0.2, 0.3, 0.5, 1.0, 0.1, 0.9]
    c = [0.7, 0.3, 1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5]
    b = [0, 0, 1, 1, 1, 2, 3, 3]   # constant weights | constant coefficients | one atom | H2-like (equal c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # no ConstantInputWarning or RuntimeWarning
        df = per_molecule_agreement(w, c, b)
    assert df["pearson_r"].isna().tolist() == [True, True, True, True]
    assert df["spearman_rho"].isna().all()
    assert df.loc[2, "n_atoms"] == 1 and df.loc[2, "top1_match"] == 1.0 and df.loc[2, "l1"] == 0.0
    assert df.loc[1, "top1_match"] == 1.0 and df.loc[1, "n_max"] == 3   # all atoms are maxima
    summary = summarise(df, random_baseline(c, b, n_draws=50))
    assert summary.set_index("statistic").loc["pearson_r", "n_molecules"] == 0
    assert np.isnan(summary.set_index("statistic").loc["pearson_r", "mean"])


@pytest.mark.parametrize("w, c, b, match", [
    ([0.5, 0.5], [0.5, 0.3, 0.2], [0, 0, 0], "differ in length"),
    ([0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [0, 0], "one entry per atom"),
    ([0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [1, 0, 0], "sorted"),
    ([0.5, np.nan, 1.0], [0.5, 0.5, 1.0], [0, 0, 1], "weights contains NaN"),
    ([0.5, 0.5, 1.0], [0.5, np.inf, 1.0], [0, 0, 1], "coefficients contains NaN"),
    ([0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [0, 0.5, 1], "integer"),
    ([[0.5, 0.5, 1.0]] * 2, [0.5, 0.5, 1.0], [0, 0, 1], "1-D"),
    ([], [], [], "no atoms"),
])
def test_bad_input_raises(w, c, b, match):
    with pytest.raises(ValueError, match=match):
        per_molecule_agreement(w, c, b)


def test_bad_input_baseline_and_ids():
    with pytest.raises(ValueError, match="sorted"):
        random_baseline([0.5, 0.5, 1.0], [1, 1, 0])
    with pytest.raises(ValueError, match="NaN"):
        random_baseline([0.5, np.nan, 1.0], [0, 0, 1])
    with pytest.raises(ValueError, match="n_draws"):
        random_baseline([0.5, 0.5], [0, 0], n_draws=0)
    with pytest.raises(ValueError, match="mol_ids"):
        per_molecule_agreement([0.5, 0.5], [0.5, 0.5], [0, 0], mol_ids=["a", "b"])


def test_random_baseline_top1_rate_is_one_over_n(rng):
    n_draws = 2000
    sizes = [2, 3, 5, 9, 18, 27]
    c = _distributions(rng, sizes)                          # continuous: unique maxima
    base = random_baseline(c, _batch(sizes), n_draws=n_draws, seed=3)
    assert base.attrs["distribution"] == "Dirichlet(1)" and base.attrs["n_draws"] == n_draws
    assert (base["n_max"] == 1).all()
    p = 1.0 / np.array(sizes)
    np.testing.assert_allclose(base["top1_expected"], p)
    sigma = np.sqrt(p * (1 - p) / n_draws)                  # binomial standard error of the rate
    assert np.all(np.abs(base["top1_match"] - p) < 5 * sigma), (base["top1_match"].tolist(), p)
    # correlations of random weights average to 0 (per molecule within 5 standard errors, sd(r) <= 1)
    assert np.all(np.abs(base["pearson_r"]) < 5 / np.sqrt(n_draws))
    assert np.all(np.abs(base["spearman_rho"]) < 5 / np.sqrt(n_draws))
    # deterministic for a seed
    again = random_baseline(c, _batch(sizes), n_draws=n_draws, seed=3)
    pd.testing.assert_frame_equal(base, again)


def test_random_baseline_with_ties_and_mean_correlation_zero(rng):
    # two equal maxima among 6 atoms -> expected rate 2/6; 1-atom molecule -> 1, NaN correlations
    c = np.r_[[0.3, 0.3, 0.1, 0.1, 0.1, 0.1], [1.0]]
    base = random_baseline(c, [0] * 6 + [1], n_draws=4000, seed=0)
    assert base.loc[0, "n_max"] == 2 and base.loc[0, "top1_expected"] == pytest.approx(1 / 3)
    assert abs(base.loc[0, "top1_match"] - 1 / 3) < 5 * np.sqrt(2 / 9 / 4000)
    assert base.loc[1, "top1_match"] == 1.0 and np.isnan(base.loc[1, "pearson_r"])
    # over many molecules the mean correlation is ~0 to high precision
    sizes = rng.integers(4, 20, size=300)
    big = random_baseline(_distributions(rng, sizes), _batch(sizes), n_draws=200, seed=1)
    assert abs(big["pearson_r"].mean()) < 0.01 and abs(big["spearman_rho"].mean()) < 0.01
    np.testing.assert_allclose(big["top1_match"].mean(), (1 / sizes).mean(), atol=0.01)


def test_bootstrap_ci_contains_mean_and_shrinks(rng):
    small = rng.normal(0.5, 0.2, size=20)
    large = rng.normal(0.5, 0.2, size=2000)
    m_s, lo_s, hi_s, n_s = bootstrap_ci(small, n_boot=2000, seed=0)
    m_l, lo_l, hi_l, n_l = bootstrap_ci(large, n_boot=2000, seed=0)
    assert n_s == 20 and n_l == 2000
    assert lo_s < m_s < hi_s and lo_l < m_l < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5                 # ~ sqrt(100) = 10 times narrower
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * 0.2 / np.sqrt(2000), rel=0.2)
    assert bootstrap_ci([np.nan, 0.3])[:3] == (0.3, 0.3, 0.3)
    assert np.isnan(bootstrap_ci([np.nan])[0])
    with pytest.raises(ValueError):
        bootstrap_ci(small, confidence=1.5)


def test_summarise_readout_beats_random():
    rng = np.random.default_rng(7)
    sizes = rng.integers(3, 25, size=150)
    b = _batch(sizes)
    c = _distributions(rng, sizes, alpha=0.5)
    good = 0.7 * c + 0.3 * _distributions(rng, sizes)       # attention partly follows the orbital
    base = random_baseline(c, b, n_draws=300, seed=0)
    s_good = summarise(per_molecule_agreement(good, c, b), base, n_boot=500)
    assert s_good["statistic"].tolist() == list(STATISTICS)
    assert {"mean", "ci_low", "ci_high", "baseline_mean", "baseline_ci_low", "baseline_ci_high", "test",
            "p_value", "beats_random", "n_molecules"} <= set(s_good.columns)
    assert s_good["beats_random"].all() and (s_good["p_value"] < 1e-6).all()
    g = s_good.set_index("statistic")
    assert (g["ci_low"] <= g["mean"]).all() and (g["mean"] <= g["ci_high"]).all()
    assert (g["baseline_ci_low"] <= g["baseline_mean"]).all() and (g["baseline_mean"] <= g["baseline_ci_high"]).all()
    assert g.loc["pearson_r", "mean"] > 0.5 and abs(g.loc["pearson_r", "baseline_mean"]) < 0.05
    assert g.loc["top1_match", "baseline_mean"] == pytest.approx((1 / sizes).mean(), abs=0.03)
    assert "Wilcoxon" in g.loc["pearson_r", "test"] and "Poisson-binomial" in g.loc["top1_match", "test"]
    assert "(less)" in g.loc["l1", "test"]
    t = summarise(per_molecule_agreement(good, c, b), base, n_boot=100, method="ttest").set_index("statistic")
    assert "t-test" in t.loc["pearson_r", "test"] and t["beats_random"].all()
    # without a baseline: baseline columns NaN, no decision
    alone = summarise(per_molecule_agreement(good, c, b), n_boot=100)
    assert alone["baseline_mean"].isna().all() and alone["beats_random"].isna().all()
    with pytest.raises(ValueError, match="same molecules"):
        summarise(per_molecule_agreement(good, c, b), base.iloc[:-1])
    with pytest.raises(ValueError, match="lacks"):
        summarise(pd.DataFrame({"pearson_r": [0.1]}))
    with pytest.raises(ValueError, match="method"):
        summarise(per_molecule_agreement(good, c, b), base, method="sign")


@pytest.mark.parametrize("method", ["wilcoxon", "ttest"])
def test_random_readout_rarely_beats_random(method):
    """Under the null (readout weights are Dirichlet(1) draws too) the test rejects at about alpha."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(3, 25, size=120)
    b = _batch(sizes)
    c = _distributions(rng, sizes, alpha=0.5)
    base = random_baseline(c, b, n_draws=300, seed=0)
    reps = 40
    rejections = np.zeros(4)
    for _ in range(reps):
        s = summarise(per_molecule_agreement(_distributions(rng, sizes), c, b), base, n_boot=20, method=method)
        rejections += s["beats_random"].to_numpy(dtype=float)
    # nominal 5 %; 40 replicates: a valid test rejects > 8 times with probability < 0.1 %
    assert np.all(rejections <= 8), dict(zip(STATISTICS, rejections))


def test_poisson_binomial_matches_binomial():
    p = np.full(40, 0.25)
    for k in (0, 5, 10, 20, 40):
        assert _poisson_binomial_sf(k, p) == pytest.approx(stats.binom.sf(k - 1, 40, 0.25), rel=1e-9, abs=1e-15)

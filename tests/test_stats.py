"""Statistics on known numbers: the paper's own Table 1, hand-checked Wilcoxon p-values, aggregation."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from abp_core import stats


def test_paper_tables_are_shipped_as_package_data():
    t1 = stats.paper_table(1)
    assert len(t1) == 40 and list(t1["dataset"].unique()) == ["QM7b", "QM8", "QM9", "QMugs", "MD17"]
    row = t1[(t1["dataset"] == "QM7b") & (t1["task"] == "HOMO – PBE0")].iloc[0]
    assert (row["schnet_sum_mean"], row["schnet_sum_std"], row["dimenetpp_abp_mean"]) == (3.039, 0.131, 2.022)
    long = stats.paper_table(1, long=True)
    assert len(long) == 160
    assert set(long["backbone"]) == {"schnet", "dimenet++"} and set(long["readout"]) == {"sum", "abp"}
    t2 = stats.paper_table(2)
    assert len(t2) == 7 and t2.loc[t2["readout"] == "OWA", "mae_mean"].item() == 0.1135
    assert set(stats.paper_table("2-4")["table"]) == {2, 3, 4}
    assert stats.paper_table(4)["readout"].tolist()[:3] == ["sum", "WA", "ABP"]
    with pytest.raises(ValueError, match="unknown paper table"):
        stats.paper_table(5)


def _change(df, dataset, task):
    return df[(df["dataset"] == dataset) & (df["task"] == task)]["improvement_pct"].item()


def test_relative_change_reproduces_the_papers_percentages():
    # The paper's text divides the decrease by the ABP error: QM9 HOMO, SchNet, 35.985 -> 29.577 meV:
    # (35.985 - 29.577) / 29.577 = 6.408 / 29.577 = 0.21665 -> "21.67%"; relative to the sum baseline
    # it is 6.408 / 35.985 = 0.17807.
    assert stats.relative_improvement(35.985, 29.577, relative_to="candidate") == pytest.approx(21.665, abs=1e-3)
    assert stats.relative_improvement(35.985, 29.577) == pytest.approx(17.807, abs=1e-3)
    assert stats.relative_improvement(1.0, 1.25) == pytest.approx(-25.0)  # a worse candidate is negative
    schnet = stats.paper_relative_changes("schnet")
    dimenet = stats.paper_relative_changes("dimenet++")
    # values quoted in the paper's section 4 (paper convention), from Table 1 by hand:
    assert round(_change(schnet, "QM9", "HOMO – DFT"), 2) == 21.67
    assert round(_change(dimenet, "QM9", "HOMO – DFT"), 2) == 9.89      # 2.134 / 21.577
    assert round(_change(schnet, "QMugs", "HOMO – DFT"), 2) == 24.77    # 12.922 / 52.172
    assert round(_change(dimenet, "QMugs", "HOMO – DFT"), 2) == 3.92     # 0.926 / 23.610
    # "Atom. energy – ZINDO/s" is the paper's label of the atomization energy (DFT/PBE0): 23.98% / 58.41%
    assert round(_change(schnet, "QM7b", "Atom. energy – ZINDO/s"), 1) == 24.0   # 0.746 / 3.113
    assert round(_change(dimenet, "QM7b", "Atom. energy – ZINDO/s"), 1) == 58.4  # 1.574 / 2.694
    # ... but the QMugs total energy figures (58.97% / 19.34%) are relative to the sum baseline
    base = stats.paper_relative_changes("schnet", relative_to="baseline")
    assert round(_change(base, "QMugs", "Total Energy – DFT"), 2) == 58.97  # 5.337 / 9.051
    # averages over a dataset's tasks: "50.5%" (QM7b, SchNet), "19.23%" (QM8, SchNet), "2.31%" (QM8, DimeNet++)
    assert schnet[schnet["dataset"] == "QM7b"]["improvement_pct"].mean() == pytest.approx(50.5, abs=0.05)
    assert schnet[schnet["dataset"] == "QM8"]["improvement_pct"].mean() == pytest.approx(19.23, abs=0.02)
    assert dimenet[dimenet["dataset"] == "QM8"]["improvement_pct"].mean() == pytest.approx(2.31, abs=0.01)
    with pytest.raises(ValueError):
        stats.relative_improvement(1.0, 2.0, relative_to="both")


def test_table4_abp_column_is_table1_dimenetpp():
    """A finding documented in abp_core.stats: Table 4's ABP numbers are Table 1's DimeNet++ ABP ones."""
    t1, t4 = stats.paper_table(1).set_index("task"), stats.paper_table(4)
    abp = t4[t4["readout"] == "ABP"].set_index("task")["mae_mean"]
    s = t4[t4["readout"] == "sum"].set_index("task")["mae_mean"]
    for t4_task, t1_task in (("HOMO (GW)", "HOMO – GW"), ("HOMO (PBE0)", "HOMO – PBE0"), ("HOMO (ZINDO/s)", "HOMO – ZINDO/s")):
        assert s[t4_task] == t1.loc[t1_task, "schnet_sum_mean"]
        assert abp[t4_task] == t1.loc[t1_task, "dimenetpp_abp_mean"] != t1.loc[t1_task, "schnet_abp_mean"]


def test_wilcoxon_hand_checked_examples():
    # d = [-1, 2, 3, 4, 5, 6]: W- = 1 (rank 1); of the 2^6 = 64 sign patterns, {} and {1} have a
    # negative rank sum <= 1, so the exact two-sided p = 2 * 2/64 = 0.0625.
    res = stats.wilcoxon_test([0] * 6, [1, -2, -3, -4, -5, -6])  # candidate - baseline = -d
    assert res.statistic == 1.0 and res.pvalue == pytest.approx(0.0625, abs=1e-12) and res.n == 6
    assert res.candidate_better == 5
    # n = 8, negative ranks 1 and 2: W = 3; rank subsets with sum <= 3 are {}, {1}, {2}, {3}, {1,2}:
    # p = 2 * 5/256 = 0.0390625
    a = np.array([10.0, 10, 10, 10, 10, 10, 10, 10])
    b = a - np.array([-0.1, -0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    res = stats.wilcoxon_test(a, b)
    assert res.statistic == 3.0 and res.pvalue == pytest.approx(0.0390625, abs=1e-12)
    ref = scipy.stats.wilcoxon(a, b)
    assert (res.statistic, res.pvalue) == (float(ref.statistic), float(ref.pvalue))
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        stats.wilcoxon_test([1, 2, 3], [1, 2])


def test_wilcoxon_on_table1_matches_scipy():
    long = stats.paper_table(1, long=True)
    summary = long.assign(unit=long["unit_as_printed"])
    t1 = stats.paper_table(1)
    for bb, col in (("schnet", "schnet"), ("dimenet++", "dimenetpp")):
        res = stats.wilcoxon_readouts(summary, "sum", "abp", backbone=bb)
        ref = scipy.stats.wilcoxon(t1[f"{col}_sum_mean"], t1[f"{col}_abp_mean"])
        assert res.n == 40
        assert res.statistic == float(ref.statistic) and res.pvalue == pytest.approx(float(ref.pvalue), rel=1e-12)
    # SchNet: ABP lower on 38 of the 40 tasks (higher on MD17 ethanol and malonaldehyde)
    res = stats.wilcoxon_readouts(summary, "sum", "abp", backbone="schnet")
    assert res.candidate_better == 38 and res.pvalue < 1e-6
    assert "Wilcoxon signed-rank (abp vs sum, 40 paired tasks" in str(res)


def _runs():
    rows = []
    for ro, maes in (("sum", [3.0, 3.2, 3.4]), ("abp", [2.0, 2.1, 2.3])):
        for seed, mae in zip((1, 2, 3), maes):
            rows.append({"dataset": "qm7b", "task": "Highest occupied molecular orbital (PBE0)", "target_index": 5,
                         "unit": "Ha", "backbone": "schnet", "readout": ro, "split_seed": seed, "seed": seed,
                         "mae": mae / 1000, "rmse": 2 * mae / 1000, "dataset_kwargs": "{}"})
    return pd.DataFrame(rows)


def test_summarize_compare_and_beside_the_paper():
    summary = stats.summarize(_runs())
    assert len(summary) == 2
    s = summary.set_index("readout")
    assert s.loc["sum", "n_splits"] == 3 and s.loc["sum", "seeds"] == "1,2,3"
    assert s.loc["sum", "mae_mean"] == pytest.approx(3.2e-3)
    assert s.loc["sum", "mae_std"] == pytest.approx(0.2e-3)  # sample std (ddof=1) of 3.0, 3.2, 3.4
    assert s.loc["abp", "mae_std"] == pytest.approx(np.std([2.0, 2.1, 2.3], ddof=1) / 1000)
    cmp = stats.compare_readouts(summary)
    assert cmp["improvement_pct"].item() == pytest.approx(100 * (3.2 - 2.1333333) / 3.2, rel=1e-5)
    joined = stats.with_paper(summary).set_index("readout")
    assert joined.loc["sum", "paper_task"] == "HOMO – PBE0"
    assert joined.loc["sum", "paper_mean"] == 3.039 and joined.loc["abp", "paper_mean"] == 2.178
    # QM7b "meV" in Table 1 are milli-Hartree: our Hartree MAE x 1000
    assert joined.loc["sum", "ours_in_paper_units_mean"] == pytest.approx(3.2)
    layout = stats.paper_layout(summary, digits=4, readouts=["sum", "abp"])
    assert layout.iloc[0].tolist() == ["0.0032 ± 0.0002", "0.0021 ± 0.0002"]
    assert stats.format_mean_std(1.0, math.nan) == "1.000"


def test_paper_task_names():
    assert stats.paper_task_name("qm7b", "Highest occupied molecular orbital (GW)") == "HOMO – GW"
    assert stats.paper_task_name("qm7b", "whatever", target_index=3) == "Atom. energy – ZINDO/s"
    assert stats.paper_task_name("qm8", "E1-CC2") == "E1-CC2"
    assert stats.paper_task_name("qm9", "homo") == "HOMO – DFT"
    assert stats.paper_task_name("md17", "energy", dataset_kwargs={"molecule": "aspirin"}) == "Aspirin – CCSD"
    assert stats.paper_task_name("qm9", "zpve") is None


def test_collect_runs_reads_metrics_json(tmp_path):
    for ro, seed, mae in (("sum", 1, 0.003), ("abp", 1, 0.002), ("abp", 2, 0.004)):
        d = tmp_path / "qm7b" / "homo" / f"schnet-{ro}" / f"seed{seed}-abc"
        d.mkdir(parents=True)
        block = {"Highest occupied molecular orbital (PBE0)": {"mae": mae, "rmse": 2 * mae, "max_error": 5 * mae,
                                                               "r2": 0.9, "n": 100}}
        (d / "metrics.json").write_text(json.dumps({
            "config": {"data": {"dataset": "qm7b", "split_seed": seed, "dataset_kwargs": {}},
                       "model": {"backbone": "schnet", "readout": ro}},
            "seed": seed, "target_names": ["Highest occupied molecular orbital (PBE0)"], "target_indices": [5],
            "target_units": ["Ha"], "epochs_trained": 10, "fingerprint": "abc",
            "metrics": {"test_best": block, "test_last": {k: {**v, "mae": 1.0} for k, v in block.items()}}}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    runs = stats.collect_runs(tmp_path)
    assert len(runs) == 3 and set(runs["readout"]) == {"sum", "abp"}
    assert runs["target_index"].tolist() == [5, 5, 5]
    summary = stats.summarize(runs).set_index("readout")
    assert summary.loc["abp", "mae_mean"] == pytest.approx(0.003) and summary.loc["abp", "n_splits"] == 2
    assert math.isnan(summary.loc["sum", "mae_std"])  # one split: no std
    assert (stats.collect_runs(tmp_path, weights="last")["mae"] == 1.0).all()


def _write_predictions(run_dir, idx, y_true, y_pred, extra_rows=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"split": "test", "weights": "best", "idx": i, "target": "homo", "unit": "eV", "y_true": t, "y_pred": p}
            for i, t, p in zip(idx, y_true, y_pred)]
    rows += [{"split": "test", "weights": "last", "idx": i, "target": "homo", "unit": "eV", "y_true": 0.0,
              "y_pred": 99.0} for i in idx]  # other weights must be ignored
    pd.DataFrame(rows + list(extra_rows)).to_csv(run_dir / "predictions_test.csv", index=False)


def test_paired_molecule_test_matches_scipy_and_aligns_by_molecule(tmp_path):
    rng = np.random.default_rng(0)
    idx = np.arange(40) * 3 + 7
    y = rng.normal(size=40)
    err_a = rng.normal(scale=0.5, size=40)
    err_b = 0.5 * rng.normal(scale=0.5, size=40)
    _write_predictions(tmp_path / "a", idx, y, y + err_a)
    perm = rng.permutation(40)  # candidate's file lists the molecules in another order
    _write_predictions(tmp_path / "b", idx[perm], y[perm], (y + err_b)[perm])
    res = stats.paired_molecule_test(tmp_path / "a", tmp_path / "b")
    ref = scipy.stats.wilcoxon(np.abs(err_a), np.abs(err_b))
    assert res["n"] == 40
    assert res["pvalue"] == pytest.approx(ref.pvalue) and res["statistic"] == pytest.approx(ref.statistic)
    assert res["baseline_mae"] == pytest.approx(np.abs(err_a).mean())
    assert res["candidate_mae"] == pytest.approx(np.abs(err_b).mean())
    assert res["candidate_lower"] == pytest.approx(np.mean(np.abs(err_b) < np.abs(err_a)))


def test_paired_molecule_test_rejects_bad_input(tmp_path):
    idx, y = np.arange(5), np.zeros(5)
    _write_predictions(tmp_path / "a", idx, y, y + 1)
    _write_predictions(tmp_path / "other_split", idx + 100, y, y + 1)
    with pytest.raises(ValueError, match="different molecules"):
        stats.paired_molecule_test(tmp_path / "a", tmp_path / "other_split")
    _write_predictions(tmp_path / "nan", idx, y, np.array([0, 1, np.nan, 1, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_molecule_test(tmp_path / "a", tmp_path / "nan")
    with pytest.raises(FileNotFoundError, match="no predictions"):
        stats.paired_molecule_test(tmp_path / "a", tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "predictions_test.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        stats.molecule_errors(tmp_path / "bad")

"""Every benchmark script takes ``--device`` (default: cuda when available, else cpu), so that the same
commands run unchanged on a GPU machine; an unavailable device is refused with a clear message."""
import contextlib
import importlib
import io
import sys
from pathlib import Path

import pytest
import torch

from abp_core import kernels

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(BENCH))


def test_every_script_is_covered():
    assert {"epoch", "readout", "train_step", "attention", "scaling"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_accepts_device(bench, script):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        bench(script).main(["--device", "cpu", "--help"])  # parsed up to --help, which prints and exits
    assert exit_info.value.code == 0
    text = " ".join(out.getvalue().split())
    assert "--device" in text, text
    source = (BENCH / f"{script}.py").read_text()  # the default: cuda when available, else cpu
    assert "add_device_argument(" in source or 'default="cuda" if torch.cuda.is_available() else "cpu"' in source


def test_device_default_and_errors(bench):
    common = bench("_common")
    assert common.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert common.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="--device"):
        common.resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            common.resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("script,args", [("epoch", ["--quick"]), ("readout", ["--quick", "--no-memory"]),
                                         ("train_step", ["--quick", "--no-memory"]), ("attention", ["--quick"]),
                                         ("scaling", ["--quick", "--no-memory"])])
def test_unavailable_device_is_refused_before_any_work(bench, script, args, capsys):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        bench(script).main(args + ["--device", "cuda"])


def test_epoch_benchmark_quick(bench, capsys):
    """benchmarks/epoch.py end to end (tiny model): the real trainer's epochs, ratios, the phase profile."""
    threads, epoch = torch.get_num_threads(), bench("epoch")
    try:
        assert epoch.main(["--quick", "--threads", "1", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("SUMMARY epoch: quick wa ")
    for text in ("median epoch s", "CPU vs sum", "readout forward", "backward: head + readout", "optimizer step",
                 "inside operators", "95 % CI of median", "95 % CI of the median n/a (< 6 epochs)", "host-normalised"):
        assert text in out, text
    # the trainer's phases (one epoch per readout here, so medians are the values) add up to the epoch
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in out.split("inside the trainer's epochs")[1]
        .split("\n\n")[0].splitlines() if line.startswith("|") and "---" not in line)}
    for col in range(3):  # sum, wa, abp
        parts = sum(float(rows[p][col]) for p in epoch.TRAINER_PHASES)
        assert parts == pytest.approx(float(rows["= epoch"][col]), abs=0.06), col  # five values rounded to 0.01
        assert 0 < float(rows["of which readout forward"][col]) < parts
    import re
    layouts = re.findall(r"fused Adam step of the (\w+) model's (\d+) parameter tensors: one entry per tensor (\d+) us, "
                         r"the trainer's flat layout \(gradients gathered, one tensor\) (\d+) us", out)
    assert [m[0] for m in layouts] == ["sum", "abp"] and all(int(m[2]) > 0 and int(m[3]) > 0 for m in layouts)
    assert int(layouts[1][1]) > int(layouts[0][1])  # ABP adds parameter tensors
    loading = re.findall(r"# data loading \(the trainer's training loader, CPU time of one pass per batch, median of 5 "
                         r"passes\): ([\d.]+) ms; (\d+)% of sum's epoch per train step", out)
    assert len(loading) == 1 and float(loading[0][0]) > 0 and 0 < int(loading[0][1]) < 100
    split = re.findall(r"# ABP's readout forward \+ backward in a hot loop, alternating: its two native calls alone "
                       r"([\d.]+) ms per batch, through the module and autograd ([\d.]+) ms: the work around the "
                       r"native calls is (-?[\d.]+) ms; .* about ([\d.]+)x, ([\d.]+)x without that work", out)
    if kernels.available() and kernels.has_blas():  # the quick model's readout runs as one native call each way
        assert len(split) == 1
        native, module, work, ratio, without = (float(v) for v in split[0])
        assert native > 0 and module > 0 and abs(module - native - work) < 0.011  # printed to 0.01 ms
        assert without <= ratio
    else:
        assert not split


def _run_against_baseline(bench, capsys, script: str, args, folder) -> str:
    """``script``'s output for ``args --baseline folder`` (quick, one thread, CPU); afterwards the thread count is
    restored and the imported baseline copy dropped, so that the next run imports its own."""
    threads = torch.get_num_threads()
    try:
        assert bench(script).main(["--quick", "--threads", "1", "--device", "cpu", *args,
                                   "--baseline", str(folder)]) == 0
    finally:
        torch.set_num_threads(threads)
        for name in [m for m in sys.modules if m == "abp_core_baseline" or m.startswith("abp_core_baseline.")]:
            del sys.modules[name]
    return capsys.readouterr().out


def test_epoch_benchmark_against_a_baseline_copy(bench, capsys):
    """--baseline imports another copy of the package (here: this one) and interleaves it with the current one."""
    out = _run_against_baseline(bench, capsys, "epoch", ["--no-profile", "--readouts", "sum", "abp"], BENCH.parent)
    assert "abp@baseline" in out and "quick abp epoch now / baseline" in out.splitlines()[-1]


@pytest.mark.skipif(not kernels.available(), reason="needs the native kernels")
def test_attention_benchmark_against_a_baseline_copy(bench, capsys, tmp_path):
    """attention.py --baseline times an older copy's native kernel beside the current one and says whether their
    numbers are bitwise equal: the same code is, a copy whose kernel output differs is not."""
    import re

    out = _run_against_baseline(bench, capsys, "attention", [], BENCH.parent)  # this package as its own baseline
    for dist in ("qm9", "qmugs"):
        assert re.search(rf"\|\s+{dist} \|\s+native@baseline \|(\s+[\d.]+ \|){{4}}", out), out
    assert "bitwise equal: qm9 True, qmugs True" in out
    summary = out.rstrip().splitlines()[-1]
    ratios = re.findall(r"(qm9|qmugs) native time / native@baseline ([\d.]+)x \(paired", summary)
    assert [d for d, _ in ratios] == ["qm9", "qmugs"] and all(float(r) > 0 for _, r in ratios)

    import shutil
    copy = tmp_path / "abp_core"  # the same kernel source (no new build), its forward's output nudged after the call
    shutil.copytree(BENCH.parent / "abp_core", copy, ignore=shutil.ignore_patterns("__pycache__", "pretrained_models"))
    with open(copy / "kernels.py", "a") as f:
        f.write("\n\n_forward = attention_forward\n\n\ndef attention_forward(*args, **kwargs):\n"
                "    out, lse = _forward(*args, **kwargs)\n    return out.add_(1e-3), lse\n")
    assert "bitwise equal: qm9 False, qmugs False" in _run_against_baseline(bench, capsys, "attention", [], tmp_path)


def test_epoch_rounds_alternate_the_order_and_pair_epochs_within_a_round(bench, monkeypatch):
    """A B, B A, A B: a host that speeds up over the run must not favour the variant that always runs first; the
    paired ratios divide epochs of the same round and index."""
    import argparse
    import types

    epoch = bench("epoch")
    order, speed = [], iter(range(1, 100))

    def fake_run_training(cfg, dataset=None, callbacks=()):
        order.append(cfg.model.readout)
        run_dir = Path(cfg.trainer.output_dir)
        run_dir.mkdir(parents=True)
        t = next(speed) * (1.5 if cfg.model.readout == "abp" else 1.0)  # each run slower than the one before
        (run_dir / "history.csv").write_text(f"epoch,epoch_time_s,global_step\n0,{t},10\n1,{t},20\n")
        callbacks[0].times.extend([t, t])
        callbacks[0].phases.extend([{epoch.PROBE: t / 10}] * 2)
        callbacks[0].parts.extend([{}] * 2)
        return types.SimpleNamespace(run_dir=run_dir)

    monkeypatch.setattr("abp_core.train.run_training", fake_run_training)
    args = argparse.Namespace(quick=True, rounds=4, readouts=["sum", "abp"], baseline=None, epochs_per_run=2,
                              precision="32-true")
    spec = epoch.configs(args)["quick"]
    times, steps = epoch.epoch_times(spec, None, args, torch.device("cpu"))
    assert order == ["sum", "abp", "abp", "sum", "sum", "abp", "abp", "sum"]
    assert steps == 10 and len(times["abp"]["cpu"]) == 7  # the first epoch of the first round is the warm-up
    ratios = [a / b for a, b in zip(times["abp"]["cpu"], times["sum"]["cpu"])]
    # round 0 pairs sum's run 1 with ABP's run 2 (x 1.5), round 1 ABP's run 3 with sum's run 4: in one the drift
    # adds to ABP's time, in the next to sum's
    assert ratios[:3] == [3.0, 1.125, 1.125] and ratios[3:5] == [6 * 1.5 / 5] * 2
    assert epoch.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    # each epoch's probe scales with its run here, so dividing it out leaves nothing: the drift is all host speed
    assert epoch.host_normalized(times["abp"], times["sum"]) == pytest.approx([1.0] * 7)


def test_epoch_host_normalisation_divides_out_a_drifting_host(bench):
    """Epochs whose every phase is slowed by the host alike (by 0.8-1.4x, differently in each run) give the same
    host-normalised ratio as a steady host; each phase's share is its extra time over sum's epoch, and the shares
    add up to the ratio."""
    epoch = bench("epoch")
    sum_phases = dict(zip(epoch.TRAINER_PHASES, (10.0, 6.0, 1.0, 4.0, 2.0)))
    abp_phases = dict(zip(epoch.TRAINER_PHASES, (12.0, 8.0, 1.3, 4.0, 2.2)))
    sum_parts = dict(zip(epoch.READOUT_PARTS, (0.2, 0.5)))
    abp_parts = dict(zip(epoch.READOUT_PARTS, (2.0, 2.4)))

    def epochs(phases, parts, speeds):
        return {"cpu": [sum(phases.values()) * s for s in speeds],
                "phases": [{k: v * s for k, v in phases.items()} for s in speeds],
                "parts": [{k: v * s for k, v in parts.items()} for s in speeds]}

    run_sum = epochs(sum_phases, sum_parts, [1.0, 1.4, 0.8, 1.1])
    run_abp = epochs(abp_phases, abp_parts, [1.3, 0.8, 1.2, 1.0])
    raw = [a / b for a, b in zip(run_abp["cpu"], run_sum["cpu"])]
    assert max(raw) - min(raw) > 0.5  # the raw paired ratios scatter with the host
    assert epoch.host_normalized(run_abp, run_sum) == pytest.approx([27.5 / 23.0] * 4)
    shares = {p: epoch.phase_shares(run_abp, run_sum, "phases", p) for p in epoch.TRAINER_PHASES}
    assert shares["forward (training_step)"] == pytest.approx([2.0 / 23.0] * 4)
    assert shares[epoch.PROBE] == pytest.approx([0.0] * 4)
    assert sum(v[0] for v in shares.values()) == pytest.approx(27.5 / 23.0 - 1.0)
    assert epoch.phase_shares(run_abp, run_sum, "parts", "readout forward") == pytest.approx([1.8 / 23.0] * 4)
    assert epoch.model_share(run_sum) == pytest.approx(17.0 / 23.0)
    run_sum["phases"][2][epoch.PROBE] = 0.0  # no probe time measured: no normalised ratio rather than a division by 0
    assert epoch.host_normalized(run_abp, run_sum) == [] and epoch.phase_shares(run_abp, run_sum, "parts",
                                                                               "readout forward") == []


def test_epoch_median_interval_is_the_order_statistics_interval(bench):
    """The paired ratios' 95 % interval of the median: for 12 values the 3rd and 10th smallest (binomial(12, 1/2)
    puts 96.1 % between them), whatever the order; not defined for 5 values; it widens as the values spread."""
    epoch = bench("epoch")
    values = [1.00 + 0.01 * i for i in range(12)]
    assert epoch.median_interval(list(reversed(values))) == pytest.approx((values[2], values[9]))
    low, high = epoch.median_interval(values[:5])
    assert low != low and high != high  # nan: five values cannot bound the median at 95 %
    tight, wide = epoch.median_interval([1.05] * 6 + [1.06] * 6), epoch.median_interval(values)
    assert tight[1] - tight[0] < wide[1] - wide[0]


def test_epoch_benchmark_trains_at_the_precision_asked(bench, capsys, monkeypatch):
    """--precision reaches the trainer of every run; the step profile (float32 steps) is skipped under it."""
    epoch = bench("epoch")
    train = importlib.import_module("abp_core.train")
    seen = []
    real = train.run_training

    def recording(cfg, **kwargs):
        seen.append(cfg.trainer.precision)
        return real(cfg, **kwargs)

    monkeypatch.setattr(train, "run_training", recording)
    threads = torch.get_num_threads()
    try:
        assert epoch.main(["--quick", "--threads", "1", "--device", "cpu", "--readouts", "sum", "abp",
                           "--precision", "bf16-mixed"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert seen == ["bf16-mixed", "bf16-mixed"]  # one round: sum, then ABP
    assert "precision bf16-mixed;" in out and out.rstrip().splitlines()[-1].startswith("SUMMARY epoch: quick abp ")
    assert "phase by phase (ms of" not in out and "matmuls alone" not in out
    assert "# trainer precision bf16-mixed: the step profile and its floors (float32 steps) are skipped" in out
    with pytest.raises(SystemExit):
        epoch.main(["--quick", "--precision", "fp8"])

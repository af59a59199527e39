"""Notebooks: committed clean, parameters cell, smoke mode, parameter validation, the batch runner.

Fast: nothing here trains a model. nbval executes the real notebooks (in smoke mode) separately.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import nbformat
import pytest

import abp_core.notebooks as nb

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """nb.parameters() in smoke mode sets torch to one thread; restore it for the other tests."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


EXPECTED = ["00_quickstart", "01_qm7b", "02_qm8", "03_qm9_homo_lumo", "04_qmugs", "05_md17", "06_oe62_owa",
            "07_qm7b_wa_vs_abp", "08_attention_vs_orbitals", "09_your_molecules"]


# ------------------------------------------------------------------------------------------------
# committed notebooks
# ------------------------------------------------------------------------------------------------
def test_all_notebooks_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean_and_parametrised(path):
    book = nbformat.read(str(path), as_version=4)
    nbformat.validate(book)
    assert book.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(book.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name}: cell {i} has outputs; strip them before committing"
            assert cell.get("execution_count") is None, f"{path.name}: cell {i} has an execution count"
    tagged = [c for c in book.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected exactly one cell tagged 'parameters'"
    source = tagged[0].source
    assert any(line.split("#")[0].replace(" ", "") in ("smoke:bool=False", "smoke=False")
               for line in source.splitlines()), f"{path.name}: the parameters cell must set smoke = False"
    # the parameters cell is followed by the validation that applies ABP_SMOKE
    index = book.cells.index(tagged[0])
    follower = next(c for c in book.cells[index + 1:] if c.cell_type == "code")
    assert "nb.parameters(globals()" in follower.source
    # papermill sees every parameter with its type (annotations it can read: no `X | None`)
    import papermill

    params = papermill.inspect_notebook(str(path))
    import ast

    declared = [n.target.id for n in ast.parse(source).body if isinstance(n, ast.AnnAssign)]
    assert list(params) == declared, "papermill skips parameter lines it cannot parse (e.g. '=' in a comment)"
    assert params["smoke"]["inferred_type_name"] == "bool"
    assert all(p["inferred_type_name"] != "None" for p in params.values()), params
    assert "output_dir" in params


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_parameters_validate_with_defaults(path, monkeypatch):
    """Executing the parameters cell and passing its globals through nb.parameters works (no kernel)."""
    book = nbformat.read(str(path), as_version=4)
    cell = next(c for c in book.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    exec(compile(cell.source, f"{path.name}:parameters", "exec"), namespace)
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    values = nb.parameters(namespace)
    assert values.smoke is False
    follower = book.cells[book.cells.index(cell) + 1].source
    # its smoke overrides (a literal dict in the nb.parameters call) are valid too
    import ast

    call = next(n for n in ast.walk(ast.parse(follower))
                if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "parameters")
    smoke_values = next((ast.literal_eval(k.value) for k in call.keywords if k.arg == "smoke_overrides"), None)
    monkeypatch.setenv(nb.SMOKE_ENV, "1")
    values = nb.parameters(namespace, smoke_values)
    assert values.smoke is True
    for k, v in (smoke_values or {}).items():  # smoke values are type-correct and within the budget
        ann = namespace["__annotations__"][k]
        assert nb.coerce_parameter(k, values[k], ann) == values[k]
        if isinstance(values[k], list) and isinstance(v, int):
            assert 1 <= len(values[k]) <= v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            assert values[k] <= v


def test_reusable_logic_lives_in_the_package():
    """Notebook code cells stay short: no function or class definitions."""
    for path in NOTEBOOKS:
        book = nbformat.read(str(path), as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert "def " not in cell.source and "class " not in cell.source, path.name


# ------------------------------------------------------------------------------------------------
# smoke mode and parameter validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                           ("0", False), ("false", False), ("", False), ("off", False)])
def test_smoke_mode_from_environment(flag, expected):
    assert nb.smoke_mode(False, env={"ABP_SMOKE": flag}) is expected
    assert nb.smoke_mode(True, env={"ABP_SMOKE": flag}) is True  # the parameter alone suffices


def test_smoke_mode_defaults(monkeypatch):
    monkeypatch.delenv("ABP_SMOKE", raising=False)
    assert nb.smoke_mode() is False
    assert nb.smoke_mode(True) is True
    assert nb.smoke_mode("True") is True
    monkeypatch.setenv("ABP_SMOKE", "1")
    assert nb.smoke_mode(False) is True


def test_smoke_mode_rejects_bad_values():
    with pytest.raises(nb.ParameterError, match="ABP_SMOKE"):
        nb.smoke_mode(False, env={"ABP_SMOKE": "maybe"})
    with pytest.raises(nb.ParameterError, match="'smoke'.*boolean"):
        nb.smoke_mode("sometimes", env={})
    with pytest.raises(nb.ParameterError, match="'smoke'"):
        nb.smoke_mode(2, env={})


@pytest.mark.parametrize("annotation,value,expected", [
    (int, 3, 3), (int, "3", 3), (int, 4.0, 4), (float, "1e-4", 1e-4), (float, 2, 2.0),
    (bool, "false", False), (bool, 1, True), (str, "x", "x"), (str, 2024, "2024"),
    (Optional[str], None, None), (Optional[str], "None", None), (Optional[int], "5", 5),
    (list[str], "sum,abp", ["sum", "abp"]), (list[str], "[sum, abp]", ["sum", "abp"]),
    (list[str], "abp", ["abp"]), (list[int], "1,2", [1, 2]), (list[int], (1, 2), [1, 2]),
    (list[str], "(64,4,2),(64,8,2)", ["(64,4,2)", "(64,8,2)"]),
    ("Optional[list[int]]", "[1, 2]", [1, 2]), ("int | None", None, None), (dict, "{a: 1}", {"a": 1}),
])
def test_coerce_parameter_accepts(annotation, value, expected):
    out = nb.coerce_parameter("p", value, annotation)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("annotation,value,phrase", [
    (int, "abc", "must be an integer, got 'abc'"), (int, True, "must be an integer"),
    (int, 2.5, "must be an integer"), (float, "fast", "must be a number"), (float, float("nan"), "NaN"),
    (bool, "maybe", "must be a boolean"), (str, None, "must be a string"), (str, ["a"], "must be a string"),
    (list[int], "a,b", "'p[0]' must be an integer"), (Optional[int], "x", "an integer or None"),
    (dict, "[1]", "must be a mapping"),
])
def test_coerce_parameter_rejects_naming_the_parameter(annotation, value, phrase):
    with pytest.raises(nb.ParameterError) as info:
        nb.coerce_parameter("p", value, annotation)
    msg = str(info.value)
    assert "'p" in msg and phrase in msg
    assert isinstance(info.value, ValueError)


def _namespace(**values):
    ann = {"smoke": bool, "epochs": int, "lr": float, "readouts": list[str], "root": Optional[str]}
    ns = {"smoke": False, "epochs": 10, "lr": 1e-3, "readouts": ["sum"], "root": None}
    ns.update(values)
    ns["__annotations__"] = ann
    return ns


def test_parameters_validates_and_converts():
    p = nb.parameters(_namespace(epochs="7", readouts="sum,abp"), env={})
    assert p == {"smoke": False, "epochs": 7, "lr": 1e-3, "readouts": ["sum", "abp"], "root": None}
    assert p.epochs == 7 and list(p) == ["smoke", "epochs", "lr", "readouts", "root"]
    assert "epochs" in p.describe()
    with pytest.raises(AttributeError, match="no notebook parameter"):
        p.nope  # noqa: B018


def test_parameters_wrong_type_names_the_parameter():
    with pytest.raises(nb.ParameterError, match=r"notebook parameter 'epochs' must be an integer, got 'abc'"):
        nb.parameters(_namespace(epochs="abc"), env={})
    with pytest.raises(nb.ParameterError, match=r"notebook parameter 'lr' must be a number"):
        nb.parameters(_namespace(lr=[1]), env={})


def test_parameters_smoke_overrides_only_in_smoke_mode():
    overrides = {"epochs": 1, "readouts": ["abp"]}
    assert nb.parameters(_namespace(), overrides, env={}).epochs == 10
    p = nb.parameters(_namespace(), overrides, env={"ABP_SMOKE": "1"})
    assert p.smoke is True and p.epochs == 1 and p.readouts == ["abp"]
    import torch

    assert torch.get_num_threads() == 1  # smoke mode: tiny models, one thread
    p = nb.parameters(_namespace(smoke=True), overrides, env={})
    assert p.epochs == 1
    # numbers are capped, an int for a list keeps that many items, explicit smaller choices survive
    capped = nb.parameters(_namespace(epochs=3, readouts=["wa", "abp", "sum"], root=None),
                           {"epochs": 5, "readouts": 2, "root": "x"}, env={"ABP_SMOKE": "1"})
    assert capped.epochs == 3 and capped.readouts == ["wa", "abp"] and capped.root == "x"
    assert nb.parameters(_namespace(lr=1.0), {"lr": 0.1}, env={"ABP_SMOKE": "1"}).lr == 0.1
    opt = {"smoke": bool, "n": Optional[int]}
    assert nb.parameters({"__annotations__": opt, "smoke": True, "n": None}, {"n": 400}, env={}).n == 400
    assert nb.parameters({"__annotations__": opt, "smoke": True, "n": 50}, {"n": 400}, env={}).n == 50
    with pytest.raises(nb.ParameterError, match="at least one item"):
        nb.parameters(_namespace(smoke=True), {"readouts": 0}, env={})
    with pytest.raises(nb.ParameterError, match="unknown notebook parameter 'nope'"):
        nb.parameters(_namespace(smoke=True), {"nope": 1}, env={})
    with pytest.raises(nb.ParameterError, match="'epochs'"):
        nb.parameters(_namespace(smoke=True), {"epochs": "x"}, env={})


def test_set_threads():
    import torch

    nb.set_threads(2)
    assert torch.get_num_threads() == 2
    nb.set_threads(None)  # leaves it alone
    assert torch.get_num_threads() == 2
    with pytest.raises(nb.ParameterError, match="'threads' must be >= 1"):
        nb.set_threads(0)


def test_parameters_needs_annotations():
    with pytest.raises(nb.ParameterError, match="annotated"):
        nb.parameters({"smoke": False})
    with pytest.raises(nb.ParameterError, match="'epochs' is declared but has no value"):
        nb.parameters({"__annotations__": {"epochs": int}})


def test_resolve_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ABP_DATA_DIR", raising=False)
    assert nb.resolve_data_root(None) is None
    assert nb.resolve_data_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("ABP_DATA_DIR", str(tmp_path))
    assert nb.resolve_data_root(None) == tmp_path
    # a relative path that only exists relative to the repository root (nbval runs kernels in notebooks/)
    monkeypatch.chdir(REPO / "notebooks")
    assert nb.resolve_data_root("abp_core") == (REPO / "abp_core").resolve()


def test_write_results_is_json_safe(tmp_path):
    import numpy as np
    import pandas as pd

    path = nb.write_results(tmp_path / "out", {"mae": np.float64(0.5), "nan": float("nan"), "n": np.int64(3),
                                              "table": pd.DataFrame({"a": [1.0, math.inf]}), "p": tmp_path})
    data = json.loads(path.read_text())
    assert data == {"mae": 0.5, "nan": None, "n": 3, "table": [{"a": 1.0}, {"a": None}], "p": str(tmp_path)}


def test_runs_directory_smoke_one_throwaway_folder_per_kernel(tmp_path):
    """Smoke mode: one temporary runs folder per process, whatever runs_dir says, shared by the notebooks run in
    one kernel (identical smoke runs train once); normal mode: runs_dir, else <output_dir>/runs."""
    first = nb.runs_directory(tmp_path / "a", True, str(tmp_path / "kept"))
    assert first.is_dir() and tmp_path not in first.parents and not (tmp_path / "kept").exists()
    assert nb.runs_directory(tmp_path / "b", True) == first
    assert nb.runs_directory(tmp_path / "c", False) == (tmp_path / "c" / "runs").resolve()
    assert nb.runs_directory(tmp_path / "c", False, str(tmp_path / "r")) == (tmp_path / "r").resolve()


def test_arms_and_paper_reference():
    arms = nb.arms(["sum", "mean", "owa", "abp"], ["(64,4,2)", "(64,16,3)"])
    assert [a.label for a in arms] == ["sum", "average", "owa", "ABP(64,4,2)", "ABP(64,16,3)"]
    assert arms[-1].readout_hparams == {"hidden_channels": 1024, "heads": 16, "num_encoder_blocks": 3}
    with pytest.raises(nb.ParameterError, match="ABP variant"):
        nb.arms(["abp"], ["(64,4)"])
    t1 = nb.paper_reference("qm9", [1])
    assert list(t1["task"]) == ["HOMO – DFT", "LUMO – DFT"]
    assert t1.loc[0, "SchNet sum"] == "35.985 ± 1.071"
    assert t1.loc[0, "SchNet change %"] == pytest.approx(21.67, abs=0.01)  # the paper's own "21.67 %"
    t23 = nb.paper_reference("oe62", [2, 3])
    assert set(t23["table"]) == {2, 3} and "ABP(64,4,2)" in set(t23["readout"])


def test_missing_dataset_is_a_message_not_an_error(tmp_path):
    status = nb.load_dataset("qm8", tmp_path, download=False)
    assert not status.available
    assert "QM8: data not present" in status.message and "gdb8.tar.gz" in status.message


def test_paper_experiment_without_data_reports_and_writes_results(tmp_path):
    report = nb.run_paper_experiment("qm8", targets=["E1-CC2"], arms=nb.arms(["sum", "abp"]), seeds=[291305],
                                     output_dir=tmp_path / "out", data_root=str(tmp_path / "data"),
                                     download=True, smoke=True, extra_results={"notebook": "test"})
    assert report.status == "data_missing" and not report.has_results
    assert "data not present" in report.text() and len(report.paper) == 16
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["status"] == "data_missing" and res["notebook"] == "test" and res["n_runs"] == 0


def test_paper_experiment_invalid_config_fails_before_running(tmp_path):
    from abp_core.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        nb.run_paper_experiment("qm8", targets=["E1-CC2"], arms=nb.arms(["sum"]), seeds=[1],
                                config={"trainer": {"max_epochs": "many"}}, output_dir=tmp_path, smoke=False,
                                data_root=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown option"):
        nb.run_paper_experiment("qm8", targets=["E1-CC2"], arms=nb.arms(["sum"]), seeds=[1],
                                overrides=["trainer.epochz=3"], output_dir=tmp_path, data_root=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# batch runner
# ------------------------------------------------------------------------------------------------
def _throwaway_notebook(path: Path) -> Path:
    """A tiny notebook (no torch): writes results.json; a == 2 with b == 'y' fails deliberately."""
    cells = [
        nbformat.v4.new_code_cell('a: int = 1\nb: str = "x"\noutput_dir: str = "out"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import json, os\n"
            "if a == 2 and b == 'y':\n"
            "    raise ValueError(f'deliberate failure for a={a}, b={b}')\n"
            "os.makedirs(output_dir, exist_ok=True)\n"
            "json.dump({'product': a * len(b), 'label': b * a, 'nested': {'a': a}}, "
            "open(os.path.join(output_dir, 'results.json'), 'w'))\n"
            "print('done', a, b)"),
    ]
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                     "language_info": {"name": "python"}}
    nbformat.write(book, str(path))
    return path


def test_run_grid_reports_failures_and_collects_results(tmp_path):
    source = _throwaway_notebook(tmp_path / "tiny.ipynb")
    df = nb.run_grid(source, {"a": [1, 2], "b": ["x", "y"]}, tmp_path / "grid")
    assert len(df) == 4
    assert list(df[["a", "b"]].itertuples(index=False, name=None)) == [(1, "x"), (1, "y"), (2, "x"), (2, "y")]
    outputs = sorted((tmp_path / "grid").glob("*.ipynb"))
    assert len(outputs) == 4 and all(Path(p).is_file() for p in df["output_notebook"])
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1
    row = failed.iloc[0]
    assert (row["a"], row["b"]) == (2, "y")
    assert "ValueError" in row["error"] and "deliberate failure for a=2, b=y" in row["error"]
    assert row["results"] is None
    ok = df[df["status"] == "ok"]
    assert len(ok) == 3 and ok["error"].isna().all()
    assert list(ok["result.product"]) == [1, 1, 2] and list(ok["result.label"]) == ["x", "y", "xx"]
    assert list(ok["result.nested.a"]) == [1, 1, 2]
    # one output directory per run, named after its parameters
    assert sorted(Path(p).name for p in ok["output_dir"]) == ["tiny__a=1__b=x", "tiny__a=1__b=y", "tiny__a=2__b=x"]
    # the failed run's output notebook records the error
    failed_nb = nbformat.read(row["output_notebook"], as_version=4)
    assert any(o.get("output_type") == "error" for c in failed_nb.cells for o in c.get("outputs", []))


def test_run_grid_rejects_unknown_parameters(tmp_path):
    source = _throwaway_notebook(tmp_path / "tiny.ipynb")
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['c'\]"):
        nb.run_grid(source, {"c": [1]}, tmp_path / "grid")
    with pytest.raises(ValueError, match="has no values"):
        nb.run_grid(source, {"a": []}, tmp_path / "grid")


def test_parse_grid_values():
    assert nb.parse_grid_values("epochs=3,6") == ("epochs", [3, 6])
    assert nb.parse_grid_values("readouts=[sum,abp],[sum,wa,abp]") == ("readouts", [["sum", "abp"], ["sum", "wa", "abp"]])
    assert nb.parse_grid_values("smoke=true") == ("smoke", [True])
    assert nb.parse_grid_values("name='a,b',c") == ("name", ["a,b", "c"])
    with pytest.raises(ValueError):
        nb.parse_grid_values("epochs")
    with pytest.raises(ValueError):
        nb.parse_grid_values("1x=3")


def test_cli_notebooks_run_and_list(tmp_path, capsys):
    """`abp notebooks run/list` through the register() hook and abp_core.cli.main."""
    from abp_core import cli

    if "notebooks" not in cli.SUBCOMMANDS:  # until cli.py registers it itself
        cli.register_subcommand("notebooks", nb.register)
    source = _throwaway_notebook(tmp_path / "tiny.ipynb")
    code = cli.main(["notebooks", "run", str(source), "-p", "a=1,2", "-p", "b=y", "--out", str(tmp_path / "g")])
    assert code == 1  # one of the two runs fails deliberately
    out = capsys.readouterr().out
    assert "1/2 runs ok" in out and "deliberate failure" in out
    grid = (tmp_path / "g" / "grid.csv").read_text()
    assert "failed" in grid and "tiny__a=2__b=y" in grid
    assert cli.main(["notebooks", "run", str(source), "-p", "c=1", "--out", str(tmp_path / "g2")]) == 2
    assert "no parameter(s) ['c']" in capsys.readouterr().err
    assert cli.main(["notebooks", "run", "no_such_notebook", "--out", str(tmp_path / "g3")]) == 2
    assert cli.main(["notebooks", "list"]) == 0
    listing = capsys.readouterr().out
    assert "00_quickstart.ipynb" in listing and "epochs: int = 12" in listing
    assert cli.main(["notebooks"]) == 2


def test_notebook_parameters_of_quickstart():
    params = nb.notebook_parameters("00_quickstart")
    assert params["epochs"]["type"] == "int" and params["smoke"]["default"] == "False"
    assert params["runs_dir"]["type"] == "Optional[str]"

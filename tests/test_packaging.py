"""The three places that list dependencies (pyproject, environment.yml, binder/) agree."""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch"  # pinned to 2.13.0 in the environment files, a range in pyproject (GPU users bring their own)


def _reqs(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        out[canonicalize_name(req.name)] = str(req.specifier)
    return out


def pyproject_reqs():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    return _reqs(meta["dependencies"] + extras["dev"] + extras["dft"])


#: conda-forge names of PyPI packages (where they differ after canonicalisation).
CONDA_TO_PYPI = {"pytorch": TORCH, "tblite-python": "tblite", "pytorch_geometric": "torch-geometric"}
#: conda packages that are not Python dependencies of the package (toolchains).
CONDA_ONLY = {"python", "pip", "cxx-compiler", "nodejs"}


def conda_spec(entry: str):
    """``"conda-forge::pytorch=2.13.0=cpu_*"`` -> (``"torch"``, ``"==2.13.0"``); ``rdkit>=2024.3`` as is."""
    spec = entry.split("#")[0].strip().split("::", 1)[-1]
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", spec)
    name, rest = m.group(1), m.group(2).strip()
    if rest.startswith("=") and not rest.startswith("=="):
        rest = "==" + rest[1:].split("=", 1)[0]  # conda's name=version=build: the version
    return canonicalize_name(CONDA_TO_PYPI.get(name, name)), rest


def environment_reqs():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "pytorch" not in env["channels"], "PyTorch's own conda channel stopped at 2.5: torch comes from conda-forge"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    reqs = _reqs(pip)
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    for entry in conda:
        assert not entry.startswith("pytorch::"), entry
        name, spec = conda_spec(entry)
        if name in CONDA_ONLY:
            continue
        assert name not in reqs, f"{name} both from conda and from pip"
        reqs[name] = spec
    assert any(re.fullmatch(r"(conda-forge::)?pytorch=2\.13\.0=cpu_\*", d) for d in conda), "CPU torch from conda-forge"
    assert any(d.startswith("python=3.11") for d in conda)
    assert "-e ." in pip, "environment.yml's pip section must install the package itself"
    return reqs


def binder_reqs():
    return _reqs((ROOT / "binder" / "requirements.txt").read_text().splitlines())


def test_same_dependencies_everywhere():
    py, env, binder = pyproject_reqs(), environment_reqs(), binder_reqs()
    assert set(py) == set(env) == set(binder), (set(py) ^ set(env), set(py) ^ set(binder))
    for name in py:
        if name == TORCH:
            continue
        assert py[name] == env[name] == binder[name], name


def test_torch_pin_is_the_local_wheel_and_within_range():
    from packaging.specifiers import SpecifierSet
    py, env, binder = pyproject_reqs(), environment_reqs(), binder_reqs()
    assert env[TORCH] == binder[TORCH] == "==2.13.0"
    assert "2.13.0" in SpecifierSet(py[TORCH])
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_binder_files_parse():
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
    for script in ("postBuild", "start"):
        text = (ROOT / "binder" / script).read_text()
        assert text.startswith("#!/bin/bash")
    assert 'exec "$@"' in (ROOT / "binder" / "start").read_text()
    assert (ROOT / "notebooks" / "00_quickstart.ipynb").exists(), "Binder opens the quickstart notebook"


def test_binder_opens_the_quickstart_next_to_your_molecules():
    import json

    ws = json.loads((ROOT / "binder" / "workspace.json").read_text())
    assert "jupyter lab workspaces import binder/workspace.json" in (ROOT / "binder" / "postBuild").read_text()
    assert f"urlpath=lab/workspaces/{ws['metadata']['id']}" in (ROOT / "README.md").read_text()
    tabs = ws["data"]["layout-restorer:data"]["main"]["dock"]["children"]
    opened = [w.split(":", 1)[1] for tab in tabs for w in tab["widgets"]]
    assert opened == ["notebooks/00_quickstart.ipynb", "notebooks/09_your_molecules.ipynb"]
    for path in opened:
        assert (ROOT / path).is_file() and ws["data"][f"notebook:{path}"]["data"]["path"] == path


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    assert ci.strip().splitlines()[-1] == "make test"

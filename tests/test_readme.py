"""The README's ten-line Python example runs as written (against the real QM7b)."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Ten lines of Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(shared_data):
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, batch, weights = scope["model"], scope["batch"], scope["weights"]
    assert weights.shape == (batch.num_nodes,)
    sums = torch.zeros(batch.num_graphs).index_add_(0, batch.batch, weights.detach())
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_readme_explanation_example_runs(shared_data, capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Explanations", 1)[1]
    code = readme_example() + re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    a, batch = scope["a"], scope["batch"]
    sums = torch.zeros(batch.num_graphs).index_add_(0, batch.batch, a)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert float(capsys.readouterr().out.split()[-1]) > 0  # a finite mean relative deletion area

"""Splits (deterministic PCG64, the paper's seeded torch splits) and the Standardizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from abp_core.data import PAPER_SEEDS, get_dataset, paper_split, qm8, qm9
from abp_core.data.splits import Standardizer, check_disjoint, random_split, torch_random_split


def test_same_seed_same_split_twice():
    a = random_split(7211, seed=3)
    b = random_split(7211, seed=3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    c = random_split(7211, seed=4)
    assert not np.array_equal(a[0], c[0])


def test_split_is_pinned_across_machines():
    # golden values of numpy's PCG64 permutation: if these change, saved splits stop being reproducible
    train, val, test = random_split(10, seed=0)
    assert np.concatenate([train, val, test]).tolist() == np.random.Generator(np.random.PCG64(0)).permutation(10).tolist()
    assert (train.tolist(), val.tolist(), test.tolist()) == ([4, 6, 2, 7, 3, 5, 9, 0], [8], [1])


@pytest.mark.parametrize("n,sizes", [(1000, (800, 100, 100)), (7211, (5768, 721, 722)),
                                     (130831, (104664, 13083, 13084)), (11, (8, 1, 2))])
def test_sizes_disjoint_and_complete(n, sizes):
    train, val, test = random_split(n, seed=123)
    assert (len(train), len(val), len(test)) == sizes
    check_disjoint(train, val, test, n=n)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(n))
    assert train.dtype == np.int64


def test_fractions_are_validated():
    with pytest.raises(ValueError):
        random_split(10, 0, frac=(0.8, 0.3, 0.1))
    train, val, test = random_split(100, 0, frac=(0.5, 0.2, 0.1))
    assert (len(train), len(val), len(test)) == (50, 20, 10)


def test_check_disjoint_detects_overlap():
    with pytest.raises(ValueError):
        check_disjoint(np.array([0, 1]), np.array([1, 2]))
    with pytest.raises(ValueError):
        check_disjoint(np.array([0, 5]), n=5)


def test_torch_random_split_equals_torch():
    lengths = [80, 11, 9]
    ours = torch_random_split(100, lengths, seed=844249)
    ref = torch.utils.data.random_split(range(100), lengths, generator=torch.Generator().manual_seed(844249))
    assert [o.tolist() for o in ours] == [list(r.indices) for r in ref]


def test_paper_random_split_qm9_lengths_and_seeds():
    assert qm9.paper_lengths(130831) == [104664, 13083, 13084]
    assert qm8.paper_lengths(21786) == [17428, 2179, 2179]
    train, val, test = qm9.paper_split(PAPER_SEEDS["qm9"][0], 130831)
    assert (len(train), len(val), len(test)) == (104664, 13083, 13084)
    ref = torch.utils.data.random_split(range(130831), [104664, 13083, 13084],
                                        generator=torch.Generator().manual_seed(844249))
    assert test.tolist() == list(ref[2].indices)
    with pytest.raises(ValueError, match="not one of the paper's"):
        qm9.paper_split(1, 130831)
    with pytest.raises(ValueError, match="do not add up"):
        qm9.paper_lengths(130830)


def test_paper_split_dispatch(shared_root):
    a = paper_split("qm7b", 386333, root=shared_root)
    assert [len(x) for x in a] == [5768, 721, 722]
    b = paper_split("oe62", 2, root=shared_root)
    assert [len(x) for x in b] == [32000, 19480, 10000]
    c = paper_split("md17", 42, n_train=1000, n_test=501)
    assert [len(x) for x in c] == [1000, 250, 251] and c[1].min() >= 1000
    d = paper_split("qm8", PAPER_SEEDS["qm8"][0], n=21786)
    assert [len(x) for x in d] == [17428, 2179, 2179]


def test_each_dataset_owns_its_paper_split_and_splits_imports_no_dataset():
    import ast
    import inspect

    from abp_core.data import DATASETS, splits

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(splits)))
                if isinstance(node, ast.ImportFrom)}
    assert not imported & {"md17", "qm7b", "qm8", "qm9", "qmugs", "oe62"}, imported
    for cls in DATASETS.values():
        assert "paper_split" in vars(cls), f"{cls.__name__} has no paper_split of its own"


# ---------------------------------------------------------------------------------------------------
# Standardizer
# ---------------------------------------------------------------------------------------------------
def test_standardizer_is_fitted_on_train_rows_only():
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(5.0, 2.0, (800, 2)), rng.normal(100.0, 30.0, (200, 2))])
    train, _, _ = random_split(1000, seed=0)
    train = train[train < 800][:600]  # only "normal" rows in train
    s = Standardizer().fit(y[train])
    assert np.allclose(s.mean.numpy(), y[train].mean(0))
    assert np.allclose(s.std.numpy(), y[train].std(0))
    assert not np.allclose(s.mean.numpy(), y.mean(0), atol=1.0)  # the test rows did not leak in
    z = s.transform(torch.tensor(y[train], dtype=torch.float32))
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(2), atol=1e-5)
    back = s.inverse_transform(s.transform(y))
    assert np.allclose(back, y)


def test_standardizer_fit_dataset_uses_only_given_rows(shared_root):
    ds = get_dataset("qm7b", root=shared_root)
    train, val, test = ds.paper_split(23887)
    s = Standardizer.fit_dataset(ds, train)
    y = torch.stack([ds[int(i)].y[0] for i in train]).double()
    assert torch.allclose(s.mean, y.mean(0), rtol=1e-6, atol=1e-9)
    full = Standardizer().fit(ds._data.y)
    assert not torch.allclose(s.mean, full.mean, rtol=1e-7, atol=0)
    one = Standardizer.fit_dataset(ds, train, targets=["homo_PBE0"])
    assert one.mean.shape == (1,) and one.mean.item() == pytest.approx(s.mean[5].item())
    # on an index_select view the rows are positions in the view
    view = ds[torch.tensor(test)]
    sv = Standardizer.fit_dataset(view, np.arange(10))
    ref = torch.stack([ds[int(i)].y[0] for i in test[:10]]).double()
    assert torch.allclose(sv.mean, ref.mean(0), rtol=1e-6)


def test_standardizer_state_dict_roundtrip_and_constant_column():
    s = Standardizer().fit(torch.tensor([[1.0, 3.0], [3.0, 3.0]]))
    assert s.std.tolist() == [1.0, 1.0]  # the constant column gets std 1, not 0
    state = s.state_dict()
    t = Standardizer.from_state_dict({k: v.tolist() for k, v in state.items()})
    x = torch.tensor([[2.0, 5.0]])
    assert torch.equal(t.transform(x), s.transform(x))
    assert torch.allclose(t.transform(x), torch.tensor([[0.0, 2.0]]))
    with pytest.raises(RuntimeError, match="not fitted"):
        Standardizer().transform(x)
    with pytest.raises(ValueError, match="non-finite"):
        Standardizer().fit(np.array([[1.0], [np.nan]]))

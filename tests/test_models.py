"""abp_core.models: invariances on real QM7b geometries, gradients, bad input, factory."""
import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from abp_core.models import AtomisticModel, build_model
from abp_core.readouts import READOUTS

SMALL = {
    "schnet": dict(hidden_channels=32, num_filters=32, num_interactions=2, cutoff=5.0),
    "dimenet++": dict(hidden_channels=32, num_blocks=2, int_emb_size=16, basis_emb_size=4, out_emb_channels=32),
}
READOUT_KW = {"abp": dict(heads=4, num_seeds=2), "owa": dict(beta=0.5)}


def small_model(backbone, readout, num_targets=2):
    torch.manual_seed(0)
    return build_model(backbone, readout, num_targets=num_targets,
                       readout_kwargs=READOUT_KW.get(readout), **SMALL[backbone]).double().eval()


def random_rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


CASES = [(b, r) for b in SMALL for r in sorted(READOUTS)]


@pytest.mark.parametrize("backbone,readout", CASES)
def test_rotation_translation_permutation_invariance(backbone, readout, qm7b_molecules):
    model = small_model(backbone, readout)
    mols = qm7b_molecules[:6] if backbone == "schnet" else qm7b_molecules[:4]
    out = model(Batch.from_data_list(mols))
    assert out.shape == (len(mols), 2)
    rot, shift = random_rotation(7), torch.tensor([3.0, -1.5, 12.0], dtype=torch.float64)
    moved = [Data(z=m.z, pos=m.pos @ rot.T + shift) for m in mols]
    assert torch.allclose(model(Batch.from_data_list(moved)), out, atol=1e-9)
    perms = [torch.randperm(m.z.numel(), generator=torch.Generator().manual_seed(i)) for i, m in enumerate(mols)]
    permuted = [Data(z=m.z[p], pos=m.pos[p]) for m, p in zip(mols, perms)]
    assert torch.allclose(model(Batch.from_data_list(permuted)), out, atol=1e-9)
    if model.readout.weighted:
        w = model.atom_weights(Batch.from_data_list(mols))
        w_perm = model.atom_weights(Batch.from_data_list(permuted))
        offsets = [0] + torch.cumsum(torch.tensor([m.z.numel() for m in mols]), 0).tolist()
        for k, p in enumerate(perms):
            assert torch.allclose(w_perm[offsets[k]:offsets[k + 1]], w[offsets[k]:offsets[k + 1]][p], atol=1e-9)


@pytest.mark.parametrize("backbone,readout", CASES)
def test_batch_composition_invariance(backbone, readout, qm7b_molecules):
    model = small_model(backbone, readout)
    small, big = qm7b_molecules[0], qm7b_molecules[-1 if backbone == "schnet" else 5]
    alone = model(Batch.from_data_list([small]))
    together = model(Batch.from_data_list([big, small, big]))
    assert torch.allclose(together[1], alone[0], atol=1e-10)


@pytest.mark.parametrize("backbone,readout", CASES)
def test_gradients_reach_every_parameter(backbone, readout, qm7b_molecules):
    model = small_model(backbone, readout).train()
    batch = Batch.from_data_list(qm7b_molecules[:5] if backbone == "schnet" else qm7b_molecules[:3])
    pred, weights = model(batch, return_atom_weights=True)
    loss = pred.pow(2).mean()
    if readout == "owa":
        batch.homo_coeff = weights.detach().flip(0)  # any per-atom target
        loss = loss + model.auxiliary_loss(batch, weights)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


@pytest.mark.parametrize("readout", ["wa", "owa", "abp"])
def test_model_atom_weights_sum_to_one(readout, qm7b_molecules):
    model = small_model("schnet", readout)
    batch = Batch.from_data_list(qm7b_molecules)
    w = model.atom_weights(batch)
    sums = torch.zeros(batch.num_graphs, dtype=w.dtype).index_add_(0, batch.batch, w)
    assert torch.allclose(sums, torch.ones_like(sums)) and bool((w >= 0).all())


def test_single_and_two_atom_molecules():
    model = small_model("dimenet++", "abp")
    mols = [Data(z=torch.tensor([6]), pos=torch.zeros(1, 3, dtype=torch.float64)),
            Data(z=torch.tensor([1, 1]), pos=torch.tensor([[0, 0, 0], [0.74, 0, 0]], dtype=torch.float64))]
    out = model(Batch.from_data_list(mols))
    assert torch.isfinite(out).all()


def test_bad_input(qm7b_molecules):
    model = small_model("schnet", "abp")
    good = Batch.from_data_list(qm7b_molecules[:2])
    with pytest.raises(ValueError, match="non-empty"):
        model(Data(z=torch.zeros(0, dtype=torch.long), pos=torch.zeros(0, 3), batch=torch.zeros(0, dtype=torch.long)))
    bad = good.clone()
    bad.pos = bad.pos.clone()
    bad.pos[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    bad = good.clone()
    bad.batch = bad.batch.flip(0)
    with pytest.raises(ValueError, match="sorted"):
        model(bad)
    bad = good.clone()
    bad.z = bad.z.clone()
    bad.z[0] = 0
    with pytest.raises(ValueError, match="atomic numbers"):
        model(bad)
    with pytest.raises(ValueError, match="width"):
        model.readout(torch.randn(3, 7, dtype=torch.float64), torch.zeros(3, dtype=torch.long))


def test_factory():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("painn", "sum")
    with pytest.raises(ValueError, match="unknown readout"):
        build_model("schnet", "attention")
    with pytest.raises(ValueError, match="unknown backbone options"):
        build_model("schnet", "sum", hidden=3)
    with pytest.raises(ValueError, match="heads"):
        build_model("schnet", "abp", hidden_channels=30, readout_kwargs=dict(heads=4))
    # paper defaults: SchNet 256/256/8, DimeNet++ 256 hidden, 6 blocks, and atom features at hidden width
    m = build_model("schnet", "abp")
    assert isinstance(m, AtomisticModel) and m.backbone.out_channels == 256 and len(m.backbone.interactions) == 8
    d = build_model("dimenet++", "sum")
    assert d.backbone.out_channels == 256 and len(d.backbone.interaction_blocks) == 6
    # SchNet without per-atom lin1/lin2: parameter count before pooling matches the paper's ~2.3 M
    n = sum(p.numel() for p in m.backbone.parameters())
    assert math.isclose(n, 2.3e6, rel_tol=0.05), n


def test_readout_is_swappable_without_touching_backbone():
    a, b = small_model("schnet", "sum"), small_model("schnet", "abp")
    assert type(a.backbone) is type(b.backbone)
    assert a.backbone.state_dict().keys() == b.backbone.state_dict().keys()

"""abp_core.readouts: one interface, masking, invariances, and a cross-check against PyG."""
import pytest
import torch
from torch_geometric.nn.aggr import Aggregation, SetTransformerAggregation
from torch_geometric.utils import scatter

from abp_core.readouts import (READOUTS, AttentionPooling, OrbitalWeightedAveragePooling,
                               WeightedAveragePooling, build_readout)

C = 16


def make(name, **kw):
    torch.manual_seed(0)
    if name == "abp":
        kw.setdefault("heads", 4)
        kw.setdefault("num_seeds", 3)
    return build_readout(name, C, **kw).double().eval()


def features(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), C, generator=g, dtype=torch.float64)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return x, batch


ALL = sorted(READOUTS)
WEIGHTED = ["abp", "owa", "wa"]


@pytest.mark.parametrize("name", ALL)
def test_interface_and_is_pyg_aggregation(name):
    r = make(name)
    assert isinstance(r, Aggregation)
    x, batch = features([3, 5, 1])
    out = r(x, batch)
    assert out.shape == (3, r.out_channels)
    # PyG-style call with ptr/dim_size works too
    assert torch.allclose(r(x, batch, dim_size=3), out)


@pytest.mark.parametrize("name", ALL)
def test_permutation_invariance(name):
    r = make(name)
    x, batch = features([4, 7, 2])
    out = r(x, batch)
    # permute atoms within each molecule (batch stays sorted)
    perm = torch.cat([torch.tensor([3, 1, 0, 2]), 4 + torch.randperm(7), torch.tensor([12, 11])])
    assert torch.allclose(r(x[perm], batch), out, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_batch_and_padding_invariance(name):
    """A molecule's output does not change when batched with larger molecules."""
    r = make(name)
    x, batch = features([3, 20, 9], seed=2)
    together = r(x, batch)
    alone = r(x[:3], batch[:3])
    assert torch.allclose(together[0], alone[0], atol=1e-12)
    assert torch.allclose(together[2], r(x[23:], torch.zeros(9, dtype=torch.long))[0], atol=1e-12)


@pytest.mark.parametrize("name", WEIGHTED)
def test_atom_weights_sum_to_one(name):
    r = make(name)
    x, batch = features([1, 6, 13])
    w = r.atom_weights(x, batch)
    assert w.shape == (20,)
    assert bool((w >= 0).all())
    assert torch.allclose(scatter(w, batch, reduce="sum"), torch.ones(3, dtype=w.dtype))
    assert w[0] == 1.0  # a one-atom molecule puts all weight on its atom
    # padding invariance of the weights too
    assert torch.allclose(r.atom_weights(x[1:7], torch.zeros(6, dtype=torch.long)), w[1:7], atol=1e-12)


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_unweighted_have_no_weights(name):
    x, batch = features([2])
    with pytest.raises(TypeError):
        make(name).atom_weights(x, batch)


def test_simple_pools_match_definitions():
    x, batch = features([3, 4])
    assert torch.allclose(make("sum")(x, batch)[1], x[3:].sum(0))
    assert torch.allclose(make("mean")(x, batch)[1], x[3:].mean(0))
    assert torch.allclose(make("max")(x, batch)[1], x[3:].max(0).values)


def test_wa_is_weighted_sum_of_values():
    r = make("wa")
    x, batch = features([5])
    w = r.atom_weights(x, batch)
    assert torch.allclose(r(x, batch)[0], (w[:, None] * r.value_mlp(x)).sum(0))


def test_abp_weights_are_pma_attention():
    """ABP's atom weights are exactly the softmax(QK^T/sqrt(d)) of PMA seeds over the encoded atoms."""
    r = make("abp", heads=2, num_seeds=1)
    x, batch = features([6])
    keys, _ = r._encode(x, batch, 1)
    q, k, _ = r.pma.project(r.seeds, keys.unsqueeze(0))
    att = torch.softmax(q @ k.transpose(-1, -2) / (C // 2) ** 0.5, dim=-1)  # [1, heads, 1, 6]
    assert torch.allclose(r.atom_weights(x, batch), att.mean(dim=(1, 2))[0])


def test_owa_orbital_loss():
    r = make("owa", beta=2.0)
    x, batch = features([2, 3])
    w = r.atom_weights(x, batch)
    coeff = torch.tensor([1.0, 0.0, 0.2, 0.3, 0.5], dtype=torch.float64)
    loss = r.orbital_loss(w, coeff, batch)
    want = 2.0 * ((coeff - w) ** 2).sum() / 2  # summed per molecule, mean over 2 molecules
    assert torch.allclose(loss, want)
    assert r.orbital_loss(coeff, coeff, batch) == 0
    with pytest.raises(ValueError, match="NaN"):
        r.orbital_loss(w, torch.full_like(w, float("nan")), batch)
    with pytest.raises(ValueError, match="one coefficient per atom"):
        r.orbital_loss(w, coeff[:3], batch)


@pytest.mark.parametrize("concat,layer_norm,k", [(False, False, 1), (True, True, 3), (False, True, 4)])
def test_abp_matches_pyg_set_transformer(concat, layer_norm, k):
    """Configured like PyG's SetTransformerAggregation and given its weights, ABP returns the same numbers."""
    torch.manual_seed(1)
    ref = SetTransformerAggregation(C, num_seed_points=k, num_encoder_blocks=2, num_decoder_blocks=1,
                                    heads=4, concat=concat, layer_norm=layer_norm).double().eval()
    ours = AttentionPooling(C, heads=4, num_encoder_blocks=2, num_seeds=k, num_decoder_blocks=1,
                            concat=concat, layer_norm=layer_norm, input_projection=False,
                            output_projection=False).double().eval()

    def copy_mab(dst, src):
        dst.in_proj_weight.data.copy_(src.attn.in_proj_weight)
        dst.in_proj_bias.data.copy_(src.attn.in_proj_bias)
        dst.out_proj.load_state_dict(src.attn.out_proj.state_dict())
        dst.lin.load_state_dict(src.lin.state_dict())
        if layer_norm:
            dst.norm1.load_state_dict(src.layer_norm1.state_dict())
            dst.norm2.load_state_dict(src.layer_norm2.state_dict())

    for d, s in zip(ours.encoders, ref.encoders):
        copy_mab(d, s.mab)
    for d, s in zip(ours.decoders, ref.decoders):
        copy_mab(d, s.mab)
    copy_mab(ours.pma, ref.pma.mab)
    ours.pma_lin.load_state_dict(ref.pma.lin.state_dict())
    ours.seeds.data.copy_(ref.pma.seed)

    x, batch = features([4, 11, 1, 7], seed=5)
    assert torch.allclose(ours(x, batch), ref(x, batch), atol=1e-10)


def test_abp_no_nan_gradients_with_padding():
    r = make("abp").train()
    x, batch = features([1, 2, 25])
    x.requires_grad_(True)
    r(x, batch).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in r.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ALL)
def test_bad_input_raises_value_error(name):
    r = make(name)
    x, batch = features([3, 2])
    with pytest.raises(ValueError, match="empty"):
        r(x[:0], batch[:0])
    with pytest.raises(ValueError, match="sorted"):
        r(x, torch.tensor([0, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="width"):
        r(x[:, :5], batch)


def test_bad_configuration():
    with pytest.raises(ValueError, match="heads"):
        AttentionPooling(16, heads=3)
    with pytest.raises(ValueError, match="unknown readout"):
        build_readout("attention", 16)
    with pytest.raises(ValueError, match="beta"):
        OrbitalWeightedAveragePooling(16, beta=-1)


def test_reset_parameters_changes_weights():
    for name in ALL:
        r = make(name)
        before = [p.clone() for p in r.parameters()]
        r.reset_parameters()
        after = list(r.parameters())
        assert all(b.shape == a.shape for b, a in zip(before, after))
        if before:
            assert any(not torch.equal(b, a) for b, a in zip(before, after)), name


def test_wa_value_width():
    r = WeightedAveragePooling(8, out_channels=3)
    assert r(torch.randn(4, 8), torch.tensor([0, 0, 1, 1])).shape == (2, 3)


@pytest.mark.parametrize("ratio", [1.0, 1.1, 3.0, 100.0])
def test_abp_bucketing_does_not_change_results(ratio):
    """Size buckets are an implementation detail: any bucketing gives the same numbers."""
    x, batch = features([1, 2, 3, 5, 8, 13, 21, 4, 4, 4], seed=4)
    r = make("abp")
    want = r(x, batch)
    r.bucket_ratio = ratio
    assert torch.allclose(r(x, batch), want, atol=1e-12)
    assert torch.allclose(r.atom_weights(x, batch), make("abp").atom_weights(x, batch), atol=1e-12)


def test_abp_empty_molecule_slot():
    """dim_size larger than the molecules present (a PyG call with an empty group) still works."""
    r = make("abp")
    x, batch = features([3])
    out = r(x, batch + 1, dim_size=3)
    assert out.shape == (3, r.out_channels) and torch.isfinite(out).all()
    assert torch.allclose(out[1], r(x, batch)[0], atol=1e-12)

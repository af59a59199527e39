"""abp_core.explain: per-atom attributions and deletion curves."""
import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from abp_core.explain import (GRADIENT_METHODS, METHODS, attribute, check_method, default_method, explanation,
                              faithfulness, supported_methods)
from abp_core.models import AtomisticModel, build_model
from abp_core.readouts import SumPooling

SIZES = (3, 7, 12, 1, 5)


def _molecules(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Data(z=torch.randint(1, 10, (n,), generator=g), pos=torch.randn(n, 3, generator=g) * 1.3)
            for n in sizes]


def _model(readout, seed=0, **readout_kwargs):
    torch.manual_seed(seed)
    kw = dict(heads=2) if readout == "abp" else {}
    kw.update(readout_kwargs)
    m = build_model("schnet", readout, num_targets=2, hidden_channels=16, num_filters=16, num_interactions=2,
                    cutoff=4.0, readout_kwargs=kw or None)
    # non-trivial head and readout weights (a fresh init can make some paths nearly constant)
    with torch.no_grad():
        for p in m.readout.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def _per_molecule(values, batch):
    return torch.zeros(int(batch.max()) + 1, dtype=values.dtype).index_add_(0, batch, values)


ALL = [(ro, m) for ro in ("sum", "mean", "max", "wa", "owa", "abp") for m in supported_methods(_model(ro))]


def test_supported_methods_per_readout():
    assert supported_methods(_model("sum")) == list(GRADIENT_METHODS) + ["occlusion"]
    assert supported_methods(_model("wa"))[0] == "weights" and "rollout" not in supported_methods(_model("wa"))
    assert supported_methods(_model("abp")) == list(METHODS)
    assert default_method("abp") in supported_methods(_model("abp"))
    assert default_method("sum") in supported_methods(_model("sum"))
    for ro in ("sum", "mean", "max", "wa", "owa", "abp"):  # the name-only check agrees with the model's
        assert [m for m in METHODS if _ok(m, ro)] == supported_methods(_model(ro))
    with pytest.raises(ValueError, match="unknown attribution method 'grad'"):
        check_method("grad")
    with pytest.raises(ValueError, match="default_method|unknown readout"):
        default_method("set2set")


def _ok(method, readout):
    try:
        return check_method(method, readout) == method
    except ValueError:
        return False


@pytest.mark.parametrize("readout,method", ALL)
def test_every_method_is_an_equivariant_distribution_independent_of_batch_mates(readout, method):
    model = _model(readout)
    mols = _molecules()
    batch = Batch.from_data_list(mols)
    batched = attribute(model, batch, method, target=1)
    assert batched.shape == (batch.num_nodes,) and batched.dtype == torch.float32
    assert bool((batched >= 0).all()) and bool(torch.isfinite(batched).all())
    torch.testing.assert_close(_per_molecule(batched, batch.batch), torch.ones(len(SIZES)), atol=1e-5, rtol=0)
    # molecule 2 (12 atoms) alone, and alone with its atoms permuted; fp32 rounding differs between batch
    # layouts (ABP's packed attention), a real dependence on batch mates or atom order would be O(0.1)
    target = mols[2]
    perm = torch.randperm(target.num_nodes, generator=torch.Generator().manual_seed(1))
    permuted = attribute(model, Batch.from_data_list([Data(z=target.z[perm], pos=target.pos[perm])]), method,
                         target=1)
    start = sum(SIZES[:2])
    mine = batched[start:start + target.num_nodes]
    torch.testing.assert_close(permuted, mine[perm], atol=1e-4, rtol=1e-3)


def _manual_attention(block, x, y):
    """Softmax attention of one MAB, heads averaged, from its raw parameters: [n_x, n_y]."""
    c, h = block.channels, block.heads
    d = c // h
    w_q, w_k, _ = block.in_proj_weight.chunk(3)
    b_q, b_k, _ = block.in_proj_bias.chunk(3)
    q = (x @ w_q.T + b_q).view(-1, h, d).transpose(0, 1)
    k = (y @ w_k.T + b_k).view(-1, h, d).transpose(0, 1)
    return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1).mean(0)


def test_rollout_equals_hand_computed_rollout():
    model = _model("abp", num_encoder_blocks=2)
    ro = model.readout
    mols = _molecules((4, 6))
    batch = Batch.from_data_list(mols)
    got = attribute(model, batch, "rollout")
    with torch.no_grad():
        h, vec = model.atom_features(batch)
        expected = []
        for m in range(2):
            x = torch.relu(ro.input_lin(h[vec == m]))
            n = x.size(0)
            mixes = []
            for block in ro.encoders:
                mixes.append((_manual_attention(block, x, x) + torch.eye(n)) / 2)
                x = block(x[None], x[None])[0]
            keys = torch.relu(ro.pma_lin(x))
            r = _manual_attention(ro.pma, ro.seeds[0], keys)  # [k, n]
            r = r @ mixes[1] @ mixes[0]                       # last encoder block first
            expected.append(r.mean(0))
        expected = torch.cat(expected)
    torch.testing.assert_close(got, expected / _per_molecule(expected, vec)[vec], atol=1e-5, rtol=1e-4)
    # the raw rollout already sums to one: (A + I) / 2 is row-stochastic
    torch.testing.assert_close(_per_molecule(expected, vec), torch.ones(2), atol=1e-5, rtol=0)


def test_rollout_without_encoder_is_the_pma_weights_and_heads_seeds_select():
    model = _model("abp", num_encoder_blocks=0, num_seeds=3)
    batch = Batch.from_data_list(_molecules())
    torch.testing.assert_close(attribute(model, batch, "rollout"), attribute(model, batch, "weights"),
                               atol=1e-6, rtol=1e-5)
    per_head = torch.stack([attribute(model, batch, "rollout", head=i) for i in range(2)])
    per_seed = torch.stack([attribute(model, batch, "rollout", seed=i) for i in range(3)])
    torch.testing.assert_close(per_head.mean(0), attribute(model, batch, "rollout"), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_seed.mean(0), attribute(model, batch, "rollout"), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(per_head[0], per_head[1])


def test_rollout_through_induced_points():
    model = _model("abp", num_encoder_blocks=1, num_induced_points=3)
    ro = model.readout
    batch = Batch.from_data_list(_molecules((5,)))
    with torch.no_grad():
        h, _ = model.atom_features(batch)
        x = torch.relu(ro.input_lin(h))
        blk = ro.encoders[0]
        a1 = _manual_attention(blk.mab1, blk.induced[0], x)        # [m, n]
        hidden = blk.mab1(blk.induced, x[None])[0]
        a2 = _manual_attention(blk.mab2, x, hidden)                # [n, m]
        x = blk.mab2(x[None], hidden[None])[0]
        p = _manual_attention(ro.pma, ro.seeds[0], torch.relu(ro.pma_lin(x)))
        expected = (p @ ((a2 @ a1 + torch.eye(5)) / 2)).mean(0)
    torch.testing.assert_close(attribute(model, batch, "rollout"), expected, atol=1e-5, rtol=1e-4)


def test_occlusion_on_sum_pooling_is_leave_one_out():
    model = _model("sum")
    mols = _molecules()
    batch = Batch.from_data_list(mols)
    got = attribute(model, batch, "occlusion", target=1)
    with torch.no_grad():
        h, vec = model.atom_features(batch)
        expected = []
        for m in range(len(mols)):
            hm = h[vec == m]
            full = model.head(hm.sum(0, keepdim=True))[0, 1]
            if hm.size(0) == 1:
                expected.append(torch.ones(1))
                continue
            loo = torch.stack([(full - model.head((hm.sum(0) - hm[i])[None])[0, 1]).abs() for i in range(hm.size(0))])
            expected.append(loo / loo.sum())
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-4)


def test_occlusion_removes_the_atom_from_a_softmax_readout():
    """WA: removing atom i renormalises the other weights (not the same as zeroing its features)."""
    model = _model("wa")
    batch = Batch.from_data_list(_molecules((6,)))
    got = attribute(model, batch, "occlusion")
    with torch.no_grad():
        h, _ = model.atom_features(batch)
        full = model.head(model.readout(h))[0, 0]
        loo = torch.stack([(full - model.head(model.readout(torch.cat([h[:i], h[i + 1:]])))[0, 0]).abs()
                           for i in range(6)])
        zeroed = torch.stack([(full - model.head(model.readout(h.index_fill(0, torch.tensor([i]), 0.0)))[0, 0]).abs()
                              for i in range(6)])
    torch.testing.assert_close(got, loo / loo.sum(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, zeroed / zeroed.sum(), atol=1e-3)


def test_gradient_on_sum_pooling_is_uniform_and_input_x_gradient_is_h_dot_g():
    """y = head(sum_i h_i): dy/dh_i is the same vector for every atom of a molecule."""
    model = _model("sum")
    batch = Batch.from_data_list(_molecules())
    a = attribute(model, batch, "gradient")
    counts = torch.bincount(batch.batch).float()
    torch.testing.assert_close(a, 1.0 / counts[batch.batch], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        h, vec = model.atom_features(batch)
    m = 2
    hm = h[vec == m].clone().requires_grad_(True)
    model.head(hm.sum(0, keepdim=True))[0, 0].backward()
    raw = (hm.detach() * hm.grad).sum(1).abs()
    torch.testing.assert_close(attribute(model, batch, "input_x_gradient")[vec == m], raw / raw.sum(),
                               atol=1e-5, rtol=1e-4)


def test_integrated_gradients_is_complete_for_a_linear_head():
    """Sum pooling + a linear head is linear in h: IG with a zero baseline is exactly w . h_i."""
    torch.manual_seed(0)
    net = build_model("schnet", "sum", hidden_channels=16, num_filters=16, num_interactions=1).backbone
    lin = torch.nn.Linear(16, 1)
    model = AtomisticModel(net, SumPooling(16), lin).eval()
    batch = Batch.from_data_list(_molecules((5, 8)))
    with torch.no_grad():
        h, _ = model.atom_features(batch)
        raw = (h @ lin.weight[0]).abs()
    expected = raw / _per_molecule(raw, batch.batch)[batch.batch]
    torch.testing.assert_close(attribute(model, batch, "integrated_gradients", n_steps=4), expected,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("readout", ["abp", "wa"])
def test_gradient_methods_leave_parameters_grads_and_mode_untouched(readout):
    model = _model(readout).train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    batch = Batch.from_data_list(_molecules())
    for method in supported_methods(model):
        attribute(model, batch, method)
    faithfulness(model, batch, attribute(model, batch, "gradient"), n_random=3)
    assert model.training, "the train/eval mode is restored"
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
        assert torch.equal(p.grad, grads[n]), n


def test_attribute_under_no_grad_and_from_a_task_like_wrapper():
    model = _model("abp")
    batch = Batch.from_data_list(_molecules())
    expected = attribute(model, batch, "gradient")

    class Task(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

    with torch.no_grad():
        torch.testing.assert_close(attribute(Task(model), batch, "gradient"), expected)


def test_explanation_follows_pyg_conventions():
    model = _model("wa")
    batch = Batch.from_data_list(_molecules())
    e = explanation(model, batch, "weights")
    assert e.node_mask.shape == (batch.num_nodes, 1)
    torch.testing.assert_close(e.node_mask[:, 0], model.atom_weights(batch), atol=1e-6, rtol=1e-5)
    assert e.method == "weights"


def test_bad_input_is_refused_with_the_choices():
    batch = Batch.from_data_list(_molecules())
    with pytest.raises(ValueError, match="unknown attribution method 'saliency'.*rollout"):
        attribute(_model("abp"), batch, "saliency")
    with pytest.raises(ValueError, match="'rollout' is not available for the wa readout.*weights"):
        attribute(_model("wa"), batch, "rollout")
    with pytest.raises(ValueError, match="'weights' is not available for the sum readout"):
        attribute(_model("sum"), batch, "weights")
    with pytest.raises(ValueError, match="target 2 is out of range.*0..1"):
        attribute(_model("sum"), batch, "gradient", target=2)
    with pytest.raises(ValueError, match="target -1 is out of range"):
        attribute(_model("abp"), batch, "rollout", target=-1)
    with pytest.raises(ValueError, match="empty batch"):
        attribute(_model("sum"), Data(z=torch.zeros(0, dtype=torch.long), pos=torch.zeros(0, 3)), "gradient")
    with pytest.raises(ValueError, match="unknown option.*'steps'.*n_steps"):
        attribute(_model("sum"), batch, "integrated_gradients", steps=3)
    with pytest.raises(ValueError, match="head 5 is out of range"):
        attribute(_model("abp"), batch, "rollout", head=5)
    with pytest.raises(ValueError, match="AtomisticModel"):
        attribute(torch.nn.Linear(2, 2), batch, "gradient")


# ------------------------------------------------------------------------------------------------------
# faithfulness
# ------------------------------------------------------------------------------------------------------
class _ElementFeatures(torch.nn.Module):
    """A backbone whose atom features depend on the element only: y = sum of per-element contributions."""

    out_channels = 4

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(20, 4)
        with torch.no_grad():
            self.table.weight.copy_(torch.rand(20, 4) + 0.1)  # positive: contributions never cancel

    def forward(self, z, pos, batch):
        return self.table(z)


def _additive_model():
    torch.manual_seed(3)
    head = torch.nn.Linear(4, 1)
    with torch.no_grad():
        head.weight.abs_()
    return AtomisticModel(_ElementFeatures(), SumPooling(4), head).eval()


def test_deletion_curve_is_the_explicit_removal():
    model = _additive_model()
    mols = _molecules((6, 4))
    batch = Batch.from_data_list(mols)
    a = attribute(model, batch, "occlusion")
    curves = faithfulness(model, batch, a, n_random=5)
    with torch.no_grad():
        h, vec = model.atom_features(batch)
        for m, n in enumerate((6, 4)):
            hm, am = h[vec == m], a[vec == m]
            order = torch.argsort(am, descending=True, stable=True)
            full = model.head(hm.sum(0))[0]
            expected = [(full - model.head(hm[order[k:]].sum(0))[0]).abs() for k in range(1, n)]
            torch.testing.assert_close(curves.curve[m, :n - 1].float(), torch.stack(expected), atol=1e-5, rtol=1e-4)
            assert torch.isnan(curves.curve[m, n - 1:]).all()
            assert math.isclose(float(curves.area[m]), float(torch.stack(expected).mean()), rel_tol=1e-4)


def test_faithful_attribution_beats_random_orders_and_its_reverse():
    """For an additive model with positive contributions, removing the largest contributions first (occlusion)
    is the fastest way to move the prediction; the reversed order is the slowest."""
    model = _additive_model()
    batch = Batch.from_data_list(_molecules((9, 12, 10, 11)))
    a = attribute(model, batch, "occlusion")
    good = faithfulness(model, batch, a, n_random=30)
    bad = faithfulness(model, batch, -a, n_random=30)
    assert bool((good.relative_area > 1).all()) and bool((bad.relative_area < 1).all())
    assert bool((good.p_value < 0.1).all())
    frame = good.to_frame(["a", "b", "c", "d"])
    assert list(frame.molecule) == ["a", "b", "c", "d"] and (frame.n_atoms == [9, 12, 10, 11]).all()


def test_a_constant_attribution_is_no_better_than_random():
    """Ties are broken at random, so a uniform attribution does not profit from the atom order."""
    model = _additive_model()
    mols = [Data(z=torch.cat([torch.full((4,), 9), torch.ones(8, dtype=torch.long)]), pos=torch.randn(12, 3))
            for _ in range(30)]  # heavy atoms first, as in QM9
    batch = Batch.from_data_list(mols)
    with torch.no_grad():
        model.backbone.table.weight[9] = 5.0  # removing the heavy atoms first would move y the most
    curves = faithfulness(model, batch, torch.ones(batch.num_nodes), n_random=20)
    assert 0.8 < float(curves.relative_area.mean()) < 1.2


def test_faithfulness_handles_single_atoms_and_refuses_bad_attributions():
    model = _model("abp")
    batch = Batch.from_data_list(_molecules())
    curves = faithfulness(model, batch, attribute(model, batch, "rollout"), n_random=4)
    assert torch.isnan(curves.area[3]) and torch.isnan(curves.p_value[3])  # the 1-atom molecule
    assert torch.isfinite(curves.area[[0, 1, 2, 4]]).all()
    with pytest.raises(ValueError, match="one value per atom"):
        faithfulness(model, batch, torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        faithfulness(model, batch, torch.full((batch.num_nodes,), float("nan")))
    with pytest.raises(ValueError, match="n_random"):
        faithfulness(model, batch, torch.ones(batch.num_nodes), n_random=0)

"""The fast paths (ABP's packed attention, ISAB, fast SchNet/DimeNet++) against plain references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.utils import scatter, to_dense_batch

import abp_core.readouts as readouts
from abp_core.readouts import AttentionPooling, InducedSetAttentionBlock, SetLayout, packed_self_attention

C, HEADS = 16, 4


def features(sizes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), C, generator=g, dtype=dtype)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    return x, batch


# ---------------------------------------------------------------- dense reference, one molecule at a time

def mab_ref(block, x, y):
    """MAB(X, Y) written out: multi-head softmax attention, residuals, ReLU feed-forward, optional norms."""
    c, h = block.channels, block.heads
    d = c // h
    w_q, w_k, w_v = block.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.in_proj_bias.chunk(3)
    q = (x @ w_q.T + b_q).view(-1, h, d).transpose(0, 1)
    k = (y @ w_k.T + b_k).view(-1, h, d).transpose(0, 1)
    v = (y @ w_v.T + b_v).view(-1, h, d).transpose(0, 1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    o = (att @ v).transpose(0, 1).reshape(-1, c)
    out = x + o @ block.out_proj.weight.T + block.out_proj.bias
    if block.norm1 is not None:
        out = block.norm1(out)
    out = out + torch.relu(out @ block.lin.weight.T + block.lin.bias)
    if block.norm2 is not None:
        out = block.norm2(out)
    return out


def abp_ref(r: AttentionPooling, x, batch, num_molecules=None):
    """ABP for each molecule on its own (no batching, no padding, no packing)."""
    num_molecules = num_molecules or int(batch.max()) + 1
    outs = []
    for m in range(num_molecules):
        z = x[batch == m]
        if z.size(0) == 0:
            raise ValueError("reference needs non-empty molecules")
        if r.input_lin is not None:
            z = torch.relu(r.input_lin(z))
        for enc in r.encoders:
            if isinstance(enc, InducedSetAttentionBlock):
                z = mab_ref(enc.mab2, z, mab_ref(enc.mab1, enc.induced[0], z))
            else:
                z = mab_ref(enc, z, z)
        h = mab_ref(r.pma, r.seeds[0], torch.relu(r.pma_lin(z)))
        for dec in r.decoders:
            h = mab_ref(dec, h, h)
        h = h.flatten() if r.concat else h.mean(0)
        if r.output_lin is not None:
            h = torch.relu(r.output_lin(h))
        outs.append(h)
    return torch.stack(outs)


def weights_ref(r: AttentionPooling, x, batch):
    """PMA attention of the seeds over each molecule's encoded atoms, averaged over heads and seeds."""
    out = torch.empty(x.size(0), dtype=x.dtype)
    for m in range(int(batch.max()) + 1):
        sel = batch == m
        keys, _ = r._encode(x[sel], torch.zeros(int(sel.sum()), dtype=torch.long), 1)
        block = r.pma
        d = block.channels // block.heads
        w_q, w_k, _ = block.in_proj_weight.chunk(3)
        b_q, b_k, _ = block.in_proj_bias.chunk(3)
        q = (r.seeds[0] @ w_q.T + b_q).view(-1, block.heads, d).transpose(0, 1)
        k = (keys @ w_k.T + b_k).view(-1, block.heads, d).transpose(0, 1)
        out[sel] = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=(0, 1))
    return out


def make(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("heads", HEADS)
    return AttentionPooling(C, **kw).double().eval()


CONFIGS = [
    dict(),
    dict(num_seeds=3, concat=True, layer_norm=True),
    dict(num_seeds=2, num_decoder_blocks=2, input_projection=False, output_projection=False),
    dict(num_induced_points=3),
    dict(num_induced_points=5, num_seeds=2, layer_norm=True, num_encoder_blocks=1),
]
SIZES = [[5, 1, 9, 5, 3, 9, 9, 2, 14, 5], [7], [4, 4, 4], [30, 2, 1]]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("sizes", SIZES)
def test_abp_matches_per_molecule_dense_reference(kw, sizes):
    r = make(**kw)
    x, batch = features(sizes, seed=len(sizes))
    assert torch.allclose(r(x, batch), abp_ref(r, x, batch), atol=1e-12)
    assert torch.allclose(r.atom_weights(x, batch), weights_ref(r, x, batch), atol=1e-12)


@pytest.mark.parametrize("kw", [dict(), dict(num_induced_points=4)])
def test_gradients_match_reference(kw):
    r = make(**kw)
    x, batch = features([6, 2, 6, 11, 1], seed=3)
    x1 = x.clone().requires_grad_(True)
    r(x1, batch).pow(2).sum().backward()
    g_ours = [x1.grad] + [p.grad.clone() for p in r.parameters()]
    r.zero_grad()
    x2 = x.clone().requires_grad_(True)
    abp_ref(r, x2, batch).pow(2).sum().backward()
    g_ref = [x2.grad] + [p.grad for p in r.parameters()]
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-11)


def test_packed_self_attention_gradcheck():
    """The fused CPU kernel path (custom autograd) has the right gradients, and equals the generic path."""
    sizes = [3, 1, 3, 5, 2, 5]
    layout = SetLayout(torch.repeat_interleave(torch.arange(6), torch.tensor(sizes)), 6)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(layout.num_atoms, 3 * 8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: packed_self_attention(t, layout, heads=2), (qkv,))
    fused = packed_self_attention(qkv, layout, heads=2)
    generic = packed_self_attention(qkv, layout, heads=2, dropout_p=0.0, force_generic=True)
    assert torch.allclose(fused, generic, atol=1e-14)
    # against a per-molecule softmax attention
    q, k, v = qkv.detach().view(-1, 3, 2, 4).unbind(1)
    start = 0
    for n in layout.sizes:
        s = slice(start, start + n)
        att = torch.softmax(torch.einsum("ihd,jhd->hij", q[s], k[s]) / 2.0, dim=-1)
        want = torch.einsum("hij,jhd->ihd", att, v[s]).reshape(n, 8)
        assert torch.allclose(fused[s], want, atol=1e-12)
        start += n


@pytest.mark.parametrize("kw", [dict(), dict(num_induced_points=3)])
def test_fused_and_generic_paths_agree(kw, monkeypatch):
    r = make(**kw).train()
    x, batch = features([8, 3, 8, 1, 20], seed=5)
    x1 = x.clone().requires_grad_(True)
    out1 = r(x1, batch)
    out1.sum().backward()
    grads1 = [x1.grad] + [p.grad.clone() for p in r.parameters()]
    r.zero_grad()
    monkeypatch.setattr(readouts, "_FLASH_CPU", None)
    x2 = x.clone().requires_grad_(True)
    out2 = r(x2, batch)
    out2.sum().backward()
    assert torch.allclose(out1, out2, atol=1e-13)
    for a, b in zip(grads1, [x2.grad] + [p.grad for p in r.parameters()]):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("group_rows", [1, 7])
def test_fused_block_in_row_groups(group_rows, monkeypatch):
    """The fused SAB processes q|k|v a group of blocks at a time: any grouping, same numbers."""
    r = make()
    x, batch = features([5, 1, 9, 5, 3, 9, 9, 2, 14, 5, 3], seed=7)
    x1 = x.clone().requires_grad_(True)
    out = r(x1, batch)
    out.pow(2).sum().backward()
    want = [x1.grad] + [p.grad.clone() for p in r.parameters()]
    r.zero_grad()
    monkeypatch.setattr(readouts, "_GROUP_ROWS", group_rows)
    assert len(readouts._row_groups(SetLayout(batch, 11).buckets)) > 1
    x2 = x.clone().requires_grad_(True)
    out2 = r(x2, batch)
    out2.pow(2).sum().backward()
    assert torch.allclose(out2, out, atol=1e-13)
    for a, b in zip([x2.grad] + [p.grad for p in r.parameters()], want):
        assert torch.allclose(a, b, atol=1e-12)


def test_set_layout_orders_and_padding():
    sizes = [3, 0, 1, 3, 2, 0]
    batch = torch.repeat_interleave(torch.arange(6), torch.tensor(sizes))
    layout = SetLayout(batch, 6)
    assert layout.sizes == [1, 2, 3, 3] and layout.molecules.tolist() == [2, 4, 0, 3]
    assert [(b, n) for _, _, b, n in layout.buckets] == [(1, 1), (1, 2), (2, 3)]
    x = torch.arange(9.0).unsqueeze(1)
    xs = layout.to_sorted(x)
    assert xs[:, 0].tolist() == [3, 7, 8, 0, 1, 2, 4, 5, 6]
    assert torch.equal(layout.atoms_to_batch_order(xs), x)
    dense = layout.pad(xs, -1.0)
    assert dense.shape == (4, 3, 1)
    assert dense[1, :, 0].tolist() == [7, 8, -1]
    rows = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert layout.molecules_to_batch_order(rows)[:, 0].tolist() == [3, 0, 1, 4, 2, 0]
    # already size-sorted: no permutation at all
    same = SetLayout(torch.tensor([0, 1, 1, 2, 2]), 3)
    x5 = x[:5]
    assert same.identity and same.to_sorted(x5) is x5


@pytest.mark.parametrize("kw", [dict(num_induced_points=4), dict(num_induced_points=1, layer_norm=True)])
def test_isab_invariances_and_weights(kw):
    r = make(**kw)
    x, batch = features([4, 7, 2], seed=1)
    out = r(x, batch)
    perm = torch.cat([torch.tensor([3, 1, 0, 2]), 4 + torch.randperm(7), torch.tensor([12, 11])])
    assert torch.allclose(r(x[perm], batch), out, atol=1e-12)  # permutation invariance
    x2, batch2 = features([3, 20, 9], seed=2)
    together = r(x2, batch2)  # batch composition / padding invariance
    assert torch.allclose(together[0], r(x2[:3], batch2[:3])[0], atol=1e-12)
    assert torch.allclose(together[2], r(x2[23:], torch.zeros(9, dtype=torch.long))[0], atol=1e-12)
    w = r.atom_weights(x, batch)
    assert bool((w >= 0).all())
    assert torch.allclose(scatter(w, batch, reduce="sum"), torch.ones(3, dtype=w.dtype))


def test_isab_matches_pyg_induced_set_attention_block():
    """Our ISAB encoder equals PyG's InducedSetAttentionBlock on padded dense batches."""
    from torch_geometric.nn.aggr.utils import InducedSetAttentionBlock as PygISAB

    torch.manual_seed(0)
    ours = InducedSetAttentionBlock(C, 3, heads=HEADS, layer_norm=True).double()
    ref = PygISAB(C, 3, heads=HEADS, layer_norm=True).double()
    ours.induced.data.copy_(ref.ind)
    for dst, src in ((ours.mab1, ref.mab1), (ours.mab2, ref.mab2)):
        dst.in_proj_weight.data.copy_(src.attn.in_proj_weight)
        dst.in_proj_bias.data.copy_(src.attn.in_proj_bias)
        dst.out_proj.load_state_dict(src.attn.out_proj.state_dict())
        dst.lin.load_state_dict(src.lin.state_dict())
        dst.norm1.load_state_dict(src.layer_norm1.state_dict())
        dst.norm2.load_state_dict(src.layer_norm2.state_dict())
    x, batch = features([5, 2, 9, 5], seed=4)
    dense, mask = to_dense_batch(x, batch)
    want = ref(dense, mask)[mask]
    layout = SetLayout(batch, 4)
    got = layout.atoms_to_batch_order(ours.forward_packed(layout.to_sorted(x), layout))
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(ours(dense, mask)[mask], want, atol=1e-12)  # our dense forward too


def test_isab_memory_is_linear_in_atoms():
    """No [n, n] intermediate: an ISAB encoder on one 3,000-atom molecule stays small."""
    r = AttentionPooling(32, heads=4, num_induced_points=8).eval()
    x = torch.randn(3000, 32)
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        r(x, torch.zeros(3000, dtype=torch.long))
    biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert biggest < 3000 * 3000 * 4 / 4  # far below one float32 [n, n] score matrix


def test_empty_molecule_slots_and_dropout():
    r = make(dropout=0.3)
    x, batch = features([3, 5])
    out = r(x, batch * 2, dim_size=4)  # slots 1 and 3 are empty
    assert out.shape == (4, r.out_channels) and torch.isfinite(out).all()
    assert torch.allclose(out[2], r(x[3:], torch.zeros(5, dtype=torch.long))[0], atol=1e-12)
    assert torch.allclose(out[1], out[3])
    r.train()
    x.requires_grad_(True)
    r(x, batch).sum().backward()  # dropout path (generic kernels) trains
    assert torch.isfinite(x.grad).all()


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    r = AttentionPooling(64, heads=8)
    x, batch = torch.randn(60, 64), torch.repeat_interleave(torch.arange(4), torch.tensor([10, 20, 10, 20]))
    want = r(x, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(x, batch)
    assert got.dtype == torch.float32 or got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------- fast backbones vs PyG's forward

def _backbones(name, **kw):
    from abp_core.models import BACKBONES

    torch.manual_seed(0)
    small = {"schnet": dict(hidden_channels=32, num_filters=24, num_interactions=3, cutoff=6.0),
             "dimenet++": dict(hidden_channels=32, num_blocks=2, int_emb_size=16, basis_emb_size=4,
                               out_emb_channels=24)}[name]
    small.update(kw)
    stock = BACKBONES[name](**small, fast=False).double()
    fast = BACKBONES[name](**small, fast=True).double()
    fast.load_state_dict(stock.state_dict())
    return stock, fast


@pytest.mark.parametrize("name,kw", [("schnet", {}), ("schnet", dict(max_num_neighbors=3)),
                                     ("dimenet++", {}), ("dimenet++", dict(max_num_neighbors=4))])
def test_fast_backbone_equals_stock(name, kw, qm7b_molecules):
    """Same outputs and gradients as PyG's own forward (float64: to round-off), also when the
    neighbour cap makes the graph asymmetric (edges without their reverse)."""
    from torch_geometric.data import Batch

    stock, fast = _backbones(name, **kw)
    b = Batch.from_data_list(qm7b_molecules)
    outs = []
    for m in (stock, fast):
        m.zero_grad()
        h = m(b.z, b.pos, b.batch)
        (h.pow(2).sum() + h.sum()).backward()
        outs.append((h.detach(), [p.grad for p in m.parameters()]))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-10)
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(g0, g1, rtol=1e-9, atol=1e-10)


def test_fast_schnet_fp32_equals_stock(qm7b_molecules):
    """In float32 too (the fast path flushes sub-normal Gaussian features: no visible change)."""
    from torch_geometric.data import Batch

    stock, fast = _backbones("schnet", cutoff=10.0)
    stock, fast = stock.float(), fast.float()
    b = Batch.from_data_list(qm7b_molecules)
    pos = b.pos.float()
    assert torch.allclose(stock(b.z, pos, b.batch), fast(b.z, pos, b.batch), rtol=1e-5, atol=1e-5)


def test_gaussian_features_flush_subnormals():
    from abp_core.models import gaussian_features

    offset = torch.linspace(0, 10, 50)
    coeff = -0.5 / (offset[1] - offset[0]).item() ** 2
    d = torch.linspace(0, 10, 1001)
    got = gaussian_features(d, offset, coeff)
    want = torch.exp(coeff * torch.pow(d.view(-1, 1) - offset.view(1, -1), 2))
    tiny = torch.finfo(torch.float32).tiny
    assert not bool(((got > 0) & (got < tiny)).any())  # no sub-normal numbers left
    assert bool(((want > 0) & (want < tiny)).any())  # ... that PyG's smearing does produce
    normal = want >= tiny
    assert torch.equal(got[normal], want[normal]) and bool((got[~normal] == 0).all())


def test_undirected_pairs_and_gather_mul_scatter():
    from abp_core.graph import gather_mul_scatter, undirected_pairs

    edge_index = torch.tensor([[1, 0, 2, 0, 3], [0, 1, 0, 2, 1]])  # (1,0),(0,1),(2,0),(0,2) and a lone 3->1
    a, b, pair = undirected_pairs(edge_index, 4)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 3)]
    assert pair.tolist() == [0, 0, 1, 1, 2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    want = torch.zeros(4, 5, dtype=torch.float64).index_add(0, edge_index[1], x[edge_index[0]] * w[pair])
    assert torch.allclose(gather_mul_scatter(x, w, edge_index[0], edge_index[1], pair, 4), want)
    assert torch.autograd.gradcheck(
        lambda x, w: gather_mul_scatter(x, w, edge_index[0], edge_index[1], pair, 4, pairs=(a, b)), (x, w))
    sym = edge_index[:, :4]  # every pair in both directions: the per-pair kernel
    a2, b2, pair2 = undirected_pairs(sym, 4)
    want = torch.zeros(4, 5, dtype=torch.float64).index_add(0, sym[1], x[sym[0]] * w[:2][pair2])
    assert torch.allclose(gather_mul_scatter(x, w[:2], sym[0], sym[1], pair2, 4, pairs=(a2, b2)), want)
    assert torch.autograd.gradcheck(
        lambda x, w: gather_mul_scatter(x, w, sym[0], sym[1], pair2, 4, pairs=(a2, b2)), (x, w[:2].detach()))


@pytest.mark.parametrize("name", ["schnet", "dimenet++"])
def test_fast_backbone_trains_under_bf16_autocast(name, qm7b_molecules):
    from torch_geometric.data import Batch

    stock, fast = _backbones(name)
    stock, fast = stock.float(), fast.float()
    b = Batch.from_data_list(qm7b_molecules[:6])
    pos = b.pos.float()
    want = stock(b.z, pos, b.batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(b.z, pos, b.batch)
    got.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters() if p.requires_grad)
    assert ((got.float() - want).norm() / want.norm()).item() < 5e-2


def test_fused_block_under_bf16_autocast(monkeypatch):
    """Under CPU bf16 autocast the SABs still run fused (bf16 matmuls, float32 attention and residual
    stream), and their outputs and gradients are as close to float32 as the autograd composition's."""
    calls = []
    fused_apply = readouts._FusedSelfAttentionBlock.apply
    monkeypatch.setattr(readouts._FusedSelfAttentionBlock, "apply",
                        lambda *a: calls.append(a[-1]) or fused_apply(*a))
    torch.manual_seed(0)
    r = AttentionPooling(C, heads=HEADS, input_projection=False, output_projection=False)
    x, batch = features([5, 12, 12, 30, 7, 1, 30], seed=3, dtype=torch.float32)

    def run(bf16):
        xr = x.clone().requires_grad_(True)
        r.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = r(xr, batch)
        out.float().pow(2).sum().backward()
        return [out.float(), xr.grad] + [p.grad.clone() for p in r.parameters()]

    ref = run(False)  # float32, fused exact path
    calls.clear()
    fused = run(True)
    assert calls == [torch.bfloat16] * 2  # both encoder SABs took the fused bf16 path
    assert all(g.dtype == torch.float32 for g in fused[1:])
    monkeypatch.setattr(readouts, "_FLASH_CPU", None)  # the autograd composition under autocast
    generic = run(True)
    assert len(calls) == 2

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    names = ["output", "x"] + [n for n, _ in r.named_parameters()]
    for name, f, g, want in zip(names, fused, generic, ref):
        assert rel(f, want) <= 1.5 * rel(g, want) + 2e-3, name


# ---------------------------------------------------------------- the three set-attention paths (issue 15)

@pytest.mark.parametrize("path", ["padded", "blocks"])
@pytest.mark.parametrize("kw", CONFIGS)
def test_each_path_matches_per_molecule_reference(path, kw):
    """Forced onto the padded path (CUDA's) or the size-sorted blocks path, ABP gives the per-molecule
    reference's outputs, atom weights and gradients (float64), empty molecule slots included."""
    r = make(**kw)
    sizes = [5, 1, 9, 5, 3, 9, 9, 2, 14, 5]
    x, batch = features(sizes, seed=11)
    with readouts.forced_set_attention_path(path):
        assert torch.allclose(r(x, batch), abp_ref(r, x, batch), atol=1e-12)
        assert torch.allclose(r.atom_weights(x, batch), weights_ref(r, x, batch), atol=1e-12)
        out = r(x, batch * 2, dim_size=20)  # odd slots empty
        x1 = x.clone().requires_grad_(True)
        r(x1, batch).pow(2).sum().backward()
    assert torch.allclose(out[::2], abp_ref(r, x, batch), atol=1e-12) and not out[1::2].isnan().any()
    got = [x1.grad] + [p.grad.clone() for p in r.parameters()]
    r.zero_grad()
    x2 = x.clone().requires_grad_(True)
    abp_ref(r, x2, batch).pow(2).sum().backward()
    for a, b in zip(got, [x2.grad] + [p.grad for p in r.parameters()]):
        assert torch.allclose(a, b, atol=1e-11)


@pytest.mark.parametrize("group_rows", [None, 7])
def test_native_path_in_batch_order_matches_reference(group_rows, monkeypatch):
    """float32 on CPU: the native path (no size sorting, one molecule table per forward) gives the float64
    reference's numbers to float32 rounding, in one row group or several, with empty slots."""
    from abp_core import kernels

    if not kernels.available():
        pytest.skip(f"native kernels: {kernels.unavailable_reason()}")
    if group_rows is not None:
        monkeypatch.setattr(readouts, "_GROUP_ROWS", group_rows)
    torch.manual_seed(0)
    r = AttentionPooling(64, heads=4, num_seeds=2)
    sizes = [5, 1, 29, 5, 3, 9, 9, 2, 14, 5]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(sizes), 64, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    layout = readouts.SetLayout(batch, len(sizes), path="native")
    assert layout.atom_order is None and layout.buckets is None
    assert (len(layout.row_groups()) > 1) == (group_rows is not None)
    calls = []
    forward = kernels.attention_forward
    monkeypatch.setattr(kernels, "attention_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    x1 = x.clone().requires_grad_(True)
    out = r(x1, batch * 2, dim_size=2 * len(sizes))
    assert calls and readouts.set_attention_path(x, 64, 4, 0.0) == "native"
    out[::2].pow(2).sum().backward()  # the empty slots' outputs depend on the seeds only
    r64 = AttentionPooling(64, heads=4, num_seeds=2).double()
    r64.load_state_dict(r.state_dict())
    x2 = x.double().requires_grad_(True)
    want = abp_ref(r64, x2, batch)
    want.pow(2).sum().backward()
    assert torch.allclose(out[::2].double(), want, rtol=1e-4, atol=1e-5) and not out.isnan().any()
    assert torch.allclose(x1.grad.double(), x2.grad, rtol=1e-3, atol=1e-4)
    for (name, p), p64 in zip(r.named_parameters(), r64.parameters()):
        assert torch.allclose(p.grad.double(), p64.grad, rtol=1e-3, atol=1e-4), name


def test_set_attention_path_is_chosen_in_one_place():
    from abp_core import kernels

    x32 = torch.zeros(3, 64)
    native = "native" if kernels.supports(x32.device, x32.dtype, 64, 4) else "blocks"
    assert readouts.set_attention_path(x32, 64, 4, 0.0) == native
    assert readouts.set_attention_path(x32.double(), 64, 4, 0.0) == "blocks"
    assert readouts.set_attention_path(x32, 64, 4, 0.1) == "blocks"  # attention dropout: PyTorch's kernels
    assert readouts.set_attention_path(x32, 64, 8, 0.0) == "blocks"  # head dimension 8: no native kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert readouts.set_attention_path(x32, 64, 4, 0.0) == "blocks"
    assert readouts.set_attention_path(torch.zeros(3, 64, device="meta"), 64, 4, 0.0) == "padded"
    with readouts.forced_set_attention_path("padded"):
        assert readouts.set_attention_path(x32, 64, 4, 0.0) == "padded"
    assert readouts.set_attention_path(x32, 64, 4, 0.0) == native
    with pytest.raises(ValueError, match="path must be one of"):
        with readouts.forced_set_attention_path("flex"):
            pass


@pytest.mark.parametrize("queries", [1, 3])
def test_single_key_attention_is_its_value(queries):
    """MAB over one key (the decoder after a one-seed PMA) skips q and k: the same numbers as the full
    attention, with and without a query mask."""
    torch.manual_seed(0)
    block = readouts.MultiheadAttentionBlock(C, HEADS).double()
    x = torch.randn(4, queries, C, dtype=torch.float64)
    y = torch.randn(4, 1, C, dtype=torch.float64)
    want = torch.stack([mab_ref(block, x[i], y[i]) for i in range(4)])
    assert torch.allclose(block(x, y), want, atol=1e-13)
    mask = torch.ones(4, queries, dtype=torch.bool)
    assert torch.allclose(block(x, y, x_mask=mask), want, atol=1e-13)

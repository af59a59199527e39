"""abp_core.graph against brute-force references."""
import itertools

import pytest
import torch

from abp_core.graph import radius_graph, triplets


def brute_radius_graph(pos, r, batch, max_num_neighbors, loop=False):
    """Per centre: all same-molecule atoms within r, nearest max_num_neighbors (ties by index)."""
    edges = []
    n = pos.size(0)
    for i in range(n):
        cands = []
        for j in range(n):
            if batch[i] != batch[j] or (i == j and not loop):
                continue
            d2 = float(((pos[i] - pos[j]) ** 2).sum())
            if d2 <= r * r:
                cands.append((d2, j))
        cands.sort()
        for _, j in sorted(cands[:max_num_neighbors], key=lambda t: t[1]):
            edges.append((j, i))
    if not edges:
        return torch.empty(2, 0, dtype=torch.long)
    return torch.tensor(edges, dtype=torch.long).t()


def brute_triplets(edge_index):
    row, col = edge_index.tolist()
    out = []
    for e_ji, (j, i) in enumerate(zip(row, col)):
        for e_kj, (k, j2) in sorted(enumerate(zip(row, col)), key=lambda t: t[1][0]):
            if j2 == j and k != i:
                out.append((i, j, k, e_kj, e_ji))
    return out


def random_batch(sizes, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64) * scale
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return pos, batch


@pytest.mark.parametrize("sizes,r,cap", [([5, 9, 1, 2, 14], 2.5, 32), ([12, 7, 30], 3.0, 4),
                                         ([1], 5.0, 32), ([2], 5.0, 32), ([2, 1, 2], 0.1, 32)])
def test_radius_graph_matches_brute_force(sizes, r, cap):
    pos, batch = random_batch(sizes)
    got = radius_graph(pos, r, batch, max_num_neighbors=cap)
    want = brute_radius_graph(pos, r, batch, cap)
    assert torch.equal(got, want)


def test_radius_graph_neighbour_cap_keeps_nearest():
    # Centre at the origin, neighbours at increasing distances: the cap keeps the closest ones.
    pos = torch.tensor([[0.0, 0, 0]] + [[d, 0, 0] for d in (3.0, 1.0, 2.0, 4.0)], dtype=torch.float64)
    ei = radius_graph(pos, 10.0, None, max_num_neighbors=2)
    assert sorted(ei[0, ei[1] == 0].tolist()) == [2, 3]
    degree = torch.bincount(ei[1], minlength=5)
    assert int(degree.max()) <= 2


def test_radius_graph_loop_and_layout():
    pos, batch = random_batch([4, 3], seed=1, scale=0.3)
    ei = radius_graph(pos, 10.0, batch, loop=True)
    assert ei.size(1) == 4 * 4 + 3 * 3  # everything is within range, self loops included
    # sorted by centre then neighbour, no cross-molecule pairs
    key = ei[1] * 100 + ei[0]
    assert torch.equal(key, key.sort().values)
    assert torch.equal(batch[ei[0]], batch[ei[1]])


def test_radius_graph_real_molecules(qm7b_molecules):
    from torch_geometric.data import Batch
    b = Batch.from_data_list(qm7b_molecules)
    for r, cap in [(5.0, 32), (2.0, 3), (10.0, 8)]:
        assert torch.equal(radius_graph(b.pos, r, b.batch, cap), brute_radius_graph(b.pos, r, b.batch, cap))


def test_radius_graph_rejects_bad_batch():
    pos, _ = random_batch([3, 3])
    with pytest.raises(ValueError, match="sorted"):
        radius_graph(pos, 2.0, torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        radius_graph(pos[:, :2], 2.0)


@pytest.mark.parametrize("sizes,r,cap", [([5, 9, 1, 2], 2.5, 32), ([8, 6], 10.0, 3)])
def test_triplets_match_brute_force(sizes, r, cap):
    pos, batch = random_batch(sizes, seed=3)
    ei = radius_graph(pos, r, batch, cap)
    i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji = triplets(ei, pos.size(0))
    assert torch.equal(i, ei[1]) and torch.equal(j, ei[0])
    got = list(zip(idx_i.tolist(), idx_j.tolist(), idx_k.tolist(), idx_kj.tolist(), idx_ji.tolist()))
    assert got == brute_triplets(ei)
    # every triplet is a genuine path k -> j -> i
    assert torch.equal(ei[0, idx_kj], idx_k) and torch.equal(ei[1, idx_kj], idx_j)
    assert torch.equal(ei[0, idx_ji], idx_j) and torch.equal(ei[1, idx_ji], idx_i)


def test_triplets_tiny_molecules():
    # one atom: no edges, no triplets; two atoms: two edges, no triplets (k == i excluded)
    for n, n_edges in [(1, 0), (2, 2)]:
        pos = torch.rand(n, 3)
        ei = radius_graph(pos, 5.0)
        assert ei.size(1) == n_edges
        assert all(t.numel() == 0 for t in triplets(ei, n)[2:])
    # three atoms, fully connected: 6 edges, each e_ji pairs with the one k not in {i, j}
    ei = radius_graph(torch.eye(3), 5.0)
    assert triplets(ei, 3)[2].numel() == 6


def test_pyg_dimenet_forward_uses_our_ops(qm7b_molecules):
    """Our DimeNet++ backbone reproduces PyG's own forward (with our graph ops in place of torch-sparse)."""
    from torch_geometric.data import Batch
    import torch_geometric.nn.models.dimenet as pyg_dimenet
    from abp_core.models import DimeNetPlusPlusBackbone

    torch.manual_seed(0)
    b = Batch.from_data_list(qm7b_molecules[:4])
    ours = DimeNetPlusPlusBackbone(hidden_channels=16, out_channels=3, num_blocks=2, int_emb_size=8,
                                   basis_emb_size=4, out_emb_channels=16).double()
    ref = pyg_dimenet.DimeNetPlusPlus(16, 3, 2, 8, 4, 16, 7, 6, output_initializer="glorot_orthogonal").double()
    ref.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=True)
    # PyG's forward, with radius_graph/triplets supplied by us for this call only.
    mp = pytest.MonkeyPatch()
    mp.setattr(pyg_dimenet, "radius_graph", lambda pos, r, batch, max_num_neighbors: radius_graph(
        pos, r, batch, max_num_neighbors))
    mp.setattr(pyg_dimenet, "triplets", triplets)
    try:
        want = ref(b.z, b.pos, b.batch)
    finally:
        mp.undo()
    got = torch.zeros(b.num_graphs, 3, dtype=torch.float64).index_add_(0, b.batch, ours(b.z, b.pos, b.batch))
    assert torch.allclose(got, want, atol=1e-10)

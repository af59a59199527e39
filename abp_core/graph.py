"""Pure-torch graph construction: radius graphs and DimeNet++ triplets.

PyG 2.8's :func:`torch_geometric.nn.radius_graph` needs ``pyg-lib``/``torch-cluster``
and DimeNet's ``triplets`` needs ``torch-sparse``. Both are replaced here by
vectorised torch code that runs on CPU and CUDA alike and returns the same edge
layout as PyG, so the PyG building blocks can be used unchanged.

Edge layout (PyG's ``flow="source_to_target"``): ``edge_index[0]`` holds the
neighbour ``j`` (source) and ``edge_index[1]`` the centre ``i`` (target); edges
are sorted by centre, then by neighbour.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

__all__ = ["radius_graph", "triplets", "undirected_pairs", "gather_mul_scatter", "triplet_message",
           "RadiusInteractionGraph",
           "check_batch_vector"]


def check_batch_vector(batch: Tensor, num_nodes: int) -> None:
    """Raise ``ValueError`` unless ``batch`` is a sorted 1-D long vector of length ``num_nodes``."""
    if batch.dim() != 1 or batch.numel() != num_nodes:
        raise ValueError(
            f"batch vector must be 1-D with one entry per atom ({num_nodes}), got shape {tuple(batch.shape)}")
    if batch.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"batch vector must be an integer tensor, got {batch.dtype}")
    if num_nodes > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch vector must be sorted (atoms of one molecule contiguous, molecules in order)")


def _segment_offsets(counts: Tensor) -> Tensor:
    """Exclusive cumulative sum: start offset of each segment."""
    return torch.cumsum(counts, 0) - counts


def radius_graph(
    pos: Tensor,
    r: float,
    batch: Optional[Tensor] = None,
    max_num_neighbors: int = 32,
    loop: bool = False,
) -> Tensor:
    r"""Edges between atoms of the same molecule closer than ``r``.

    Computes all intra-molecule pair distances block-wise (memory
    :math:`\sum_m n_m^2`, which is tiny for molecules), keeps pairs with
    :math:`\lVert p_i - p_j \rVert \le r`, and caps each centre at its
    ``max_num_neighbors`` *nearest* neighbours (ties broken by index) -- a
    deterministic choice, unlike an arbitrary first-found cap.

    Args:
        pos: ``[num_atoms, 3]`` coordinates.
        r: cutoff radius (same unit as ``pos``).
        batch: ``[num_atoms]`` sorted molecule index; ``None`` means one molecule.
        max_num_neighbors: maximum neighbours per centre atom (default ``32``).
        loop: include self-loops (default ``False``).

    Returns:
        ``edge_index`` of shape ``[2, num_edges]`` (row: neighbour ``j``, col: centre ``i``).
    """
    if pos.dim() != 2 or pos.size(1) != 3:
        raise ValueError(f"pos must have shape [num_atoms, 3], got {tuple(pos.shape)}")
    n = pos.size(0)
    device = pos.device
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=device)
    check_batch_vector(batch, n)
    if n == 0:
        return torch.empty(2, 0, dtype=torch.long, device=device)
    batch = batch.long()
    with torch.no_grad():
        counts = torch.bincount(batch)
        starts = _segment_offsets(counts)
        # Every (centre i, candidate j) pair within the centre's molecule.
        per_atom = counts[batch]
        centre = torch.repeat_interleave(torch.arange(n, device=device), per_atom)
        local = torch.arange(centre.numel(), device=device) - torch.repeat_interleave(
            _segment_offsets(per_atom), per_atom)
        neighbour = starts[batch[centre]] + local
        dist = (pos[centre] - pos[neighbour]).pow(2).sum(-1)
        keep = dist <= r * r
        if not loop:
            keep &= centre != neighbour
        centre, neighbour, dist = centre[keep], neighbour[keep], dist[keep]
        if centre.numel() and max_num_neighbors is not None:
            # Rank neighbours of each centre by distance (stable: ties keep index order).
            order = torch.sort(dist, stable=True).indices
            order = order[torch.sort(centre[order], stable=True).indices]
            c_sorted = centre[order]
            deg = torch.bincount(c_sorted, minlength=n)
            rank = torch.arange(c_sorted.numel(), device=device) - torch.repeat_interleave(
                _segment_offsets(deg), deg)
            chosen = order[rank < max_num_neighbors]
            # Back to (centre, neighbour) order.
            chosen = torch.sort(chosen).values
            centre, neighbour = centre[chosen], neighbour[chosen]
    return torch.stack([neighbour, centre], dim=0)


def triplets(
    edge_index: Tensor, num_nodes: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""All angle triplets ``k -> j -> i`` (``k != i``) of a directed graph, as PyG's DimeNet needs.

    For every edge ``e_ji`` (``j -> i``) and every edge ``e_kj`` (``k -> j``) with
    ``k != i`` one triplet is emitted; triplets of one ``e_ji`` are ordered by ``k``,
    exactly like PyG's ``torch_sparse``-based implementation.

    Returns:
        ``(i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji)`` with ``i = edge_index[1]``,
        ``j = edge_index[0]`` per edge, the node indices of each triplet and the
        edge indices of its two edges.
    """
    row, col = edge_index  # j -> i
    device = row.device
    num_edges = row.numel()
    # Incoming edges of each node, sorted by (target, source).
    incoming = torch.sort(col * max(num_nodes, 1) + row, stable=True).indices
    in_deg = torch.bincount(col, minlength=num_nodes)
    in_start = _segment_offsets(in_deg)
    # Edge e_ji (j -> i) pairs with every edge into j.
    num_triplets = in_deg[row]
    idx_ji = torch.repeat_interleave(torch.arange(num_edges, device=device), num_triplets)
    local = torch.arange(idx_ji.numel(), device=device) - torch.repeat_interleave(
        _segment_offsets(num_triplets), num_triplets)
    idx_kj = incoming[in_start[row[idx_ji]] + local]
    idx_i, idx_j, idx_k = col[idx_ji], row[idx_ji], row[idx_kj]
    mask = idx_i != idx_k
    return col, row, idx_i[mask], idx_j[mask], idx_k[mask], idx_kj[mask], idx_ji[mask]


def undirected_pairs(edge_index: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Unique unordered atom pairs of a directed graph, for per-pair (distance-only) edge features.

    A radius graph holds both ``j -> i`` and ``i -> j``; anything that depends on the distance
    alone (radial basis, cutoff, SchNet's filters) is the same for both and can be computed once
    per pair. Edges whose reverse is missing (e.g. cut by ``max_num_neighbors``) get a pair of
    their own, so this is exact for any graph.

    Returns:
        ``(a, b, pair)``: the pairs' atoms ``a < b`` (``[P]`` each) and, per directed edge, the
        index of its pair (``[E]``).
    """
    row, col = edge_index
    lo, hi = torch.minimum(row, col), torch.maximum(row, col)
    keys, pair = torch.unique(lo * max(num_nodes, 1) + hi, sorted=True, return_inverse=True)
    return keys // max(num_nodes, 1), keys % max(num_nodes, 1), pair


class _GatherMulScatter(torch.autograd.Function):
    """``out[dst[e]] += x[src[e]] * w[pair[e]]``, keeping no per-edge tensor for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, src: Tensor, dst: Tensor, pair: Tensor, num_nodes: int):
        msg = x.index_select(0, src) * w.index_select(0, pair)
        out = msg.new_zeros(num_nodes, msg.size(1)).index_add_(0, dst, msg)
        ctx.save_for_backward(x, w, src, dst, pair)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, w, src, dst, pair = ctx.saved_tensors
        g = grad.index_select(0, dst)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.zeros_like(x).index_add_(0, src, (g * w.index_select(0, pair)).to(x.dtype))
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(w).index_add_(0, pair, (g * x.index_select(0, src)).to(w.dtype))
        return gx, gw, None, None, None, None


class _PairMulScatter(torch.autograd.Function):
    """``out[a] += x[b] * w``, ``out[b] += x[a] * w`` over pairs (both directions of every pair present)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, a: Tensor, b: Tensor, num_nodes: int):
        # native kernel (one pass per pair, no gathered [P, F] temporaries) for CPU float32
        ctx.native = (x.dtype == w.dtype and x.is_contiguous() and w.is_contiguous() and w.size(1) % 16 == 0
                      and x.size(0) == num_nodes and kernels.applies(x.device, x.dtype))
        if ctx.native:
            out = kernels.pair_mul_scatter(x, w, a, b)
        else:
            out = w.new_zeros(num_nodes, w.size(1))
            out.index_add_(0, a, x.index_select(0, b) * w).index_add_(0, b, x.index_select(0, a) * w)
        ctx.save_for_backward(x, w, a, b)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, w, a, b = ctx.saved_tensors
        if ctx.native:
            gx, gw = kernels.pair_mul_scatter_backward(grad.contiguous(), x, w, a, b, ctx.needs_input_grad[0],
                                                       ctx.needs_input_grad[1])
            return gx, gw, None, None, None
        ga, gb = grad.index_select(0, a), grad.index_select(0, b)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.zeros_like(x).index_add_(0, b, (ga * w).to(x.dtype)).index_add_(0, a, (gb * w).to(x.dtype))
        if ctx.needs_input_grad[1]:
            gw = (ga.mul_(x.index_select(0, b)).addcmul_(gb, x.index_select(0, a))).to(w.dtype)
        return gx, gw, None, None, None


def gather_mul_scatter(x: Tensor, w: Tensor, src: Tensor, dst: Tensor, pair: Tensor, num_nodes: int,
                       pairs: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    r"""Continuous-filter convolution sum :math:`o_i = \sum_{e: j \to i} x_j \odot w_{p(e)}`.

    ``x`` ``[num_nodes, F]`` node features, ``w`` ``[P, F]`` per-pair filters, ``src``/``dst``/``pair``
    per directed edge. Same result as ``scatter(x[src] * w[pair], dst, reduce="sum")`` but the
    ``[E, F]`` messages are transient (recomputed in the backward) instead of being stored.
    With ``pairs=(a, b)`` from :func:`undirected_pairs` and every pair present in both directions
    (``E == 2 P``), both directions are handled per pair: the filters are never gathered.
    """
    if pairs is not None and src.numel() == 2 * w.size(0):
        return _PairMulScatter.apply(x, w, pairs[0], pairs[1], num_nodes)
    return _GatherMulScatter.apply(x, w, src, dst, pair, num_nodes)


class _TripletMessage(torch.autograd.Function):
    """``out[ji[t]] += x[kj[t]] * (s[t] @ w.T)`` in chunks of triplets, storing no per-triplet product."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, w: Tensor, idx_kj: Tensor, idx_ji: Tensor, num_edges: int,
                chunk: int):
        out = x.new_zeros(num_edges, w.size(0))
        for c0 in range(0, idx_kj.numel(), chunk):
            sl = slice(c0, c0 + chunk)
            msg = x.index_select(0, idx_kj[sl]) * F.linear(s[sl], w.to(s.dtype)).to(x.dtype)
            out.index_add_(0, idx_ji[sl], msg)
        ctx.chunk = chunk
        ctx.save_for_backward(x, s, w, idx_kj, idx_ji)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, s, w, idx_kj, idx_ji = ctx.saved_tensors
        gx, gs, gw = torch.zeros_like(x), torch.empty_like(s), torch.zeros_like(w)
        for c0 in range(0, idx_kj.numel(), ctx.chunk):
            sl = slice(c0, c0 + ctx.chunk)
            gm = grad.index_select(0, idx_ji[sl])
            gx.index_add_(0, idx_kj[sl], (gm * F.linear(s[sl], w.to(s.dtype))).to(gx.dtype))
            gm.mul_(x.index_select(0, idx_kj[sl]))  # d msg / d (s w^T)
            gs[sl] = gm.to(w.dtype) @ w
            gw.addmm_(gm.t().to(w.dtype), s[sl].to(w.dtype))
        return gx, gs, gw, None, None, None, None


def triplet_message(x: Tensor, s: Tensor, w: Tensor, idx_kj: Tensor, idx_ji: Tensor, num_edges: int,
                    chunk: int = 65536) -> Tensor:
    r"""DimeNet++'s triplet interaction :math:`m_{ji} = \sum_{k} x_{kj} \odot (W s_{kji})`.

    ``x`` ``[E, I]`` down-projected edge messages, ``s`` ``[T, B]`` per-triplet basis embedding,
    ``w`` ``[I, B]`` (``lin_sbf2.weight``). Same as PyG's
    ``scatter(x[idx_kj] * lin_sbf2(s), idx_ji)``, but processed in chunks of triplets and with
    the ``[T, I]`` products recomputed in the backward instead of stored (PyG keeps two).
    """
    return _TripletMessage.apply(x, s, w, idx_kj, idx_ji, num_edges, chunk)


class RadiusInteractionGraph(torch.nn.Module):
    """Drop-in for PyG SchNet's ``interaction_graph``: returns ``(edge_index, edge_weight)``."""

    def __init__(self, cutoff: float = 10.0, max_num_neighbors: int = 32):
        super().__init__()
        self.cutoff = cutoff
        self.max_num_neighbors = max_num_neighbors

    def forward(self, pos: Tensor, batch: Tensor) -> Tuple[Tensor, Tensor]:
        edge_index = radius_graph(pos, self.cutoff, batch, self.max_num_neighbors)
        row, col = edge_index
        return edge_index, (pos[row] - pos[col]).norm(dim=-1)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, max_num_neighbors={self.max_num_neighbors}"

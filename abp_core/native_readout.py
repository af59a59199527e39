r"""ABP's whole readout as one autograd node on the native CPU path.

:class:`~abp_core.readouts.AttentionPooling` in float32 on the CPU with the native kernels
(:func:`abp_core.readouts.set_attention_path` says ``"native"``), SAB encoders, one seed and no layer
norms (the paper's layout and the package's defaults) runs here instead of as ~20 modules and ~30
autograd nodes. The forward and its hand-written backward are straight-line code: one ``torch.mm``
per atom-wise linear layer, the native kernels for the attention and the element-wise passes, the
molecule table built in one pass from the batch vector, and everything after the PMA keys (the seed's
scores, the per-molecule softmax and weighted sums, the PMA's feed-forward, the decoders, the output
projection: ~60 small operator calls) in one native call each way, its matmuls through the BLAS
``sgemm_`` inside PyTorch's own library (:func:`abp_core.kernels.has_blas`; where it is not found,
those steps run as PyTorch ops, :func:`python_tail`). Same numbers as the module path (fp32
``allclose``; the module path in float64 to ~1e-6 relative, see ``tests/test_native_readout.py``).

Why: at small batches (the quickstart's 32 QM9 molecules, ~450 atoms) ABP's arithmetic is ~1.5 ms per
training step on one core, but the module path spent ~8 ms, most of it in the dispatch of ~1,300
operator calls and autograd bookkeeping (``benchmarks/epoch.py``'s profile, ``benchmarks/README.md``).

The math (``C`` channels, ``H`` heads of ``d = C / H``, molecule ``m``'s atoms ``i``)::

    X_0 = ReLU(X W_0^T + b_0)                                  input projection (optional)
    SAB:  Q|K|V = X W_in^T + b_in;  A = Attn(Q, K, V) within each molecule
          Hh = X + A W_o^T + b_o;   Y = Hh + ReLU(Hh W_l^T + b_l)
    Z = ReLU(X_E W_p^T + b_p)                                  PMA keys
    PMA:  q = W_q s + b_q;  U_h = d^{-1/2} q_h^T W_{k,h}      (the key projection folded into the query)
          a_{ih} = softmax_i(Z_i . U_h);  P_{mh} = sum_i a_{ih} Z_i
          att_{m,h} = W_{v,h} P_{mh} + b_{v,h};  then the MAB feed-forward with the seed s as residual
    decoder SABs over one key: att = h W_v^T + b_v (its softmax weight is exactly 1)
    out = ReLU(h W_out^T + b_out)                               output projection (optional)

``q|k|v`` is kept for the backward when the batch is small and recomputed when it is large (the
readout's ``recompute``; see :class:`~abp_core.readouts.AttentionPooling`). :func:`disabled` switches
this path off so that the module path runs (tests, benchmarks).

When ``q|k|v`` is kept (every batch below :data:`KEEP_QKV_BYTES`) and the BLAS is found, the whole readout is one
native call each way (:class:`_WholeReadout`; csrc's ``abp_readout_forward`` / ``abp_readout_backward``): the
same steps in the same order, every intermediate the backward needs in two workspaces the call allocates (floats
and ReLU masks), the parameter gradients as views of one buffer. That removes the ~40 PyTorch calls per step left
around the native kernels above, their dispatch and their allocations (``benchmarks/README.md``, third pass).
:func:`stepwise` keeps the per-layer node (tests; the recomputing layout always runs it).

In training with :class:`abp_core.train.FlatParameters` the readout's parameters are one slice of a flat tensor;
given that slice as a *parameter block* (:func:`use_parameter_block`), the node takes the block as its one
parameter input and returns one gradient in its layout (:class:`_WholeReadoutBlock`): the autograd engine then
accumulates one tensor instead of 31, and nothing is split into per-parameter views.
"""
from __future__ import annotations

import array
import contextlib
from typing import List, Optional

import torch
from torch import Tensor

from . import kernels

__all__ = ["parameters", "attention_pooling", "use_parameter_block", "sab_backward", "disabled", "python_tail",
           "stepwise", "KEEP_QKV_BYTES"]

_state = {"off": False, "native_tail": True, "whole": True}


@contextlib.contextmanager
def _switched(key: str, value: bool):
    previous, _state[key] = _state[key], value
    try:
        yield
    finally:
        _state[key] = previous


def disabled():
    """Inside this block :class:`~abp_core.readouts.AttentionPooling` runs its module path."""
    return _switched("off", True)


def parameters(readout, x: Tensor, path: str) -> Optional[List[Tensor]]:
    """The readout's parameters in the order :class:`_AttentionPooling` reads them if it runs here for features
    ``x`` (``path``: the set-attention path chosen for them), else ``None``."""
    if _state["off"] or path != "native" or readout.num_seeds != 1 or readout.num_induced_points is not None:
        return None
    if torch.compiler.is_compiling():
        return None
    # plain dictionary reads (nn.Module.__getattr__ and .parameters() cost ~1 us per name at this call rate)
    mods = readout._modules
    ps: List[Tensor] = []
    if mods.get("input_lin") is not None:
        ps += _linear(mods["input_lin"])
    pma = mods["pma"]
    for b in (*mods["encoders"]._modules.values(), pma, *mods["decoders"]._modules.values()):
        if b.norm1 is not None or (b.dropout > 0 and b.training):
            return None
        own, sub = b._parameters, b._modules
        ps += [own["in_proj_weight"], own["in_proj_bias"], *_linear(sub["out_proj"]), *_linear(sub["lin"])]
        if b is pma:
            ps += [*_linear(mods["pma_lin"]), readout._parameters["seeds"]]
    if mods.get("output_lin") is not None:
        ps += _linear(mods["output_lin"])
    for p in ps:  # (p.is_cpu: p.device builds a device object, ~1 us per tensor at this call rate)
        if p is None or p.dtype != torch.float32 or not p.is_cpu:
            return None
    return ps


def _linear(lin) -> List[Tensor]:
    return [lin._parameters["weight"], lin._parameters["bias"]]


# Bytes of one SAB's q|k|v above which it is recomputed in the backward instead of kept
# (recompute=None): 16 MiB is [21,845, 192] floats, far above the paper's QM9 batches.
KEEP_QKV_BYTES = 16 << 20


def attention_pooling(readout, x: Tensor, batch: Tensor, dim_size: int, params: List[Tensor]) -> Tensor:
    """``readout(x, batch)`` on this path (``batch`` sorted and checked, ``dim_size`` molecule slots, ``params``
    from :func:`parameters`)."""
    lib = kernels._lib()
    x = x.contiguous()
    if batch.device.type != "cpu":
        raise ValueError(f"the batch vector must be on the CPU with the features, got {batch.device}")
    starts, sizes, num_present = kernels.batch_table(batch.long(), dim_size)
    c, heads = readout.hidden_channels, readout.heads
    n = x.size(0)
    recompute = readout.recomputes(n)
    if _state["whole"] and not recompute and kernels.has_blas():
        plan = _WholePlan(lib, readout, starts, sizes)
        if torch.is_grad_enabled():
            block = _block_of(readout, params)
            if block is not None:
                return _WholeReadoutBlock.apply(x, plan, block, params)
            if x.requires_grad or any(p.requires_grad for p in params):
                return _WholeReadout.apply(x, plan, *params)
        return _whole_forward(plan, x, params)[0]
    present = None
    if num_present < dim_size:
        present = sizes > 0
        p_starts, p_sizes = starts[present].contiguous(), sizes[present].contiguous()
    else:
        p_starts, p_sizes = starts, sizes
    from .readouts import _table_groups  # the module path's grouping of rows for the q|k|v buffers

    groups = [(r0, r1, table) for r0, r1, _, table in _table_groups(p_starts, p_sizes, n)]
    plan = _Plan(lib, readout, heads, c, groups, starts, sizes, present, recompute)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _AttentionPooling.apply(x, plan, *params)
    return _forward(plan, x, params, None)


class _Plan:
    """What one call needs besides tensors: the library, shapes, molecule table and row groups."""

    def __init__(self, lib, readout, heads, c, groups, starts, sizes, present, recompute):
        self.lib, self.heads, self.c, self.groups = lib, heads, c, groups
        self.starts, self.sizes, self.present, self.recompute = starts, sizes, present, recompute
        self.has_input = readout.input_lin is not None
        self.has_output = readout.output_lin is not None
        self.num_encoders, self.num_decoders = len(readout.encoders), len(readout.decoders)
        self.threads = torch.get_num_threads()
        self.native_tail = _state["native_tail"] and kernels.has_blas()


def _relu_bias(plan: _Plan, z: Tensor, bias: Tensor, h: Optional[Tensor] = None) -> Tensor:
    """In place ``z <- h + relu(z + bias)`` (or ``relu(z + bias)``); returns the ReLU mask."""
    rows, cols = z.shape
    mask = torch.empty(rows, cols, dtype=torch.bool)
    plan.lib.abp_relu_residual(z.data_ptr(), bias.data_ptr(), None if h is None else h.data_ptr(), mask.data_ptr(),
                               rows, cols, plan.threads)
    return mask


def _relu_bias_backward(lib, threads: int, grad: Tensor, mask: Tensor):
    """``(grad * mask, its column sums, column sums of grad)``."""
    rows, cols = grad.shape
    out, sum_out, sum_grad = torch.empty_like(grad), grad.new_empty(cols), grad.new_empty(cols)
    lib.abp_relu_backward(grad.data_ptr(), mask.data_ptr(), out.data_ptr(), sum_out.data_ptr(),
                          sum_grad.data_ptr(), rows, cols, threads)
    return out, sum_out, sum_grad


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"native {what} failed (code {code})")


def _int64s(values) -> array.array:
    """C ``int64_t`` array of ``values`` (shapes, pointer tables) for a native call: pass ``_address(a)`` and keep
    ``a`` alive through the call. (An ``array`` is built in ~3 us for 31 pointers, a ctypes array in ~7.)"""
    return array.array("q", values)


def _address(a: array.array) -> int:
    return a.buffer_info()[0]


def _forward(plan: _Plan, x: Tensor, ps: List[Tensor], saved: Optional[dict]) -> Tensor:
    """The readout's forward; ``saved`` (a dict, or ``None`` when no backward follows) receives what the
    backward needs."""
    lib, c, heads, t = plan.lib, plan.c, plan.heads, plan.threads
    n, i = x.size(0), 0
    keep = saved is not None
    cur = x
    if plan.has_input:
        w, b = ps[0], ps[1]
        i = 2
        cur = torch.mm(x, w.t())
        mask = _relu_bias(plan, cur, b)
        if keep:
            saved["input"] = mask
    sabs = []
    for _ in range(plan.num_encoders):
        w_in, b_in, w_o, b_o, w_l, b_l = ps[i:i + 6]
        i += 6
        out = x.new_empty(n, c)
        lses, kept = [], []
        for r0, r1, (g_starts, g_sizes) in plan.groups:
            qkv = torch.mm(cur[r0:r1] if len(plan.groups) > 1 else cur, w_in.t())
            lse = x.new_empty(r1 - r0, heads)
            _check(lib.abp_set_attention_forward(qkv.data_ptr(), b_in.data_ptr(), out[r0:r1].data_ptr(),
                                                 lse.data_ptr(), g_starts.data_ptr(), g_sizes.data_ptr(),
                                                 g_starts.numel(), c, heads, t), "attention forward")
            lses.append(lse)
            if keep and not plan.recompute:
                kept.append(qkv)
        h = torch.mm(out, w_o.t())
        lib.abp_add_residual(h.data_ptr(), cur.data_ptr(), b_o.data_ptr(), n, c, t)
        y = torch.mm(h, w_l.t())
        mask = _relu_bias(plan, y, b_l, h)
        if keep:
            sabs.append((cur, out, h, mask, lses, kept))
        cur = y
    # PMA: keys, the seed's per-head scores, per-molecule softmax and weighted sums, the value projection
    w_in, b_in, w_o, b_o, w_l, b_l, w_p, b_p, seeds = ps[i:i + 9]
    i += 9
    d = c // heads
    m = plan.starts.numel()
    keys_input = cur
    z = torch.mm(cur, w_p.t())
    z_mask = _relu_bias(plan, z, b_p)
    if plan.native_tail:
        out, tail = _tail_forward(plan, z, ps, i - 9)
        if keep:
            saved.update(sabs=sabs, keys_input=keys_input, z=z, z_mask=z_mask, tail=tail)
        return out
    s = seeds.view(c)
    q = torch.addmv(b_in[:c], w_in[:c], s)
    u = torch.bmm(q.view(heads, 1, d), w_in[c:2 * c].view(heads, d, c)).view(heads, c).mul_(d ** -0.5)
    scores = torch.mm(z, u.t())
    a, pooled = x.new_empty(n, heads), x.new_empty(m, heads, c)
    _check(lib.abp_pma_pool_forward(scores.data_ptr(), z.data_ptr(), a.data_ptr(), pooled.data_ptr(),
                                    plan.starts.data_ptr(), plan.sizes.data_ptr(), m, heads, c, t), "PMA pooling")
    w_v = w_in[2 * c:].view(heads, d, c)
    att = torch.bmm(pooled.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1).reshape(m, c).add_(b_in[2 * c:])
    if plan.present is not None:  # an empty molecule sees no keys: zero attention, as in the module path
        att[~plan.present] = 0.0
    h1 = torch.addmm(b_o, att, w_o.t()).add_(s)
    z1 = torch.addmm(b_l, h1, w_l.t())
    m1 = z1 > 0
    cur = h1 + z1.relu_()
    decs = []
    for _ in range(plan.num_decoders):  # over one key: the attention output is the key's value
        w_in, b_in, w_o, b_o, w_l, b_l = ps[i:i + 6]
        i += 6
        v = torch.addmm(b_in[2 * c:], cur, w_in[2 * c:].t())
        hh = torch.addmm(b_o, v, w_o.t()).add_(cur)
        zz = torch.addmm(b_l, hh, w_l.t())
        mz = zz > 0
        if keep:
            decs.append((cur, v, hh, mz))
        cur = hh + zz.relu_()
    if plan.has_output:
        w, b = ps[i], ps[i + 1]
        dec_out = cur
        cur = torch.addmm(b, cur, w.t())
        out_mask = cur > 0
        cur.relu_()
    if keep:
        saved.update(sabs=sabs, keys_input=keys_input, z=z, z_mask=z_mask, q=q, u=u, a=a, pooled=pooled, att=att,
                     h1=h1, m1=m1, decs=decs)
        if plan.has_output:
            saved.update(dec_out=dec_out, out_mask=out_mask)
    return cur


class _AttentionPooling(torch.autograd.Function):
    """One autograd node for the whole readout (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *ps: Tensor) -> Tensor:
        saved: dict = {}
        out = _forward(plan, x, list(ps), saved)
        if "tail" in saved:  # the native tail's backward reads the output (through its pointer table)
            del saved["tail"]["out"]
        ctx.plan, ctx.saved = plan, saved
        ctx.save_for_backward(x, out, *ps)  # the output as a saved tensor: as an attribute it would form a cycle
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, _, *ps = ctx.saved_tensors  # the output: kept alive and checked for in-place changes
        grads = _backward(ctx.plan, ctx.saved, x, ps, grad.contiguous(), ctx.needs_input_grad[0])
        ctx.saved = None
        return (grads[0], None, *grads[1:])


def sab_backward(gy: Tensor, saved_sab, w_in, b_in, w_o, w_l, groups, heads: int) -> tuple:
    """One SAB's backward on the native kernels (this node's encoders and
    :class:`abp_core.readouts._FusedSelfAttentionBlock`): ``(dL/dx, gw_in, gb_in, gw_o, gb_o, gw_l, gb_l)`` from
    ``gy`` (contiguous), the forward's ``(x, out, h, mask, lses, kept)`` (one log-sum-exp tensor per group;
    ``kept``: the groups' bias-free ``q|k|v``, or empty to recompute them) and ``groups`` ``[(first_row, end_row,
    molecule table)]``."""
    lib, c, t = kernels._lib(), w_o.size(1), torch.get_num_threads()
    x, out, h, mask, lses, kept = saved_sab
    gz, gb_l, sum_gy = _relu_bias_backward(lib, t, gy, mask)
    gb_o = torch.addmv(sum_gy, w_l.t(), gb_l)  # column sums of gh = gy + gz W_l
    gw_l = gz.t().mm(h)
    gh = torch.addmm(gy, gz, w_l)  # dL/dh; becomes dL/dx below
    gw_o = gh.t().mm(out)
    go = torch.mm(gh, w_o, out=gz)
    single = len(groups) == 1
    gw_in = None if single else torch.zeros_like(w_in)
    gb_in = None
    for g, (r0, r1, (g_starts, g_sizes)) in enumerate(groups):
        xg = x if single else x[r0:r1]
        # kept, or recomputed (bias-free, as in the forward) and overwritten by its own gradient
        qkv = kept[g] if kept else torch.mm(xg, w_in.t())
        grad = torch.empty_like(qkv) if kept else qkv
        sums = qkv.new_empty(3 * c)
        _check(lib.abp_set_attention_backward(qkv.data_ptr(), b_in.data_ptr(), out[r0:r1].data_ptr(),
                                              lses[g].data_ptr(), go[r0:r1].data_ptr(), grad.data_ptr(),
                                              sums.data_ptr(), g_starts.data_ptr(), g_sizes.data_ptr(),
                                              g_starts.numel(), c, heads, t), "attention backward")
        if single:
            gw_in, gb_in = grad.t().mm(xg), sums
            gh.addmm_(grad, w_in)
        else:
            gw_in.addmm_(grad.t(), xg)
            gb_in = sums if gb_in is None else gb_in.add_(sums)
            gh[r0:r1].addmm_(grad, w_in)
    return gh, gw_in, gb_in, gw_o, gb_o, gw_l, gb_l


def _backward(plan: _Plan, saved: dict, x: Tensor, ps: List[Tensor], g: Tensor, need_x: bool) -> list:
    """Gradients ``[dL/dx, *dL/dparameters]`` (parameters in :func:`parameters`' order)."""
    c, heads = plan.c, plan.heads
    d = c // heads
    grads: List[Optional[Tensor]] = [None] * len(ps)
    if plan.native_tail:
        i = (2 if plan.has_input else 0) + 6 * plan.num_encoders  # the PMA's parameters
        gz = _tail_backward(plan, saved["tail"], g, ps, grads, i)
        return _keys_and_encoders_backward(plan, saved, x, ps, gz, grads, i, need_x)
    end = len(ps)
    if plan.has_output:
        w = ps[end - 2]
        gpre = g * saved["out_mask"]
        grads[end - 2], grads[end - 1] = gpre.t().mm(saved["dec_out"]), gpre.sum(0)
        g = gpre.mm(w)
        end -= 2
    for k in reversed(range(plan.num_decoders)):
        i = end - 6 * (plan.num_decoders - k)
        w_in, _, w_o, _, w_l, _ = ps[i:i + 6]
        hin, v, hh, mz = saved["decs"][k]
        gz = g * mz
        gw_l, gb_l = gz.t().mm(hh), gz.sum(0)
        ghh = torch.addmm(g, gz, w_l)
        gw_o, gb_o = ghh.t().mm(v), ghh.sum(0)
        gv = ghh.mm(w_o)
        gw_in, gb_in = torch.zeros_like(w_in), torch.zeros_like(ps[i + 1])  # q and k are not used: exactly 0
        gw_in[2 * c:] = gv.t().mm(hin)
        gb_in[2 * c:] = gv.sum(0)
        g = torch.addmm(ghh, gv, w_in[2 * c:])
        grads[i:i + 6] = [gw_in, gb_in, gw_o, gb_o, gw_l, gb_l]
    end -= 6 * plan.num_decoders
    # PMA
    i = end - 9
    w_in, b_in, w_o, _, w_l, _, _, _, seeds = ps[i:i + 9]
    s = seeds.view(c)
    gz1 = g * saved["m1"]
    gw_l, gb_l = gz1.t().mm(saved["h1"]), gz1.sum(0)
    gh1 = torch.addmm(g, gz1, w_l)
    gw_o, gb_o = gh1.t().mm(saved["att"]), gh1.sum(0)
    g_seed = gb_o.clone()  # the seed is the feed-forward's residual
    g_att = gh1.mm(w_o)
    if plan.present is not None:
        g_att[~plan.present] = 0.0
    gb_v = g_att.sum(0)
    g_att_h = g_att.view(-1, heads, d).transpose(0, 1)  # [H, M, d]
    pooled = saved["pooled"]
    gw_v = torch.bmm(g_att_h.transpose(1, 2), pooled.transpose(0, 1))  # [H, d, C]
    g_pooled = torch.bmm(g_att_h, w_in[2 * c:].view(heads, d, c)).transpose(0, 1).contiguous()  # [M, H, C]
    z, a = saved["z"], saved["a"]
    n, m = z.size(0), plan.starts.numel()
    gz, gs = torch.empty_like(z), z.new_empty(n, heads)
    _check(plan.lib.abp_pma_pool_backward(g_pooled.data_ptr(), z.data_ptr(), a.data_ptr(), gz.data_ptr(), gs.data_ptr(),
                                          plan.starts.data_ptr(), plan.sizes.data_ptr(), m, heads, c, plan.threads),
           "PMA pooling backward")
    gu = gs.t().mm(z).mul_(d ** -0.5)  # [H, C], the scale folded in
    gz.addmm_(gs, saved["u"])
    q = saved["q"]
    gq = torch.bmm(w_in[c:2 * c].view(heads, d, c), gu.view(heads, c, 1)).view(c)
    gw_k = (q.view(heads, d, 1) * gu.view(heads, 1, c)).view(c, c)
    g_seed.addmv_(w_in[:c].t(), gq)
    gw_in = torch.cat([torch.outer(gq, s), gw_k, gw_v.reshape(c, c)])
    gb_in = torch.cat([gq, torch.zeros_like(gq), gb_v])  # the key bias cancels in the softmax: exactly 0
    grads[i:i + 6] = [gw_in, gb_in, gw_o, gb_o, gw_l, gb_l]
    grads[i + 8] = g_seed.view_as(seeds)
    return _keys_and_encoders_backward(plan, saved, x, ps, gz, grads, i, need_x)


def _keys_and_encoders_backward(plan: _Plan, saved: dict, x: Tensor, ps: List[Tensor], gz: Tensor, grads: list,
                                i: int, need_x: bool) -> list:
    """From dL/d(PMA keys) ``gz``: the key projection's, the encoder SABs' and the input projection's gradients
    (``i``: index of the PMA's parameters)."""
    w_p = ps[i + 6]
    gzp, gb_p, _ = _relu_bias_backward(plan.lib, plan.threads, gz, saved["z_mask"])
    grads[i + 6], grads[i + 7] = gzp.t().mm(saved["keys_input"]), gb_p
    g = gzp.mm(w_p)
    # encoder SABs
    for k in reversed(range(plan.num_encoders)):
        i = (2 if plan.has_input else 0) + 6 * k
        w_in, b_in, w_o, _, w_l, _ = ps[i:i + 6]
        g, *pg = sab_backward(g, saved["sabs"][k], w_in, b_in, w_o, w_l, plan.groups, plan.heads)
        grads[i:i + 6] = pg
    gx = None
    if plan.has_input:
        gpre, gb0, _ = _relu_bias_backward(plan.lib, plan.threads, g, saved["input"])
        grads[0], grads[1] = gpre.t().mm(x), gb0
        gx = gpre.mm(ps[0]) if need_x else None
    elif need_x:
        gx = g
    return [gx, *grads]


# Slots of the native tail's pointer table (csrc/set_attention.cpp, enum Slot)
(_Z, _STARTS, _SIZES, _W_IN, _B_IN, _W_O, _B_O, _W_L, _B_L, _SEED, _W_OUT, _B_OUT, _Q, _U, _A, _POOLED, _ATT, _H1, _Z1,
 _HS, _V, _HH, _ZZ, _OUT, _GRAD_OUT, _GZ, _GW_IN, _GB_IN, _GW_O, _GB_O, _GW_L, _GB_L, _G_SEED, _GW_OUT, _GB_OUT,
 _DECODERS) = range(36)


def python_tail():
    """Inside this block the steps after the PMA keys run as PyTorch ops instead of the one native call (tests)."""
    return _switched("native_tail", False)


def _tail_forward(plan: _Plan, z: Tensor, ps: List[Tensor], i: int):
    """Everything after the PMA keys ``z`` in one native call: ``(output, saved tensors)``; ``i`` indexes the
    PMA's parameters in ``ps``."""
    c, heads, n, m, dec = plan.c, plan.heads, z.size(0), plan.starts.numel(), plan.num_decoders
    out_ch = ps[-2].size(0) if plan.has_output else 0
    new = z.new_empty
    t = {"q": new(c), "u": new(heads, c), "a": new(n, heads), "pooled": new(m, heads, c), "att": new(m, c),
         "h1": new(m, c), "z1": new(m, c), "hs": new(dec + 1, m, c), "v": new(max(dec, 1), m, c),
         "hh": new(max(dec, 1), m, c), "zz": new(max(dec, 1), m, c), "out": new(m, out_ch or c)}
    ptrs = [0] * (_DECODERS + 12 * dec)
    ptrs[_Z], ptrs[_STARTS], ptrs[_SIZES] = z.data_ptr(), plan.starts.data_ptr(), plan.sizes.data_ptr()
    for k, slot in enumerate((_W_IN, _B_IN, _W_O, _B_O, _W_L, _B_L)):
        ptrs[slot] = ps[i + k].data_ptr()
    ptrs[_SEED] = ps[i + 8].data_ptr()
    if plan.has_output:
        ptrs[_W_OUT], ptrs[_B_OUT] = ps[-2].data_ptr(), ps[-1].data_ptr()
    for name, slot in (("q", _Q), ("u", _U), ("a", _A), ("pooled", _POOLED), ("att", _ATT), ("h1", _H1),
                       ("z1", _Z1), ("hs", _HS), ("v", _V), ("hh", _HH), ("zz", _ZZ), ("out", _OUT)):
        ptrs[slot] = t[name].data_ptr()
    for k in range(dec):
        for j in range(6):
            ptrs[_DECODERS + 6 * k + j] = ps[i + 9 + 6 * k + j].data_ptr()
    dims, table = _int64s((n, m, c, heads, dec, out_ch, plan.threads)), _int64s(ptrs)
    _check(plan.lib.abp_pma_tail_forward(_address(dims), _address(table)), "PMA tail forward")
    t["ptrs"], t["out_ch"] = ptrs, out_ch
    return t["out"], t


def _tail_backward(plan: _Plan, t: dict, grad: Tensor, ps: List[Tensor], grads: list, i: int) -> Tensor:
    """Backward of :func:`_tail_forward`: fills the PMA's, decoders' and output projection's entries of ``grads``;
    returns dL/dz."""
    ptrs, dec = list(t["ptrs"]), plan.num_decoders
    gz = t["a"].new_empty(t["a"].size(0), plan.c)
    ptrs[_GRAD_OUT], ptrs[_GZ] = grad.data_ptr(), gz.data_ptr()
    pma = [torch.empty_like(ps[i + k]) for k in range(6)] + [torch.empty_like(ps[i + 8])]
    for k, slot in enumerate((_GW_IN, _GB_IN, _GW_O, _GB_O, _GW_L, _GB_L, _G_SEED)):
        ptrs[slot] = pma[k].data_ptr()
    grads[i:i + 6], grads[i + 8] = pma[:6], pma[6]
    if plan.has_output:
        gw, gb = torch.empty_like(ps[-2]), torch.empty_like(ps[-1])
        ptrs[_GW_OUT], ptrs[_GB_OUT] = gw.data_ptr(), gb.data_ptr()
        grads[-2], grads[-1] = gw, gb
    for k in range(dec):
        for j in range(6):
            g = torch.empty_like(ps[i + 9 + 6 * k + j])
            ptrs[_DECODERS + 6 * dec + 6 * k + j] = g.data_ptr()
            grads[i + 9 + 6 * k + j] = g
    dims = _int64s((gz.size(0), plan.starts.numel(), plan.c, plan.heads, dec, t["out_ch"], plan.threads))
    table = _int64s(ptrs)
    _check(plan.lib.abp_pma_tail_backward(_address(dims), _address(table)), "PMA tail backward")
    return gz


# ---- the whole readout in one native call each way (q|k|v kept: the usual case below KEEP_QKV_BYTES) ----

def stepwise():
    """Inside this block the readout runs step by step (one PyTorch or native call per layer, the tail in one
    call) instead of in one native call each way (tests, benchmarks)."""
    return _switched("whole", False)


class _WholePlan:
    """Shapes and the molecule table of one whole-readout call."""

    def __init__(self, lib, readout, starts, sizes):
        mods = readout._modules
        self.lib, self.starts, self.sizes = lib, starts, sizes
        self.c, self.heads = readout.hidden_channels, readout.heads
        self.in_ch = mods["input_lin"].in_features if mods.get("input_lin") is not None else 0
        self.out_ch = mods["output_lin"].out_features if mods.get("output_lin") is not None else 0
        self.num_encoders, self.num_decoders = len(mods["encoders"]), len(mods["decoders"])
        self.threads = torch.get_num_threads()


def _whole_forward(plan: _WholePlan, x: Tensor, ps: List[Tensor]):
    """``(output, state for the backward)``: csrc's ``abp_readout_forward``, every intermediate in two
    workspaces (floats, ReLU masks) laid out by the library. The state holds the parameter pointer table too."""
    lib, m = plan.lib, plan.starts.numel()
    if x.size(1) != (plan.in_ch or plan.c):
        raise ValueError(f"expected features with {plan.in_ch or plan.c} channels, got {tuple(x.shape)}")
    dims = _int64s((x.size(0), m, plan.c, plan.heads, plan.num_encoders, plan.num_decoders, plan.out_ch,
                    plan.in_ch, plan.threads))
    size = _int64s((0, 0))
    lib.abp_readout_workspace(_address(dims), _address(size))
    ws, wb = x.new_empty(size[0]), torch.empty(size[1], dtype=torch.uint8)
    out = x.new_empty(m, plan.out_ch or plan.c)
    table = _int64s([p.data_ptr() for p in ps])
    _check(lib.abp_readout_forward(_address(dims), _address(table), x.data_ptr(), plan.starts.data_ptr(),
                                   plan.sizes.data_ptr(), ws.data_ptr(), wb.data_ptr(), out.data_ptr()),
           "readout forward")
    return out, (dims, ws, wb, table)


def _whole_backward(plan: _WholePlan, state, x: Tensor, out: Tensor, grad: Tensor, gtable: array.array,
                    need_gx: bool) -> Optional[Tensor]:
    """csrc's ``abp_readout_backward``: the parameter gradients at ``gtable``'s addresses (:func:`_int64s`, in
    the parameters' order); returns dL/dx."""
    dims, ws, wb, table = state
    grad = grad.contiguous()
    gx = torch.empty_like(x) if need_gx else None
    _check(plan.lib.abp_readout_backward(_address(dims), _address(table), _address(gtable), x.data_ptr(),
                                         plan.starts.data_ptr(), plan.sizes.data_ptr(), ws.data_ptr(), wb.data_ptr(),
                                         out.data_ptr(), grad.data_ptr(), None if gx is None else gx.data_ptr()),
           "readout backward")
    return gx


class _WholeReadout(torch.autograd.Function):
    """One autograd node, one native call each way, for the whole readout."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _WholePlan, *ps: Tensor) -> Tensor:
        out, state = _whole_forward(plan, x, list(ps))
        ctx.plan, ctx.state = plan, state
        ctx.save_for_backward(x, out, *ps)  # the output as a saved tensor: as an attribute it would form a cycle
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, out, *ps = ctx.saved_tensors
        # all parameter gradients in one allocation, each a contiguous view with its parameter's shape
        numels = [p.numel() for p in ps]
        grads = [g.view(p.shape) for g, p in zip(x.new_empty(sum(numels)).split(numels), ps)]
        gtable = _int64s([g.data_ptr() for g in grads])
        gx = _whole_backward(ctx.plan, ctx.state, x, out, grad, gtable, ctx.needs_input_grad[0])
        ctx.state = None
        return (gx, None, *grads)


class _WholeReadoutBlock(torch.autograd.Function):
    """:class:`_WholeReadout` with the parameters as one autograd input, their parameter block (see
    :func:`use_parameter_block`): one gradient tensor in the block's layout instead of 31, so the autograd
    engine runs one gradient accumulation instead of 31 and nothing is split into views."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _WholePlan, block: Tensor, ps: List[Tensor]) -> Tensor:
        out, state = _whole_forward(plan, x, ps)
        ctx.plan, ctx.state = plan, state
        ctx.save_for_backward(x, out, block)  # the block: autograd checks it is not modified before the backward
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, out, block = ctx.saved_tensors
        gblock = torch.empty_like(block)
        shift = gblock.data_ptr() - block.data_ptr()  # each gradient at its parameter's offset in the block
        gtable = _int64s([ptr + shift for ptr in ctx.state[3]])  # the forward's parameter pointers
        gx = _whole_backward(ctx.plan, ctx.state, x, out, grad, gtable, ctx.needs_input_grad[0])
        ctx.state = None
        return gx, None, gblock, None


def use_parameter_block(readout, block: Optional[Tensor]) -> bool:
    """Let ``readout``'s training steps on this path take the gradient of all its parameters as one tensor.

    ``block`` is a leaf tensor that requires grad and whose memory holds exactly the readout's parameters (e.g.
    :class:`abp_core.train.FlatParameters`' views of one flat tensor: the readout's slice of it). While it is set,
    a forward with gradients here gives ``block`` a ``.grad`` in its own layout (each parameter's gradient at its
    parameter's offset) and leaves the parameters' own ``.grad`` alone; whoever set it collects the gradient
    (:meth:`abp_core.train.FlatParameters.gather_grads`). Why: the autograd engine has a fixed cost per input
    tensor and gradient accumulation; at the quickstart's configuration ABP's backward (with the head's) fell from
    +3.51 to +2.60 ms per step over sum's (``benchmarks/README.md``, sixth pass). If a
    parameter's storage later moves out of the block (``module.to(...)``), the path falls back to per-parameter
    gradients. ``None`` switches it off. Returns whether the block was accepted (``False``: it does not hold the
    parameters, or it is not a float32 CPU leaf)."""
    if block is None:
        readout.__dict__.pop("_parameter_block", None)
        return True
    ps = list(readout.parameters())
    if (not ps or not block.is_leaf or not block.requires_grad or block.dtype != torch.float32
            or block.device.type != "cpu" or not block.is_contiguous()
            or block.numel() != sum(p.numel() for p in ps)):
        return False
    if any(p.dtype != torch.float32 or not p.is_contiguous() or not p.requires_grad for p in ps):
        return False
    # the parameters must tile the block exactly: sorted by address, each starts where the previous one ended
    end = block.data_ptr()
    for p in sorted(ps, key=lambda t: t.data_ptr()):
        if p.data_ptr() != end:
            return False
        end += p.numel() * 4
    # a plain attribute (not a buffer, not in the state dict), with the number of tensors it holds
    readout.__dict__["_parameter_block"] = (block, len(ps))
    return True


def _block_of(readout, ps: List[Tensor]) -> Optional[Tensor]:
    """The readout's parameter block if ``ps`` are all the tensors it holds (so the backward writes every element
    of its gradient) and each still lies in it, else ``None``."""
    entry = readout.__dict__.get("_parameter_block")
    if entry is None or len(ps) != entry[1]:
        return None
    block = entry[0]
    lo = block.data_ptr()
    hi = lo + block.numel() * 4
    for p in ps:
        if not lo <= p.data_ptr() < hi:
            return None
    return block

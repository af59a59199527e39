"""abp_core.native_readout: ABP's whole readout as one autograd node (CPU, float32, native kernels).

Every check compares it with the module path (:func:`abp_core.native_readout.disabled`), which the
other readout tests pin to PyG and to per-molecule float64 references."""
import contextlib

import pytest
import torch

from abp_core import kernels, native_readout
from abp_core.readouts import AttentionPooling, forced_set_attention_path

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


def _batch(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def _run(readout, x, batch, dim_size, gout):
    x = x.detach().requires_grad_()
    out = readout(x, batch, dim_size=dim_size)
    grads = torch.autograd.grad(out, [x, *readout.parameters()], gout, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip([x, *readout.parameters()], grads)]
    return out, grads, out.grad_fn


OURS = ("_WholeReadoutBackward", "_AttentionPoolingBackward")  # one native call each way; step by step


def _compare(readout, sizes, dim_size=None, channels=64, seed=0, atol=2e-6, node=None):
    """Outputs and all gradients against the module path; ``node``: the expected autograd node (default: either
    of this module's)."""
    torch.manual_seed(seed)
    batch = _batch(sizes)
    dim_size = dim_size or len(sizes)
    x = torch.randn(batch.numel(), channels)
    gout = torch.randn(dim_size, readout.out_channels)
    out, grads, fn = _run(readout, x, batch, dim_size, gout)
    with native_readout.disabled():
        ref, ref_grads, ref_fn = _run(readout, x, batch, dim_size, gout)
    assert type(fn).__name__ in ((node,) if node else OURS)
    assert type(ref_fn).__name__ not in OURS
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    names = ["x"] + [n for n, _ in readout.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        scale = max(float(r.abs().max()), 1e-3)
        assert float((g - r).abs().max()) <= 2e-5 * scale, name
    return out, grads


@pytest.mark.parametrize("kwargs", [
    dict(heads=4),
    dict(heads=4, recompute=True),
    dict(heads=4, recompute=False),
    dict(heads=2, num_encoder_blocks=1, num_decoder_blocks=2),
    dict(heads=1, num_encoder_blocks=3, num_decoder_blocks=0),
    dict(heads=4, input_projection=False, output_projection=False),
    dict(heads=4, out_channels=32, num_encoder_blocks=0),
    dict(heads=4, concat=True),
])
@pytest.mark.parametrize("path", ["whole", "native tail", "python tail"])
def test_equals_module_path(kwargs, path):
    if path != "python tail" and not kernels.has_blas():
        pytest.skip("PyTorch's sgemm_ not found")
    torch.manual_seed(1)
    readout = AttentionPooling(64, **kwargs)
    with contextlib.ExitStack() as stack:
        if path != "whole":
            stack.enter_context(native_readout.stepwise())
        if path == "python tail":
            stack.enter_context(native_readout.python_tail())
        whole = path == "whole" and not readout.recomputes(100)
        node = "_WholeReadoutBackward" if whole else "_AttentionPoolingBackward"
        _compare(readout, [5, 1, 17, 9, 3, 12, 30, 2], node=node)
        _compare(readout, [1, 0, 4, 0, 1, 7], dim_size=8, node=node)


def test_empty_molecule_slots_and_single_atoms():
    torch.manual_seed(2)
    readout = AttentionPooling(64, heads=4)
    out, _ = _compare(readout, [1, 0, 4, 0, 1, 7], dim_size=8)  # two empty slots inside, two at the end
    # an empty slot sees no atoms: its output depends on the parameters only, the same for every empty slot
    torch.testing.assert_close(out[1], out[3])
    torch.testing.assert_close(out[6], out[7])


def test_all_molecules_the_same_size_and_one_molecule():
    torch.manual_seed(3)
    readout = AttentionPooling(32, heads=2)
    _compare(readout, [6] * 10, channels=32)
    _compare(readout, [11], channels=32)


def test_which_native_calls_run(monkeypatch):
    # q|k|v kept and PyTorch's sgemm_ found: one native call each way; step by step, the tail is one call
    readout = AttentionPooling(64, heads=4)
    x, batch = torch.randn(8, 64, requires_grad=True), _batch([3, 5])
    calls = []
    lib = kernels._lib()
    for name in ("abp_readout_forward", "abp_readout_backward", "abp_pma_tail_forward"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    readout(x, batch).sum().backward()
    assert calls == (["abp_readout_forward", "abp_readout_backward"] if kernels.has_blas() else [])
    calls.clear()
    with native_readout.stepwise():
        readout(x, batch)
    assert calls == (["abp_pma_tail_forward"] if kernels.has_blas() else [])
    calls.clear()
    with native_readout.stepwise(), native_readout.python_tail():
        readout(x, batch)
    assert not calls
    calls.clear()
    readout.recompute = True  # recomputing q|k|v in the backward runs step by step
    readout(x, batch)
    assert calls == (["abp_pma_tail_forward"] if kernels.has_blas() else [])


@pytest.mark.parametrize("path", ["whole", "stepwise"])
def test_no_reference_cycle_and_the_output_is_guarded(path):
    import gc
    import weakref

    readout = AttentionPooling(64, heads=4)
    x, batch = torch.randn(8, 64, requires_grad=True), _batch([3, 5])
    with native_readout.stepwise() if path == "stepwise" else contextlib.nullcontext():
        out = readout(x, batch)
        assert type(out.grad_fn).__name__ in OURS
        ref = weakref.ref(out)
        gc.disable()
        try:
            del out  # no backward: without a cycle, the graph and its workspaces go with the output
            assert ref() is None
        finally:
            gc.enable()
        out = readout(x, batch)
        out.add_(1.0)  # the backward needs the output as computed
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_whole_readout_checks_the_feature_width():
    readout = AttentionPooling(64, heads=4, input_projection=False)
    with pytest.raises(ValueError, match="feature width"):
        readout(torch.randn(8, 32), _batch([3, 5]))


def test_several_row_groups():
    # > 4,096 atoms: q|k|v is computed group by group (as the module path does), kept or recomputed
    torch.manual_seed(4)
    sizes = torch.randint(1, 40, (500,)).tolist()
    assert sum(sizes) > 2 * 4096
    for recompute in (True, False):
        _compare(AttentionPooling(32, heads=2, recompute=recompute), sizes, channels=32, atol=5e-6)


def test_close_to_float64_module_path():
    torch.manual_seed(5)
    readout = AttentionPooling(64, heads=4)
    sizes = [3, 18, 9, 1, 25]
    batch = _batch(sizes)
    x = torch.randn(batch.numel(), 64)
    out = readout(x, batch)
    ref = readout.double()(x.double(), batch)  # float64: the module path (the native kernels are float32)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


def test_molecules_do_not_depend_on_batch_mates():
    torch.manual_seed(6)
    readout = AttentionPooling(64, heads=4)
    sizes = [4, 9, 13]
    batch = _batch(sizes)
    x = torch.randn(batch.numel(), 64)
    together = readout(x, batch)
    for m, (start, n) in enumerate(zip([0, 4, 13], sizes)):
        alone = readout(x[start:start + n], torch.zeros(n, dtype=torch.long))
        torch.testing.assert_close(alone[0], together[m], atol=2e-6, rtol=1e-5)


def test_permutation_of_atoms_within_a_molecule():
    torch.manual_seed(7)
    readout = AttentionPooling(64, heads=4)
    x = torch.randn(12, 64)
    batch = torch.zeros(12, dtype=torch.long)
    perm = torch.randperm(12)
    torch.testing.assert_close(readout(x[perm], batch), readout(x, batch), atol=2e-6, rtol=1e-5)


def test_no_grad_forward_equals_forward_with_grad():
    torch.manual_seed(8)
    readout = AttentionPooling(64, heads=4)
    batch = _batch([3, 8, 5])
    x = torch.randn(batch.numel(), 64)
    with torch.no_grad():
        a = readout(x, batch)
    b = readout(x.requires_grad_(), batch)
    assert b.grad_fn is not None
    torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)


def test_training_steps_update_like_the_module_path():
    # SGD steps on the same batch give the same parameters either way (plain SGD: Adam would blow the
    # round-off of gradients that are exactly zero in exact arithmetic, like the key bias's, up to +-lr)
    torch.manual_seed(9)
    first = AttentionPooling(64, heads=4)
    second = AttentionPooling(64, heads=4)
    second.load_state_dict(first.state_dict())
    batch = _batch([5, 7, 2, 9])
    x, y = torch.randn(batch.numel(), 64), torch.randn(4, 64)
    for readout, native in ((first, True), (second, False)):
        opt = torch.optim.SGD(readout.parameters(), lr=0.1)
        ctx = native_readout.disabled() if not native else torch.enable_grad()
        with ctx:
            for _ in range(3):
                opt.zero_grad()
                torch.nn.functional.l1_loss(readout(x, batch), y).backward()
                opt.step()
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("make", [
    lambda: AttentionPooling(64, heads=4, layer_norm=True),
    lambda: AttentionPooling(64, heads=4, num_seeds=3),
    lambda: AttentionPooling(64, heads=4, num_induced_points=4),
    lambda: AttentionPooling(64, heads=4, dropout=0.1).train(),
    lambda: AttentionPooling(64, heads=4).double(),
    lambda: AttentionPooling(64, heads=3, hidden_channels=24),  # head dimension 8: no native kernel
])
def test_other_layouts_run_the_module_path(make):
    readout = make()
    dtype = next(readout.parameters()).dtype
    batch = _batch([3, 5])
    out = readout(torch.randn(8, 64, dtype=dtype, requires_grad=True), batch)
    assert type(out.grad_fn).__name__ not in OURS


def test_forced_paths_and_disabled_kernels_run_the_module_path():
    readout = AttentionPooling(64, heads=4)
    x, batch = torch.randn(8, 64, requires_grad=True), _batch([3, 5])
    assert type(readout(x, batch).grad_fn).__name__ in OURS
    for path in ("padded", "blocks"):
        with forced_set_attention_path(path):
            assert type(readout(x, batch).grad_fn).__name__ not in OURS
    with kernels.disabled():
        assert type(readout(x, batch).grad_fn).__name__ not in OURS


def test_recompute_default_depends_on_the_batch_size():
    readout = AttentionPooling(64, heads=4)
    assert readout.recompute is None
    assert not readout.recomputes(500)  # the quickstart's batches keep q|k|v
    big = native_readout.KEEP_QKV_BYTES // (3 * 64 * 4) + 1
    assert readout.recomputes(big)
    assert AttentionPooling(64, heads=4, recompute=True).recomputes(10)
    assert not AttentionPooling(64, heads=4, recompute=False).recomputes(10 ** 7)


def test_bad_batch_vectors_raise():
    readout = AttentionPooling(64, heads=4)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="sorted"):
        readout(x, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="sorted"):
        kernels.batch_table(torch.tensor([0, 1, 0]), 2)
    with pytest.raises(ValueError, match="outside"):
        kernels.batch_table(torch.tensor([0, 0, 3]), 2)
    starts, sizes, present = kernels.batch_table(torch.tensor([0, 0, 2, 2, 2, 4]), 6)
    assert starts.tolist() == [0, 2, 2, 5, 5, 6] and sizes.tolist() == [2, 0, 3, 0, 1, 0] and present == 3


def test_pma_pool_kernels_against_torch():
    torch.manual_seed(10)
    sizes = torch.tensor([3, 0, 1, 7])
    starts = torch.cumsum(sizes, 0) - sizes
    n, heads, c = int(sizes.sum()), 4, 32
    scores = torch.randn(n, heads, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    refs_a, refs_p = [], []
    for s0, k in zip(starts.tolist(), sizes.tolist()):
        w = scores[s0:s0 + k].softmax(0)  # [k, H]
        refs_a.append(w)
        refs_p.append(w.t() @ z[s0:s0 + k] if k else torch.zeros(heads, c, dtype=torch.float64))
    ref_a, ref_p = torch.cat(refs_a), torch.stack(refs_p)
    a, pooled = kernels.pma_pool_forward(scores.detach().float(), z.detach().float(), starts, sizes)
    torch.testing.assert_close(a.double(), ref_a.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled.double(), ref_p.detach(), atol=1e-5, rtol=1e-5)
    gp = torch.randn(4, heads, c, dtype=torch.float64)
    g_scores, g_z = torch.autograd.grad(ref_p, [scores, z], gp)
    gz, gs = kernels.pma_pool_backward(gp.float(), z.detach().float(), a, starts, sizes)
    torch.testing.assert_close(gz.double(), g_z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs.double(), g_scores, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        kernels.pma_pool_forward(scores.detach().float(), z.detach().float(), starts + 1, sizes)


def _blocked(readout):
    """The readout's parameters made views of one leaf tensor, as abp_core.train.FlatParameters lays them out."""
    ps = list(readout.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in ps])
    for p, view in zip(ps, flat.split([p.numel() for p in ps])):
        p.data = view.view_as(p)
    return flat.requires_grad_()


@pytest.mark.skipif(not kernels.has_blas(), reason="the whole-readout call needs PyTorch's sgemm_")
def test_a_parameter_block_receives_every_parameter_gradient_in_its_layout():
    import copy

    torch.manual_seed(0)
    readout = AttentionPooling(64, heads=4)
    reference = copy.deepcopy(readout)
    batch = _batch([3, 7, 1, 12])
    x, gout = torch.randn(batch.numel(), 64), torch.randn(4, 64)
    ref, ref_grads, _ = _run(reference, x, batch, 4, gout)
    block = _blocked(readout)
    assert readout.use_parameter_block(block)
    xg = x.clone().requires_grad_()
    out = readout(xg, batch, dim_size=4)
    assert type(out.grad_fn).__name__ == "_WholeReadoutBlockBackward"
    out.backward(gout)
    # the same native call with the same inputs: bitwise the same numbers, only where the gradients go differs
    assert torch.equal(out, ref) and torch.equal(xg.grad, ref_grads[0])
    assert all(p.grad is None for p in readout.parameters())
    base = block.data_ptr()
    for (name, p), g in zip(readout.named_parameters(), ref_grads[1:]):
        at = (p.data_ptr() - base) // 4
        assert torch.equal(block.grad[at:at + p.numel()].view_as(p), g), name
    # a parameter whose storage moved out of the block: per-parameter gradients again, nothing lost
    ps = list(readout.parameters())
    ps[5].data = ps[5].data.clone()
    block.grad = None
    out = readout(xg, batch, dim_size=4)
    assert type(out.grad_fn).__name__ == "_WholeReadoutBackward"
    out.backward(gout)
    assert block.grad is None and all(p.grad is not None for p in ps)
    assert readout.use_parameter_block(None) and "_parameter_block" not in readout.__dict__


def test_a_parameter_block_that_does_not_hold_the_parameters_is_refused():
    readout = AttentionPooling(64, heads=4)
    numel = sum(p.numel() for p in readout.parameters())
    assert not readout.use_parameter_block(torch.zeros(numel, requires_grad=True))  # other memory
    block = _blocked(readout)
    assert not readout.use_parameter_block(block[:-1].detach().requires_grad_())  # one element short
    assert not readout.use_parameter_block(block * 1)  # not a leaf
    assert not readout.use_parameter_block(block.detach())  # does not require grad
    assert "_parameter_block" not in readout.__dict__
    assert readout.use_parameter_block(block)


def test_gradients_are_bitwise_the_same_from_run_to_run_on_two_threads():
    """The attention kernels hand molecules to whichever thread is free; the bias gradient's column sums are still
    added in molecule order, so the same inputs give the same bits every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        readout = AttentionPooling(64, heads=4)
        batch = _batch([3, 7, 1, 12, 5, 9, 2, 14])
        x, gout = torch.randn(batch.numel(), 64), torch.randn(8, 64)
        for whole in (True, False):
            with contextlib.nullcontext() if whole else native_readout.stepwise():
                first = _run(readout, x, batch, 8, gout)[1]
                for _ in range(6):
                    again = _run(readout, x, batch, 8, gout)[1]
                    assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)


def test_training_call_checks_the_batch_vector():
    """A training step's call (batch vector and dim_size given) skips the base class's checks on this path: the
    molecule table's native pass checks the vector instead, with the same kind of error."""
    r = AttentionPooling(32, heads=2)
    x = torch.randn(5, 32)
    assert type(r(x.requires_grad_(), _batch([3, 2]), dim_size=2).grad_fn).__name__ == "_WholeReadoutBackward"
    with pytest.raises(ValueError, match="sorted"):
        r(x, torch.tensor([0, 1, 0, 1, 1]), dim_size=2)
    with pytest.raises(ValueError, match="outside"):  # an id beyond dim_size
        r(x, _batch([3, 2]), dim_size=1)
    with pytest.raises(ValueError, match="outside"):
        r(x, torch.tensor([-1, 0, 0, 1, 1]), dim_size=2)
    with pytest.raises(ValueError, match="one entry per atom"):
        r(x, _batch([3, 3]), dim_size=2)
    with pytest.raises(ValueError, match="width"):
        r(x[:, :5], _batch([3, 2]), dim_size=2)
    with pytest.raises(ValueError, match="empty"):
        r(x[:0], _batch([3, 2])[:0], dim_size=2)
    # an int32 vector, or no dim_size, takes the base class's checks: the same results
    out = r(x, _batch([3, 2]), dim_size=2)
    torch.testing.assert_close(r(x, _batch([3, 2]).int(), dim_size=2), out, rtol=0, atol=0)
    torch.testing.assert_close(r(x, _batch([3, 2])), out, rtol=0, atol=0)

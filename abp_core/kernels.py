"""Native CPU kernels (``csrc/set_attention.cpp``): ABP's self-attention, its molecule table and PMA
pooling (:func:`batch_table`, :func:`pma_pool_forward`; used by :mod:`abp_core.native_readout`), and
SchNet's filter network and pair message passing (:func:`shifted_softplus`, :func:`bias_scale_rows`,
:func:`pair_mul_scatter`).

Exact fp32 multi-head self-attention within each molecule of size-sorted packed atoms, forward
and backward, for head dimensions 16, 32 and 64, and the element-wise passes around it fused
(bias + ReLU + residual in one pass; ReLU backward with the bias gradients' column sums). It
replaces one call of PyTorch's CPU flash-attention kernel per block of equal-size molecules by
one call per group of rows; a task is a whole molecule (all heads), so its rows are read once.
``benchmarks/attention.py`` measures it against the flash kernels, ``benchmarks/readout.py`` the
whole readout against PyG and against our flash path (:func:`disabled`).

The C++ source is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``;
about 3 s) into a cache directory (``$ABP_KERNEL_CACHE``, else ``~/.cache/abp/kernels``), keyed
by a hash of the source, the compiler, the flags and the CPU's feature flags, and written
atomically (a temporary file, then a rename). A library that fails to load or reports the
wrong ABI version is rebuilt once. Without a compiler, or with ``ABP_NATIVE_ATTENTION=0`` (which
switches off all of them), :func:`available` is ``False`` and callers use PyTorch's ops (flash
attention for ABP; same numbers up to fp32 rounding); the reason is kept in
:func:`unavailable_reason` and warned about once.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .files import atomic_path

__all__ = ["available", "unavailable_reason", "applies", "supports", "disabled", "molecule_table", "attention_forward",
           "attention_backward", "relu_residual", "add_residual", "relu_backward", "shifted_softplus",
           "shifted_softplus_backward", "pair_mul_scatter", "pair_mul_scatter_backward", "bias_scale_rows", "scale_rows_backward",
           "linear_epilogue", "native_linear", "batch_table", "pma_pool_forward", "pma_pool_backward",
           "NativeKernelWarning"]

SOURCE = Path(__file__).with_name("csrc") / "set_attention.cpp"
ABI_VERSION = 10
HEAD_DIMS = (16, 32, 64)
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-march=native", "-mprefer-vector-width=512"]


class NativeKernelWarning(RuntimeWarning):
    """The native kernels could not be built or loaded (PyTorch's ops are used instead)."""


_lock = threading.Lock()
_state = {"lib": None, "reason": None, "tried": False, "off": False}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


def _cache_dir() -> Path:
    root = os.environ.get("ABP_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "abp" / "kernels"


def _library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_flags()]).encode())
    return _cache_dir() / f"set_attention-{key.hexdigest()[:16]}.so"


def _build(cxx: str, target: Path) -> None:
    """Compile into a temporary file next to ``target``, then rename it into place (:mod:`abp_core.files`)."""
    with atomic_path(target) as tmp:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed:\n{proc.stderr.strip()[-2000:]}")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    try:
        version = lib.abp_set_attention_abi_version()
    except AttributeError as err:  # some other library under that name
        raise OSError(f"{path} is not the abp attention kernel: {err}") from None
    if version != ABI_VERSION:
        raise OSError(f"{path} reports ABI version {version}, expected {ABI_VERSION}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.abp_set_attention_forward.argtypes = [p, p, p, p, p, p, i64, i64, i64, i32]
    lib.abp_set_attention_backward.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i32]
    lib.abp_relu_residual.argtypes = [p, p, p, p, i64, i64, i32]
    lib.abp_add_residual.argtypes = [p, p, p, i64, i64, i32]
    lib.abp_relu_backward.argtypes = [p, p, p, p, p, i64, i64, i32]
    lib.abp_shifted_softplus.argtypes = [p, p, ctypes.c_float, i64, i64, i32]
    lib.abp_shifted_softplus_backward.argtypes = [p, p, ctypes.c_float, p, p, i64, i64, i32]
    lib.abp_pair_mul_scatter.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.abp_pair_mul_scatter_backward.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i32]
    lib.abp_bias_scale_rows.argtypes = [p, p, p, i64, i64, i32]
    lib.abp_scale_rows_backward.argtypes = [p, p, p, p, i64, i64, i32]
    lib.abp_batch_table.argtypes = [p, i64, i64, p, p]
    lib.abp_pma_pool_forward.argtypes = [p, p, p, p, p, p, i64, i64, i64, i32]
    lib.abp_pma_pool_backward.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i32]
    for f in (lib.abp_set_attention_forward, lib.abp_set_attention_backward, lib.abp_relu_residual,
              lib.abp_add_residual, lib.abp_relu_backward, lib.abp_shifted_softplus,
              lib.abp_shifted_softplus_backward, lib.abp_pair_mul_scatter, lib.abp_pair_mul_scatter_backward,
              lib.abp_bias_scale_rows, lib.abp_scale_rows_backward, lib.abp_pma_pool_forward,
              lib.abp_pma_pool_backward):
        f.restype = i32
    lib.abp_batch_table.restype = i64
    lib.abp_flush_denormal.argtypes = [i32, i32]
    lib.abp_flush_denormal.restype = i32
    lib.abp_set_sgemm.argtypes = [p]
    lib.abp_set_sgemm.restype = None
    lib.abp_pma_tail_forward.argtypes = [p, p]
    lib.abp_pma_tail_backward.argtypes = [p, p]
    lib.abp_pma_tail_forward.restype = lib.abp_pma_tail_backward.restype = i32
    lib.abp_readout_workspace.argtypes = [p, p]
    lib.abp_readout_workspace.restype = None
    lib.abp_readout_forward.argtypes = [p, p, p, p, p, p, p, p]
    lib.abp_readout_backward.argtypes = [p, p, p, p, p, p, p, p, p, p, p]
    lib.abp_readout_forward.restype = lib.abp_readout_backward.restype = i32
    sgemm = _torch_sgemm()
    lib.abp_has_sgemm = sgemm is not None
    if sgemm is not None:
        lib.abp_set_sgemm(sgemm)
    return lib


def _torch_sgemm() -> Optional[int]:
    """Address of the BLAS ``sgemm_`` inside PyTorch's own CPU library (the one ``torch.mm`` calls), or ``None``
    (a build without it: the steps that need it run PyTorch's ops instead)."""
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def has_blas() -> bool:
    """Can native kernels call PyTorch's BLAS (:func:`_torch_sgemm`)? Needed by ABP's native PMA tail."""
    return available() and not _state["off"] and bool(getattr(_state["lib"], "abp_has_sgemm", False))


def flush_denormals(on: bool) -> Optional[bool]:
    """Turn flush-to-zero and denormals-are-zero on or off for float arithmetic on the calling thread and on every
    PyTorch intra-op worker thread (x86: MXCSR's FTZ and DAZ bits).

    Sub-normal floats (magnitudes below 1.2e-38) then read and write as zero. On x86 CPUs an operation on or
    producing one takes a microcode assist, tens of times slower than a normal one. SchNet's backward meets them,
    for example where the cosine cutoff goes to zero. ``torch.set_flush_denormal`` alone sets the calling thread
    only, and worker threads that already exist keep their own state.

    Returns the calling thread's previous state (``True`` if both flags were set), or ``None`` where it is not
    known: without the native library (only the calling thread is set, by ``torch.set_flush_denormal``) and off
    x86. Raises nothing: on a CPU without these flags, nothing changes.
    """
    if available():
        before = _state["lib"].abp_flush_denormal(int(bool(on)), torch.get_num_threads())
        if before >= 0:
            return bool(before)
    torch.set_flush_denormal(bool(on))
    return None


def _init() -> None:
    if os.environ.get("ABP_NATIVE_ATTENTION", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["reason"] = "disabled by ABP_NATIVE_ATTENTION=0"
        return
    cxx = _compiler()
    if cxx is None:
        _state["reason"] = "no C++ compiler found ($CXX or c++)"
        return
    try:
        path = _library_path(cxx)
        if not path.exists():
            try:
                _build(cxx, path)
            except PermissionError:  # read-only home: build in the temporary directory instead
                path = Path(tempfile.gettempdir()) / f"abp-kernels-{os.getuid()}" / path.name
                if not path.exists():
                    _build(cxx, path)
        try:
            _state["lib"] = _load(path)
        except OSError:  # truncated, corrupt or stale file in the cache: rebuild once
            path.unlink(missing_ok=True)
            _build(cxx, path)
            _state["lib"] = _load(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _state["reason"] = f"native attention kernel unavailable: {err}"


def available() -> bool:
    """Is the native kernel built and loaded (building it on the first call)?"""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _init()
            reason = _state["reason"]
            if _state["lib"] is None and reason and not reason.startswith("disabled"):
                warnings.warn(reason + "; using PyTorch's ops instead", NativeKernelWarning, stacklevel=3)
    return _state["lib"] is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is ``False`` (``None`` when it is ``True`` or not yet tried)."""
    return _state["reason"]


def _reset() -> None:
    """Forget the loaded library (tests: environment changes take effect on the next call)."""
    with _lock:
        _state.update(lib=None, reason=None, tried=False, off=False)


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Do the native kernels run on tensors of this device and dtype (CPU float32, built, not
    :func:`disabled`)?"""
    return not _state["off"] and device.type == "cpu" and dtype == torch.float32 and available()


def supports(device: torch.device, dtype: torch.dtype, channels: int, heads: int) -> bool:
    """Can the native kernel run attention of this width (``C``, the q|k|v tensor being ``[N, 3C]``)?
    ``False`` inside :func:`disabled`."""
    return channels % heads == 0 and channels // heads in HEAD_DIMS and applies(device, dtype)


@contextlib.contextmanager
def disabled():
    """Forward passes inside this block use PyTorch's kernels instead of the native ones (to compare
    them side by side; each backward follows its forward's choice)."""
    previous, _state["off"] = _state["off"], True
    try:
        yield
    finally:
        _state["off"] = previous


def molecule_table(blocks: Sequence[Tuple[int, int, int, int]]) -> Tuple[Tensor, Tensor]:
    """First row and size of every molecule of ``(first_row, first_molecule, B, n)`` blocks (int64)."""
    starts, sizes = [], []
    for r0, _, b, n in blocks:
        starts.extend(range(r0, r0 + b * n, n))
        sizes.extend([n] * b)
    return torch.tensor(starts, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64)


def _check(table: Tuple[Tensor, Tensor], rows: int) -> Tuple[Tensor, Tensor]:
    starts, sizes = table
    checked = getattr(starts, "_abp_checked", None)  # (sizes, last row): a table is used by several calls
    if checked is not None and checked[0] is sizes and checked[1] <= rows:
        return starts, sizes
    if starts.shape != sizes.shape or starts.dim() != 1 or starts.dtype != torch.int64 or sizes.dtype != torch.int64:
        raise ValueError("the molecule table must be two int64 vectors of equal length (see molecule_table)")
    if starts.device.type != "cpu" or sizes.device.type != "cpu":
        raise ValueError(f"the molecule table must be on the CPU, got {starts.device} and {sizes.device}")
    end = 0
    if starts.numel():
        if int(sizes.min()) < 1 or int(starts.min()) < 0:
            raise ValueError("the molecule table has an empty molecule or a negative first row")
        end = int((starts + sizes).max())
        if end > rows:
            raise ValueError(f"molecule table reaches row {end} of a {rows}-row tensor")
    starts, sizes = starts.contiguous(), sizes.contiguous()
    starts._abp_checked = (sizes, end)  # tables are built once per forward and never modified in place
    return starts, sizes


def _lib() -> ctypes.CDLL:
    if not available():
        raise RuntimeError(f"the native kernels are unavailable: {unavailable_reason()}")
    return _state["lib"]


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _rows(name: str, t: Tensor, shape, dtype=torch.float32) -> None:
    if t.shape != shape or not t.is_contiguous() or t.dtype != dtype:
        raise ValueError(f"{name} must be a contiguous {dtype} {list(shape)} tensor, got {list(t.shape)} {t.dtype}")


def _width16(what: str, cols: int) -> None:
    if cols % 16:  # the kernels work in 16-wide vectors
        raise ValueError(f"{what} needs a multiple of 16 columns, got {cols}")


def _check_bias(bias: Optional[Tensor], c: int) -> None:
    if bias is not None:
        _rows("bias", bias, (3 * c,))


def attention_forward(qkv: Tensor, table: Tuple[Tensor, Tensor], heads: int, out: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Self-attention within each molecule: packed ``qkv`` ``[N, 3C]`` (plus ``bias`` ``[3C]``, added on
    the fly, if given) -> ``out`` ``[N, C]`` and the log-sum-exps ``[N, heads]`` the backward needs.
    ``table`` from :func:`molecule_table`."""
    n_rows, c = qkv.size(0), qkv.size(1) // 3
    if not qkv.is_contiguous() or qkv.dtype != torch.float32:
        raise ValueError("qkv must be a contiguous float32 tensor")
    _check_bias(bias, c)
    starts, sizes = _check(table, n_rows)
    if out is None:
        out = qkv.new_empty(n_rows, c)
    elif out.shape != (n_rows, c) or not out.is_contiguous() or out.dtype != qkv.dtype:
        raise ValueError(f"out must be a contiguous float32 [{n_rows}, {c}] tensor")
    lse = qkv.new_empty(n_rows, heads)
    code = _lib().abp_set_attention_forward(_ptr(qkv), _ptr(bias), _ptr(out), _ptr(lse), _ptr(starts),
                                            _ptr(sizes), starts.numel(), c, heads, torch.get_num_threads())
    if code != 0:
        raise RuntimeError(f"native attention forward failed (code {code}; channels {c}, heads {heads})")
    return out, lse


def attention_backward(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, table: Tuple[Tensor, Tensor],
                       heads: int, grad: Tensor, bias: Optional[Tensor] = None,
                       column_sums: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradient ``d qkv`` ``[N, 3C]`` written into ``grad`` (which may be ``qkv`` itself: each molecule's
    q|k|v are read before its gradients are written), and with ``column_sums`` its column sums
    ``[3C]`` (the gradient of a bias added to ``qkv``), else ``None``. ``bias`` as in the forward."""
    n_rows, c = qkv.size(0), qkv.size(1) // 3
    _check_bias(bias, c)
    for name, t, shape in (("grad_out", grad_out, (n_rows, c)), ("out", out, (n_rows, c)),
                           ("lse", lse, (n_rows, heads)), ("grad", grad, (n_rows, 3 * c)), ("qkv", qkv, (n_rows, 3 * c))):
        _rows(name, t, shape)
    starts, sizes = _check(table, n_rows)
    sums = qkv.new_empty(3 * c) if column_sums else None
    code = _lib().abp_set_attention_backward(_ptr(qkv), _ptr(bias), _ptr(out), _ptr(lse), _ptr(grad_out),
                                             _ptr(grad), _ptr(sums), _ptr(starts), _ptr(sizes), starts.numel(),
                                             c, heads, torch.get_num_threads())
    if code != 0:
        raise RuntimeError(f"native attention backward failed (code {code}; channels {c}, heads {heads})")
    return grad, sums


def relu_residual(z: Tensor, bias: Tensor, h: Optional[Tensor] = None) -> Tensor:
    """In place ``z <- h + relu(z + bias)`` (``[N, C]``, ``bias`` ``[C]``; without ``h``: ``relu(z + bias)``);
    returns the ReLU mask (bool)."""
    rows, cols = z.shape
    for name, t, shape in (("z", z, (rows, cols)), ("h", h, (rows, cols)), ("bias", bias, (cols,))):
        if t is not None:
            _rows(name, t, shape)
    mask = torch.empty(rows, cols, dtype=torch.bool)
    _lib().abp_relu_residual(_ptr(z), _ptr(bias), _ptr(h), _ptr(mask), rows, cols, torch.get_num_threads())
    return mask


def add_residual(h: Tensor, x: Tensor, bias: Tensor) -> Tensor:
    """In place ``h <- h + x + bias`` (``[N, C]``, ``bias`` ``[C]``); returns ``h``."""
    rows, cols = h.shape
    for name, t, shape in (("h", h, (rows, cols)), ("x", x, (rows, cols)), ("bias", bias, (cols,))):
        _rows(name, t, shape)
    _lib().abp_add_residual(_ptr(h), _ptr(x), _ptr(bias), rows, cols, torch.get_num_threads())
    return h


def relu_backward(grad: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad * mask, column sums of that, column sums of grad)`` in one pass (``[N, C]``, bool mask)."""
    rows, cols = grad.shape
    _rows("grad", grad, (rows, cols))
    _rows("mask", mask, (rows, cols), torch.bool)
    out, sum_out, sum_grad = torch.empty_like(grad), grad.new_empty(cols), grad.new_empty(cols)
    _lib().abp_relu_backward(_ptr(grad), _ptr(mask), _ptr(out), _ptr(sum_out), _ptr(sum_grad), rows, cols,
                             torch.get_num_threads())
    return out, sum_out, sum_grad


def shifted_softplus(y: Tensor, bias: Tensor, shift: float) -> Tensor:
    """In place ``y <- softplus(y + bias) - shift`` (``[N, C]`` with ``C`` a multiple of 16, ``bias``
    ``[C]``); returns ``y``. The backward needs only ``y`` (:func:`shifted_softplus_backward`)."""
    rows, cols = y.shape
    _rows("y", y, (rows, cols))
    _rows("bias", bias, (cols,))
    _width16("shifted_softplus", cols)
    _lib().abp_shifted_softplus(_ptr(y), _ptr(bias), shift, rows, cols, torch.get_num_threads())
    return y


def shifted_softplus_backward(grad: Tensor, y: Tensor, shift: float) -> Tuple[Tensor, Tensor]:
    """Gradient through :func:`shifted_softplus` from its output ``y``: ``(grad * sigmoid(z), its column
    sums)``, using ``sigmoid(z) = 1 - exp(-(y + shift))``."""
    rows, cols = y.shape
    _rows("grad", grad, (rows, cols))
    _rows("y", y, (rows, cols))
    _width16("shifted_softplus_backward", cols)
    out, sums = torch.empty_like(grad), grad.new_empty(cols)
    _lib().abp_shifted_softplus_backward(_ptr(grad), _ptr(y), shift, _ptr(out), _ptr(sums), rows, cols,
                                         torch.get_num_threads())
    return out, sums


def _pairs(x: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tuple[int, int, int]:
    nodes, f = x.shape
    pairs = w.size(0)
    _rows("x", x, (nodes, f))
    _rows("w", w, (pairs, f))
    for name, t in (("a", a), ("b", b)):
        _rows(name, t, (pairs,), torch.int64)
    _width16("pair_mul_scatter", f)
    if pairs and (int(torch.minimum(a, b).min()) < 0 or int(torch.maximum(a, b).max()) >= nodes):
        raise ValueError(f"pair atoms must lie in [0, {nodes})")
    return nodes, f, pairs


def pair_mul_scatter(x: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out[a] += x[b] * w``, ``out[b] += x[a] * w`` over pairs (``x`` ``[N, F]``, ``w`` ``[P, F]``); pairs
    sorted by ``a < b`` (as :func:`abp_core.graph.undirected_pairs` returns them) run in parallel."""
    nodes, f, pairs = _pairs(x, w, a, b)
    out = x.new_empty(nodes, f)
    _lib().abp_pair_mul_scatter(_ptr(x), _ptr(w), _ptr(a), _ptr(b), _ptr(out), pairs, nodes, f,
                                torch.get_num_threads())
    return out


def pair_mul_scatter_backward(grad: Tensor, x: Tensor, w: Tensor, a: Tensor, b: Tensor, need_x: bool = True,
                              need_w: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`pair_mul_scatter` with respect to ``x`` and ``w`` (``None`` where not needed)."""
    nodes, f, pairs = _pairs(x, w, a, b)
    _rows("grad", grad, (nodes, f))
    gx = torch.empty_like(x) if need_x else None
    gw = torch.empty_like(w) if need_w else None
    _lib().abp_pair_mul_scatter_backward(_ptr(grad), _ptr(x), _ptr(w), _ptr(a), _ptr(b), _ptr(gx), _ptr(gw),
                                         pairs, nodes, f, torch.get_num_threads())
    return gx, gw


def bias_scale_rows(y: Tensor, bias: Tensor, scale: Tensor) -> Tensor:
    """In place ``y <- (y + bias) * scale[:, None]`` (``[N, C]``, ``C`` a multiple of 16); returns ``y``."""
    rows, cols = y.shape
    for name, t, shape in (("y", y, (rows, cols)), ("bias", bias, (cols,)), ("scale", scale, (rows,))):
        _rows(name, t, shape)
    _width16("bias_scale_rows", cols)
    _lib().abp_bias_scale_rows(_ptr(y), _ptr(bias), _ptr(scale), rows, cols, torch.get_num_threads())
    return y


def scale_rows_backward(grad: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """``(grad * scale[:, None], its column sums)`` in one pass."""
    rows, cols = grad.shape
    _rows("grad", grad, (rows, cols))
    _rows("scale", scale, (rows,))
    _width16("scale_rows_backward", cols)
    out, sums = torch.empty_like(grad), grad.new_empty(cols)
    _lib().abp_scale_rows_backward(_ptr(grad), _ptr(scale), _ptr(out), _ptr(sums), rows, cols, torch.get_num_threads())
    return out, sums


def batch_table(batch: Tensor, num_molecules: int) -> Tuple[Tensor, Tensor, int]:
    """First row and size (int64, ``[M]``; empty molecules: size 0) of every molecule of a sorted batch vector,
    and the number of non-empty molecules, in one pass; ``ValueError`` if the vector is not sorted or an id
    lies outside ``[0, num_molecules)``."""
    batch = batch.contiguous()
    _rows("batch", batch, (batch.numel(),), torch.int64)
    starts = torch.empty(num_molecules, dtype=torch.int64)
    sizes = torch.empty(num_molecules, dtype=torch.int64)
    present = _lib().abp_batch_table(_ptr(batch), batch.numel(), num_molecules, _ptr(starts), _ptr(sizes))
    if present == -1:
        raise ValueError("batch vector must be sorted (atoms of one molecule contiguous, molecules in order)")
    if present == -2:
        raise ValueError(f"batch vector has molecule ids outside [0, {num_molecules})")
    return starts, sizes, present


def _pool_shapes(z: Tensor, starts: Tensor, sizes: Tensor, heads: int, what: str) -> Tuple[int, int, int]:
    n, c = z.shape
    _rows("z", z, (n, c))
    m = starts.numel()
    _rows("starts", starts, (m,), torch.int64)
    _rows("sizes", sizes, (m,), torch.int64)
    if m and (int(sizes.min()) < 0 or int(starts.min()) < 0 or int((starts + sizes).max()) > n):
        raise ValueError(f"{what}: the molecule table reaches outside the {n} rows")
    return n, c, m


def pma_pool_forward(scores: Tensor, z: Tensor, starts: Tensor, sizes: Tensor) -> Tuple[Tensor, Tensor]:
    """PMA pooling with one seed: per molecule (rows ``starts[m] ..+ sizes[m]``) and head, the softmax ``a``
    ``[N, H]`` of ``scores`` ``[N, H]`` over the molecule's atoms and ``pooled[m, h] = sum_i a[i, h] z[i]``
    ``[M, H, C]`` (empty molecules: zeros). Returns ``(a, pooled)``."""
    n, c, m = _pool_shapes(z, starts, sizes, scores.size(-1), "pma_pool_forward")
    heads = scores.size(1)
    _rows("scores", scores, (n, heads))
    a, pooled = z.new_empty(n, heads), z.new_empty(m, heads, c)
    _lib().abp_pma_pool_forward(_ptr(scores), _ptr(z), _ptr(a), _ptr(pooled), _ptr(starts), _ptr(sizes), m, heads, c,
                                torch.get_num_threads())
    return a, pooled


def pma_pool_backward(grad: Tensor, z: Tensor, a: Tensor, starts: Tensor, sizes: Tensor) -> Tuple[Tensor, Tensor]:
    """Backward of :func:`pma_pool_forward` from ``grad`` = dL/dpooled ``[M, H, C]``: ``(dL/dz [N, C] through the
    weighted sums, dL/dscores [N, H])``."""
    n, c, m = _pool_shapes(z, starts, sizes, a.size(-1), "pma_pool_backward")
    heads = a.size(1)
    _rows("a", a, (n, heads))
    _rows("grad", grad, (m, heads, c))
    gz, gs = z.new_empty(n, c), z.new_empty(n, heads)
    _lib().abp_pma_pool_backward(_ptr(grad), _ptr(z), _ptr(a), _ptr(gz), _ptr(gs), _ptr(starts), _ptr(sizes), m, heads,
                                 c, torch.get_num_threads())
    return gz, gs


class _LinearEpilogue(torch.autograd.Function):
    """``epilogue(x W^T, b)`` for a native in-place epilogue (bias + activation or scaling): a plain
    matmul, then one pass; in the backward, one pass gives the pre-activation gradient and its column
    sums (the bias gradient). ``epilogue`` has ``forward(y, bias) -> state`` (in place on ``y``; the
    tensors to keep) and ``backward(grad, y, state) -> (grad_pre, grad_bias)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, epilogue) -> Tensor:
        y = torch.mm(x, weight.t())
        state = epilogue.forward(y, bias)
        ctx.epilogue = epilogue
        ctx.save_for_backward(x, weight, y if epilogue.keeps_output else None, *state)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, y, *state = ctx.saved_tensors
        gz, gb = ctx.epilogue.backward(grad.contiguous(), y, state)
        gx = torch.mm(gz, weight) if ctx.needs_input_grad[0] else None
        return gx, gz.t().mm(x), gb, None


def native_linear(x: Tensor, weight: Tensor) -> bool:
    """Do the native epilogues apply to ``x W^T`` (CPU float32, no autocast, not being compiled, a
    multiple of 16 outputs)?"""
    return (x.dim() == 2 and weight.size(0) % 16 == 0 and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()
            and applies(x.device, x.dtype))


def linear_epilogue(x: Tensor, weight: Tensor, bias: Tensor, epilogue) -> Tensor:
    """``epilogue(x W^T, bias)`` with one native pass forward and one backward (see :class:`_LinearEpilogue`)."""
    return _LinearEpilogue.apply(x, weight, bias, epilogue)

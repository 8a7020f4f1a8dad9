"""Decoder layers packed into one exact-size (pinned) host slab each.

`torch.Tensor.pin_memory()` rounds every allocation up to a power of two (a 129.5 MiB
tensor pins 256 MiB), so each layer gets ONE `uint8` slab of exactly the bytes it needs,
allocated page-locked, and every tensor of the layer is a typed view into it. One H2D
copy per layer moves the whole slab.

All decoder layers have the same structure, so one `SlabLayout` (name -> offset, shape,
dtype, role) serves every layer of a format:

- "native": every parameter and buffer in its own dtype (the model dtype for bf16 models;
  a checkpoint loaded with fp8 layers keeps its fp8 weights and scales as they are);
- "fp8": each `nn.Linear` weight as float8_e4m3fn plus one float32 scale per output row
  (row-wise, as `fp8.quantize_fp8`), everything else (biases, norms) in its own dtype;
- "bf16-packed": each `nn.Linear` weight in the lossless 12-bit format of
  `bf16_packing` (low bytes, 4-bit codes, base, exceptions), everything else as it is.

The two encoded formats are "staged": a GPU copy of such a slab is decoded into a NATIVE
buffer before the layer runs (`dequant.py`). After packing, the layer module's tensors are
views into the slab (native) or, for an encoded weight, released to the meta device (the
encoded copy is the only host copy), so host RAM holds each layer once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..bf16_packing import PackedBf16, pack_bf16, packed_nbytes, unpack_bf16
from ..fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8

log = logging.getLogger(__name__)

ALIGN = 256  # bytes; every tensor view starts on a 256-byte boundary (vectorised kernels, DMA)

NATIVE = "native"
FP8 = "fp8"
PACKED = "bf16-packed"
STAGED_FORMATS = (FP8, PACKED)

_PACKED_PARTS = tuple(PackedBf16._fields[1:])  # after `low`, which takes the weight's own name


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class SlabEntry:
    name: str  # dotted name inside the layer ("self_attn.q_proj.weight")
    offset: int  # bytes from the slab's start
    shape: tuple[int, ...]
    dtype: torch.dtype
    # "raw": stored as used; "q": an nn.Linear weight's encoded main part (fp8 values, or the
    # packed low bytes); "part": the rest of its encoding (fp8 row scales, packed codes...)
    role: str
    is_param: bool  # a parameter (else a buffer) of its module

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This entry as a typed tensor inside a flat uint8 buffer (host slab or GPU slot)."""
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class SlabLayout:
    """Where each tensor of a decoder layer sits in its slab; shared by all layers."""

    format: str
    entries: tuple[SlabEntry, ...]
    nbytes: int

    @classmethod
    def build(cls, layer: nn.Module, fmt: str) -> "SlabLayout":
        if fmt not in (NATIVE, *STAGED_FORMATS):
            raise ValueError(f"unknown slab format {fmt!r}")
        linear_weights = {f"{name}.weight" if name else "weight" for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        entries: list[SlabEntry] = []
        offset = 0

        def add(name: str, shape: tuple[int, ...], dtype: torch.dtype, role: str, is_param: bool) -> None:
            nonlocal offset
            entry = SlabEntry(name, offset, shape, dtype, role, is_param)
            entries.append(entry)
            offset = _align(offset + entry.nbytes)

        tensors = [(n, t, True) for n, t in layer.named_parameters()] + [(n, t, False) for n, t in layer.named_buffers()]
        for name, tensor, is_param in tensors:
            shape = tuple(tensor.shape)
            if fmt != NATIVE and name in linear_weights and tensor.is_floating_point() and tensor.dim() == 2:
                if fmt == FP8:
                    add(name, shape, FP8_DTYPE, "q", is_param)
                    add(name + ".__scale", (shape[0],), torch.float32, "part", False)
                    continue
                if tensor.dtype != torch.bfloat16:
                    raise ValueError(f"{fmt} streaming needs a bf16 model; {name} is {tensor.dtype}")
                add(name, shape, torch.uint8, "q", is_param)
                for part, (part_shape, dtype) in packed_nbytes(tensor.numel()).items():
                    add(f"{name}.__{part}", part_shape, dtype, "part", False)
            else:
                add(name, shape, tensor.dtype, "raw", is_param)
        return cls(fmt, tuple(entries), offset)

    def by_name(self) -> dict[str, SlabEntry]:
        return {e.name: e for e in self.entries}

    def matches(self, layer: nn.Module) -> bool:
        """True when `layer` has exactly this layout's tensors (names and shapes)."""
        try:
            other = SlabLayout.build(layer, self.format)
        except Exception:  # noqa: BLE001 - a structurally different layer
            return False
        return [(e.name, e.shape, e.dtype) for e in other.entries] == [(e.name, e.shape, e.dtype) for e in self.entries]


def _cuda_host_register(tensor: torch.Tensor) -> str | None:
    """Page-lock `tensor`'s exact bytes with cudaHostRegister; returns an error text or None."""
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    except Exception as exc:  # noqa: BLE001 - no CUDA, no driver, binding missing
        return repr(exc)
    code = int(getattr(err, "value", err))
    if code == 0:
        return None
    _clear_cuda_last_error()
    return f"cudaHostRegister returned error {code} ({cudart.cudaGetErrorString(err)})"


def _clear_cuda_last_error() -> None:
    """Consume the CUDA runtime's "last error" that a refused cudaHostRegister leaves behind.

    PyTorch's binding returns the error without clearing it, and PyTorch checks
    cudaGetLastError after each kernel launch: the next kernel, anywhere, would raise this
    registration's error as its own, so the pageable fallback would never run. A trivial
    launch here reads the error (which clears it) and is discarded."""
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:  # torch.AcceleratorError: the stale registration error, now cleared
        pass


def _cuda_host_unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - interpreter shutdown
        pass


def allocate_slab(nbytes: int, pinned: bool) -> tuple[torch.Tensor, bool]:
    """An exact-size host buffer; page-locked when asked and possible. Returns (slab, is_pinned).

    Pinned slabs are ordinary host tensors registered with `cudaHostRegister`, not
    `torch.empty(..., pin_memory=True)`: PyTorch's caching host allocator rounds every
    pinned allocation up to a power of two (a 93.6 MB 1.5B layer would pin 128 MB) and keeps
    freed blocks cached, so close() could not give the memory back. A registered slab is
    exactly `nbytes` and is unregistered when it is freed.
    """
    slab = torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
    if pinned and nbytes:
        error = _cuda_host_register(slab)
        if error is None:
            weakref.finalize(slab, _cuda_host_unregister, slab.data_ptr())
            return slab, True
        log.warning(
            "pinning a %.1f MB host slab failed (%s): falling back to pageable memory; copies to the GPU "
            "will be several times slower but results are unchanged", nbytes / 1e6, error,
        )
    return slab, False


def _set_tensor(layer: nn.Module, entry: SlabEntry, value: torch.Tensor) -> None:
    module_name, _, attr = entry.name.rpartition(".")
    module = layer.get_submodule(module_name) if module_name else layer
    if entry.is_param:
        param = module._parameters[attr]
        if param is not None and param.dtype == value.dtype and param.device == value.device and param.shape == value.shape:
            param.data = value  # keep the Parameter object (tied or referenced elsewhere)
        else:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _get_tensor(layer: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    module = layer.get_submodule(module_name) if module_name else layer
    t = module._parameters.get(attr)
    return t if t is not None else module._buffers[attr]


def point_layer(layer: nn.Module, layout: SlabLayout, flat: torch.Tensor) -> None:
    """Make `layer`'s tensors views into `flat` (a buffer laid out as `layout`): all of them
    for NATIVE; for a staged format the ones stored as they are used (biases, norms), its
    encoded weights being decoded elsewhere."""
    for entry in layout.entries:
        if entry.role == "raw":
            _set_tensor(layer, entry, entry.view(flat))


def assign_layer(layer: nn.Module, native: SlabLayout, tensors: dict[str, torch.Tensor]) -> None:
    """Give `layer` these tensors (named as inside the layer: a checkpoint's copy of it),
    checked against `native`'s names, shapes and dtypes first, so a wrong copy changes nothing."""
    for entry in native.entries:
        value = tensors.get(entry.name)
        if value is None or tuple(value.shape) != entry.shape or value.dtype != entry.dtype:
            got = "missing" if value is None else f"{tuple(value.shape)} {value.dtype}"
            raise ValueError(f"decoder layer tensor {entry.name}: expected {entry.shape} {entry.dtype}, got {got}")
    for entry in native.entries:
        _set_tensor(layer, entry, tensors[entry.name])


def release_layer(layer: nn.Module, native: SlabLayout) -> None:
    """Point `layer`'s tensors at the meta device: its weights live only in a slab or a GPU buffer."""
    for entry in native.entries:
        _set_tensor(layer, entry, torch.empty(entry.shape, dtype=entry.dtype, device="meta"))


def _orig_dtype(layer: nn.Module, entry: SlabEntry) -> torch.dtype:
    return _get_tensor(layer, entry.name).dtype


@dataclass
class HostLayer:
    """One decoder layer's host copy: a slab and the layout it is packed in."""

    slab: torch.Tensor
    layout: SlabLayout
    pinned: bool

    @property
    def nbytes(self) -> int:
        return self.slab.numel()

    @property
    def format(self) -> str:
        return self.layout.format


def _encode(fmt: str, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """An nn.Linear weight in a staged format, by slab entry name."""
    if fmt == FP8:
        q, scale = quantize_fp8(weight)
        return {name: q, name + ".__scale": scale}
    packed = pack_bf16(weight, name)
    return {name: packed.low, **{f"{name}.__{part}": getattr(packed, part) for part in _PACKED_PARTS}}


def packed_weight(entries: dict[str, SlabEntry], name: str, flat: torch.Tensor) -> PackedBf16:
    """Weight `name` of a bf16-packed layout as views into `flat` (a host slab or a staging slot)."""
    return PackedBf16(entries[name].view(flat), **{part: entries[f"{name}.__{part}"].view(flat) for part in _PACKED_PARTS})


def _decode(fmt: str, name: str, slab: torch.Tensor, entries: dict[str, SlabEntry], dtype: torch.dtype) -> torch.Tensor:
    """The model-dtype weight that entry `name` of a staged slab holds (on the slab's device;
    the reference decoders, which allocate: `dequant.py` decodes on the GPU without)."""
    if fmt == FP8:
        return dequantize_fp8(entries[name].view(slab), entries[name + ".__scale"].view(slab), dtype)
    return unpack_bf16(packed_weight(entries, name, slab))


def pack_layer(layer: nn.Module, layout: SlabLayout, pinned: bool) -> HostLayer:
    """Copy `layer`'s tensors into a new slab (encoding a staged format's linear weights) and
    point the layer at it.

    NATIVE: the layer's tensors become views into the slab (no second host copy).
    Staged: the layer's linear weights are released to meta (the encoded slab is the host
    copy); its other tensors become views into the slab."""
    slab, is_pinned = allocate_slab(layout.nbytes, pinned)
    entries = layout.by_name()
    for entry in layout.entries:
        if entry.role == "part":
            continue
        source = _get_tensor(layer, entry.name)
        if source.is_meta:
            raise ValueError(f"decoder layer tensor {entry.name} is on the meta device; nothing to pack")
        if entry.role == "q":
            for name, value in _encode(layout.format, entry.name, source.detach()).items():
                entries[name].view(slab).copy_(value)
        else:
            entry.view(slab).copy_(source.detach())
    host = HostLayer(slab, layout, is_pinned)
    point_layer(layer, layout, slab)
    for entry in layout.entries:
        if entry.role == "q":
            _set_tensor(layer, entry, torch.empty(entry.shape, dtype=_orig_dtype(layer, entry), device="meta"))
    return host


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS.

    Packing replaces a layer's tensors with views into its slab, and glibc keeps the freed
    tensors' pages in its heap (after the first large free it serves tensors up to 32 MiB
    from the heap, not from mmap): the process held both copies. Measured on the CPU with
    1.5B at the real shapes, 21 layers streamed: 1.33x the model's bytes after packing,
    1.04x after this."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def decode_host(host: HostLayer, native: SlabLayout) -> torch.Tensor:
    """A NATIVE-layout pageable copy of a staged host layer, decoded on the CPU."""
    flat = torch.empty(native.nbytes, dtype=torch.uint8)
    src = host.layout.by_name()
    for entry in native.entries:
        if src[entry.name].role == "q":
            entry.view(flat).copy_(_decode(host.format, entry.name, host.slab, src, entry.dtype))
        else:
            entry.view(flat).copy_(src[entry.name].view(host.slab))
    return flat


def unpack_layer(layer: nn.Module, host: HostLayer, native: SlabLayout) -> None:
    """Give `layer` ordinary pageable tensors again (slab no longer referenced by it).
    Staged slabs are decoded: an fp8 layer then holds the fp8-rounded weights, a packed
    one its own weights, bit for bit."""
    flat = decode_host(host, native) if host.format != NATIVE else host.slab.clone()
    for entry in native.entries:
        _set_tensor(layer, entry, entry.view(flat).clone())

"""PyTorch checkpoints: the zip format read without torch, the legacy format through torch.

`torch.save` writes a zip of `<top>/data.pkl` (the object, protocol 2) and one member
`<top>/data/<key>` per storage, stored uncompressed. The pickle is read by an unpickler that
admits only plain containers, scalars and the torch globals that describe tensors, each as an
inert record; any other global is refused by name before anything runs. Every tensor of the
object becomes a row named by its path of dict keys and list indices joined with `.`; the rest
of the object (epoch, hyper-parameters, optimizer settings) is kept as the checkpoint's `extra`
so that writing back keeps it.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from paramctl.dtypes import TORCH_STORAGES, from_torch, itemsize, torch_dtype
from paramctl.errors import FormatError, UnsafeContentError
from paramctl.formats.zipfiles import member_storage, zip_members
from paramctl.table import Checkpoint, Storage, Tensor

# --- inert records standing in for torch objects while the pickle is read ----------------------


@dataclass(frozen=True)
class TorchDtype:
    name: str


@dataclass(frozen=True)
class StorageType:
    dtype: str | None  # None: UntypedStorage (bytes)


@dataclass(frozen=True)
class TorchDevice:
    spec: tuple


@dataclass(frozen=True)
class TorchLayout:
    name: str


class TorchSize(tuple):
    """A torch.Size in the object, kept apart from plain tuples so it is written back as one."""


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, dtype=None) -> Tensor:
    if not isinstance(storage, _StorageRef) or not isinstance(storage.storage, Storage):
        raise FormatError("tensor record without a storage")
    dtype = dtype or storage.dtype
    if dtype is None:
        raise FormatError("tensor record without a dtype")
    shape, strides = tuple(size), tuple(stride)
    if (
        not all(type(n) is int for n in shape + strides)
        or len(shape) != len(strides)
        or type(storage_offset) is not int
    ):
        raise FormatError(f"tensor record with an invalid size {size!r:.80} or stride {stride!r:.80}")
    if storage.nbytes % itemsize(dtype):
        raise FormatError(f"storage {storage.key!r} of {storage.nbytes} bytes is not a whole number of {dtype}")
    return Tensor(
        "", shape, dtype, storage.storage, storage_offset, strides, attrs={"requires_grad": bool(requires_grad)}
    )


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"tensor record with an invalid dtype {dtype!r:.80}")
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, dtype.name)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, Tensor):
        raise FormatError("parameter record without a tensor")
    data.attrs.update(parameter=True, requires_grad=bool(requires_grad))
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type not in (_TENSOR_TYPE, _PARAMETER_TYPE) or func not in _REBUILDERS:
        raise UnsafeContentError(f"refuses tensor subclass {new_type!r:.80}")
    t = func(*args)
    if new_type is _PARAMETER_TYPE and isinstance(t, Tensor):
        t.attrs["parameter"] = True
    return t


_TENSOR_TYPE = object()
_PARAMETER_TYPE = object()
_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    """How protocol-2 pickles spell bytes; other codecs (zlib, bz2, ...) are not admitted."""
    if encoding not in ("latin1", "latin-1", "utf-8") or not isinstance(text, str):
        raise UnsafeContentError(f"refuses _codecs.encode with codec {encoding!r:.40}")
    return text.encode(encoding)


def _device(*spec):
    return TorchDevice(tuple(spec))


def _admitted() -> dict[str, Any]:
    globals_: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
        "_codecs.encode": _encode,
        "torch.Size": TorchSize,
        "torch.device": _device,
        "torch.serialization._get_layout": TorchLayout,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": _TENSOR_TYPE,
        "torch.nn.parameter.Parameter": _PARAMETER_TYPE,
        "torch.storage.UntypedStorage": StorageType(None),
        "torch.storage.TypedStorage": StorageType(None),
    }
    for cls, dtype in TORCH_STORAGES.items():
        globals_[f"torch.{cls}"] = StorageType(dtype)
    from paramctl.dtypes import ITEMSIZE

    for dtype in ITEMSIZE:
        globals_[f"torch.{dtype}"] = TorchDtype(dtype)
    return globals_


ADMITTED = _admitted()


@dataclass(eq=False)
class _StorageRef:
    key: str
    dtype: str | None
    nbytes: int
    storage: Storage


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only ADMITTED globals; storages resolve to regions of the zip through STORAGES."""

    def __init__(self, file: BinaryIO, storages: dict[str, Storage], path: str):
        super().__init__(file, encoding="utf-8")
        self.storages = storages
        self.path = path
        self.refs: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in ADMITTED:
            return ADMITTED[key]
        raise UnsafeContentError(f"refuses to load: pickle global {key} is not allowed", self.path)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise FormatError(f"unknown persistent id {pid!r:.80}", self.path)
        _, stype, key, _location, _numel = pid
        key = str(key)
        if key not in self.refs:
            if key not in self.storages:
                raise FormatError(f"storage data/{key} is missing from the archive", self.path)
            storage = self.storages[key]
            self.refs[key] = _StorageRef(key, stype.dtype, storage.nbytes, storage)
        return self.refs[key]


def unpickle(data: bytes, storages: dict[str, Storage], path: str) -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(data), storages, path).load()
    except FormatError as e:
        if e.path is None:
            raise FormatError(str(e), path) from None
        raise
    except RecursionError:
        raise FormatError("pickle nests too deeply", path) from None
    except Exception as e:  # a malformed pickle raises anything from UnpicklingError to TypeError
        raise FormatError(f"invalid pickle: {type(e).__name__}: {e}", path) from None


# --- the zip format ----------------------------------------------------------------------------


def load_zip(path: str, source: str) -> Checkpoint:
    zf, members = zip_members(path)
    pickles = [n for n in members if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise FormatError("not a PyTorch checkpoint: no single <top>/data.pkl in the archive", path)
    top = pickles[0][: -len("data.pkl")]
    byteorder = members.get(top + "byteorder")
    if byteorder is not None and zf.read(byteorder).strip() not in (b"little", b""):
        raise FormatError("big-endian checkpoints are not supported", path)
    try:
        storages = {
            name[len(top) + 5 :]: member_storage(zf, info, path)
            for name, info in members.items()
            if name.startswith(top + "data/")
        }
        data = zf.read(members[pickles[0]])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FormatError(f"invalid zip archive: {e}", path) from None
    obj = unpickle(data, storages, path)
    return Checkpoint(source, "pt", name_tensors(obj, path), extra=obj)


def name_tensors(obj: Any, path: str) -> list[Tensor]:
    """Every tensor in OBJ, named by its path of keys and indices; bounds are checked."""
    tensors: list[Tensor] = []
    seen: dict[int, Tensor] = {}  # a tensor object pickled twice is memoized: give each place a row

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Tensor):
            if id(node) in seen:  # one pickled object in two places: a row per name, tied
                first = seen[id(node)]
                node = Tensor(
                    "", first.shape, first.dtype, first.storage, first.offset, first.stride, attrs=first.attrs
                )
            seen[id(node)] = node
            node.name = prefix or "tensor"
            node.check_bounds()
            tensors.append(node)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}" if prefix else str(i))

    walk(obj, "")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FormatError(f"two tensors would both be named {dup!r}", path)
    return tensors


# --- the legacy format, through torch ------------------------------------------------------------


def load_legacy(path: str, source: str) -> Checkpoint:
    """The pre-1.6 format: torch.load(weights_only=True) is the safe reader for it."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        what = f"pickle global {blocked.group(1)} is not allowed" if blocked else "the pickle is not weights-only"
        raise UnsafeContentError(f"refuses to load: {what}", path) from None
    except Exception as e:
        raise FormatError(f"invalid legacy PyTorch file: {type(e).__name__}: {e}", path) from None
    storages: dict[int, Storage] = {}

    def record(t: torch.Tensor) -> Tensor:
        untyped = t.untyped_storage()
        key = untyped.data_ptr()
        if key not in storages:
            raw = torch.empty(0, dtype=torch.uint8).set_(untyped).numpy().tobytes()
            storages[key] = Storage(len(raw), buffer=raw)
        row = Tensor("", tuple(t.shape), from_torch(t.dtype), storages[key], int(t.storage_offset()), tuple(t.stride()))
        row.attrs.update(requires_grad=t.requires_grad, parameter=isinstance(t, torch.nn.Parameter))
        return row

    obj = _map_tensors(obj, record)
    return Checkpoint(source, "pt-legacy", name_tensors(obj, path), extra=obj)


def _map_tensors(obj: Any, fn: Any) -> Any:
    """OBJ with every torch tensor replaced by fn(tensor), containers rebuilt."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
        out.update((k, _map_tensors(v, fn)) for k, v in obj.items())
        if hasattr(obj, "__dict__"):
            out.__dict__.update(obj.__dict__)
        return out
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_map_tensors(v, fn) for v in obj) if type(obj) is tuple else obj
    return obj


# --- writing, through torch ---------------------------------------------------------------------


def save(ckpt: Checkpoint, path: str) -> None:
    """torch.save the checkpoint's object with every row as a torch tensor; views and ties kept."""
    import torch

    storages: dict[int, torch.UntypedStorage] = {}

    def to_torch(t: Tensor) -> torch.Tensor:
        if t.storage.nbytes and id(t.storage) not in storages:
            storages[id(t.storage)] = torch.frombuffer(bytearray(t.storage.read()), dtype=torch.uint8).untyped_storage()
        untyped = storages.get(id(t.storage), torch.UntypedStorage(0))
        out = torch.empty(0, dtype=torch_dtype(t.dtype)).set_(untyped, t.offset, t.shape, t.strides)
        if t.attrs.get("parameter"):
            return torch.nn.Parameter(out, requires_grad=t.attrs.get("requires_grad", True))
        return out

    made: dict[int, torch.Tensor] = {}
    tied: dict[str, torch.Tensor] = {}

    def convert(t: Tensor) -> torch.Tensor:
        if t.tie is not None and t.tie in tied:
            return tied[t.tie]
        if id(t) not in made:
            made[id(t)] = to_torch(t)
        if t.tie is not None:
            tied[t.tie] = made[id(t)]
        return made[id(t)]

    if ckpt.format in ("pt", "pt-legacy") and ckpt.extra is not None:
        obj = _to_torch_objects(ckpt.extra, convert)
    else:
        obj = collections.OrderedDict((t.name, convert(t)) for t in ckpt.tensors)
    torch.save(obj, path)


def _to_torch_objects(node: Any, convert: Any) -> Any:
    """The object read by the restricted unpickler, with records turned back into torch objects."""
    import torch

    if isinstance(node, Tensor):
        return convert(node)
    if isinstance(node, TorchDtype):
        return torch_dtype(node.name)
    if isinstance(node, TorchDevice):
        return torch.device(*node.spec)
    if isinstance(node, TorchLayout):
        return torch.serialization._get_layout(node.name)
    if isinstance(node, TorchSize):
        return torch.Size(node)
    if isinstance(node, dict):
        out = type(node)()
        out.update((k, _to_torch_objects(v, convert)) for k, v in node.items())
        if hasattr(node, "__dict__"):
            out.__dict__.update(node.__dict__)
        return out
    if isinstance(node, list):
        return [_to_torch_objects(v, convert) for v in node]
    if type(node) is tuple:
        return tuple(_to_torch_objects(v, convert) for v in node)
    return node


def non_tensor_entries(ckpt: Checkpoint) -> dict[str, Any]:
    """The object's leaves that are not tensors, by dotted path, as JSON-safe values."""
    found: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Tensor):
            return
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)) and node and not isinstance(node, TorchSize):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}" if prefix else str(i))
        elif prefix:
            plain = node is None or isinstance(node, (bool, int, float, str))
            found[prefix] = node if plain else _describe(node)

    walk(ckpt.extra, "")
    return found


def _describe(node: Any) -> str:
    if isinstance(node, TorchDtype):
        return f"torch.{node.name}"
    if isinstance(node, TorchDevice):
        return f"device{node.spec!r}"
    if isinstance(node, TorchSize):
        return f"torch.Size({list(node)})"
    if isinstance(node, (dict, list, tuple)):
        return repr(node)
    return f"{type(node).__name__}: {node!r:.200}"

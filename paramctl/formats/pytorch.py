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

import _compat_pickle
import collections
import functools
import io
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from paramctl import remote
from paramctl.dtypes import TORCH_STORAGES, itemsize, torch_dtype
from paramctl.errors import FormatError, UnsafeContentError, UsageError
from paramctl.formats import Format, Probe, dropped_entries, register
from paramctl.formats.pickle_bounds import check_pickle
from paramctl.formats.zipfiles import ZIP_ERRORS, member_storage, read_member, zip_members
from paramctl.table import Checkpoint, Storage, Tensor, contiguous_strides

POSITION = "position"  # Tensor.attrs key: the keys leading to the tensor in the object it was read from

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
    offset = storage.offset + storage_offset
    return Tensor("", shape, dtype, storage.storage, offset, strides, attrs={"requires_grad": bool(requires_grad)})


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    check_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"tensor record with an invalid dtype {dtype!r:.80}")
    check_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, dtype.name)


def check_metadata(metadata: Any) -> None:
    """A tensor record's metadata sets lazy bits (`{'neg': True}` of a `_neg_view`, `{'conj':
    True}` of a `conj()` view) that torch applies on loading: the stored bytes are not the values,
    so the tensor is refused rather than misread."""
    if metadata is None or (isinstance(metadata, dict) and not any(metadata.values())):
        return
    shown = sorted(map(str, metadata)) if isinstance(metadata, dict) else type(metadata).__name__
    raise FormatError(f"a tensor record with metadata {shown!s:.80} (a lazy negation or conjugation): not read")


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


def _bytearray(data: bytes | str = b"", encoding: str = "latin-1") -> bytearray:
    """bytearray as pickles call it: from bytes, or protocol 2's latin-1 text; never from a
    count (`bytearray(3 << 30)` would allocate what the file only claims)."""
    if isinstance(data, str):
        return bytearray(_encode(data, encoding))
    if not isinstance(data, bytes):
        raise UnsafeContentError(f"refuses builtins.bytearray({type(data).__name__}): only bytes or text are admitted")
    return bytearray(data)


def _complex(real: float | str = 0.0, imag: float = 0.0) -> complex:
    if not (isinstance(real, (int, float, str)) and isinstance(imag, (int, float))) or isinstance(real, bool):
        raise UnsafeContentError(f"refuses builtins.complex({type(real).__name__}): only numbers are admitted")
    if isinstance(real, str):
        if len(real) > 100 or imag:
            raise UnsafeContentError("refuses builtins.complex of a long text, or of text and a number")
        return complex(real)
    return complex(real, imag)


def _device(*spec):
    return TorchDevice(tuple(spec))


def _admitted() -> dict[str, Any]:
    globals_: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": _bytearray,
        "builtins.complex": _complex,
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


# modules whose globals are refused outright, whatever the opcode: what code execution goes through
REFUSED_MODULES = frozenset(
    [
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "builtins",
        "importlib",
        "runpy",
        "shutil",
        "socket",
        "pickle",
        "_pickle",
        "marshal",
        "ctypes",
        "code",
        "codeop",
        "pty",
        "multiprocessing",
        "webbrowser",
        "types",
        "functools",
        "operator",
        "io",
        "_io",
        "torch",
    ]
)


# Data-only classes: calling one (REDUCE) only ever builds a value from the arguments (no file,
# process or code is touched), so the call is recorded, never made. `torch.load(weights_only=False)`
# of a written file builds them; paramctl lists them in info and writes them back as read.
DATA_CALLABLES = frozenset(
    [f"{m}.{f}" for m in ("numpy.core.multiarray", "numpy._core.multiarray") for f in ("scalar", "_reconstruct")]
    + ["numpy.dtype", "collections.defaultdict"]
    + [f"datetime.{c}" for c in ("datetime", "date", "time", "timedelta", "timezone")]
    + [f"{m}.{c}" for m in ("pathlib", "pathlib._local") for c in ("Path", "PosixPath", "WindowsPath")]
    + [f"{m}.{c}" for m in ("pathlib", "pathlib._local") for c in ("PurePath", "PurePosixPath", "PureWindowsPath")]
)
# builtin types that data-only objects name without calling (`defaultdict(list)`, OmegaConf's
# `object_type`): kept as references; calling one is refused as for any class
DATA_REFERENCES = frozenset(f"builtins.{c}" for c in ("list", "dict", "tuple", "int", "float", "str", "bool", "object"))
ENUM_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*")
_NO_STATE = object()


class Opaque:
    """An object of a class paramctl does not load (an `argparse.Namespace` among a Lightning
    checkpoint's hyper-parameters): kept as the class's name and what the pickle gave it
    (construction arguments, state, items), never constructed, so that it is written back as it
    was read. Calling the class (REDUCE, INST) would run its code: refused unless the class is
    data-only (DATA_CALLABLES) or an enum member, a third-party `Class(literal)`."""

    module = ""
    qualname = ""
    global_name = ""
    data_only = False
    kind: str  # "newobj": cls.__new__(cls, *args); "reduce": cls(*args)
    args: tuple
    state: Any
    items: list  # APPENDS into it
    entries: list  # SETITEMS into it, as (key, value)

    def __new__(cls, *args: Any) -> Opaque:  # NEWOBJ and OBJ: no code of the class runs
        obj = super().__new__(cls)
        obj.kind, obj.args, obj.state, obj.items, obj.entries = "newobj", args, _NO_STATE, [], []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE: the call is recorded, not made
        if not (self.data_only or (not kwargs and is_enum_member(self.module, self.qualname, args))):
            raise UnsafeContentError(f"refuses to load: pickle global {self.global_name} is not allowed (called)")
        self.kind = "reduce"

    def __setstate__(self, state: Any) -> None:  # BUILD
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) into a dict subclass
        self.entries.append((key, value))

    def append(self, item: Any) -> None:  # APPEND(S) into a list subclass
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    @property
    def has_state(self) -> bool:
        return self.state is not _NO_STATE


def is_enum_member(module: str, qualname: str, args: tuple) -> bool:
    """Whether `module.qualname(*args)` reads as an enum member as pickle writes one: a class
    (CapWords) of a third-party module called with one literal. The standard library's classes
    are excluded: some of them act on construction (`logging.FileHandler('x')` opens a file)."""
    top = module.split(".")[0]
    return (
        len(args) == 1
        and type(args[0]) in (str, int, float, bool)
        and ENUM_CLASS.fullmatch(qualname) is not None
        and top not in sys.stdlib_module_names
        and top not in REFUSED_MODULES
    )


@functools.cache
def opaque_class(module: str, qualname: str) -> type[Opaque]:
    key = f"{module}.{qualname}"
    attrs = {"module": module, "qualname": qualname, "global_name": key, "data_only": key in DATA_CALLABLES}
    return type("Opaque", (Opaque,), attrs)


NUMPY = "numpy"  # Tensor.attrs key of a row read from a numpy array: the array's record, to write it back
NUMPY_DTYPES = {
    "b1": "bool",
    "u1": "uint8",
    "i1": "int8",
    "u2": "uint16",
    "i2": "int16",
    "f2": "float16",
    "u4": "uint32",
    "i4": "int32",
    "f4": "float32",
    "c8": "complex64",
    "u8": "uint64",
    "i8": "int64",
    "f8": "float64",
    "c16": "complex128",
}


def numpy_row(node: Opaque) -> Tensor | None:
    """The row a pickled numpy array is (`_reconstruct` then BUILD with (version, shape, dtype,
    fortran, bytes)), holding its bytes; None when NODE is no such array or one of a dtype
    paramctl has no row for (objects, strings, records, big-endian)."""
    if node.qualname != "_reconstruct" or not node.data_only or node.kind != "reduce":
        return None
    state = node.state
    if not (isinstance(state, tuple) and len(state) == 5):
        return None
    _version, shape, dtype, fortran, raw = state
    if not (isinstance(dtype, Opaque) and dtype.global_name == "numpy.dtype" and dtype.args):
        return None
    name = NUMPY_DTYPES.get(dtype.args[0]) if isinstance(dtype.args[0], str) else None
    dtype_state = dtype.state if dtype.has_state and isinstance(dtype.state, tuple) else ()
    order = dtype_state[1] if len(dtype_state) > 1 else "|"
    if name is None or order not in ("<", "|", "=") or type(fortran) is not bool or not isinstance(raw, bytes):
        return None
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        return None
    if len(raw) != math.prod(shape) * itemsize(name):
        return None
    stride = tuple(reversed(contiguous_strides(tuple(reversed(shape))))) if fortran else None
    return Tensor("", shape, name, Storage(len(raw), buffer=raw), stride=stride, attrs={NUMPY: node})


def arrays_as_rows(obj: Any) -> Any:
    """OBJ with each numpy array in its containers replaced by its row (one row per array, so an
    array pickled once and referenced twice stays one tensor)."""
    rows: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(node: Any) -> Any:
        if isinstance(node, Opaque):
            if id(node) not in rows:
                rows[id(node)] = numpy_row(node) or node
            return rows[id(node)]
        if id(node) in seen or not isinstance(node, (dict, list, tuple)):
            return node
        seen.add(id(node))
        if isinstance(node, dict):
            check_attributes(node)  # before anything calls its methods
            for k, v in node.items():
                if (new := visit(v)) is not v:
                    node[k] = new
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if (new := visit(v)) is not v:
                    node[i] = new
        elif type(node) is tuple:
            items = [visit(v) for v in node]
            if any(a is not b for a, b in zip(items, node)):
                return tuple(items)
        return node

    return visit(obj)


@dataclass(eq=False)
class _StorageRef:
    key: str
    dtype: str | None
    nbytes: int
    storage: Storage
    offset: int = 0  # elements: a legacy storage view starts inside its root storage


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only ADMITTED globals. Zip format: storages resolve to the members in STORAGES.
    Legacy format (STORAGES None): each storage becomes a region whose place in the file is
    known only after the object, so `legacy` collects them for `load_legacy` to locate."""

    def __init__(self, file: BinaryIO | BoundedReader, storages: dict[str, Storage] | None, path: str):
        super().__init__(file, encoding="utf-8")
        self.storages = storages
        self.path = path
        self.refs: dict[str, _StorageRef] = {}
        self.legacy: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles spell some globals the Python 2 way (__builtin__.eval): name them as
        # Python 3 does, as the standard unpickler would resolve them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module}.{name}"
        if key in ADMITTED:
            return ADMITTED[key]
        if module.split(".")[0] in REFUSED_MODULES and key not in DATA_REFERENCES:
            raise UnsafeContentError(f"refuses to load: pickle global {key} is not allowed", self.path)
        return opaque_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise FormatError(f"unknown persistent id {pid!r:.80}", self.path)
        if self.storages is None and len(pid) == 6:
            return self.legacy_storage(*pid[1:])
        if self.storages is None or len(pid) != 5:
            raise FormatError(f"unknown persistent id {pid!r:.80}", self.path)
        _, stype, key, _location, _numel = pid
        key = str(key)
        if key not in self.refs:
            if key not in self.storages:
                raise FormatError(f"storage data/{key} is missing from the archive", self.path)
            storage = self.storages[key]
            self.refs[key] = _StorageRef(key, stype.dtype, storage.nbytes, storage)
        return self.refs[key]

    def legacy_storage(self, stype: StorageType, key: Any, _location: Any, numel: Any, view: Any) -> _StorageRef:
        if stype.dtype is None or type(numel) is not int or numel < 0:
            raise FormatError(f"invalid legacy storage record for {key!r:.40}", self.path)
        key = str(key)
        if key not in self.legacy:
            nbytes = numel * itemsize(stype.dtype)
            self.legacy[key] = _StorageRef(key, stype.dtype, nbytes, Storage(nbytes, path=self.path))
        root = self.legacy[key]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])):
            raise FormatError(f"invalid legacy storage view {view!r:.80}", self.path)
        _, offset, size = view
        if offset < 0 or size < 0 or (offset + size) * itemsize(stype.dtype) > root.nbytes:
            raise FormatError(f"legacy storage view {view!r:.80} lies outside its storage", self.path)
        return _StorageRef(key, stype.dtype, size * itemsize(stype.dtype), root.storage, offset)


def unpickle(data: bytes | BinaryIO | BoundedReader, storages: dict[str, Storage] | None, path: str) -> Any:
    """The restricted unpickler's result, any failure as FormatError (UnsafeContentError for a
    refused global)."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    check_lengths(stream, path)
    return load_with(RestrictedUnpickler(stream, storages, path))


def check_lengths(stream: BinaryIO | BoundedReader, path: str) -> None:
    """Walk the opcodes of the pickle at STREAM's position, then rewind: the C unpickler
    allocates whatever length a BINBYTES-style opcode declares before reading it, while
    pickletools reads what is there and fails on a length the data cannot back."""
    check_pickle(stream, path)  # and dict keys, set items and integers kept to what checkpoints hold


def load_with(unpickler: RestrictedUnpickler) -> Any:
    path = unpickler.path
    try:
        return arrays_as_rows(unpickler.load())
    except FormatError as e:
        if e.path is None:
            raise FormatError(str(e), path) from None
        raise
    except RecursionError:
        raise FormatError("pickle nests too deeply", path) from None
    except Exception as e:  # a malformed pickle raises anything from UnpicklingError to TypeError
        raise FormatError(f"invalid pickle: {type(e).__name__}: {e}", path) from None


def check_attributes(node: dict) -> None:
    """FormatError if NODE has an attribute that hides one of its class's (a BUILD state setting
    `items` on an OrderedDict): torch's loader and paramctl would read it differently. torch sets
    only `_metadata` on a state dict."""
    for name in getattr(node, "__dict__", None) or ():
        if not isinstance(name, str) or hasattr(type(node), name):
            raise FormatError(
                f"a container ({type(node).__name__}) whose pickled state sets attribute {name!r:.40}, hiding "
                "the container's own: read differently by different loaders, so refused"
            )


# --- the zip format ----------------------------------------------------------------------------


@dataclass
class Archive:
    """A torch.save (or torch.jit.save) zip as torch's reader sees it: its members, the folder
    `top` they live under, the storages in `top/data/`, and the pickle `top/data.pkl`."""

    zf: zipfile.ZipFile
    members: dict[str, zipfile.ZipInfo]
    top: str
    storages: dict[str, Storage]
    data: bytes


def open_archive(path: str, kind: str = "PyTorch checkpoint") -> Archive:
    zf, members = zip_members(path)
    pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise FormatError(f"not a {kind}: no single <top>/data.pkl in the archive", path)
    top = pickles[0][: -len("data.pkl")]
    if not next(iter(members)).startswith(top):  # torch takes <top> from the first member
        raise FormatError(f"the archive's first member is not under {top}, where torch looks", path)
    byteorder = members.get(top + "byteorder")
    try:
        if byteorder is not None and read_member(zf, byteorder, path).strip() not in (b"little", b""):
            raise FormatError(f"big-endian {kind}s are not supported", path)
        storages = {
            name[len(top) + 5 :]: member_storage(zf, info, path)
            for name, info in members.items()
            if name.startswith(top + "data/")
        }
        data = read_member(zf, members[pickles[0]], path)
    except ZIP_ERRORS as e:
        raise FormatError(f"invalid zip archive: {e}", path) from None
    return Archive(zf, members, top, storages, data)


def load_zip(path: str, source: str) -> Checkpoint:
    archive = open_archive(path)
    data, storages = archive.data, archive.storages
    obj = unpickle(data, storages, path)
    return Checkpoint(source, "pt", name_tensors(obj, path), extra=obj)


# The walk over the object visits a container once per place it is reached from (a state dict
# saved under two keys gives two sets of rows), so memo sharing could make it exponential (a list
# DAG of 64 levels in 600 bytes): it may visit at most this many entries per byte of the file.
WALK_PER_BYTE = 4
WALK_MIN = 1 << 16
# all rows together may claim at most this many times the bytes of their distinct storages (ties
# and views over one storage: reading every row must not cost what the file only claims)
CLAIM_PER_BYTE = 16
CLAIM_MIN = 1 << 26


def name_tensors(obj: Any, path: str) -> list[Tensor]:
    """Every tensor in OBJ, named by its path of keys and indices; bounds are checked.

    Each row records that path as its POSITION, so that the writer puts it back there (or, once
    renamed, under its new key) whatever else has changed in the table. A tensor that would not
    be a row (inside an object kept opaque, a set, an attribute or a key) refuses the file: a
    table that silently lacks it would let `check` pass what it never saw.
    """
    tensors: list[Tensor] = []
    seen: dict[int, Tensor] = {}  # a tensor object pickled twice is memoized: give each place a row
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    budget = [max(WALK_MIN, WALK_PER_BYTE * size)]
    claimed, stored, storages = 0, 0, set()  # bytes the rows claim; bytes of the storages they view

    def spend() -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise FormatError("the object's shared parts expand past what the file can hold (memo bomb)", path)

    def walk(node: Any, keys: tuple) -> None:
        nonlocal claimed, stored
        spend()
        if isinstance(node, Tensor):
            if id(node) in seen:  # one pickled object in two places: a row per name, tied
                first = seen[id(node)]
                node = Tensor(
                    "", first.shape, first.dtype, first.storage, first.offset, first.stride, attrs=dict(first.attrs)
                )
            seen[id(node)] = node
            node.name = dotted(keys) or "tensor"
            node.attrs[POSITION] = keys
            node.check_bounds()
            claimed += node.nbytes
            if id(node.storage) not in storages:
                storages.add(id(node.storage))
                stored += node.storage.nbytes
            if claimed > CLAIM_MIN + CLAIM_PER_BYTE * stored:
                raise FormatError(
                    f"the tensors claim {claimed} bytes, more than {CLAIM_PER_BYTE} times the "
                    f"{stored} bytes of their storages (views and ties repeating them)",
                    path,
                )
            tensors.append(node)
        elif isinstance(node, dict):
            attributes = getattr(node, "__dict__", None)
            if attributes:
                attribute_tensors(attributes, keys)
            for k, v in node.items():
                if not isinstance(k, (str, int, float, bool, tuple, type(None))):
                    unseen(k, keys, f"a key of {dotted(keys) or 'the object'}")
                walk(v, (*keys, k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, (*keys, i))
        elif isinstance(node, (set, frozenset)):
            for v in node:
                unseen(v, keys, f"the set {dotted(keys) or 'the file holds'}")
        elif isinstance(node, Opaque):
            parts = [*node.args, *node.items, *(v for kv in node.entries for v in kv)]
            for v in (*parts, node.state if node.has_state else None):
                unseen(v, keys, f"an object of class {node.global_name} that paramctl keeps opaque")

    def attribute_tensors(attributes: dict, keys: tuple) -> None:
        """A state dict's attributes (`_metadata`) hold no tensor: torch's load_state_dict
        would not see one there, nor would the table."""
        for name, value in attributes.items():
            unseen(value, keys, f"attribute {name} of {dotted(keys) or 'the object'}")

    looked: set[int] = set()  # containers and opaque objects looked into: OmegaConf's `_parent` makes cycles

    def unseen(node: Any, keys: tuple, where: str) -> None:
        """Refuse the file if NODE holds a tensor, which would not be a row."""
        spend()
        if isinstance(node, (dict, list, tuple, set, frozenset, Opaque)):
            if id(node) in looked:
                return
            looked.add(id(node))
        if isinstance(node, Tensor):
            at = dotted(keys) or "the top"
            raise FormatError(f"a tensor in {where} at {at}: not read as a row, so refused", path)
        if isinstance(node, dict):
            for k, v in node.items():
                unseen(k, keys, where)
                unseen(v, keys, where)
            if getattr(node, "__dict__", None):
                unseen(node.__dict__, keys, where)
        elif isinstance(node, (list, tuple, set, frozenset)):
            for v in node:
                unseen(v, keys, where)
        elif isinstance(node, Opaque):
            parts = [*node.args, *node.items, *(v for kv in node.entries for v in kv)]
            for v in (*parts, node.state if node.has_state else None):
                unseen(v, keys, f"an object of class {node.global_name} that paramctl keeps opaque")

    walk(obj, ())
    names: set[str] = set()
    for t in tensors:
        if t.name in names:
            raise FormatError(f"two tensors would both be named {t.name!r}", path)
        names.add(t.name)
    return tensors


def dotted(keys: tuple) -> str:
    """The name of the place KEYS lead to in the object: keys and indices joined with '.'."""
    name = ""
    for k in keys:
        name = f"{name}.{k}" if name else str(k)
    return name


# --- the legacy format, through torch ------------------------------------------------------------


class BoundedReader:
    """A file whose reads never ask for more than what is left of it: the unpickler sizes a
    read by the length a pickle opcode declares, which a damaged file can set to anything.
    No `readinto`, or the unpickler would allocate that declared length itself."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def left(self, n: int | None) -> int:
        remaining = max(0, self.size - self.f.tell())
        return remaining if n is None or n < 0 else min(n, remaining)

    def read(self, n: int | None = -1) -> bytes:
        return self.f.read(self.left(n))

    def readline(self, limit: int | None = -1) -> bytes:
        return self.f.readline(self.left(limit))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def load_legacy(path: str, source: str) -> Checkpoint:
    """The pre-1.6 format, read without torch: a magic-number pickle, a protocol pickle, a
    sys-info pickle, the object pickle (6-field storage ids), a pickled list of storage keys,
    then per key an int64 element count and the raw bytes."""
    size = remote.size(path)
    with remote.open_path(path) as raw:
        f = BoundedReader(raw, size)
        if unpickle(f, None, path) != LEGACY_MAGIC or unpickle(f, None, path) != LEGACY_PROTOCOL:
            raise FormatError("not a PyTorch checkpoint: a pickle without torch's magic number", path)
        info = unpickle(f, None, path)
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise FormatError("big-endian checkpoints are not supported", path)
        check_lengths(f, path)
        unpickler = RestrictedUnpickler(f, None, path)
        obj = load_with(unpickler)
        keys = unpickle(f, None, path)
        if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.legacy):
            raise FormatError("the storage list does not match the storages the object uses", path)
        position = f.tell()
        for key in map(str, keys):
            ref = unpickler.legacy[key]
            assert ref.dtype is not None  # legacy_storage refuses a storage without one
            f.seek(position)
            count = f.read(8)
            if len(count) < 8 or int.from_bytes(count, "little", signed=True) * itemsize(ref.dtype) != ref.nbytes:
                raise FormatError(f"storage {key!r} does not hold the {ref.nbytes} bytes its tensors need", path)
            ref.storage.offset = position + 8
            position += 8 + ref.nbytes
            if position > size:
                raise FormatError(f"truncated: storage {key!r} ends at byte {position} of {size}", path)
    return Checkpoint(source, "pt", name_tensors(obj, path), extra=obj)


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
            made[id(t)] = numpy_array(t) if NUMPY in t.attrs else to_torch(t)
        if t.tie is not None:
            tied[t.tie] = made[id(t)]
        return made[id(t)]

    tree = ckpt.extra if ckpt.format == "pt" else source_object(ckpt)
    if tree is not None:
        obj = _to_torch_objects(arrange(tree, ckpt.tensors), convert)
    else:
        obj = collections.OrderedDict((t.name, convert(t)) for t in ckpt.tensors)
    # the Python pickler only where opaque objects need it: the C one is twice as fast on many tensors
    module = _pickle_module(lambda node: _to_torch_objects(node, convert)) if holds_opaque(obj) else pickle
    try:
        torch.save(obj, path, pickle_module=module)
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) this way
        raise OSError(str(e).splitlines()[0]) from None


def numpy_array(t: Tensor) -> Any:
    """What row T, read from a numpy array, is written back as: its record with the row's bytes
    (same globals, so the file loads as before), or a numpy array if its shape or dtype changed."""
    record = t.attrs[NUMPY]
    _version, shape, dtype, fortran, _raw = record.state
    if t.shape == shape and t.dtype == NUMPY_DTYPES[dtype.args[0]]:
        out = opaque_class(record.module, record.qualname)(*record.args)
        out.kind = record.kind
        out.state = (_version, shape, dtype, fortran, t.array().tobytes(order="F" if fortran else "C"))
        return out
    return t.array().copy()


def holds_opaque(obj: Any) -> bool:
    """Whether OBJ's containers hold an opaque object anywhere."""
    stack, seen = [obj], set()
    while stack:
        node = stack.pop()
        if isinstance(node, Opaque):
            return True
        if isinstance(node, (dict, list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
            if isinstance(node, dict) and getattr(node, "__dict__", None):
                stack.extend(node.__dict__.values())
    return False


def _pickle_module(records: Callable[[Any], Any]) -> Any:
    """What torch.save takes as its pickle module (it subclasses the module's Pickler): `pickle`
    with an OpaquePickler that turns records into torch objects with RECORDS."""
    import types

    pickler = type("Pickler", (OpaquePickler,), {"records": staticmethod(records)})
    return types.SimpleNamespace(__name__=__name__, Pickler=pickler, dump=pickle.dump)


_PurePickler: Any = pickle._Pickler  # the Python pickler: its save() can be extended (typeshed does not declare it)


class OpaquePickler(_PurePickler):
    """The pickler torch.save writes with: opaque objects are emitted with the opcodes they were
    read from (the class as a GLOBAL, the recorded construction, items and BUILD state), so
    `torch.load(weights_only=False)` builds the same object, and `weights_only=True` refuses
    the same global as on the input. RECORDS turns the reader's records met inside an opaque
    object (tensors, dtypes) into torch objects."""

    records: Callable[[Any], Any]

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Opaque):
            self.save_opaque(obj)
        elif isinstance(obj, type) and issubclass(obj, Opaque):
            self.save_class(obj)
        elif isinstance(obj, (Tensor, TorchDtype, TorchDevice, TorchLayout, TorchSize)):
            self.save(self.records(obj), save_persistent_id)
        else:
            super().save(obj, save_persistent_id)

    def save_class(self, cls: type[Opaque]) -> None:
        if self.from_memo(cls):
            return
        module, name = cls.module, cls.qualname
        if self.proto < 3 and self.fix_imports:  # as pickle spells a Python 3 name for Python 2
            if (module, name) in _compat_pickle.REVERSE_NAME_MAPPING:
                module, name = _compat_pickle.REVERSE_NAME_MAPPING[(module, name)]
            module = _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(cls)

    def save_opaque(self, obj: Opaque) -> None:
        if self.from_memo(obj):
            return
        self.save_class(type(obj))
        self.save(obj.args)
        self.write(pickle.NEWOBJ if obj.kind == "newobj" else pickle.REDUCE)
        self.memoize(obj)
        if obj.items:
            self._batch_appends(iter(obj.items))
        if obj.entries:
            self._batch_setitems(iter(obj.entries))
        if obj.has_state:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def from_memo(self, obj: Any) -> bool:
        memo = self.memo.get(id(obj))
        if memo is not None:
            self.write(self.get(memo[0]))
        return memo is not None


# --- the object to write: the one read, rearranged to hold the table's rows -----------------------

_GONE = object()  # an entry whose row has left the table, or has been renamed out of its container
_CONTAINERS = (dict, list, tuple)


def arrange(tree: Any, rows: list[Tensor]) -> Any:
    """TREE (the object read from the file) with every tensor entry holding its row of ROWS.

    A row sits at the POSITION it was read from. Renamed, it keeps its container, under its new
    key, when its new name still starts with the container's path (in a Lightning checkpoint,
    `state_dict.model.0.weight` -> `state_dict.0.weight` is the key `model.0.weight` of the
    `state_dict` dict becoming `0.weight`); otherwise it goes, like a row the tree never held,
    into the deepest dict whose path begins its name. The entry of a row that has left the table
    is deleted. Containers are copies: TREE itself is left as it was.
    """
    if isinstance(tree, Tensor):  # torch.save(tensor): still one row named `tensor`, or a state_dict now
        if len(rows) == 1 and rows[0].name == "tensor":
            return rows[0]
        return collections.OrderedDict((t.name, t) for t in rows)
    arrangement = _Arrangement(rows)
    out = arrangement.rebuild(tree, ())
    if out is _GONE:
        return collections.OrderedDict((t.name, t) for t in rows)
    for t in rows:
        if id(t) not in arrangement.placed:
            arrangement.place(out, t)
    return out


class _Arrangement:
    def __init__(self, rows: list[Tensor]):
        self.at: dict[tuple, Tensor] = {}
        for t in rows:
            position = t.attrs.get(POSITION)
            if isinstance(position, tuple):
                self.at.setdefault(position, t)
        positioned = {id(t) for t in self.at.values()}
        # rows made since reading (or read from another file) take a place of their name
        self.newcomers = {t.name: t for t in rows if id(t) not in positioned}
        self.placed: set[int] = set()

    def row_at(self, keys: tuple) -> Any:
        row = self.at.get(keys) or self.newcomers.get(dotted(keys))
        return _GONE if row is None or id(row) in self.placed else row

    def rebuild(self, node: Any, keys: tuple) -> Any:
        if isinstance(node, Tensor):
            return self.row_at(keys)
        if isinstance(node, dict):
            return self.rebuild_dict(node, keys)
        if type(node) in (list, tuple):
            return self.rebuild_sequence(node, keys)
        return node

    def rebuild_dict(self, node: dict, keys: tuple) -> dict:
        prefix = dotted(keys)
        out = type(node)()
        renamed: dict[str, bool] = {}  # each key written, as text: whether a renamed tensor took it
        moves: list[tuple[str, str]] = []  # (old key, new key) of the tensors that stay here
        for k, v in node.items():
            child = self.rebuild(v, (*keys, k))
            moved = False
            if isinstance(v, Tensor):
                key = _GONE if child is _GONE else _key_in(child.name, prefix, k)
                if key is _GONE:
                    continue  # removed, or renamed out of this dict: placed by name later
                self.placed.add(id(child))
                moves.append((str(k), str(key)))
                moved, k = key != k, key
            if str(k) in renamed and (moved or renamed[str(k)]):
                raise UsageError(f"cannot write {dotted((*keys, k))!r}: another entry has that name")
            renamed[str(k)] = moved
            out[k] = child
        if hasattr(node, "__dict__"):
            out.__dict__.update(node.__dict__)
            metadata = node.__dict__.get("_metadata")
            if isinstance(metadata, dict) and moves:
                out.__dict__["_metadata"] = renamed_prefixes(metadata, moves)
        return out

    def rebuild_sequence(self, node: list | tuple, keys: tuple) -> list | tuple:
        out = []
        gap = None  # the first item whose tensor has left
        for i, v in enumerate(node):
            child = self.rebuild(v, (*keys, i))
            if isinstance(v, Tensor):
                if child is _GONE or child.name != dotted((*keys, i)):
                    gap = gap or dotted((*keys, i))
                    continue
                self.placed.add(id(child))
            if gap is not None:
                raise UsageError(
                    f"cannot take {gap!r} out of the list {dotted(keys) or 'the file holds'}: "
                    "the items after it would be renumbered"
                )
            out.append(child)
        return out if type(node) is list else tuple(out)

    def place(self, root: Any, t: Tensor) -> None:
        """Put row T into the deepest dict of ROOT whose path begins its name."""
        node, rest = root, t.name
        while True:
            inner = [
                (str(k), v)
                for k, v in (node.items() if isinstance(node, dict) else enumerate(node))
                if type(v) in _CONTAINERS and rest.startswith(f"{k}.")
            ]
            if not inner:
                break
            key, node = max(inner, key=lambda kv: len(kv[0]))
            rest = rest[len(key) + 1 :]
        where = t.name[: len(t.name) - len(rest) - 1]
        if not isinstance(node, dict):
            raise UsageError(f"cannot write {t.name!r}: {where!r} is a list, whose items are numbered")
        if any(str(k) == rest for k in node):
            raise UsageError(f"cannot write {t.name!r}: the file already has an entry of that name")
        node[rest] = t


def _key_in(name: str, prefix: str, old: Any) -> Any:
    """The key under which the row NAME stays in the dict at PREFIX, where its key was OLD; or _GONE."""
    if prefix and not name.startswith(prefix + "."):
        return _GONE
    rest = name[len(prefix) + 1 :] if prefix else name
    if rest == str(old):
        return old
    if not rest:
        return _GONE
    if isinstance(old, int) and rest.isdecimal() and str(int(rest)) == rest:
        return int(rest)  # an optimizer state keyed by parameter index stays keyed by integers
    return rest


def renamed_prefixes(metadata: dict, moves: list[tuple[str, str]]) -> dict:
    """A state_dict's `_metadata` (module versions keyed by module prefix) with each prefix
    renamed as the keys under it were, as torch's `consume_prefix_in_state_dict_if_present`
    does: `module.0` becomes `0` when `module.0.weight` became `0.weight`. A module without
    tensors (a ReLU) follows its parent; a prefix whose keys disagree stays as it was."""
    votes: dict[str, set[str | None]] = {}
    for old, new in moves:
        parts = old.split(".")
        for n in range(1, len(parts)):
            prefix = ".".join(parts[:n])
            if prefix in metadata:
                rest = old[len(prefix) + 1 :]
                target = "" if new == rest else new[: -len(rest) - 1] if new.endswith("." + rest) else None
                votes.setdefault(prefix, set()).add(target)
    renamed = {p: v.pop() for p, v in votes.items() if len(v) == 1 and None not in v}

    def new_prefix(prefix: Any) -> Any:
        if not isinstance(prefix, str) or not prefix or prefix in votes:
            return renamed.get(prefix, prefix)
        parts = prefix.split(".")
        for n in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:n])
            if parent in votes:
                if parent not in renamed:
                    return prefix
                rest = ".".join(parts[n:])
                return f"{renamed[parent]}.{rest}" if renamed[parent] else rest
        return prefix

    out = type(metadata)()
    for prefix, value in metadata.items():
        out[new_prefix(prefix)] = value
    return out


def _to_torch_objects(node: Any, convert: Any) -> Any:
    """The object read by the restricted unpickler, with records turned back into torch objects."""
    import torch

    if isinstance(node, Opaque):
        return node  # written back by the pickler as it was read, never constructed
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
    if isinstance(node, Opaque):
        value = opaque_value(node)
        return f"opaque {node.global_name}{f' {value}' if value else ''} (not loaded)"
    if isinstance(node, TorchDtype):
        return f"torch.{node.name}"
    if isinstance(node, TorchDevice):
        return f"device{node.spec!r}"
    if isinstance(node, TorchSize):
        return f"torch.Size({list(node)})"
    if isinstance(node, (dict, list, tuple)):
        return repr(node)
    return f"{type(node).__name__}: {node!r:.200}"


def opaque_value(node: Opaque) -> str:
    """What a data-only object holds, for `info`, rebuilt from its recorded arguments as plain
    values (never by calling its class): a numpy scalar's value, a datetime, a path."""
    args = node.args
    if node.qualname == "scalar" and node.data_only and len(args) == 2 and isinstance(args[1], bytes):
        dtype = args[0]
        name = NUMPY_DTYPES.get(dtype.args[0]) if isinstance(dtype, Opaque) and dtype.args else None
        if name is not None and len(args[1]) == itemsize(name) and name != "bool":
            import numpy as np

            return f"{name} {np.frombuffer(args[1], name)[0].item()!r}"
    if node.global_name == "datetime.datetime" and args and isinstance(args[0], bytes) and len(args[0]) == 10:
        b = args[0]
        year = b[0] * 256 + b[1]
        return f"{year:04}-{b[2]:02}-{b[3]:02} {b[4]:02}:{b[5]:02}:{b[6]:02}"
    if node.module in ("pathlib", "pathlib._local") and node.data_only and all(isinstance(a, str) for a in args):
        return repr("/".join(args).replace("//", "/"))
    if node.kind == "reduce" and not node.data_only and len(args) == 1:  # an enum member: its value
        return f"({args[0]!r:.80})"
    return ""


# --- registration --------------------------------------------------------------------------------


def load(path: str, source: str) -> Checkpoint:
    """A `torch.save` file: the zip format (torch >= 1.6) or the legacy pickle stream."""
    zipped = remote.read_range(path, 0, 4) in (b"PK\x03\x04", b"PK\x05\x06")
    return load_zip(path, source) if zipped else load_legacy(path, source)


def _accept(probe: Probe) -> bool:
    if probe.head[0] == 0x80:  # a pickle's PROTO opcode: the legacy format
        return True
    names = probe.zip_names
    return names is not None and any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names)


def source_object(ckpt: Checkpoint) -> Any:
    """The object another format's reader says `torch.save` should write for CKPT (a DCP
    directory: the nested state dict `dcp_to_torch_save` writes), or None."""
    return getattr(ckpt.extra, "pt_object", None)


def _losses(ckpt: Checkpoint, sharded: bool) -> list[str]:
    if (ckpt.format == "pt" or source_object(ckpt) is not None) and not sharded:
        return []
    return dropped_entries(ckpt, "sharded pt" if sharded else "pt")


register(
    Format(
        name="pt",
        description="PyTorch (torch.save, zip or legacy)",
        load=load,
        save=save,
        extensions=(".pt", ".pth", ".bin", ".ckpt"),
        accept=_accept,
        losses=_losses,
        entries=non_tensor_entries,
        keeps_views=True,
        remote=True,
    )
)

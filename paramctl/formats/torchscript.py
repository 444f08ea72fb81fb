"""TorchScript archives (`torch.jit.save`), read without torch and without running their code.

The archive is a zip like `torch.save`'s (`<top>/data.pkl`, `<top>/data/<key>`) plus the module's
code (`<top>/code/__torch__/...py`), `constants.pkl` and `version`. `data.pkl` pickles the module
as objects of its script classes (`__torch__.torch.nn.modules.linear.Linear`, mangled
`__torch__.___torch_mangle_3.Block`), each made by NEWOBJ and given its attributes by BUILD:
parameters, buffers, submodules and plain values alike. Those classes are admitted as inert
records (never imported, never called), and the pickle is otherwise read by the `.pt` reader's
restricted unpickler.

Which attributes are parameters and buffers the pickle does not say: each class's definition in
`code/` declares them (`__parameters__ = ["weight", "bias", ]`, `__buffers__ = [...]`), and that
text is read as text (the two lists parsed as literals). Rows are what `torch.jit.load(f).state_dict()`
holds, in its order: a module's parameters, then its buffers, then its submodules', named by
attribute names joined with `.`; a tensor held by two names (a tied weight) is one storage. Tensor
attributes that are neither (and `constants.pkl`) are not in the state dict and not rows.

paramctl does not write TorchScript archives: converting one to `.pt` or safetensors keeps its state
dict; the code cannot be kept, and an archive is never overwritten in place.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

from paramctl.errors import FormatError
from paramctl.formats import Format, Probe, register
from paramctl.formats.pytorch import (
    WALK_MIN,
    WALK_PER_BYTE,
    Opaque,
    RestrictedUnpickler,
    check_lengths,
    load_with,
    opaque_class,
    open_archive,
)
from paramctl.formats.zipfiles import ZIP_ERRORS, read_member
from paramctl.table import Checkpoint, Tensor

READ_ONLY = "TorchScript archives are read-only in paramctl: convert to .pt or safetensors"


def _typed_list(kind: type) -> Any:
    """torch.jit._pickle.build_<kind>list: the list itself, checked, nothing else done."""

    def build(data: Any) -> list:
        if not (isinstance(data, list) and all(isinstance(v, kind) for v in data)):
            raise FormatError(f"a typed list of {kind.__name__} holding something else")
        return data

    return build


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    return value


JIT_GLOBALS: dict[str, Any] = {
    "torch.jit._pickle.build_intlist": _typed_list(int),
    "torch.jit._pickle.build_doublelist": _typed_list(float),
    "torch.jit._pickle.build_boollist": _typed_list(bool),
    "torch.jit._pickle.build_tensorlist": _typed_list(object),
    "torch.jit._pickle.restore_type_tag": _restore_type_tag,
}


def is_script_class(module: str) -> bool:
    return module == "__torch__" or module.startswith("__torch__.")


class ScriptUnpickler(RestrictedUnpickler):
    """The `.pt` reader's unpickler, admitting the archive's script classes as inert records and
    torch.jit's typed-list builders; every other global as the `.pt` reader decides."""

    def find_class(self, module: str, name: str) -> Any:
        if is_script_class(module):
            return opaque_class(module, name)
        key = f"{module}.{name}"
        if key in JIT_GLOBALS:
            return JIT_GLOBALS[key]
        return super().find_class(module, name)


CLASS = re.compile(r"^class (\w+)\((\w*)\):\n((?:  .*\n|\n)*)", re.M)
DECLARED = re.compile(r"^  __(parameters|buffers)__ = (\[[^\n]*\])$", re.M)


class Declarations:
    """Each script class's declared parameters and buffers, read as text from `code/` when
    first asked for (a class lives in `code/<module path>.py`)."""

    def __init__(self, zf: Any, members: dict, top: str, path: str):
        self.zf, self.members, self.top, self.path = zf, members, top, path
        self.files: dict[str, dict[str, tuple[str, list[str], list[str]]]] = {}

    def of(self, module: str, name: str) -> tuple[str, list[str], list[str]]:
        """(base class, parameter names, buffer names) of the class MODULE.NAME."""
        file = f"{self.top}code/{module.replace('.', '/')}.py"
        if file not in self.files:
            self.files[file] = self.parse(file)
        found = self.files[file].get(name)
        if found is None:
            raise FormatError(f"class {module}.{name} is not defined in the archive's code/", self.path)
        return found

    def parse(self, file: str) -> dict[str, tuple[str, list[str], list[str]]]:
        info = self.members.get(file)
        if info is None:
            return {}
        try:
            text = read_member(self.zf, info, self.path).decode("utf-8")
        except (UnicodeDecodeError, *ZIP_ERRORS) as e:
            raise FormatError(f"unreadable {file}: {e}", self.path) from None
        classes = {}
        for match in CLASS.finditer(text):
            lists: dict[str, list[str]] = {"parameters": [], "buffers": []}
            for kind, literal in DECLARED.findall(match.group(3)):
                try:
                    import ast

                    names = ast.literal_eval(literal)
                except (ValueError, SyntaxError):
                    names = None
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise FormatError(f"class {match.group(1)} in {file} declares __{kind}__ unreadably", self.path)
                lists[kind] = names
            classes[match.group(1)] = (match.group(2), lists["parameters"], lists["buffers"])
        return classes


def state_dict_rows(root: Any, declarations: Declarations, path: str) -> list[Tensor]:
    """The rows `state_dict()` would give for the module ROOT: parameters, buffers, then each
    submodule's, depth first, named by attribute path."""
    rows: list[Tensor] = []
    made: dict[int, Tensor] = {}
    # a submodule shared under several names is visited under each, as state_dict() does: a chain
    # of modules each holding the next twice would be exponential, so the visits are bounded
    budget = [max(WALK_MIN, WALK_PER_BYTE * os.path.getsize(path))]

    def module(node: Opaque, prefix: str, depth: int) -> None:
        budget[0] -= 1
        if depth > 200 or budget[0] < 0:
            raise FormatError("modules nest too deeply or are shared too often to be a state dict", path)
        _base, parameters, buffers = declarations.of(node.module, node.qualname)
        state = node.state if node.has_state else None
        if not isinstance(state, dict):
            raise FormatError(f"module {prefix or 'the top'} ({node.global_name}) has no attribute dict", path)
        for declared in (parameters, buffers):
            for name, value in state.items():
                if name in declared and isinstance(value, Tensor):
                    row(value, prefix + name, parameter=declared is parameters)
        for name, value in state.items():
            if (
                isinstance(value, Opaque)
                and is_script_class(value.module)
                and declarations.of(value.module, value.qualname)[0] == "Module"
            ):
                module(value, f"{prefix}{name}.", depth + 1)

    def row(t: Tensor, name: str, parameter: bool) -> None:
        if id(t) in made:  # one tensor under two names: a tie, one storage
            first = made[id(t)]
            t = Tensor(
                name, first.shape, first.dtype, first.storage, first.offset, first.stride, attrs=dict(first.attrs)
            )
        made.setdefault(id(t), t)
        t.name = name
        t.attrs["parameter"] = parameter
        t.check_bounds()
        rows.append(t)

    if not (isinstance(root, Opaque) and is_script_class(root.module)):
        raise FormatError("the archive's data.pkl holds no script module", path)
    module(root, "", 0)
    return rows


def load(path: str, source: str) -> Checkpoint:
    archive = open_archive(path, "TorchScript archive")
    stream = io.BytesIO(archive.data)
    check_lengths(stream, path)
    root = load_with(ScriptUnpickler(stream, archive.storages, path))
    rows = state_dict_rows(root, Declarations(archive.zf, archive.members, archive.top, path), path)
    return Checkpoint(source, "torchscript", rows, extra=root)


def _accept(probe: Probe) -> bool:
    names = probe.zip_names
    if names is None:
        return False
    tops = {n.split("/", 1)[0] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
    return any(n.startswith(f"{top}/code/") or n == f"{top}/constants.pkl" for top in tops for n in names)


register(
    Format(
        name="torchscript",
        description="TorchScript archive (torch.jit.save)",
        load=load,
        accept=_accept,
        priority=20,
    )
)

"""A walk over a pickle's opcodes before the unpickler runs: what it would be made to do that no
checkpoint needs, refused up front.

The C unpickler trusts the stream in three ways that a file of a few hundred bytes can turn into
unbounded work or memory:

- a BINBYTES-style opcode's declared length is allocated before it is read (pickletools reads
  what is there instead, and fails on a length the data cannot back);
- a dict key, a set item or an argument of an admitted set-building class is hashed, and a tuple's
  hash walks all of its members without caching: a key that is a tuple DAG
  (`T_k = (T_{k-1}, T_{k-1})`, shared through the memo) costs 2^k steps for k opcodes;
- an integer of thousands of digits loads, but anything that later prints it fails.

So dict keys and set items are kept to what state dicts use: str, int, float, bool, None, bytes,
a global (a dtype), an object that hashes by identity, or a tuple of such scalars. An integer
longer than Python prints (about 4300 digits) is refused.
"""

from __future__ import annotations

import pickletools
from collections.abc import Callable
from typing import Any, BinaryIO

from paramctl.errors import FormatError

MAX_INT_BITS = 14_000  # Python refuses to print an int of more than 4300 digits (~14,284 bits)
MAX_NAME = 4096  # the longest text kept to name a STACK_GLOBAL's module or class
# admitted callables that hash what they are given (the others record their arguments)
HASHING = frozenset(["builtins.set", "builtins.frozenset", "collections.Counter", "collections.OrderedDict"])
# callables whose results hash by their (file-controlled) contents: not admitted as keys
STRUCTURAL = frozenset(["torch.Size", "builtins.frozenset", "builtins.tuple"])

STRINGS = ["STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"]
INTS = ["INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"]
SCALARS = ["BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT"]
OPCODES = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
STOP = next(op for op in pickletools.opcodes if op.name == "STOP")


class Item:
    """What the walk knows of one object on the unpickler's stack or in its memo."""

    __slots__ = ("kind", "key", "ok", "name", "members")

    def __init__(self, kind: str, key: bool = False, ok: bool = True, name: str | None = None, members: tuple = ()):
        self.kind = kind  # scalar, str, tuple, list, dict, set, frozenset, global, call, mark
        self.key = key  # whether it may be a dict key or set item: hashing it is bounded
        self.ok = ok  # a list: every item may be a key; a tuple: every item is a scalar, str or global
        self.name = name  # a str's text, a global's dotted name (None: unknown)
        self.members = members  # a tuple's items


SCALAR = Item("scalar", key=True)
MARK = Item("mark")
# shared items, as no opcode changes what the walk knows of them: dicts and sets (their keys are
# checked as they are added), lists every item of which may be a key and lists one of which may not
DICT, SET, BAD_LIST = Item("dict"), Item("set"), Item("list", ok=False)
LIST = Item("list")  # a list only one place on the stack refers to (see `own`)
FLAT = ("scalar", "str", "global")


class Refused(Exception):
    pass


def check_pickle(stream: BinaryIO | Any, path: str) -> None:
    """Walk the opcodes of the pickle at STREAM's position, then rewind; FormatError for a
    stream the unpickler would misread, or be made to work without bound on."""
    start = stream.tell()
    try:
        walk(stream)
    except Refused as e:
        raise FormatError(f"refuses the pickle: {e}", path) from None
    except Exception as e:  # ValueError for a short read or a bad opcode, among others
        raise FormatError(f"invalid pickle: {e}", path) from None
    stream.seek(start)


def walk(stream: BinaryIO | Any) -> None:
    """Read every opcode up to STOP (pickletools' readers check each declared length against
    what is there) while keeping a model of the unpickler's stack and memo: what each object is,
    as far as hashing it goes. Where the model's stack breaks, the unpickler's does too, at that
    opcode at the latest (having refused any global before): the model stops, the reading goes on."""
    stack: list[Item] = []
    memo: dict[Any, Item] = {}
    modelled = True
    read = stream.read
    while True:
        code = read(1)
        if not code:
            raise ValueError("the pickle ends before its STOP opcode")
        found = DISPATCH.get(code[0])
        if found is None:
            raise ValueError(f"unknown opcode {code!r}")
        op, step = found
        arg = op.arg.reader(stream) if op.arg is not None else None
        if op is STOP:
            return
        if modelled:
            try:
                step(arg, stack, memo)
            except (IndexError, KeyError, ValueError, AttributeError):
                modelled = False


def pop_mark(stack: list[Item]) -> list[Item]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise IndexError("no mark on the stack")


def check_keys(items: list[Item] | tuple[Item, ...], where: str) -> None:
    for item in items:
        if not item.key:
            raise Refused(
                f"a {where} that is a {item.kind} of containers or objects (keys are str, int or tuples of those)"
            )


def appended(stack: list[Item], items: list[Item]) -> None:
    """ITEMS appended to the list on top of STACK (else the unpickler fails, or an opaque object
    records them)."""
    target = stack[-1]
    if target.kind == "list" and target.ok and not all(i.key for i in items):
        if target is LIST:  # a list no other place refers to: it becomes one of many bad lists
            stack[-1] = BAD_LIST
        else:
            target.ok = False


def call(callable_: Item, args: list[Item] | tuple[Item, ...]) -> Item:
    """The result of calling CALLABLE_ with ARGS; a hashing class's arguments are checked."""
    name = callable_.name if callable_.kind == "global" else None
    if name is None or name in HASHING:
        for arg in args:
            if (arg.kind == "list" and not arg.ok) or (arg.kind == "tuple" and not all(m.key for m in arg.members)):
                raise Refused(f"{name or 'a class'} given items that are containers or objects")
    return Item("call", key=name is not None and name not in STRUCTURAL, name=name)


def as_args(item: Item) -> tuple[Item, ...]:
    return item.members if item.kind == "tuple" else (item,)


def global_name(arg: Any) -> str:
    return ".".join(str(arg).split(" ", 1))


def own(stack: list[Item]) -> Item:
    """The top of STACK, made an item of its own if it is the shared LIST (which stands for any
    list that only one place refers to): a second reference must see its later appends."""
    if stack[-1] is LIST:
        stack[-1] = Item("list")
    return stack[-1]


def put(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    memo[arg] = own(stack)


def get(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.append(memo[arg])


def memoize(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    memo[len(memo)] = own(stack)


def integer(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    if type(arg) is int and arg.bit_length() > MAX_INT_BITS:
        raise Refused(f"an integer of {arg.bit_length()} bits")
    stack.append(SCALAR)


def scalar(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.append(SCALAR)


def string(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.append(Item("str", key=True, name=arg if isinstance(arg, str) and len(arg) <= MAX_NAME else None))


def new(kind: str, key: bool = False) -> Callable[[Any, list[Item], dict[Any, Item]], None]:
    return lambda arg, stack, memo: stack.append(Item(kind, key))


def tuple_of(n: int | None) -> Callable[[Any, list[Item], dict[Any, Item]], None]:
    def make(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
        if n is None:
            members = tuple(pop_mark(stack))
        else:
            if len(stack) < n:
                raise IndexError("stack underflow")
            members = tuple(stack[len(stack) - n :])
            del stack[len(stack) - n :]
        flat = all(m.kind in FLAT for m in members)
        stack.append(Item("tuple", key=flat, ok=flat, members=members))

    return make


def append(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    item = stack.pop()
    if not item.key:
        appended(stack, [item])


def appends(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    items = pop_mark(stack)
    appended(stack, items)


def list_(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    items = pop_mark(stack)
    stack.append(LIST if all(i.key for i in items) else BAD_LIST)


def setitem(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.pop()
    check_keys((stack.pop(),), "dict key")


def setitems(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    check_keys(pop_mark(stack)[::2], "dict key")


def dict_(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    check_keys(pop_mark(stack)[::2], "dict key")
    stack.append(Item("dict"))


def additems(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    check_keys(pop_mark(stack), "set item")


def frozenset_(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    items = pop_mark(stack)
    check_keys(items, "set item")
    stack.append(Item("frozenset", key=all(i.kind in ("scalar", "str") for i in items)))


def pop(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.pop()


def pop_mark_(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    pop_mark(stack)


def dup(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.append(own(stack))


def global_(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.append(Item("global", key=True, name=global_name(arg)))


def stack_global(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    name, module = stack.pop(), stack.pop()
    known = module.kind == name.kind == "str" and module.name is not None and name.name is not None
    stack.append(Item("global", key=True, name=f"{module.name}.{name.name}" if known else None))


def reduce(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:  # and NEWOBJ
    args, callable_ = stack.pop(), stack.pop()
    stack.append(call(callable_, as_args(args)))


def newobj_ex(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    kwargs, args, cls = stack.pop(), stack.pop(), stack.pop()
    stack.append(call(cls, (*as_args(args), kwargs)))


def obj(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    cls, *rest = pop_mark(stack)
    stack.append(call(cls, rest))


def inst(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    stack.append(call(Item("global", name=global_name(arg)), pop_mark(stack)))


def persid(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:  # BINPERSID
    stack[-1] = Item("call")


def nothing(arg: Any, stack: list[Item], memo: dict[Any, Item]) -> None:
    pass


STEPS: dict[str, Callable[[Any, list[Item], dict[Any, Item]], None]] = {
    **dict.fromkeys(["PUT", "BINPUT", "LONG_BINPUT"], put),
    **dict.fromkeys(["GET", "BINGET", "LONG_BINGET"], get),
    "MEMOIZE": memoize,
    **dict.fromkeys(INTS, integer),
    **dict.fromkeys(SCALARS, scalar),
    **dict.fromkeys(STRINGS, string),
    "MARK": lambda arg, stack, memo: stack.append(MARK),
    "EMPTY_LIST": lambda arg, stack, memo: stack.append(LIST),
    "EMPTY_DICT": lambda arg, stack, memo: stack.append(DICT),
    "EMPTY_SET": lambda arg, stack, memo: stack.append(SET),
    "EMPTY_TUPLE": tuple_of(0),
    "TUPLE": tuple_of(None),
    "TUPLE1": tuple_of(1),
    "TUPLE2": tuple_of(2),
    "TUPLE3": tuple_of(3),
    "APPEND": append,
    "APPENDS": appends,
    "LIST": list_,
    "SETITEM": setitem,
    "SETITEMS": setitems,
    "DICT": dict_,
    "ADDITEMS": additems,
    "FROZENSET": frozenset_,
    "POP": pop,
    "POP_MARK": pop_mark_,
    "DUP": dup,
    "GLOBAL": global_,
    "STACK_GLOBAL": stack_global,
    **dict.fromkeys(["EXT1", "EXT2", "EXT4"], new("global", key=True)),  # a class the registry names
    "REDUCE": reduce,
    "NEWOBJ": reduce,
    "NEWOBJ_EX": newobj_ex,
    "OBJ": obj,
    "INST": inst,
    "BUILD": pop,
    "BINPERSID": persid,
    **dict.fromkeys(["PERSID", "BYTEARRAY8", "NEXT_BUFFER"], new("call")),
    **dict.fromkeys(["PROTO", "FRAME", "READONLY_BUFFER"], nothing),
}
# by opcode byte: (the opcode, its step)
DISPATCH = {code: (op, STEPS.get(op.name, nothing)) for code, op in OPCODES.items()}

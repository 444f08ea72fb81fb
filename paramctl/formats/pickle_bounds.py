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
from typing import Any, BinaryIO

from paramctl.errors import FormatError

MAX_INT_BITS = 14_000  # Python refuses to print an int of more than 4300 digits (~14,284 bits)
MAX_NAME = 4096  # the longest text kept to name a STACK_GLOBAL's module or class
# admitted callables that hash what they are given (the others record their arguments)
HASHING = frozenset(["builtins.set", "builtins.frozenset", "collections.Counter", "collections.OrderedDict"])
# callables whose results hash by their (file-controlled) contents: not admitted as keys
STRUCTURAL = frozenset(["torch.Size", "builtins.frozenset", "builtins.tuple"])

STRINGS = frozenset(
    ["STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"]
)
SCALARS = frozenset(
    ["INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"]
    + ["NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT"]
)


class Item:
    """What the walk knows of one object on the unpickler's stack or in its memo."""

    __slots__ = ("kind", "ok", "name", "members")

    def __init__(self, kind: str, ok: bool = True, name: str | None = None, members: tuple = ()):
        self.kind = kind  # scalar, str, tuple, list, dict, set, global, call, mark
        # a key it may be (hashing it is bounded); for a list: every item may be a key
        self.ok = ok
        self.name = name  # a str's text, a global's dotted name (None: unknown)
        self.members = members  # a tuple's items


SCALAR = Item("scalar")
MARK = Item("mark")


def key_ok(item: Item) -> bool:
    return item.kind in ("scalar", "str", "global") or (item.kind in ("tuple", "call", "frozenset") and item.ok)


def check_pickle(stream: BinaryIO | Any, path: str) -> None:
    """Walk the opcodes of the pickle at STREAM's position, then rewind; FormatError for a
    stream the unpickler would misread, or be made to work without bound on."""
    start = stream.tell()
    walk: Walk | None = Walk(path)
    try:
        for op, arg, _pos in pickletools.genops(stream):
            if walk is None:
                continue
            try:
                walk.step(op.name, arg)
            except (ValueError, IndexError, AttributeError):
                # a stack the unpickler cannot build either: it stops here at the latest (having
                # refused any global before), so nothing later is hashed
                walk = None
    except FormatError:
        raise
    except Exception as e:  # ValueError for a short read or a bad opcode, among others
        raise FormatError(f"invalid pickle: {e}", path) from None
    stream.seek(start)


class Walk:
    def __init__(self, path: str):
        self.path = path
        self.stack: list[Item] = []
        self.memo: dict[int, Item] = {}

    def refuse(self, what: str) -> None:
        raise FormatError(f"refuses the pickle: {what}", self.path)

    def pop_mark(self) -> list[Item]:
        stack = self.stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise ValueError("no mark on the stack")

    def pop(self) -> Item:
        return self.stack.pop()

    def check_key(self, item: Item, where: str) -> None:
        if not key_ok(item):
            self.refuse(
                f"a {where} that is a {item.kind} of containers or objects (keys are str, int or tuples of those)"
            )

    def call(self, callable_: Item, args: list[Item] | tuple[Item, ...]) -> Item:
        """The result of calling CALLABLE_ with ARGS; a hashing class's arguments are checked."""
        name = callable_.name if callable_.kind == "global" else None
        if name is None or name in HASHING:
            for arg in args:
                if arg.kind in ("list", "tuple") and not (
                    arg.ok if arg.kind == "list" else all(map(key_ok, arg.members))
                ):
                    self.refuse(f"{name or 'a class'} given items that are containers or objects")
        return Item("call", ok=name is not None and name not in STRUCTURAL, name=name)

    @staticmethod
    def appended(target: Item, items: list[Item]) -> None:
        if target.kind == "list":  # (else the unpickler fails, or an opaque object records them)
            target.ok = target.ok and all(map(key_ok, items))

    def step(self, op: str, arg: Any) -> None:
        stack, push = self.stack, self.stack.append
        if op in SCALARS:
            if type(arg) is int and arg.bit_length() > MAX_INT_BITS:
                self.refuse(f"an integer of {arg.bit_length()} bits")
            push(SCALAR)
        elif op in STRINGS:
            push(Item("str", name=arg if isinstance(arg, str) and len(arg) <= MAX_NAME else None))
        elif op == "MARK":
            push(MARK)
        elif op == "EMPTY_LIST":
            push(Item("list"))
        elif op == "EMPTY_TUPLE":
            push(Item("tuple"))
        elif op in ("EMPTY_DICT",):
            push(Item("dict"))
        elif op == "EMPTY_SET":
            push(Item("set"))
        elif op in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(op)
            members = self.pop_mark() if n is None else [stack.pop() for _ in range(n)][::-1]
            ok = all(m.kind in ("scalar", "str", "global") for m in members)
            push(Item("tuple", ok=ok, members=tuple(members)))
        elif op == "LIST":
            push(Item("list", ok=all(map(key_ok, self.pop_mark()))))
        elif op == "DICT":
            items = self.pop_mark()
            for key in items[::2]:
                self.check_key(key, "dict key")
            push(Item("dict"))
        elif op == "APPEND":
            self.appended(stack[-2], [self.pop()])
        elif op == "APPENDS":
            items = self.pop_mark()
            self.appended(stack[-1], items)
        elif op == "SETITEM":
            _value, key = self.pop(), self.pop()
            self.check_key(key, "dict key")
        elif op == "SETITEMS":
            for key in self.pop_mark()[::2]:
                self.check_key(key, "dict key")
        elif op in ("ADDITEMS", "FROZENSET"):
            items = self.pop_mark()
            for item in items:
                self.check_key(item, "set item")
            if op == "FROZENSET":
                push(Item("frozenset", ok=all(i.kind in ("scalar", "str") for i in items)))
        elif op == "POP":
            self.pop()
        elif op == "POP_MARK":
            self.pop_mark()
        elif op == "DUP":
            push(stack[-1])
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[arg] = stack[-1]
        elif op == "MEMOIZE":
            self.memo[len(self.memo)] = stack[-1]
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise ValueError(f"memo key {arg} is not defined")
            push(self.memo[arg])
        elif op == "GLOBAL":
            push(Item("global", name=".".join(str(arg).split(" ", 1))))
        elif op == "STACK_GLOBAL":
            name, module = self.pop(), self.pop()
            known = module.kind == name.kind == "str" and module.name is not None and name.name is not None
            push(Item("global", name=f"{module.name}.{name.name}" if known else None))
        elif op in ("EXT1", "EXT2", "EXT4"):
            push(Item("global"))  # a class the extension registry names: unknown here
        elif op == "REDUCE":
            args, callable_ = self.pop(), self.pop()
            push(self.call(callable_, args.members if args.kind == "tuple" else (args,)))
        elif op == "NEWOBJ":
            args, cls = self.pop(), self.pop()
            push(self.call(cls, args.members if args.kind == "tuple" else (args,)))
        elif op == "NEWOBJ_EX":
            _kwargs, args, cls = self.pop(), self.pop(), self.pop()
            push(self.call(cls, (*(args.members if args.kind == "tuple" else (args,)), _kwargs)))
        elif op == "OBJ":
            cls, *args = self.pop_mark()
            push(self.call(cls, args))
        elif op == "INST":
            push(self.call(Item("global", name=".".join(str(arg).split(" ", 1))), self.pop_mark()))
        elif op == "BUILD":
            self.pop()
        elif op == "BINPERSID":
            self.pop()
            push(Item("call", ok=False))
        elif op in ("PERSID", "BYTEARRAY8", "NEXT_BUFFER"):
            push(Item("call", ok=False))
        elif op == "STOP":
            self.pop()
        elif op not in ("PROTO", "FRAME", "READONLY_BUFFER"):
            raise ValueError(f"opcode {op}")

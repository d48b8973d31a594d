"""A flattened device tree (DTB) codec: bytes in, a tree of nodes; a tree in, packed bytes. No I/O.

Layout (Devicetree Specification 0.4, chapter 5; all integers big-endian)::

    0   header, 10 u32: magic 0xd00dfeed, totalsize, off_dt_struct, off_dt_strings, off_mem_rsvmap,
        version, last_comp_version, boot_cpuid_phys, size_dt_strings, size_dt_struct
        memory reservation block: (u64 address, u64 size) pairs ending with (0, 0), 8-byte aligned
        structure block: tokens, each 4-byte aligned
            FDT_BEGIN_NODE (1) name NUL, padded   FDT_PROP (3) u32 len, u32 nameoff, value, padded
            FDT_END_NODE (2)                       FDT_NOP (4)      FDT_END (9)
        strings block: NUL-terminated property names, referred to by offset

:func:`pack` writes what ``dtc -I dtb -O dtb`` writes: version 17, the blocks back to back, no free space,
each property name stored once. QEMU's ``-machine dumpdtb`` leaves its 1 MiB working buffer around the tree,
and a guest handed that buffer back through ``-dtb`` hung; a packed tree is what it boots.

PyPI's ``fdt`` (0.3.3, 2022) was weighed for this and not taken: no type hints, last released for
Python 3.10, and it guesses each property's type on parsing, where this project wants the raw bytes kept.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

MAGIC = 0xD00DFEED
VERSION = 17
LAST_COMPATIBLE_VERSION = 16
#: The oldest version this codec reads: size_dt_struct, which it relies on, came with version 17.
OLDEST_READABLE_VERSION = 17

FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_NOP = 4
FDT_END = 9

_HEADER = struct.Struct(">10I")
HEADER_SIZE = _HEADER.size
_RESERVATION = struct.Struct(">QQ")
_U32 = struct.Struct(">I")
_PROP = struct.Struct(">II")

#: Deeper nesting than any real machine has; a hostile blob must not recurse without bound.
MAX_DEPTH = 64
PHANDLE_PROPERTIES = ("phandle", "linux,phandle")
#: Phandles 0 and 0xffffffff are invalid (Devicetree Specification 2.3.3).
MAX_PHANDLE = 0xFFFF_FFFE


class FdtError(ValueError):
    """Bytes that are not a well-formed flattened device tree, or a tree that cannot be packed."""


@dataclass
class Node:
    """A node: its name (``name@unit-address``), properties as raw bytes in order, children in order."""

    name: str
    properties: dict[str, bytes] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def child(self, name: str) -> Node | None:
        return next((child for child in self.children if child.name == name), None)

    def cells(self, name: str) -> tuple[int, ...] | None:
        """Property ``name`` as u32 cells; None when absent. :class:`FdtError` when not whole cells."""
        value = self.properties.get(name)
        return None if value is None else decode_cells(value, name)

    def strings(self, name: str) -> tuple[str, ...]:
        """A string-list property (``compatible``...); empty when absent."""
        value = self.properties.get(name)
        if not value:
            return ()
        return tuple(piece.decode("ascii", errors="replace") for piece in value.rstrip(b"\0").split(b"\0"))

    def walk(self, path: str = "") -> Iterator[tuple[str, Node]]:
        """(path, node) of this node and every descendant, depth first; the root's path is ``/``."""
        here = path or "/"
        yield here, self
        for child in self.children:
            yield from child.walk(f"{path}/{child.name}")


@dataclass
class DeviceTree:
    root: Node
    reservations: list[tuple[int, int]] = field(default_factory=list)
    boot_cpuid_phys: int = 0

    def phandles(self) -> set[int]:
        """Every phandle a node of the tree already carries."""
        found = set()
        for _, node in self.root.walk():
            for name in PHANDLE_PROPERTIES:
                value = node.cells(name)
                if value is not None and len(value) == 1:
                    found.add(value[0])
        return found

    def new_phandle(self) -> int:
        """A phandle no node uses: one above the highest in use (dtc's own rule)."""
        highest = max(self.phandles(), default=0)
        if highest >= MAX_PHANDLE:
            raise FdtError(f"phandle {highest:#x} in use leaves no higher one to allocate")
        return highest + 1


def encode_cells(*values: int) -> bytes:
    for value in values:
        if not 0 <= value <= 0xFFFF_FFFF:
            raise FdtError(f"{value!r} does not fit a 32-bit cell")
    return struct.pack(f">{len(values)}I", *values)


def decode_cells(value: bytes, name: str = "property") -> tuple[int, ...]:
    if len(value) % 4:
        raise FdtError(f"{name} is {len(value)} bytes, not a whole number of 32-bit cells")
    return struct.unpack(f">{len(value) // 4}I", value)


def encode_string(text: str) -> bytes:
    try:
        return text.encode("ascii") + b"\0"
    except UnicodeEncodeError:
        raise FdtError(f"{text!r} is not ASCII") from None


# -- parsing -------------------------------------------------------------------------------------------------


def parse(blob: bytes) -> DeviceTree:
    """Decode a DTB, checking every offset and length against the blob; raises :class:`FdtError`."""
    if len(blob) < HEADER_SIZE:
        raise FdtError(f"{len(blob)} bytes is shorter than the {HEADER_SIZE}-byte header")
    (magic, total, off_struct, off_strings, off_reservations, version, last_compatible, boot_cpuid,
     strings_size, struct_size) = _HEADER.unpack_from(blob)  # fmt: skip
    if magic != MAGIC:
        raise FdtError(f"magic {magic:#010x} is not {MAGIC:#010x}: not a device tree blob")
    if version < OLDEST_READABLE_VERSION or last_compatible > VERSION:
        raise FdtError(f"version {version} (compatible with {last_compatible}) is not one this codec reads")
    if not HEADER_SIZE <= total <= len(blob):
        raise FdtError(f"totalsize {total} but the blob has {len(blob)} bytes")
    blocks = (("structure", off_struct, struct_size), ("strings", off_strings, strings_size))
    for name, offset, size in blocks:
        if offset < HEADER_SIZE or offset + size > total:
            raise FdtError(f"{name} block {offset}+{size} lies outside the {total}-byte tree")
    if off_struct % 4:
        raise FdtError(f"structure block offset {off_struct} is not 4-byte aligned")
    strings = blob[off_strings : off_strings + strings_size]
    reservations = _parse_reservations(blob, off_reservations, total)
    root = _StructReader(blob[off_struct : off_struct + struct_size], strings).tree()
    return DeviceTree(root, reservations, boot_cpuid)


def _parse_reservations(blob: bytes, offset: int, total: int) -> list[tuple[int, int]]:
    if offset < HEADER_SIZE or offset % 8:
        raise FdtError(f"memory reservation block offset {offset} is not 8-byte aligned after the header")
    reservations: list[tuple[int, int]] = []
    while True:
        if offset + _RESERVATION.size > total:
            raise FdtError("memory reservation block has no (0, 0) terminator within the tree")
        address, size = _RESERVATION.unpack_from(blob, offset)
        offset += _RESERVATION.size
        if address == 0 and size == 0:
            return reservations
        reservations.append((address, size))


class _StructReader:
    def __init__(self, block: bytes, strings: bytes) -> None:
        self.block = block
        self.strings = strings
        self.offset = 0

    def token(self) -> int:
        while True:
            if self.offset + 4 > len(self.block):
                raise FdtError(f"structure block ends at {self.offset} without FDT_END")
            token: int = _U32.unpack_from(self.block, self.offset)[0]
            self.offset += 4
            if token != FDT_NOP:
                return token

    def text(self, data: bytes, start: int, what: str) -> str:
        end = data.find(b"\0", start)
        if end < 0:
            raise FdtError(f"{what} at {start} has no NUL terminator")
        try:
            return data[start:end].decode("ascii")
        except UnicodeDecodeError:
            raise FdtError(f"{what} at {start} is not ASCII") from None

    def tree(self) -> Node:
        if self.token() != FDT_BEGIN_NODE:
            raise FdtError("structure block does not start with the root node")
        root = self.node(depth=0)
        if self.token() != FDT_END:
            raise FdtError("something follows the root node other than FDT_END")
        return root

    def node(self, depth: int) -> Node:
        # Called just after FDT_BEGIN_NODE.
        if depth > MAX_DEPTH:
            raise FdtError(f"nodes nested deeper than {MAX_DEPTH}")
        node = Node(self.text(self.block, self.offset, "node name"))
        _check_node_name(node.name, depth)
        self.offset = _align4(self.offset + len(node.name) + 1)
        while True:
            token = self.token()
            if token == FDT_PROP:
                if node.children:
                    raise FdtError(f"node {node.name!r}: a property follows a child node")
                self.prop(node)
            elif token == FDT_BEGIN_NODE:
                node.children.append(self.node(depth + 1))
            elif token == FDT_END_NODE:
                return node
            else:
                raise FdtError(f"unexpected token {token} at {self.offset - 4} in node {node.name!r}")

    def prop(self, node: Node) -> None:
        if self.offset + _PROP.size > len(self.block):
            raise FdtError(f"node {node.name!r}: property header overflows the structure block")
        length, name_offset = _PROP.unpack_from(self.block, self.offset)
        self.offset += _PROP.size
        if self.offset + length > len(self.block):
            raise FdtError(f"node {node.name!r}: a {length}-byte property overflows the structure block")
        if name_offset >= len(self.strings):
            raise FdtError(f"node {node.name!r}: property name offset {name_offset} outside the strings")
        name = self.text(self.strings, name_offset, "property name")
        _check_property_name(node, name)
        if name in node.properties:
            raise FdtError(f"node {node.name!r}: property {name!r} appears twice")
        node.properties[name] = self.block[self.offset : self.offset + length]
        self.offset = _align4(self.offset + length)


def _check_node_name(name: str, depth: int) -> None:
    """Only the root is unnamed; no name holds a NUL or a '/' (the path separator)."""
    if bool(name) != bool(depth) or "\0" in name or "/" in name:
        raise FdtError(f"node name {name!r} at depth {depth} is not a valid node name")


def _check_property_name(node: Node, name: str) -> None:
    if not name or "\0" in name:
        raise FdtError(f"node {node.name!r}: property name {name!r} is empty or contains NUL")


def _align4(offset: int) -> int:
    return (offset + 3) & ~3


# -- packing -------------------------------------------------------------------------------------------------


def pack(tree: DeviceTree) -> bytes:
    """The packed DTB of ``tree`` (version 17, no free space), as ``dtc -I dtb -O dtb`` lays it out."""
    strings = _StringTable()
    structure = bytearray()
    _pack_node(tree.root, structure, strings, depth=0)
    structure += _U32.pack(FDT_END)
    reservations = b"".join(_RESERVATION.pack(address, size) for address, size in tree.reservations)
    reservations += _RESERVATION.pack(0, 0)
    off_reservations = HEADER_SIZE  # 40: already 8-byte aligned
    off_struct = off_reservations + len(reservations)
    off_strings = off_struct + len(structure)
    total = off_strings + len(strings.block)
    header = _HEADER.pack(MAGIC, total, off_struct, off_strings, off_reservations, VERSION,
                          LAST_COMPATIBLE_VERSION, tree.boot_cpuid_phys, len(strings.block),
                          len(structure))  # fmt: skip
    return header + reservations + bytes(structure) + strings.block


class _StringTable:
    def __init__(self) -> None:
        self.block = b""
        self.offsets: dict[str, int] = {}

    def offset(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.block)
            self.block += encode_string(name)
        return self.offsets[name]


def _pack_node(node: Node, out: bytearray, strings: _StringTable, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FdtError(f"nodes nested deeper than {MAX_DEPTH}")
    _check_node_name(node.name, depth)
    out += _U32.pack(FDT_BEGIN_NODE)
    out += _padded(encode_string(node.name))
    for name, value in node.properties.items():
        _check_property_name(node, name)
        out += _U32.pack(FDT_PROP) + _PROP.pack(len(value), strings.offset(name)) + _padded(value)
    for child in node.children:
        _pack_node(child, out, strings, depth + 1)
    out += _U32.pack(FDT_END_NODE)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (_align4(len(data)) - len(data))

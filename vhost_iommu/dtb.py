"""The device tree that tells an Arm guest which endpoints the virtio-iommu manages (the counterpart of
:mod:`vhost_iommu.viot` for QEMU's ``virt`` machine, which has no ACPI VIOT without a QEMU patch).

QEMU's virt describes only its own ``virtio-iommu-pci`` in the tree it builds; for the vhost-user device the
tree comes from QEMU's dump (``-machine dumpdtb=F`` with the same machine options) with the IOMMU added here
and is passed back with ``-dtb``. Bindings (Linux ``Documentation/devicetree/bindings/virtio/iommu.yaml``,
``.../pci/pci-iommu.yaml``)::

    pcie@10000000 {                                   the PCIe host (compatible "pci-host-ecam-generic")
        iommu-map = <rid-base &viommu endpoint-base length>, ...;
        virtio_iommu@3,0 {                            IommuTransport.PCI: a child at the IOMMU's BDF
            compatible = "virtio,pci-iommu";
            reg = <(bdf << 8) 0 0 0 0>;
            #iommu-cells = <1>;  phandle = <...>;     viommu
        };
    };
    virtio_mmio@a003e00 { ... #iommu-cells = <1>; phandle = <...>; };   IommuTransport.MMIO: viommu

Linux gives the PCI function with requester ID ``rid`` (bus << 8 | devfn) the endpoint ID
``endpoint-base + rid - rid-base`` of the first ``iommu-map`` entry covering it, so each [[endpoints]] range
of the topology becomes one entry and the IDs agree with those the device accepts. The IOMMU's own RID is
never in a range (the topology refuses that), so it is left out of the map.

A guest whose IOMMU PCI function has no node oopses when virtio_iommu loads (Linux 6.12,
viommu_probe_device): every topology that cannot give it one is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhost_iommu import fdt
from vhost_iommu.fdt import DeviceTree, FdtError, Node, encode_cells, encode_string
from vhost_iommu.machine import IommuFacts, IommuTransport

PCIE_HOST_COMPATIBLE = "pci-host-ecam-generic"
PCI_IOMMU_COMPATIBLE = "virtio,pci-iommu"
VIRTIO_MMIO_COMPATIBLE = "virtio,mmio"
#: Cells of an endpoint's specifier: the endpoint ID.
IOMMU_CELLS = 1
#: The PCI bus binding's address and size cells (phys.hi phys.mid phys.lo, size.hi size.lo).
PCI_ADDRESS_CELLS = 3
PCI_SIZE_CELLS = 2


class DtbError(ValueError):
    """A topology that cannot be described in this device tree, or bytes that are not a usable dump."""


@dataclass(frozen=True)
class MapEntry:
    """One ``iommu-map`` entry: requester IDs ``rid_base..rid_base+length-1`` are endpoints from
    ``endpoint_base``."""

    rid_base: int
    phandle: int
    endpoint_base: int
    length: int


@dataclass(frozen=True)
class IommuDescription:
    """What a device tree says about the virtio-iommu: read back by :func:`read_description`."""

    host_path: str
    iommu_path: str
    phandle: int
    iommu_map: tuple[MapEntry, ...]


def add_iommu(dumped: bytes, topology: IommuFacts) -> bytes:
    """QEMU's dumped tree with the IOMMU and ``iommu-map`` of ``topology`` added, packed for ``-dtb``."""
    tree = _parse(dumped)
    segment = _managed_segment(topology)
    host_path, host = _pcie_host(tree, segment)
    first_bus, last_bus = _bus_range(host)
    if "iommu-map" in host.properties or "iommu-map-mask" in host.properties:
        raise DtbError(f"{host_path} already has an iommu-map: dump the machine without an IOMMU device")
    if any(PCI_IOMMU_COMPATIBLE in child.strings("compatible") for child in host.children):
        raise DtbError(f"{host_path} already has a {PCI_IOMMU_COMPATIBLE} node: dump it without one")
    try:
        phandle = tree.new_phandle()
        if topology.iommu_transport is IommuTransport.PCI:
            _add_pci_iommu(host_path, host, topology, first_bus, phandle)
        else:
            phandle = _mark_mmio_iommu(tree, topology, phandle)
        entries = _map_entries(topology, phandle, first_bus, last_bus)
        host.properties["iommu-map"] = b"".join(
            encode_cells(entry.rid_base, entry.phandle, entry.endpoint_base, entry.length)
            for entry in entries
        )
        return fdt.pack(tree)
    except FdtError as error:  # a phandle space used up, a cell out of range
        raise DtbError(str(error)) from None


def _parse(dumped: bytes) -> DeviceTree:
    try:
        return fdt.parse(dumped)
    except FdtError as error:
        raise DtbError(f"not a usable device tree dump: {error}") from None


def _managed_segment(topology: IommuFacts) -> int:
    """The one PCI segment the topology's endpoints (and a PCI IOMMU) live on: virt has one host bridge."""
    segments = {segment for segment, *_ in topology.viot_ranges()}
    if topology.iommu_transport is IommuTransport.PCI:
        segments.add(topology.iommu_segment)
    if len(segments) != 1:
        found = ", ".join(f"{segment:#x}" for segment in sorted(segments)) or "none"
        raise DtbError(f"the topology's endpoints and IOMMU must share one PCI segment (found: {found})")
    return segments.pop()


def _pcie_host(tree: DeviceTree, segment: int) -> tuple[str, Node]:
    hosts = [
        (path, node) for path, node in tree.root.walk() if PCIE_HOST_COMPATIBLE in node.strings("compatible")
    ]
    if not hosts:
        raise DtbError(f"the dump has no PCIe host node (compatible {PCIE_HOST_COMPATIBLE!r})")
    matching = []
    for path, node in hosts:
        domain = _cells(node, "linux,pci-domain", path)
        # Without linux,pci-domain Linux numbers host bridges itself; a lone one is domain 0.
        if (domain[0] if domain else 0) == segment:
            matching.append((path, node))
    if len(matching) != 1:
        raise DtbError(f"{len(matching)} PCIe host nodes for PCI segment {segment:#x} (need exactly one)")
    path, host = matching[0]
    if _cells(host, "#address-cells", path) != (PCI_ADDRESS_CELLS,) or _cells(host, "#size-cells", path) != (
        PCI_SIZE_CELLS,
    ):
        raise DtbError(f"{path}: #address-cells/#size-cells are not the PCI binding's 3/2")
    return path, host


def _bus_range(host: Node) -> tuple[int, int]:
    bus_range = _cells(host, "bus-range", "the PCIe host")
    if bus_range is None:
        return 0, 0xFF
    if len(bus_range) != 2 or not bus_range[0] <= bus_range[1] <= 0xFF:
        raise DtbError(f"the PCIe host's bus-range {bus_range} is not <first last> within 0..0xff")
    return bus_range[0], bus_range[1]


def _cells(node: Node, name: str, where: str) -> tuple[int, ...] | None:
    try:
        return node.cells(name)
    except FdtError as error:
        raise DtbError(f"{where}: {error}") from None


def _add_pci_iommu(host_path: str, host: Node, topology: IommuFacts, first_bus: int, phandle: int) -> None:
    requester_id = topology.iommu_bdf
    if not 0 <= requester_id <= 0xFFFF:
        raise DtbError(f"the IOMMU's BDF {requester_id:#x} is not a 16-bit requester ID")
    bus, devfn = requester_id >> 8, requester_id & 0xFF
    # The guest looks for a function's node among the children of its bus's node: only functions of the
    # host's root bus have theirs here. Elsewhere the IOMMU would be left without one.
    if bus != first_bus:
        raise DtbError(
            f"the IOMMU at {_bdf(requester_id)} is not on the PCIe host's root bus {first_bus:#04x}: "
            "its function would have no device-tree node (and the guest's virtio_iommu oopses without one)"
        )
    for child in host.children:
        reg = _cells(child, "reg", f"{host_path}/{child.name}")
        if reg and (reg[0] >> 8) & 0xFFFF == requester_id:
            raise DtbError(f"{host_path}/{child.name} already describes {_bdf(requester_id)}")
    device, function = devfn >> 3, devfn & 7
    host.children.append(
        Node(
            f"virtio_iommu@{device:x},{function:x}",
            {
                "compatible": encode_string(PCI_IOMMU_COMPATIBLE),
                "reg": encode_cells(requester_id << 8, 0, 0, 0, 0),
                "#iommu-cells": encode_cells(IOMMU_CELLS),
                "phandle": encode_cells(phandle),
            },
        )
    )


def _mark_mmio_iommu(tree: DeviceTree, topology: IommuFacts, phandle: int) -> int:
    """Give the virtio_mmio node at the topology's address ``#iommu-cells`` and a phandle (its own if it
    has one); returns the phandle."""
    address = topology.iommu_mmio_address
    if address is None:
        raise DtbError("an IOMMU on virtio-mmio needs its transport's address")
    root_cells = _cells(tree.root, "#address-cells", "/") or (2,)
    if len(root_cells) != 1 or root_cells[0] not in (1, 2):
        raise DtbError(f"/: #address-cells {root_cells} is not 1 or 2")
    for path, node in tree.root.walk():
        if VIRTIO_MMIO_COMPATIBLE not in node.strings("compatible"):
            continue
        reg = _cells(node, "reg", path) or ()
        if len(reg) < root_cells[0]:
            continue
        base = reg[0] if root_cells[0] == 1 else (reg[0] << 32) | reg[1]
        if base != address:
            continue
        if "#iommu-cells" in node.properties:
            raise DtbError(f"{path} is already an IOMMU: dump the machine without one")
        existing = _cells(node, "phandle", path)
        if existing is not None:
            if len(existing) != 1:
                raise DtbError(f"{path}: phandle is not one cell")
            phandle = existing[0]
        node.properties["#iommu-cells"] = encode_cells(IOMMU_CELLS)
        node.properties["phandle"] = encode_cells(phandle)
        return phandle
    raise DtbError(f"the dump has no {VIRTIO_MMIO_COMPATIBLE} node at {address:#x}")


def _map_entries(topology: IommuFacts, phandle: int, first_bus: int, last_bus: int) -> list[MapEntry]:
    entries: list[MapEntry] = []
    for segment, bdf_start, bdf_end, endpoint_start in sorted(topology.viot_ranges(), key=lambda r: r[1]):
        where = f"endpoint range {_bdf(bdf_start)}-{_bdf(bdf_end)}"
        if not 0 <= bdf_start <= bdf_end <= 0xFFFF:
            raise DtbError(f"{where} (segment {segment:#x}) is not a range of 16-bit requester IDs")
        if not (first_bus <= bdf_start >> 8 and bdf_end >> 8 <= last_bus):
            raise DtbError(f"{where} lies outside the PCIe host's buses {first_bus:#04x}-{last_bus:#04x}")
        length = bdf_end - bdf_start + 1
        if not 0 <= endpoint_start <= 0xFFFF_FFFF - (length - 1):
            raise DtbError(f"{where}: endpoint IDs from {endpoint_start:#x} overflow 32 bits")
        if topology.iommu_transport is IommuTransport.PCI and bdf_start <= topology.iommu_bdf <= bdf_end:
            raise DtbError(f"{where} includes the IOMMU itself; Linux refuses to translate the IOMMU")
        if entries and bdf_start < entries[-1].rid_base + entries[-1].length:
            raise DtbError(f"{where} overlaps another endpoint range")
        entries.append(MapEntry(bdf_start, phandle, endpoint_start, length))
    if not entries:
        raise DtbError("the topology has no endpoint range: the IOMMU would manage nothing")
    return entries


def _bdf(requester_id: int) -> str:
    return f"{requester_id >> 8:02x}:{(requester_id >> 3) & 0x1F:02x}.{requester_id & 7}"


# -- reading back: for tests and for the command's summary ------------------------------------------------


def read_description(blob: bytes) -> IommuDescription:
    """The IOMMU a device tree describes: the node ``iommu-map`` names, and the map itself."""
    tree = _parse(blob)
    mapped = [(path, node) for path, node in tree.root.walk() if "iommu-map" in node.properties]
    if len(mapped) != 1:
        raise DtbError(f"{len(mapped)} nodes carry an iommu-map (expected one)")
    host_path, host = mapped[0]
    cells = _cells(host, "iommu-map", host_path) or ()
    if not cells or len(cells) % 4:
        raise DtbError(f"{host_path}: iommu-map is not a list of <rid-base phandle endpoint-base length>")
    entries = tuple(MapEntry(*cells[index : index + 4]) for index in range(0, len(cells), 4))
    phandles = {entry.phandle for entry in entries}
    if len(phandles) != 1:
        raise DtbError(f"{host_path}: iommu-map names {len(phandles)} IOMMUs (expected one)")
    phandle = phandles.pop()
    for path, node in tree.root.walk():
        if _cells(node, "phandle", path) == (phandle,):
            if _cells(node, "#iommu-cells", path) != (IOMMU_CELLS,):
                raise DtbError(f"{path} (phandle {phandle:#x}) has no #iommu-cells = <{IOMMU_CELLS}>")
            return IommuDescription(host_path, path, phandle, entries)
    raise DtbError(f"{host_path}: iommu-map names phandle {phandle:#x}, which no node has")


def describe(blob: bytes) -> str:
    """A human-readable summary of :func:`read_description`."""
    description = read_description(blob)
    lines = [
        f"device tree, {len(blob)} bytes: IOMMU {description.iommu_path} (phandle {description.phandle:#x})",
        f"  iommu-map of {description.host_path}:",
    ]
    for entry in description.iommu_map:
        last = entry.rid_base + entry.length - 1
        lines.append(
            f"    {_bdf(entry.rid_base)}-{_bdf(last)} -> endpoints "
            f"{entry.endpoint_base:#x}-{entry.endpoint_base + entry.length - 1:#x}"
        )
    return "\n".join(lines)

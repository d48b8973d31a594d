"""The Arm guest's device tree: the FDT codec against dtc, and the IOMMU node and iommu-map made from a
topology (what the guest's of_map_id will read), with hostile dumps and topologies refused."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu import fdt
from vhost_iommu.device.topology import Topology
from vhost_iommu.dtb import DtbError, MapEntry, add_iommu, describe, read_description
from vhost_iommu.machine import VIRT_DEFAULT_MMIO_TRANSPORT
from vhost_iommu.provision.configs import configs_dir

# The shape of QEMU virt's own tree (10.2, gic-version=3): the parts the IOMMU description touches, the
# phandles QEMU allocates from 0x8000, and a few properties that must come through unchanged.
VIRT_LIKE_DTS = """/dts-v1/;
/memreserve/ 0x40000000 0x1000;
/ {
    interrupt-parent = <0x8002>;
    #size-cells = <0x02>;
    #address-cells = <0x02>;
    compatible = "linux,dummy-virt";
    chosen { stdout-path = "/pl011@9000000"; };
    pl011@9000000 { compatible = "arm,pl011", "arm,primecell"; reg = <0x00 0x9000000 0x00 0x1000>; };
    intc@8000000 {
        phandle = <0x8002>;
        compatible = "arm,gic-v3";
        #interrupt-cells = <0x03>;
        its@8080000 { phandle = <0x8003>; msi-controller; reg = <0x00 0x8080000 0x00 0x20000>; };
    };
    virtio_mmio@a000000 {
        dma-coherent;
        interrupts = <0x00 0x10 0x01>;
        reg = <0x00 0xa000000 0x00 0x200>;
        compatible = "virtio,mmio";
    };
    virtio_mmio@a003e00 {
        dma-coherent;
        interrupts = <0x00 0x2f 0x01>;
        reg = <0x00 0xa003e00 0x00 0x200>;
        compatible = "virtio,mmio";
    };
    pcie@10000000 {
        msi-map = <0x00 0x8003 0x00 0x10000>;
        dma-coherent;
        bus-range = <0x00 0xff>;
        linux,pci-domain = <0x00>;
        #size-cells = <0x02>;
        #address-cells = <0x03>;
        device_type = "pci";
        compatible = "pci-host-ecam-generic";
        reg = <0x40 0x10000000 0x00 0x10000000>;
    };
};
"""

ARM_VIRT = configs_dir() / "topologies" / "arm-virt.toml"
ARM_VIRT_MMIO = configs_dir() / "topologies" / "arm-virt-mmio.toml"


@pytest.fixture(scope="module")
def dtc() -> str:
    """dtc, the reference this codec is checked against (installed when missing, as provisioning does)."""
    from vhost_iommu.provision.host import ensure_packages

    ensure_packages(("device-tree-compiler",), why="the device-tree tests (dtc)")
    path = shutil.which("dtc")
    assert path is not None
    return path


def compile_dts(dtc: str, source: str) -> bytes:
    return subprocess.run([dtc, "-I", "dts", "-O", "dtb"], input=source.encode(), capture_output=True,
                          check=True).stdout  # fmt: skip


def decompile(dtc: str, blob: bytes) -> str:
    done = subprocess.run([dtc, "-I", "dtb", "-O", "dts"], input=blob, capture_output=True, check=True)
    return done.stdout.decode()


def dumped(dtc: str, source: str = VIRT_LIKE_DTS) -> bytes:
    """A tree as QEMU dumps it: compiled, then left inside a 1 MiB buffer (dtc -S), as dumpdtb does."""
    return subprocess.run([dtc, "-I", "dts", "-O", "dtb", "-S", str(1 << 20)], input=source.encode(),
                          capture_output=True, check=True).stdout  # fmt: skip


def node_text(dts: str, name: str) -> str:
    match = re.search(rf"\t*{re.escape(name)} \{{\n(.*?)\n\t*\}};", dts, re.DOTALL)
    assert match, f"no node {name} in\n{dts}"
    return match.group(1)


def prop_cells(text: str, name: str) -> list[int]:
    match = re.search(rf"\s{re.escape(name)} = <([^>]*)>;", text)
    assert match, f"no {name} in {text}"
    return [int(word, 16) for word in match.group(1).split()]


# -- the codec --------------------------------------------------------------------------------------------


def test_packing_a_dump_gives_dtcs_own_packed_bytes(dtc: str) -> None:
    blob = dumped(dtc)
    assert len(blob) == 1 << 20
    packed = fdt.pack(fdt.parse(blob))
    # dtc -I dtb -O dtb of the dump: what was known to boot.
    by_dtc = subprocess.run(
        [dtc, "-I", "dtb", "-O", "dtb"], input=blob, capture_output=True, check=True
    ).stdout
    assert packed == by_dtc
    assert fdt.pack(fdt.parse(packed)) == packed


def test_parsed_tree_keeps_raw_values_reservations_and_order(dtc: str) -> None:
    tree = fdt.parse(compile_dts(dtc, VIRT_LIKE_DTS))
    assert tree.reservations == [(0x4000_0000, 0x1000)]
    assert [child.name for child in tree.root.children][:3] == ["chosen", "pl011@9000000", "intc@8000000"]
    host = tree.root.child("pcie@10000000")
    assert host is not None
    assert host.cells("reg") == (0x40, 0x1000_0000, 0, 0x1000_0000)
    assert host.properties["dma-coherent"] == b""
    assert host.strings("compatible") == ("pci-host-ecam-generic",)
    assert tree.phandles() == {0x8002, 0x8003}
    assert tree.new_phandle() == 0x8004


def _header(blob: bytes, index: int, value: int) -> bytes:
    return blob[: 4 * index] + struct.pack(">I", value) + blob[4 * index + 4 :]


def _struct_offset(blob: bytes) -> int:
    offset: int = struct.unpack_from(">I", blob, 8)[0]
    return offset


HOSTILE: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("short", lambda blob: blob[:20], "shorter than"),
    ("magic", lambda blob: _header(blob, 0, 0xFEEDD00D), "not a device tree"),
    ("totalsize", lambda blob: _header(blob, 1, len(blob) + 1), "totalsize"),
    ("struct offset", lambda blob: _header(blob, 2, 0xFFFF_FF00), "outside"),
    ("strings size", lambda blob: _header(blob, 8, 0x7FFF_FFFF), "outside"),
    ("version", lambda blob: _header(blob, 5, 3), "version"),
    ("reservations unterminated", lambda blob: _header(blob, 4, len(blob) - 8), "reservation"),
    ("first token", lambda blob: _header(blob, _struct_offset(blob) // 4, fdt.FDT_PROP), "root node"),
    ("truncated structure", lambda blob: _header(blob, 9, 12), "structure block"),
]


@pytest.mark.parametrize(
    ("mangle", "message"), [(m, t) for _, m, t in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_malformed_blobs_are_refused_with_a_reason(
    dtc: str, mangle: Callable[[bytes], bytes], message: str
) -> None:
    blob = compile_dts(dtc, VIRT_LIKE_DTS)
    with pytest.raises(fdt.FdtError, match=message):
        fdt.parse(mangle(blob))


@given(st.binary(max_size=400), st.integers(0, 399), st.binary(min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_parser_never_fails_other_than_with_fdt_error(prefix: bytes, offset: int, junk: bytes) -> None:
    blob = bytearray(_SMALL_DTB)
    blob[offset % len(blob) : offset % len(blob) + len(junk)] = junk
    for candidate in (bytes(blob), prefix):
        try:
            tree = fdt.parse(candidate)
        except fdt.FdtError:
            continue
        assert fdt.parse(fdt.pack(tree)) == tree


# A tiny valid blob written by hand (header, empty reservation map, root with one property), so the
# hypothesis test needs no dtc.
_SMALL_DTB = fdt.pack(
    fdt.DeviceTree(fdt.Node("", {"#address-cells": fdt.encode_cells(2)}, [fdt.Node("a@1")]))
)


def test_deep_nesting_is_refused() -> None:
    node = fdt.Node("leaf")
    for depth in range(fdt.MAX_DEPTH + 2):
        node = fdt.Node(f"n{depth}", children=[node])
    with pytest.raises(fdt.FdtError, match="deeper"):
        fdt.pack(fdt.DeviceTree(fdt.Node("", children=[node])))


# -- the IOMMU description --------------------------------------------------------------------------------


def test_pci_iommu_node_and_map_round_trip_through_dtc(dtc: str) -> None:
    topology = Topology.load(ARM_VIRT)
    blob = add_iommu(dumped(dtc), topology)
    # Packed: no free space left, as dtc -I dtb -O dtb leaves it.
    assert struct.unpack_from(">I", blob, 4)[0] == len(blob) < 4096

    dts = decompile(dtc, blob)
    iommu = node_text(dts, "virtio_iommu@3,0")
    assert 'compatible = "virtio,pci-iommu";' in iommu
    assert prop_cells(iommu, "reg") == [0x18 << 8, 0, 0, 0, 0]
    assert prop_cells(iommu, "#iommu-cells") == [1]
    phandle = prop_cells(iommu, "phandle")[0]
    assert phandle not in (0x8002, 0x8003)
    host = node_text(dts, "pcie@10000000")
    # 00:04.0-00:1e.7 are endpoints 0x20-0xf7; the IOMMU's own 00:03.0 (RID 0x18) is in no entry.
    assert prop_cells(host, "iommu-map") == [0x20, phandle, 0x20, 0xD8]
    # Everything else came through: the ITS phandle the msi-map names, the reservation, the dtc re-compile.
    assert prop_cells(host, "msi-map") == [0, 0x8003, 0, 0x10000]
    assert "/memreserve/\t0x0000000040000000 0x0000000000001000;" in dts
    assert decompile(dtc, compile_dts(dtc, dts)) == dts
    assert read_description(blob) == read_description(compile_dts(dtc, dts))


def test_served_vfio_user_endpoints_lie_inside_the_iommu_map(dtc: str) -> None:
    topology = Topology.load(ARM_VIRT)
    description = read_description(add_iommu(dumped(dtc), topology))
    assert topology.devices
    for device in topology.devices:
        (entry,) = [e for e in description.iommu_map if e.rid_base <= device.bdf < e.rid_base + e.length]
        assert entry.endpoint_base + device.bdf - entry.rid_base == topology.endpoint_for(0, device.bdf)


def test_endpoint_offsets_and_several_ranges_are_honoured(dtc: str) -> None:
    topology = Topology.loads(
        'arch = "arm64"\n[iommu]\nbdf = "00:01.0"\n'
        '[[endpoints]]\nbdf_start = "00:02.0"\nbdf_end = "00:02.7"\nendpoint_start = 0x1000\n'
        '[[endpoints]]\nbdf_start = "01:00.0"\nbdf_end = "01:1f.7"\nendpoint_start = 7\n'
    )
    description = read_description(add_iommu(dumped(dtc), topology))
    assert description.iommu_path == "/pcie@10000000/virtio_iommu@1,0"
    assert description.iommu_map == (
        MapEntry(0x10, description.phandle, 0x1000, 8),
        MapEntry(0x100, description.phandle, 7, 0x100),
    )
    # What of_map_id computes for a function, against what the device accepts.
    for rid in (0x10, 0x17, 0x100, 0x1FF):
        entry = next(e for e in description.iommu_map if e.rid_base <= rid < e.rid_base + e.length)
        assert entry.endpoint_base + rid - entry.rid_base == topology.endpoint_for(0, rid)


def test_mmio_iommu_marks_its_transport_and_maps_pci_through_it(dtc: str) -> None:
    topology = Topology.load(ARM_VIRT_MMIO)
    assert topology.iommu_mmio_address == VIRT_DEFAULT_MMIO_TRANSPORT
    blob = add_iommu(dumped(dtc), topology)
    dts = decompile(dtc, blob)
    transport = node_text(dts, "virtio_mmio@a003e00")
    assert prop_cells(transport, "#iommu-cells") == [1]
    phandle = prop_cells(transport, "phandle")[0]
    assert "#iommu-cells" not in node_text(dts, "virtio_mmio@a000000")
    assert "virtio,pci-iommu" not in dts
    assert prop_cells(node_text(dts, "pcie@10000000"), "iommu-map") == [0x20, phandle, 0x20, 0xD8]
    assert read_description(blob).iommu_path == "/virtio_mmio@a003e00"
    assert "virtio_mmio@a003e00 (phandle" in describe(blob)


def _without(source: str, text: str) -> str:
    assert text in source
    return source.replace(text, "")


REFUSED_DUMPS: list[tuple[str, str, str]] = [
    ("no host", re.sub(r"\tpcie@10000000 \{.*?\n    \};\n", "", VIRT_LIKE_DTS, flags=re.DOTALL)
     .replace('compatible = "pci-host-ecam-generic";', ""), "no PCIe host node"),
    ("host cells", VIRT_LIKE_DTS.replace("#address-cells = <0x03>", "#address-cells = <0x02>"), "3/2"),
    ("other domain", VIRT_LIKE_DTS.replace("linux,pci-domain = <0x00>", "linux,pci-domain = <0x01>"),
     "segment 0x0"),
    ("mapped already", VIRT_LIKE_DTS.replace("dma-coherent;\n        bus-range",
                                             "iommu-map = <0 1 0 1>;\n        bus-range"), "already"),
    ("bus range", VIRT_LIKE_DTS.replace("bus-range = <0x00 0xff>", "bus-range = <0x00>"), "bus-range"),
    ("odd cells", VIRT_LIKE_DTS.replace("linux,pci-domain = <0x00>", 'linux,pci-domain = "x"'), "cells"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "message"), [(s, m) for _, s, m in REFUSED_DUMPS],
                         ids=[n for n, _, _ in REFUSED_DUMPS])  # fmt: skip
def test_dumps_that_cannot_carry_the_iommu_are_refused(dtc: str, source: str, message: str) -> None:
    with pytest.raises(DtbError, match=message):
        add_iommu(compile_dts(dtc, source), Topology.load(ARM_VIRT))


def test_no_phandle_left_is_a_dtb_error(dtc: str) -> None:
    source = VIRT_LIKE_DTS.replace("phandle = <0x8003>", "phandle = <0xfffffffe>")
    with pytest.raises(DtbError, match="phandle"):
        add_iommu(compile_dts(dtc, source), Topology.load(ARM_VIRT))


def test_garbage_dump_is_a_dtb_error() -> None:
    with pytest.raises(DtbError, match="not a usable device tree dump"):
        add_iommu(b"\0" * 64, Topology.load(ARM_VIRT))


def _topology(iommu: str, ranges: str) -> Topology:
    return Topology.loads(f'arch = "arm64"\n[iommu]\n{iommu}\n{ranges}')


_RANGE = '[[endpoints]]\nbdf_start = "{}"\nbdf_end = "{}"\n'
_SEGMENT_1_RANGE = (
    '[[endpoints]]\nsegment = 1\nbdf_start = "00:04.0"\nbdf_end = "00:1f.7"\nendpoint_start = 0x1000\n'
)


REFUSED_TOPOLOGIES: list[tuple[str, Topology, str]] = [
    # Behind a bridge the guest looks for the IOMMU's node under the bridge's: it would find none.
    ("iommu off the root bus", _topology('bdf = "01:00.0"', _RANGE.format("00:04.0", "00:1f.7")), "root bus"),
    ("iommu on another segment", _topology('segment = 1\nbdf = "00:03.0"',
                                           _RANGE.format("00:04.0", "00:1f.7")), "one PCI segment"),
    ("endpoints on two segments", _topology('bdf = "00:03.0"', _RANGE.format("00:04.0", "00:1f.7")
                                            + _SEGMENT_1_RANGE),
     "one PCI segment"),
    ("mmio transport missing", _topology('transport = "mmio"\naddress = 0x0a000200',
                                         _RANGE.format("00:04.0", "00:1f.7")),
     "no virtio,mmio node at 0xa000200"),
]  # fmt: skip


@pytest.mark.parametrize(("topology", "message"), [(t, m) for _, t, m in REFUSED_TOPOLOGIES],
                         ids=[n for n, _, _ in REFUSED_TOPOLOGIES])  # fmt: skip
def test_topologies_that_would_leave_the_guest_without_a_description_are_refused(
    dtc: str, topology: Topology, message: str
) -> None:
    with pytest.raises(DtbError, match=message):
        add_iommu(dumped(dtc), topology)


def test_iommu_slot_already_described_is_refused(dtc: str) -> None:
    source = VIRT_LIKE_DTS.replace(
        "        reg = <0x40 0x10000000 0x00 0x10000000>;\n",
        "        reg = <0x40 0x10000000 0x00 0x10000000>;\n        dev@3,0 { reg = <0x1800 0 0 0 0>; };\n",
    )
    with pytest.raises(DtbError, match=r"already describes 00:03\.0"):
        add_iommu(compile_dts(dtc, source), Topology.load(ARM_VIRT))


def test_topology_refuses_what_the_device_tree_cannot_say() -> None:
    from vhost_iommu.device import TopologyError

    with pytest.raises(TopologyError, match="arch"):
        Topology.loads('[iommu]\ntransport = "mmio"\n' + _RANGE.format("00:04.0", "00:1f.7"))
    with pytest.raises(TopologyError, match="not one of virt's virtio-mmio"):
        _topology('transport = "mmio"\naddress = 0x0a000100', _RANGE.format("00:04.0", "00:1f.7"))
    with pytest.raises(TopologyError, match="not a PCI function"):
        _topology('transport = "mmio"\nbdf = "00:03.0"', _RANGE.format("00:04.0", "00:1f.7"))
    with pytest.raises(TopologyError, match="only an IOMMU on a virtio-mmio"):
        _topology("address = 0x0a003e00", _RANGE.format("00:04.0", "00:1f.7"))
    with pytest.raises(TopologyError, match="arch"):
        Topology.loads('arch = "riscv"\n' + _RANGE.format("00:04.0", "00:1f.7"))
    # On virtio-mmio the PCI slot the IOMMU would take on PCI is an ordinary endpoint.
    mmio = _topology('transport = "mmio"', _RANGE.format("00:00.0", "00:1f.7"))
    assert mmio.endpoint_for(0, 0x18) == 0x18


def test_arm_presets_report_the_its_doorbell_as_msi_region() -> None:
    from vhost_iommu.device import ResvMemType

    for path in (ARM_VIRT, ARM_VIRT_MMIO):
        topology = Topology.load(path)
        assert topology.granule == 4096 and topology.input_end == (1 << 48) - 1
        for endpoint in topology.endpoint_ids():
            (region,) = topology.reserved_regions(endpoint)
            assert (region.kind, region.start, region.end) == (ResvMemType.MSI, 0x0809_0000, 0x0809_FFFF)


def test_dtb_command_writes_the_tree_from_a_dump(dtc: str, tmp_path: Path) -> None:
    from vhost_iommu.cli import main

    dump = tmp_path / "dump.dtb"
    dump.write_bytes(dumped(dtc))
    output = tmp_path / "virt.dtb"
    assert main(["dtb", "--topology", str(ARM_VIRT), "--dump", str(dump), "-o", str(output)]) == 0
    assert read_description(output.read_bytes()).iommu_path == "/pcie@10000000/virtio_iommu@3,0"


def test_dtb_command_refuses_an_x86_topology_and_a_bad_dump(
    dtc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vhost_iommu.cli import main

    output = tmp_path / "virt.dtb"
    assert main(["dtb", "--dump", str(tmp_path / "none"), "-o", str(output)]) == 1
    assert 'arch = "arm64"' in capsys.readouterr().err
    junk = tmp_path / "junk.dtb"
    junk.write_bytes(b"\xd0\x0d\xfe\xed" + b"\0" * 60)
    assert main(["dtb", "--topology", str(ARM_VIRT), "--dump", str(junk), "-o", str(output)]) == 1
    assert "not a usable device tree dump" in capsys.readouterr().err
    assert not output.exists()

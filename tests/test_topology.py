"""Topology descriptions: the default, the shipped TOML files, and errors that name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost_iommu.device import IommuDevice, ResvMemType, Topology, TopologyError
from vhost_iommu.device.topology import PciRange, ReservedRegion
from vhost_iommu.machine import Arch

TOPOLOGIES = Path(__file__).resolve().parent.parent / "qemu-configs" / "topologies"

MINIMAL = """
[[endpoints]]
bdf_start = "00:04.0"
bdf_end = "00:04.7"
"""


def load(text: str) -> Topology:
    return Topology.loads(text, source="topology.toml")


def test_default_is_the_q35_layout() -> None:
    topology = Topology.default()
    assert (topology.iommu_segment, topology.iommu_bdf) == (0, 0x18)
    assert topology.viot_ranges() == [(0, 0x20, 0xF7, 0x20)]
    assert topology.endpoint_ids() == list(range(0x20, 0xF8))
    assert topology.granule == 4096
    assert (topology.input_start, topology.input_end) == (0, 2**48 - 1)
    assert topology.probe_size == 512 and topology.boot_bypass
    for endpoint in (0x20, 0x9A, 0xF7):
        assert topology.reserved_regions(endpoint) == (
            ReservedRegion(ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF),
        )
    assert topology.endpoint_for(0, 0x20) == 0x20 and topology.endpoint_for(0, 0x18) is None
    assert topology.endpoint_for(1, 0x20) is None
    assert topology.pci_address(0xF7) == (0, 0xF7)


@pytest.mark.parametrize(("name", "arch"), [("default.toml", Arch.X86_64), ("arm-virt.toml", Arch.ARM64)])
def test_shipped_default_file_equals_default(name: str, arch: Arch) -> None:
    loaded = Topology.load(TOPOLOGIES / name)
    assert loaded == Topology.default(arch)
    assert hash(loaded) == hash(Topology.default(arch))


@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_topology_loads_and_serves(path: Path) -> None:
    topology = Topology.load(path)
    device = IommuDevice(topology)
    assert len(device.endpoints()) == len(topology.endpoint_ids()) > 0


def test_viot_ids_follow_the_acpi_formula() -> None:
    topology = load(
        """
        [iommu]
        bdf = "0000:00:02.0"
        [[endpoints]]
        bdf_start = "00:08.0"
        bdf_end = "00:08.7"
        endpoint_start = 0x100
        [[endpoints]]
        segment = 1
        bdf_start = 0x100
        bdf_end = 0x1ff
        endpoint_start = 0x10000
        """
    )
    assert topology.iommu_bdf == 0x10
    assert topology.viot_ranges() == [(0, 0x40, 0x47, 0x100), (1, 0x100, 0x1FF, 0x10000)]
    assert topology.endpoint_for(0, 0x43) == 0x103
    assert topology.endpoint_for(1, 0x1FF) == 0x100FF
    assert topology.endpoint_for(0, 0x100) is None
    assert topology.pci_address(0x10001) == (1, 0x101)


def test_reserved_regions_per_range_and_per_endpoint() -> None:
    topology = load(
        MINIMAL
        + """
        [[endpoints.reserved]]
        type = "msi"
        start = 0xfee00000
        end = 0xfeefffff
        [[reserved]]
        bdf = "00:04.1"
        type = "reserved"
        start = 0x1000
        end = 0x1fff
        [[reserved]]
        endpoint = 0x22
        type = "RESERVED"
        start = 0x2000
        end = 0x2fff
        """
    )
    msi = ReservedRegion(ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF)
    assert topology.reserved_regions(0x20) == (msi,)
    assert topology.reserved_regions(0x21) == (ReservedRegion(ResvMemType.RESERVED, 0x1000, 0x1FFF), msi)
    assert topology.reserved_regions(0x22) == (ReservedRegion(ResvMemType.RESERVED, 0x2000, 0x2FFF), msi)


def test_granule_and_options() -> None:
    topology = load(
        "granule = 0x10000\ninput_range = { start = 0, end = 0xffffffff }\n"
        "domain_range = { start = 0, end = 255 }\nprobe_size = 0\nboot_bypass = false\n" + MINIMAL
    )
    assert topology.page_size_mask == 0xFFFF_FFFF_FFFF_0000 and topology.granule == 0x10000
    assert (topology.domain_start, topology.domain_end) == (0, 255)
    assert topology.probe_size == 0 and not topology.boot_bypass


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[endpoints]]\nbdf_start = "00:04.0"\nbdf_end = 0x10000\n',
            "topology.toml: endpoints[0].bdf_end: 0x10000 is not a valid BDF",
        ),
        (
            MINIMAL + '[[endpoints]]\nbdf_start = "00:05.0"\nbdf_end = "00:20.0"\n',
            "topology.toml: endpoints[1].bdf_end: '00:20.0' is not a valid BDF",
        ),
        (
            '[[endpoints]]\nbdf_start = "00:05.0"\nbdf_end = "00:04.0"\n',
            "endpoints[0].bdf_end: 0x20 is below",
        ),
        ('[[endpoints]]\nbdf_start = "00:05.0"\n', "endpoints[0].bdf_end: missing"),
        (
            '[[endpoints]]\nbdf_strat = "00:05.0"\nbdf_end = "00:05.0"\n',
            "endpoints[0].bdf_strat: unknown key",
        ),
        ("probe_sise = 4\n" + MINIMAL, "topology.toml: probe_sise: unknown key"),
        ("", "endpoints: missing"),
        ("page_size_mask = 0\n" + MINIMAL, "page_size_mask: 0x0 is not a non-zero 64-bit mask"),
        ("granule = 512\n" + MINIMAL, "page_size_mask: 0xfffffffffffffe00 gives a 512-byte granule"),
        ("granule = 3000\n" + MINIMAL, "granule: 0xbb8 is not a power of two"),
        (
            "granule = 4096\npage_size_mask = 0x1000\n" + MINIMAL,
            "granule: give either granule or page_size_mask",
        ),
        ("input_range = { start = 0, end = 0x1234 }\n" + MINIMAL, "input_range: 0x0-0x1234 is not aligned"),
        (
            "input_range = { start = 0x2000, end = 0x1fff }\n" + MINIMAL,
            "input_range.end: 0x1fff is below start",
        ),
        ("domain_range = { start = 0, end = 0x10000 }\n" + MINIMAL, "domain_range: 65537 domain IDs"),
        (
            "domain_range = { start = 0, end = 0x100000000 }\n" + MINIMAL,
            "domain_range.end: 0x100000000 is not",
        ),
        ("probe_size = 70000\n" + MINIMAL, "probe_size: 0x11170 is not"),
        ("boot_bypass = 2\n" + MINIMAL, "boot_bypass: 2 is not 0, 1, true or false"),
        ('[iommu]\nbdf = "00:04.3"\n' + MINIMAL, "endpoints[0]: includes the IOMMU itself (0000:00:04.3)"),
        (
            MINIMAL + '[[endpoints]]\nbdf_start = "00:04.7"\nbdf_end = "00:05.0"\nendpoint_start = 0x100\n',
            "endpoints[1]: BDFs overlap those of endpoints[0]",
        ),
        (
            MINIMAL + '[[endpoints]]\nbdf_start = "00:05.0"\nbdf_end = "00:05.7"\nendpoint_start = 0x27\n',
            "endpoints[1]: endpoint IDs overlap those of endpoints[0]",
        ),
        (
            '[[endpoints]]\nbdf_start = "00:04.0"\nbdf_end = "00:04.1"\nendpoint_start = 0xffffffff\n',
            "endpoints[0].endpoint_start: 0xffffffff makes endpoint IDs beyond 32 bits",
        ),
        (
            '[[endpoints]]\nsegment = 1\nbdf_start = "0000:00:04.0"\nbdf_end = "00:04.1"\n',
            "endpoints[0].bdf_start: '0000:00:04.0' is in segment 0x0, not 0x1",
        ),
        (
            MINIMAL + '[[endpoints.reserved]]\ntype = "doorbell"\nstart = 0\nend = 1\n',
            "endpoints[0].reserved[0].type: 'doorbell' is not one of: reserved, msi",
        ),
        (
            MINIMAL + '[[endpoints.reserved]]\ntype = "msi"\nstart = 0x2000\nend = 0x1000\n',
            "endpoints[0].reserved[0].end: 0x1000 is below start 0x2000",
        ),
        (
            MINIMAL + '[[endpoints.reserved]]\ntype = "msi"\nstart = 0\nend = 0xfff\n'
            '[[reserved]]\nendpoint = 0x21\ntype = "msi"\nstart = 0x2000\nend = 0x2fff\n',
            "endpoint 0x21: more than one MSI region",
        ),
        (
            MINIMAL + '[[reserved]]\nendpoint = 0x21\ntype = "reserved"\nstart = 0x0\nend = 0x1fff\n'
            '[[reserved]]\nendpoint = 0x21\ntype = "reserved"\nstart = 0x1000\nend = 0x2fff\n',
            "endpoint 0x21: reserved regions 0x0-0x1fff and 0x1000-0x2fff overlap",
        ),
        (
            MINIMAL + '[[reserved]]\nendpoint = 0x30\ntype = "reserved"\nstart = 0\nend = 1\n',
            "reserved[0].endpoint: 0x30 is not in any endpoint range",
        ),
        (
            MINIMAL + '[[reserved]]\nbdf = "00:09.0"\ntype = "reserved"\nstart = 0\nend = 1\n',
            "reserved[0].bdf: 0000:00:09.0 is not in any endpoint range",
        ),
        (
            MINIMAL + '[[reserved]]\ntype = "reserved"\nstart = 0\nend = 1\n',
            "reserved[0]: give exactly one of endpoint or bdf",
        ),
        (
            "probe_size = 40\n" + MINIMAL + '[[endpoints.reserved]]\ntype = "msi"\nstart = 0\nend = 0xfff\n'
            '[[endpoints.reserved]]\ntype = "reserved"\nstart = 0x1000\nend = 0x1fff\n',
            "probe_size: 40 bytes cannot hold the 2 reserved regions of endpoint 0x20",
        ),
        (
            MINIMAL + '[[devices]]\nkind = "toaster"\nbdf = "00:04.1"\nsocket = "s"\n',
            "devices[0].kind: 'toaster'",
        ),
        (
            MINIMAL + '[[devices]]\nkind = "dma-engine"\nbdf = "00:09.0"\nsocket = "s"\n',
            "devices[0].bdf: 0000:00:09.0 is not in any endpoint range",
        ),
        (MINIMAL + '[[devices]]\nkind = "dma-engine"\nbdf = "00:04.1"\n', "devices[0].socket: missing"),
        (
            MINIMAL + '[[devices]]\nkind = "dma-engine"\nbdf = "00:04.1"\nsocket = "s"\nimage = "x"\n',
            "devices[0].image: unknown key",
        ),
        (
            MINIMAL + '[[devices]]\nkind = "dma-engine"\nbdf = "00:04.1"\nsocket = "s"\n'
            '[[devices]]\nkind = "dma-engine"\nbdf = "00:04.2"\nsocket = "s"\n',
            "devices[1].socket: 's' is also devices[0]'s",
        ),
        ("devices = 1\n" + MINIMAL, "devices: must be an array of tables"),
        ("endpoints = 3\n", "endpoints: missing"),
        ('[iommu]\nbdf = "nope"\n' + MINIMAL, "iommu.bdf: 'nope' is not a valid BDF"),
        ("= broken", "topology.toml: not valid TOML"),
    ],
)
def test_bad_files_name_the_field(text: str, message: str) -> None:
    with pytest.raises(TopologyError) as caught:
        load(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("topology.toml: ")


def test_devices_are_parsed_with_their_endpoint_and_socket() -> None:
    topology = load(MINIMAL + '[[devices]]\nkind = "dma-engine"\nbdf = "00:04.3"\nsocket = "/run/e.sock"\n')
    (device,) = topology.devices
    assert (device.kind, device.segment, device.bdf) == ("dma-engine", 0, 0x23)
    assert topology.endpoint_for(device.segment, device.bdf) == 0x23
    assert device.socket_path("/elsewhere") == "/run/e.sock"
    default = Topology.default().devices[0]
    assert default.kind == "dma-engine" and default.socket_path("/run/vm") == "/run/vm/dma-engine.sock"
    assert default.socket_path(None) is None
    # One engine per VM at the same address, each on its own socket.
    two = load(
        MINIMAL + '[[devices]]\nkind = "dma-engine"\nbdf = "00:04.1"\nsocket = "a"\n'
        '[[devices]]\nkind = "dma-engine"\nbdf = "00:04.1"\nsocket = "b"\n'
    )
    assert [device.socket for device in two.devices] == ["a", "b"]


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[[endpoints]]\nbdf_start = "00:04.0"\nbdf_end = 0x1ffff\n')
    with pytest.raises(
        TopologyError, match=r"^mine\.toml: endpoints\[0\]\.bdf_end: 0x1ffff is not a valid BDF"
    ):
        Topology.load(path)
    with pytest.raises(TopologyError, match="cannot read"):
        Topology.load(tmp_path / "missing.toml")


def test_python_construction_is_validated_too() -> None:
    with pytest.raises(TopologyError, match="manages no endpoint"):
        Topology()
    with pytest.raises(TopologyError, match="bdf_end"):
        Topology(pci_ranges=(PciRange(0, 0x20, 0x1_0000, 0x20),))


def test_shipped_strict_topology() -> None:
    topology = Topology.load(TOPOLOGIES / "strict.toml")
    assert not topology.boot_bypass
    assert topology.viot_ranges() == [(0, 0x20, 0x3F, 0x20), (0, 0x100, 0x1FF, 0x1000)]
    kinds = [(region.kind, region.start) for region in topology.reserved_regions(0x1000)]
    assert kinds == [
        (ResvMemType.RESERVED, 0),
        (ResvMemType.RESERVED, 0xE0000000),
        (ResvMemType.MSI, 0xFEE00000),
    ]
    assert len(topology.reserved_regions(0x1001)) == 2

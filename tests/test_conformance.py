"""Conformance of the device to the virtio 1.3 "IOMMU Device" chapter (device-types/iommu/description.tex).

Each test quotes the statement it checks, verbatim, with its section. Requests are built with the encoders
of `vhost_iommu.device.layout` and go through ONE step, `Harness.submit(request_bytes, writable_size) ->
(response_bytes, used_length)`. The `make_harness` fixture is the seam: here it calls
`IommuDevice.handle_request` directly; an adapter can return a Harness whose `submit` goes through the
vhost-user back-end (real sockets and rings) and whose `device` is the device behind it, and every test
below runs unchanged.

Addresses scale the spec's byte examples to the default 4 KiB granule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from vhost_iommu.device import Access, Fault, FaultReason, IommuDevice, Status, Topology, Translation
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
    F_BYPASS,
    F_BYPASS_CONFIG,
    F_MAP_UNMAP,
    F_MMIO,
    F_PROBE,
    FAULT_F_ADDRESS,
    FAULT_F_READ,
    FAULT_F_WRITE,
    MAP_F_MMIO,
    MAP_F_READ,
    MAP_F_WRITE,
    PROPERTY_HEAD,
    RESV_MEM,
    TAIL_SIZE,
    ResvMemProperty,
    ResvMemType,
    decode_config,
    decode_fault,
    decode_properties,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
)
from vhost_iommu.device.topology import PciRange, ReservedRegion
from vhost_iommu.harness import IommuDriver, RequestFailedError, running_server
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.jit.rules import RULES
from vhost_iommu.virtio_iommu import RING_FEATURES, VIRTIO_F_VERSION_1, VirtioIommuBackend

PAGE = 0x1000
EP = 0x20  # 0000:00:04.0 in the default topology
EP2 = 0x21
MSI_START, MSI_END = 0xFEE0_0000, 0xFEEF_FFFF
RW = MAP_F_READ | MAP_F_WRITE

Submit = Callable[[bytes, int], tuple[bytes, int]]


@dataclass
class Harness:
    """A device under test and the way requests reach it."""

    device: IommuDevice
    submit: Submit

    def read_config(self, offset: int, size: int) -> bytes:
        return self.device.get_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.device.set_config(offset, data)

    def reset(self) -> None:
        """Device reset, as the transport does it; features must be negotiated again after it."""
        self.device.reset()

    def negotiate(self, features: int) -> None:
        self.device.set_features(features)


MakeHarness = Callable[..., Harness]


class VhostUserHarness(Harness):
    """The same device behind the real vhost-user path: a server thread, a unix socket, memfd guest RAM,
    split rings with EVENT_IDX, eventfds. ``submit`` posts one chain on the requestq, kicks, waits for the
    call eventfd and reads the used entry back; config goes through GET/SET_CONFIG."""

    def __init__(
        self,
        topology: Topology,
        features: int | None,
        stack: ExitStack,
        *,
        kick_thread: bool = False,
        max_mappings: int | None = None,
    ) -> None:
        self.server = stack.enter_context(
            running_server(
                lambda: VirtioIommuBackend(device=new_device(topology, max_mappings), kick_thread=kick_thread)
            )
        )
        self.frontend = stack.enter_context(self.server.connect())
        self.ram = GuestRam(4 << 20)
        stack.callback(self.ram.close)
        self.frontend.negotiate(2)
        self._started = False
        backend = self.server.backends[0]
        assert isinstance(backend, VirtioIommuBackend)
        super().__init__(backend.device, self._submit)
        self.negotiate(self.device.device_features() if features is None else features)

    def _submit(self, request: bytes, writable_size: int) -> tuple[bytes, int]:
        if not request and not writable_size:
            pytest.skip("a chain of no buffers cannot be put on a ring")
        [answer] = self.driver.submit([request], writable_size)
        return answer

    def read_config(self, offset: int, size: int) -> bytes:
        return self.frontend.get_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        try:
            self.frontend.set_config(offset, data)
        except RequestFailedError as error:
            raise ValueError(str(error)) from error

    def reset(self) -> None:
        # What QEMU 10.2 does when the guest resets the device: the rings are disabled and stopped, and
        # nothing else is said; the device learns of the reset when the rings restart elsewhere.
        self.frontend.stop_device(2, reset_status=False)

    def negotiate(self, features: int) -> None:
        # A device (re)start as QEMU does it, on fresh rings as a driver sets them up after a reset.
        self.driver = IommuDriver(self.frontend, self.ram, event_idx=True, start=False)
        # After a reset the memory table goes again as a whole (SET_MEM_TABLE): an ADD_MEM_REG of a
        # region the back-end already holds is refused as an overlap.
        self.frontend.start_rings(
            self.ram,
            self.driver.queues,
            driver_features=features | VIRTIO_F_VERSION_1 | RING_FEATURES,
            use_mem_slots=not self._started,
        )
        self._started = True


def new_device(topology: Topology, max_mappings: int | None) -> IommuDevice:
    return IommuDevice(topology) if max_mappings is None else IommuDevice(topology, max_mappings=max_mappings)


@pytest.fixture(params=["device", "vhost-user", "vhost-user-kick-thread"])
def make_harness(request: pytest.FixtureRequest) -> Iterator[MakeHarness]:
    """The seam: ``make(topology=None, features=None, max_mappings=None)`` -> Harness with ``features``
    negotiated, either straight on `IommuDevice.handle_request` (the device core's Python path) or through
    the whole vhost-user path (the compiled request path, the requestq served from the event loop or from
    the back-end's kick thread)."""
    with ExitStack() as stack:

        def make(
            topology: Topology | None = None, *, features: int | None = None, max_mappings: int | None = None
        ) -> Harness:
            topology = topology if topology is not None else Topology.default()
            if request.param != "device":
                kick_thread = request.param == "vhost-user-kick-thread"
                return VhostUserHarness(
                    topology, features, stack, kick_thread=kick_thread, max_mappings=max_mappings
                )
            device = new_device(topology, max_mappings)
            device.set_features(device.device_features() if features is None else features)
            return Harness(device, device.handle_request)

        yield make


class Driver:
    """Sends requests through a Harness and checks what every completed request must satisfy."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.device = harness.device

    def send(self, request: bytes, writable_size: int = TAIL_SIZE) -> tuple[bytes, int]:
        return self.harness.submit(request, writable_size)

    def status(self, request: bytes, writable_size: int = TAIL_SIZE) -> Status:
        response, used = self.send(request, writable_size)
        # A completed request: the whole writable part is used, the tail is last and its reserved bytes are 0.
        assert used == writable_size
        assert len(response) == writable_size
        assert response[-3:] == bytes(3)
        return Status(response[-TAIL_SIZE])

    def attach(self, domain: int, endpoint: int = EP, flags: int = 0, **fields: bytes) -> Status:
        return self.status(encode_attach(domain, endpoint, flags, **fields))

    def detach(self, domain: int, endpoint: int = EP, **fields: bytes) -> Status:
        return self.status(encode_detach(domain, endpoint, **fields))

    def map(self, domain: int, virt_start: int, virt_end: int, phys: int, flags: int = RW) -> Status:
        return self.status(encode_map(domain, virt_start, virt_end, phys, flags))

    def unmap(self, domain: int, virt_start: int, virt_end: int, **fields: bytes) -> Status:
        return self.status(encode_unmap(domain, virt_start, virt_end, **fields))

    def probe(
        self, endpoint: int = EP, properties_size: int | None = None, **fields: bytes
    ) -> tuple[bytes, Status]:
        size = self.device.topology.probe_size if properties_size is None else properties_size
        response, used = self.send(encode_probe(endpoint, **fields), size + TAIL_SIZE)
        assert used == size + TAIL_SIZE and len(response) == used
        return response[:-TAIL_SIZE], Status(response[-TAIL_SIZE])

    def mapped(self, domain: int) -> list[tuple[int, int]]:
        return [(start, end) for start, end, _phys, _flags in self.device.mappings(domain)]


@pytest.fixture
def harness(make_harness: MakeHarness) -> Harness:
    return make_harness()


@pytest.fixture
def driver(harness: Harness) -> Driver:
    return Driver(harness)


def range_topology(*regions: ReservedRegion, probe_size: int = 512, boot_bypass: bool = True) -> Topology:
    """Eight endpoints 0x20-0x27 (00:04.0-00:04.7) sharing ``regions``."""
    return Topology(
        pci_ranges=(PciRange(0, 0x20, 0x27, 0x20, regions),), probe_size=probe_size, boot_bypass=boot_bypass
    )


def no_bypass(driver: Driver) -> None:
    driver.harness.write_config(CONFIG_BYPASS, b"\x00")


# -- Feature bits --------------------------------------------------------------------------------------------


def test_offers_map_unmap(harness: Harness) -> None:
    """Feature bits, device normative: "The device SHOULD offer feature bit VIRTIO_IOMMU_F_MAP_UNMAP." """
    assert harness.device.device_features() & F_MAP_UNMAP


def test_never_offers_legacy_bypass(harness: Harness) -> None:
    """Feature bits, device normative: "The VIRTIO_IOMMU_F_BYPASS_CONFIG feature supersedes
    VIRTIO_IOMMU_F_BYPASS. New devices SHOULD NOT offer VIRTIO_IOMMU_F_BYPASS. Devices SHOULD NOT offer both
    VIRTIO_IOMMU_F_BYPASS and VIRTIO_IOMMU_F_BYPASS_CONFIG." """
    features = harness.device.device_features()
    assert not features & F_BYPASS
    assert features & F_BYPASS_CONFIG


# -- Device configuration layout -----------------------------------------------------------------------------


def test_page_size_mask_has_a_bit(harness: Harness) -> None:
    """Device configuration layout, device normative: "The device MUST set at least one bit in
    page_size_mask, describing the page granularity. The device MAY set more than one bit in
    page_size_mask." (Every power of two from the 4 KiB granule up.)"""
    config = decode_config(harness.read_config(0, 40))
    assert config.page_size_mask != 0
    assert config.page_size_mask & -config.page_size_mask == PAGE
    assert config.page_size_mask == (2**64 - 1) ^ (PAGE - 1)


def test_bypass_initialised_to_boot_value(make_harness: MakeHarness) -> None:
    """Device configuration layout, device normative: "If the device offers the
    VIRTIO_IOMMU_F_BYPASS_CONFIG feature, it MAY initialize the bypass field to 1." """
    assert decode_config(make_harness().read_config(0, 40)).bypass == 1
    assert decode_config(make_harness(range_topology(boot_bypass=False)).read_config(0, 40)).bypass == 0


def test_bypass_sticky_across_device_reset(harness: Harness) -> None:
    """Device configuration layout, device normative: "Field bypass SHOULD NOT change on device reset, but
    SHOULD be restored to its initial value on system reset." """
    harness.write_config(CONFIG_BYPASS, b"\x00")
    harness.reset()
    assert harness.read_config(CONFIG_BYPASS, 1) == b"\x00"
    harness.device.system_reset()
    assert harness.read_config(CONFIG_BYPASS, 1) == b"\x01"


@pytest.mark.parametrize("value", [2, 0x80, 0xFF])
def test_bypass_never_other_than_0_or_1(harness: Harness, value: int) -> None:
    """Device configuration layout, device normative: "The device MUST NOT present a value different than
    0 or 1 in bypass." """
    with pytest.raises(ValueError):
        harness.write_config(CONFIG_BYPASS, bytes([value]))
    assert harness.read_config(CONFIG_BYPASS, 1) == b"\x01"


# -- Device initialization -----------------------------------------------------------------------------------


def test_reset_detaches_every_endpoint(driver: Driver) -> None:
    """Device initialization: "When the device is reset, endpoints are not attached to any domain." """
    assert driver.attach(1, EP) == Status.OK
    assert driver.attach(2, EP2) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0x10000) == Status.OK
    driver.harness.reset()
    driver.harness.negotiate(driver.device.device_features())
    assert driver.device.domain_of(EP) is None and driver.device.domain_of(EP2) is None
    assert driver.device.domains() == []
    assert driver.map(1, 0, PAGE - 1, 0x10000) == Status.NOENT


# -- Device operations ---------------------------------------------------------------------------------------


def test_ok_on_success(driver: Driver) -> None:
    """Device operations, device normative: "The device SHOULD set status to VIRTIO_IOMMU_S_OK if a request
    succeeds." """
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0) == Status.OK
    assert driver.unmap(1, 0, PAGE - 1) == Status.OK
    assert driver.probe()[1] == Status.OK
    assert driver.detach(1) == Status.OK


@pytest.mark.parametrize("request_type", [0, 6, 7, 0x80, 0xFF])
def test_unknown_type_not_written(driver: Driver, request_type: int) -> None:
    """Device operations, device normative: "If a request type is not recognized, the device SHOULD NOT
    write the buffer and SHOULD set the used length to zero." """
    request = bytes([request_type]) + bytes(35)
    assert driver.send(request, TAIL_SIZE) == (b"", 0)


def test_head_reserved_ignored_tail_reserved_zero(driver: Driver) -> None:
    """Device operations, device normative: "The device MUST ignore field reserved of struct
    virtio_iommu_req_head and SHOULD set field reserved of struct virtio_iommu_req_tail to zero." """
    junk = b"\xff\x5a\xa5"
    assert driver.status(encode_attach(1, EP, head_reserved=junk)) == Status.OK
    assert driver.status(encode_map(1, 0, PAGE - 1, 0, RW, head_reserved=junk)) == Status.OK
    assert driver.status(encode_unmap(1, 0, PAGE - 1, head_reserved=junk)) == Status.OK
    assert driver.status(encode_probe(EP, head_reserved=junk), 512 + TAIL_SIZE) == Status.OK
    assert driver.status(encode_detach(1, EP, head_reserved=junk)) == Status.OK
    # Driver.status asserts the tail's reserved bytes are zero on every one of these.


def test_unattached_endpoint_without_bypass_cannot_access_memory(driver: Driver) -> None:
    """Device operations, device normative: "The device SHOULD NOT let unattached endpoints that are not in
    bypass mode access the guest-physical address space." """
    no_bypass(driver)
    fault = driver.device.translate(EP, 0x10000, 8, Access.READ)
    assert isinstance(fault, Fault) and fault.reason == FaultReason.DOMAIN


def test_bypass_applies_even_without_bypass_config_accepted(make_harness: MakeHarness) -> None:
    """Device operations: an endpoint is in bypass mode if "config field bypass is 1 and the endpoint is not
    attached to a domain. This applies even if the driver does not accept the VIRTIO_IOMMU_F_BYPASS_CONFIG
    feature and the device initializes field bypass to 1." """
    harness = make_harness(features=F_MAP_UNMAP | F_PROBE)
    result = harness.device.translate(EP, 0x10000, 8, Access.WRITE)
    assert isinstance(result, Translation) and result.bypass and result.phys == 0x10000


def test_bypass_domain_endpoints_are_identity(driver: Driver) -> None:
    """Device operations: an endpoint is in bypass mode if "the endpoint is attached to a domain with
    VIRTIO_IOMMU_ATTACH_F_BYPASS". "All accesses from an endpoint in bypass mode are allowed and translated
    by the IOMMU using the identity function." """
    no_bypass(driver)
    assert driver.attach(9, EP, ATTACH_F_BYPASS) == Status.OK
    result = driver.device.translate(EP, 0x1234_5000, 0x2000, Access.READ | Access.WRITE)
    assert isinstance(result, Translation) and result.segments == ((0x1234_5000, 0x2000),)


def test_unparseable_request_not_written(driver: Driver) -> None:
    """Device operations: "When the device fails to parse a request, for instance if a request is too small
    for its type and the device cannot find the tail, then it is unable to set status. In that case, it
    returns the buffers without writing to them." """
    assert driver.send(b"", TAIL_SIZE) == (b"", 0)
    assert driver.send(b"\x01\x00", TAIL_SIZE) == (b"", 0)
    assert driver.send(encode_attach(1, EP), 0) == (b"", 0)
    assert driver.send(encode_attach(1, EP), 3) == (b"", 0)
    assert driver.device.domain_of(EP) is None


def test_domain_outside_domain_range(driver: Driver) -> None:
    """Device operations: "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is offered, domain_range describes the
    values supported in a domain field." Values outside it are out-of-range parameters (S_RANGE)."""
    config = decode_config(driver.harness.read_config(0, 40))
    for domain in (config.domain_start - 1, config.domain_end + 1, 0xFFFF_FFFF):
        assert driver.attach(domain) == Status.RANGE
        assert driver.map(domain, 0, PAGE - 1, 0) == Status.RANGE
        assert driver.unmap(domain, 0, PAGE - 1) == Status.RANGE
        assert driver.detach(domain) == Status.RANGE
    assert driver.device.domain_of(EP) is None


def test_map_outside_input_range_fails(driver: Driver) -> None:
    """Device operations: "If the VIRTIO_IOMMU_F_INPUT_RANGE feature is offered, input_range contains the
    virtual address range that the IOMMU is able to translate. Any mapping request to virtual addresses
    outside of this range fails." """
    config = decode_config(driver.harness.read_config(0, 40))
    assert driver.attach(1) == Status.OK
    end = config.input_end
    assert driver.map(1, end + 1, end + PAGE, 0) == Status.RANGE
    assert driver.map(1, end - PAGE + 1, end + PAGE, 0) == Status.RANGE
    assert driver.map(1, end - PAGE + 1, end, 0) == Status.OK
    assert driver.mapped(1) == [(end - PAGE + 1, end)]


# -- ATTACH --------------------------------------------------------------------------------------------------


def test_attach_reserved_not_zero(driver: Driver) -> None:
    """ATTACH request, device normative: "If the reserved field of an ATTACH request is not zero, the device
    MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL." """
    for reserved in (b"\x01\x00\x00\x00", b"\x00\x00\x00\x80"):
        assert driver.attach(1, EP, reserved=reserved) == Status.INVAL
    assert driver.device.domain_of(EP) is None and driver.device.domains() == []


@pytest.mark.parametrize("flags", [1 << 1, 1 << 31, 0xFFFF_FFFF])
def test_attach_unknown_flag(driver: Driver, flags: int) -> None:
    """ATTACH request, device normative: "If the device does not recognize a flags bit, it MUST reject the
    request and set status to VIRTIO_IOMMU_S_INVAL." """
    assert driver.attach(1, EP, flags) == Status.INVAL
    assert driver.device.domain_of(EP) is None


def test_attach_bypass_flag_unknown_without_bypass_config(make_harness: MakeHarness) -> None:
    """ATTACH request: "When the VIRTIO_IOMMU_F_BYPASS_CONFIG is negotiated, the driver can set the
    VIRTIO_IOMMU_ATTACH_F_BYPASS flag"; without it the bit is not one the device recognizes: "it MUST reject
    the request and set status to VIRTIO_IOMMU_S_INVAL." """
    driver = Driver(make_harness(features=F_MAP_UNMAP | F_PROBE))
    assert driver.attach(1, EP, ATTACH_F_BYPASS) == Status.INVAL
    assert driver.attach(1, EP) == Status.OK


@pytest.mark.parametrize("endpoint", [0, 0x1F, 0x18, 0xF8, 0xFFFF_FFFF])
def test_attach_unknown_endpoint(driver: Driver, endpoint: int) -> None:
    """ATTACH request, device normative: "If the endpoint identified by endpoint doesn't exist, the device
    MUST reject the request and set status to VIRTIO_IOMMU_S_NOENT." """
    assert driver.attach(1, endpoint) == Status.NOENT
    assert driver.device.domains() == []


def test_attach_second_endpoint_to_domain(driver: Driver) -> None:
    """ATTACH request, device normative: "If another endpoint is already attached to the domain identified
    by domain, then the device MAY attach the endpoint identified by endpoint to the domain. If it cannot do
    so, the device MUST reject the request and set status to VIRTIO_IOMMU_S_UNSUPP." (We always can.)"""
    assert driver.attach(1, EP) == Status.OK
    assert driver.map(1, 0x10000, 0x10FFF, 0x80000, MAP_F_READ) == Status.OK
    assert driver.attach(1, EP2) == Status.OK
    no_bypass(driver)
    for endpoint in (EP, EP2):
        result = driver.device.translate(endpoint, 0x10010, 4, Access.READ)
        assert isinstance(result, Translation) and result.phys == 0x80010


def test_endpoints_of_different_domains_are_isolated(driver: Driver) -> None:
    """ATTACH request: "Multiple endpoints can be attached to the same domain. An endpoint can be attached to
    a single domain at a time. Endpoints attached to different domains are isolated from each other." """
    no_bypass(driver)
    assert driver.attach(1, EP) == Status.OK
    assert driver.attach(2, EP2) == Status.OK
    assert driver.map(1, 0x10000, 0x10FFF, 0x80000) == Status.OK
    assert driver.map(2, 0x20000, 0x20FFF, 0x90000) == Status.OK
    assert isinstance(driver.device.translate(EP, 0x10000, 4, Access.READ), Translation)
    assert isinstance(driver.device.translate(EP, 0x20000, 4, Access.READ), Fault)
    assert isinstance(driver.device.translate(EP2, 0x10000, 4, Access.READ), Fault)
    assert isinstance(driver.device.translate(EP2, 0x20000, 4, Access.READ), Translation)
    # Attaching again to the domain it is in changes nothing.
    assert driver.attach(1, EP) == Status.OK
    assert driver.device.domain_of(EP) == 1 and driver.mapped(1) == [(0x10000, 0x10FFF)]


def test_attach_bypass_mismatch_refused_before_anything_changes(driver: Driver) -> None:
    """ATTACH request, device normative: "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS
    flag is not consistent with that domain, the device SHOULD reject the request and set status to
    VIRTIO_IOMMU_S_INVAL." """
    assert driver.attach(1, EP) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0x5000) == Status.OK
    assert driver.attach(2, EP2, ATTACH_F_BYPASS) == Status.OK
    # EP is the only endpoint of domain 1: a move that detached first would destroy domain 1.
    assert driver.attach(2, EP) == Status.INVAL
    assert driver.attach(1, EP2, ATTACH_F_BYPASS) == Status.INVAL
    assert driver.device.domain_of(EP) == 1 and driver.device.domain_of(EP2) == 2
    assert driver.mapped(1) == [(0, PAGE - 1)]


def test_reattach_moves_endpoint(driver: Driver) -> None:
    """ATTACH request, device normative: "If the endpoint identified by endpoint is already attached to
    another domain, then the device SHOULD first detach it from that domain and attach it to the one
    identified by domain. In that case the device SHOULD behave as if the driver issued a DETACH request
    with this endpoint, followed by the ATTACH request. If the device cannot do so, it MUST reject the
    request and set status to VIRTIO_IOMMU_S_UNSUPP." (We always can.)"""
    assert driver.attach(1, EP) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0x5000) == Status.OK
    assert driver.attach(2, EP) == Status.OK
    assert driver.device.domain_of(EP) == 2
    # Domain 1 lost its last endpoint: it ceased to exist, with its mappings.
    assert driver.map(1, 0, PAGE - 1, 0x5000) == Status.NOENT
    assert driver.device.store.count(1) == 0
    assert driver.attach(1, EP2) == Status.OK
    assert driver.mapped(1) == []


def test_attach_incompatible_properties(make_harness: MakeHarness) -> None:
    """ATTACH request, device normative: "If properties of the endpoint (obtained with a PROBE request) are
    compatible with properties of other endpoints already attached to the requested domain, then the device
    SHOULD attach the endpoint. Otherwise the device SHOULD reject the request and set status to
    VIRTIO_IOMMU_S_UNSUPP." A reserved region of the new endpoint under an existing mapping is
    incompatible."""
    topology = Topology(
        pci_ranges=(PciRange(0, 0x20, 0x27, 0x20, ()),),
        endpoint_reserved={EP2: (ReservedRegion(ResvMemType.RESERVED, 0x8000, 0x8FFF),)},
    )
    driver = Driver(make_harness(topology))
    assert driver.attach(1, EP) == Status.OK
    assert driver.map(1, 0x8000, 0x8FFF, 0x8000) == Status.OK
    assert driver.attach(1, EP2) == Status.UNSUPP
    assert driver.device.domain_of(EP2) is None
    assert driver.unmap(1, 0x8000, 0x8FFF) == Status.OK
    assert driver.attach(1, EP2) == Status.OK
    # From now on the domain refuses maps over the region of its new endpoint.
    assert driver.map(1, 0x8000, 0x8FFF, 0x8000) == Status.RANGE


def test_attach_not_rejected_means_attached(driver: Driver) -> None:
    """ATTACH request, device normative: "A device that does not reject the request MUST attach the
    endpoint." """
    no_bypass(driver)
    assert driver.attach(7, EP) == Status.OK
    assert driver.device.domain_of(EP) == 7
    fault = driver.device.translate(EP, 0x3000, 4, Access.READ)
    assert isinstance(fault, Fault) and fault.reason == FaultReason.MAPPING


# -- DETACH --------------------------------------------------------------------------------------------------


def test_detach_reserved_ignored(driver: Driver) -> None:
    """DETACH request, device normative: "The device MUST ignore reserved." """
    assert driver.attach(1) == Status.OK
    assert driver.detach(1, EP, reserved=b"\xff" * 8) == Status.OK
    assert driver.device.domain_of(EP) is None


def test_detach_unknown_endpoint(driver: Driver) -> None:
    """DETACH request, device normative: "If the endpoint identified by endpoint doesn't exist, then the
    device MUST reject the request and set status to VIRTIO_IOMMU_S_NOENT." """
    assert driver.attach(1) == Status.OK
    assert driver.detach(1, 0x1000) == Status.NOENT
    assert driver.device.domain_of(EP) == 1


def test_detach_from_wrong_domain(driver: Driver) -> None:
    """DETACH request, device normative: "If the domain identified by domain doesn't exist, or if the
    endpoint identified by endpoint isn't attached to this domain, then the device MAY set the request
    status to VIRTIO_IOMMU_S_INVAL." (We do, and nothing changes.)"""
    assert driver.detach(1, EP) == Status.INVAL
    assert driver.attach(1, EP) == Status.OK
    assert driver.attach(2, EP2) == Status.OK
    assert driver.detach(2, EP) == Status.INVAL
    assert driver.detach(3, EP) == Status.INVAL
    assert driver.device.domain_of(EP) == 1 and driver.device.domain_of(EP2) == 2


def test_detached_endpoint_loses_domain_mappings(driver: Driver) -> None:
    """DETACH request, device normative: "The device MUST ensure that after being detached from a domain,
    the endpoint cannot access any mapping from that domain." """
    assert driver.attach(1, EP) == Status.OK
    assert driver.attach(1, EP2) == Status.OK
    assert driver.map(1, 0x10000, 0x10FFF, 0x90000) == Status.OK
    assert driver.detach(1, EP) == Status.OK
    # With bypass 1 the endpoint is in bypass mode: identity, never the domain's mapping.
    result = driver.device.translate(EP, 0x10000, 4, Access.READ)
    assert isinstance(result, Translation) and result.phys == 0x10000
    no_bypass(driver)
    fault = driver.device.translate(EP, 0x10000, 4, Access.READ)
    assert isinstance(fault, Fault) and fault.reason == FaultReason.DOMAIN
    still = driver.device.translate(EP2, 0x10000, 4, Access.READ)
    assert isinstance(still, Translation) and still.phys == 0x90000


def test_domain_ceases_with_last_endpoint(driver: Driver) -> None:
    """DETACH request: "After all endpoints have been successfully detached from a domain, it ceases to
    exist and its ID can be reused by the driver for another domain." """
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0) == Status.OK
    assert driver.detach(1) == Status.OK
    assert driver.device.domains() == []
    assert driver.map(1, 0, PAGE - 1, 0) == Status.NOENT
    assert driver.attach(1, EP, ATTACH_F_BYPASS) == Status.OK  # reused, now as a bypass domain
    assert driver.device.domains()[0].bypass


# -- MAP -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("virt_start", "virt_end", "phys"),
    [
        (0x800, 0x17FF, 0x1000),  # virt_start unaligned
        (0x1000, 0x1FFF, 0x1800),  # phys_start unaligned
        (0x1000, 0x2FFE, 0x1000),  # virt_end + 1 unaligned
        (0x1000, 0x1000, 0x1000),  # one byte: virt_end + 1 unaligned
    ],
)
def test_map_unaligned(driver: Driver, virt_start: int, virt_end: int, phys: int) -> None:
    """MAP request, device normative: "If virt_start, phys_start or (virt_end + 1) is not aligned on the page
    granularity, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_RANGE." """
    assert driver.attach(1) == Status.OK
    assert driver.map(1, virt_start, virt_end, phys) == Status.RANGE
    assert driver.mapped(1) == []


def test_map_top_of_address_space_is_aligned(make_harness: MakeHarness) -> None:
    """MAP request: (virt_end + 1) of a mapping that ends at 2^64 - 1 wraps to 0, which is aligned."""
    topology = Topology(pci_ranges=(PciRange(0, 0x20, 0x27, 0x20, ()),), input_end=2**64 - 1)
    driver = Driver(make_harness(topology))
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 2**64 - PAGE, 2**64 - 1, 0x4000) == Status.OK


@pytest.mark.parametrize(
    ("virt_start", "virt_end"),
    [
        (0x10000, 0x10FFF),
        (0xF000, 0x10FFF),
        (0x11000, 0x12FFF),
        (0x0, 0x20FFF),
        (0x10000, 0x10000 + PAGE - 1),
    ],
)
def test_map_over_existing_mapping(driver: Driver, virt_start: int, virt_end: int) -> None:
    """MAP request, device normative: "If a mapping already exists in the requested range, the device
    SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL." """
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0x10000, 0x11FFF, 0x40000) == Status.OK
    assert driver.map(1, virt_start, virt_end, 0x80000) == Status.INVAL
    assert driver.mapped(1) == [(0x10000, 0x11FFF)]


@pytest.mark.parametrize("flags", [1 << 3, 1 << 31, 0xFFFF_FFFF])
def test_map_unknown_flag(driver: Driver, flags: int) -> None:
    """MAP request, device normative: "If the device doesn't recognize a flags bit, it MUST reject the
    request and set status to VIRTIO_IOMMU_S_INVAL." """
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0, flags) == Status.INVAL
    assert driver.mapped(1) == []


def test_map_mmio_flag_needs_mmio_feature(make_harness: MakeHarness) -> None:
    """MAP request: "The VIRTIO_IOMMU_MAP_F_MMIO flag is a memory type rather than a protection flag. It is
    only available when the VIRTIO_IOMMU_F_MMIO feature has been negotiated." Without it, it is a flag the
    device does not recognize (S_INVAL)."""
    without = Driver(make_harness(features=F_MAP_UNMAP | F_PROBE | F_BYPASS_CONFIG))
    assert without.attach(1) == Status.OK
    assert without.map(1, 0, PAGE - 1, 0, MAP_F_WRITE | MAP_F_MMIO) == Status.INVAL
    with_mmio = Driver(make_harness(features=F_MAP_UNMAP | F_PROBE | F_MMIO))
    assert with_mmio.attach(1) == Status.OK
    assert with_mmio.map(1, 0, PAGE - 1, 0, MAP_F_WRITE | MAP_F_MMIO) == Status.OK


def test_map_needs_map_unmap_negotiated(make_harness: MakeHarness) -> None:
    """MAP request: "This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated."
    (Otherwise the device answers S_UNSUPP, "Unsupported request".)"""
    driver = Driver(make_harness(features=F_PROBE))
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0) == Status.UNSUPP
    assert driver.unmap(1, 0, PAGE - 1) == Status.UNSUPP


def test_map_unknown_domain(driver: Driver) -> None:
    """MAP request, device normative: "If domain does not exist, the device SHOULD reject the request and
    set status to VIRTIO_IOMMU_S_NOENT." """
    assert driver.map(1, 0, PAGE - 1, 0) == Status.NOENT
    assert driver.attach(1) == Status.OK
    assert driver.map(2, 0, PAGE - 1, 0) == Status.NOENT


def test_map_on_bypass_domain(driver: Driver) -> None:
    """MAP request, device normative: "If the domain is a bypass domain, the device SHOULD reject the
    request and set status to VIRTIO_IOMMU_S_INVAL." """
    assert driver.attach(1, EP, ATTACH_F_BYPASS) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0) == Status.INVAL
    assert driver.device.store.count(1) == 0


def test_no_write_without_write_flag(driver: Driver) -> None:
    """MAP request, device normative: "The device MUST NOT allow writes to a range mapped without the
    VIRTIO_IOMMU_MAP_F_WRITE flag. However, if the underlying architecture does not support write-only
    mappings, the device MAY allow reads to a range mapped with VIRTIO_IOMMU_MAP_F_WRITE but not
    VIRTIO_IOMMU_MAP_F_READ." (This device supports write-only mappings: reads of them fault.)"""
    no_bypass(driver)
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0x4000, 0x4FFF, 0x9000, MAP_F_READ) == Status.OK
    assert isinstance(driver.device.translate(EP, 0x4000, PAGE, Access.READ), Translation)
    fault = driver.device.translate(EP, 0x4FFC, 4, Access.WRITE)
    assert isinstance(fault, Fault) and fault.reason == FaultReason.MAPPING and fault.address == 0x4FFC
    assert decode_fault(driver.device.take_event() or b"").flags == FAULT_F_WRITE | FAULT_F_ADDRESS
    assert driver.map(1, 0x5000, 0x5FFF, 0xA000, MAP_F_WRITE) == Status.OK
    assert isinstance(driver.device.translate(EP, 0x5000, 4, Access.WRITE), Translation)
    assert isinstance(driver.device.translate(EP, 0x5000, 4, Access.READ), Fault)


def test_map_translates_as_the_spec_computes(driver: Driver) -> None:
    r"""MAP request: "For example, if an endpoint accesses address $VA \in [virt\_start; virt\_end]$, the
    device (or the physical IOMMU) translates the address: $PA = VA - virt\_start + phys\_start$." """
    no_bypass(driver)
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0x20_0000, 0x3F_FFFF, 0x7_0000_0000) == Status.OK
    for va in (0x20_0000, 0x2A_BCDE, 0x3F_FFFF):
        result = driver.device.translate(EP, va, 1, Access.READ)
        assert isinstance(result, Translation) and result.phys == va - 0x20_0000 + 0x7_0000_0000


# -- UNMAP ---------------------------------------------------------------------------------------------------


def test_unmap_reserved_not_zero(driver: Driver) -> None:
    """UNMAP request, device normative: "If the reserved field of an UNMAP request is not zero, the device
    MAY set the request status to VIRTIO_IOMMU_S_INVAL, in which case the device MAY perform the UNMAP
    operation." (We answer INVAL and do not unmap.)"""
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0, PAGE - 1, 0) == Status.OK
    assert driver.unmap(1, 0, PAGE - 1, reserved=b"\x00\x00\x01\x00") == Status.INVAL
    assert driver.mapped(1) == [(0, PAGE - 1)]


def test_unmap_unknown_domain(driver: Driver) -> None:
    """UNMAP request, device normative: "If domain does not exist, the device SHOULD set the request status
    to VIRTIO_IOMMU_S_NOENT." """
    assert driver.unmap(1, 0, PAGE - 1) == Status.NOENT


def test_unmap_on_bypass_domain(driver: Driver) -> None:
    """UNMAP request, device normative: "If the domain is a bypass domain, the device SHOULD reject the
    request and set status to VIRTIO_IOMMU_S_INVAL." """
    assert driver.attach(1, EP, ATTACH_F_BYPASS) == Status.OK
    assert driver.unmap(1, 0, PAGE - 1) == Status.INVAL


@pytest.mark.parametrize(
    ("unmap_start", "unmap_end"),
    [(0x0, 0x4FFF), (0x6000, 0x9FFF), (0x1000, 0x8FFF), (0x4000, 0x4FFF), (0x0, 0x0)],
)
def test_unmap_split_is_atomic(driver: Driver, unmap_start: int, unmap_end: int) -> None:
    """UNMAP request, device normative: "If a mapping affected by the range is not covered in its entirety
    by the range (the UNMAP request would split the mapping), then the device SHOULD set the request status
    to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping." """
    assert driver.attach(1) == Status.OK
    assert driver.map(1, 0x0, 0x2FFF, 0x10000) == Status.OK
    assert driver.map(1, 0x3000, 0x6FFF, 0x20000) == Status.OK
    assert driver.map(1, 0x7000, 0x9FFF, 0x30000) == Status.OK
    assert driver.unmap(1, unmap_start, unmap_end) == Status.RANGE
    assert driver.mapped(1) == [(0x0, 0x2FFF), (0x3000, 0x6FFF), (0x7000, 0x9FFF)]


# The spec's seven examples; each page here is one unit of the spec's byte addresses.
UNMAP_EXAMPLES = [
    ("(1) nothing mapped", [], (0, 4), Status.OK, []),
    ("(2) exact", [(0, 9)], (0, 9), Status.OK, []),
    ("(3) two adjacent", [(0, 4), (5, 9)], (0, 9), Status.OK, []),
    ("(4) would split", [(0, 9)], (0, 4), Status.RANGE, [(0, 9)]),
    ("(5) first of two", [(0, 4), (5, 9)], (0, 4), Status.OK, [(5, 9)]),
    ("(6) spills over", [(0, 4)], (0, 9), Status.OK, []),
    ("(7) with a gap", [(0, 4), (10, 14)], (0, 14), Status.OK, []),
]


@pytest.mark.parametrize(
    ("name", "maps", "unmap", "status", "left"), UNMAP_EXAMPLES, ids=[e[0] for e in UNMAP_EXAMPLES]
)
def test_unmap_examples(
    driver: Driver,
    name: str,
    maps: list[tuple[int, int]],
    unmap: tuple[int, int],
    status: Status,
    left: list[tuple[int, int]],
) -> None:
    """UNMAP request, device normative: "If part of the range or the full range is not covered by an
    existing mapping, then the device SHOULD remove all mappings affected by the range and set the request
    status to VIRTIO_IOMMU_S_OK." Checked on the spec's examples (1) to (7)."""

    def pages(first: int, last: int) -> tuple[int, int]:
        return first * PAGE, (last + 1) * PAGE - 1

    assert driver.attach(1) == Status.OK
    for first, last in maps:
        assert driver.map(1, *pages(first, last), 0x100000 + first * PAGE) == Status.OK
    assert driver.unmap(1, *pages(*unmap)) == status
    assert driver.mapped(1) == [pages(first, last) for first, last in left]


# -- PROBE ---------------------------------------------------------------------------------------------------


def test_probe_reserved_ignored(driver: Driver) -> None:
    """PROBE request, device normative: "The device MUST ignore field reserved of a PROBE request." """
    plain, status = driver.probe(EP)
    junk, junk_status = driver.probe(EP, reserved=b"\xa5" * 64)
    assert status == junk_status == Status.OK
    assert plain == junk


@pytest.mark.parametrize("endpoint", [0, 0x18, 0xF8, 0xFFFF_FFFF])
def test_probe_unknown_endpoint(driver: Driver, endpoint: int) -> None:
    """PROBE request, device normative: "If the endpoint identified by endpoint doesn't exist, then the
    device SHOULD reject the request and set status to VIRTIO_IOMMU_S_NOENT." """
    properties, status = driver.probe(endpoint)
    assert status == Status.NOENT
    assert properties == bytes(len(properties))


def test_probe_not_offered(make_harness: MakeHarness) -> None:
    """PROBE request, device normative: "If the device does not offer the VIRTIO_IOMMU_F_PROBE feature, and
    if the driver sends a VIRTIO_IOMMU_T_PROBE request, then the device SHOULD NOT write the buffer and
    SHOULD set the used length to zero." """
    harness = make_harness(range_topology(probe_size=0))
    assert not harness.device.device_features() & F_PROBE
    assert harness.submit(encode_probe(EP), 512 + TAIL_SIZE) == (b"", 0)


def test_probe_property_layout(make_harness: MakeHarness) -> None:
    """PROBE request, device normative: "The device SHOULD set field reserved of a property to zero." "The
    device MUST write the size of a property without the struct virtio_iommu_probe_property header, in bytes,
    into length." "When two properties follow each other, the device MUST put the second property exactly
    $(length + 4)$ bytes after the beginning of the first one." """
    regions = (
        ReservedRegion(ResvMemType.RESERVED, 0x1000, 0x1FFF),
        ReservedRegion(ResvMemType.MSI, MSI_START, MSI_END),
    )
    driver = Driver(make_harness(range_topology(*regions)))
    properties, status = driver.probe(EP)
    assert status == Status.OK
    first_type, first_length = PROPERTY_HEAD.unpack_from(properties, 0)
    assert first_type == 1 and first_type >> 12 == 0  # RESV_MEM, reserved bits of the type word zero
    assert first_length == RESV_MEM.size - PROPERTY_HEAD.size == 20
    second_at = first_length + PROPERTY_HEAD.size
    second_type, second_length = PROPERTY_HEAD.unpack_from(properties, second_at)
    assert (second_type, second_length) == (1, 20)
    assert decode_properties(properties) == [
        ResvMemProperty(ResvMemType.RESERVED, 0x1000, 0x1FFF),
        ResvMemProperty(ResvMemType.MSI, MSI_START, MSI_END),
    ]


def test_probe_buffer_smaller_than_probe_size(driver: Driver) -> None:
    """PROBE request, device normative: "If the properties list is smaller than probe_size, the device
    SHOULD NOT write any property. It SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL." """
    for size in (0, 24, 511):
        properties, status = driver.probe(EP, size)
        assert status == Status.INVAL
        assert properties == bytes(size)


def test_probe_zero_fills_the_rest(driver: Driver) -> None:
    """PROBE request, device normative: "If the device doesn't fill all probe_size bytes with properties,
    it SHOULD fill the remaining bytes of properties with zeroes." """
    properties, status = driver.probe(EP)
    assert status == Status.OK
    assert len(properties) == 512
    assert properties[RESV_MEM.size :] == bytes(512 - RESV_MEM.size)


# -- RESV_MEM ------------------------------------------------------------------------------------------------


def test_resv_mem_reserved_zero(driver: Driver) -> None:
    """Property RESV_MEM, device normative: "The device SHOULD set reserved to zero." """
    properties, _ = driver.probe(EP)
    assert RESV_MEM.unpack_from(properties, 0)[3] == bytes(3)


def test_at_most_one_msi_region_per_endpoint() -> None:
    """Property RESV_MEM, device normative: "The device SHOULD NOT present more than one
    VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint." A topology asking for two is refused."""
    with pytest.raises(ValueError, match="more than one MSI"):
        range_topology(
            ReservedRegion(ResvMemType.MSI, 0x1000, 0x1FFF), ReservedRegion(ResvMemType.MSI, 0x3000, 0x3FFF)
        )


def test_no_overlapping_regions_per_endpoint() -> None:
    """Property RESV_MEM, device normative: "The device SHOULD NOT present multiple RESV_MEM properties that
    overlap each other for the same endpoint." A topology asking for it is refused."""
    with pytest.raises(ValueError, match="overlap"):
        range_topology(
            ReservedRegion(ResvMemType.RESERVED, 0x1000, 0x2FFF),
            ReservedRegion(ResvMemType.MSI, 0x2000, 0x3FFF),
        )


@pytest.mark.parametrize(
    ("virt_start", "virt_end"),
    [(MSI_START, MSI_END), (MSI_START - PAGE, MSI_START + PAGE - 1), (MSI_END + 1 - PAGE, MSI_END + PAGE)],
)
def test_map_over_reserved_region_refused(driver: Driver, virt_start: int, virt_end: int) -> None:
    """Property RESV_MEM, device normative: "The device SHOULD reject a MAP request that overlaps a RESV_MEM
    region." (Status S_RANGE: the region is a hole in the range the IOMMU can map.)"""
    assert driver.attach(1) == Status.OK
    assert driver.map(1, virt_start, virt_end, 0x100000) == Status.RANGE
    assert driver.map(1, MSI_START - PAGE, MSI_START - 1, 0x100000) == Status.OK
    assert driver.map(1, MSI_END + 1, MSI_END + PAGE, 0x100000) == Status.OK


def test_reserved_region_accesses_stay_with_the_endpoint(make_harness: MakeHarness) -> None:
    """Property RESV_MEM, device normative: "The device SHOULD NOT allow accesses from the endpoint to
    RESV_MEM regions to affect any other component than the endpoint and the driver." A RESERVED region
    faults; an MSI region reaches the doorbell (identity) and nothing else."""
    regions = (
        ReservedRegion(ResvMemType.RESERVED, 0x8000, 0x8FFF),
        ReservedRegion(ResvMemType.MSI, MSI_START, MSI_END),
    )
    driver = Driver(make_harness(range_topology(*regions)))
    no_bypass(driver)
    assert driver.attach(1) == Status.OK
    fault = driver.device.translate(EP, 0x8000, 4, Access.WRITE)
    assert isinstance(fault, Fault) and fault.reason == FaultReason.MAPPING
    doorbell = driver.device.translate(EP, MSI_START + 0x4, 4, Access.WRITE)
    assert isinstance(doorbell, Translation) and doorbell.segments == ((MSI_START + 4, 4),)


# -- Fault reporting -----------------------------------------------------------------------------------------


def test_fault_report_fields(driver: Driver) -> None:
    """Fault reporting, device normative: "The device SHOULD set reserved and reserved1 to zero." "The
    device SHOULD set undefined flags to zero." "The device SHOULD write a valid endpoint ID in endpoint."
    "The device MAY omit setting VIRTIO_IOMMU_FAULT_F_ADDRESS and writing address in any fault report,
    regardless of the reason." (It never omits them.)"""
    no_bypass(driver)
    driver.device.translate(EP2, 0x5000, 4, Access.READ)  # not attached
    assert driver.attach(1) == Status.OK
    driver.device.translate(EP, 0x5000, 4, Access.WRITE)  # no mapping
    events = [decode_fault(event) for event in iter(driver.device.take_event, None)]
    assert [(e.reason, e.endpoint, e.address) for e in events] == [
        (FaultReason.DOMAIN, EP2, 0x5000),
        (FaultReason.MAPPING, EP, 0x5000),
    ]
    for event in events:
        assert event.reserved == bytes(3) and event.reserved1 == 0
        assert event.flags & ~(FAULT_F_READ | FAULT_F_WRITE | FAULT_F_ADDRESS) == 0
    # An endpoint this IOMMU does not manage has no valid endpoint ID to report.
    unknown = driver.device.translate(0x1000, 0x5000, 4, Access.READ)
    assert isinstance(unknown, Fault) and not unknown.reported
    assert driver.device.take_event() is None


def test_events_wait_for_buffers_bounded(make_harness: MakeHarness) -> None:
    """Fault reporting: "If no buffer is available, the device can either wait for one to be consumed, or
    drop the event." Events wait in a bounded queue; what does not fit is counted, not silently lost."""
    harness = make_harness()
    device = harness.device
    harness.write_config(CONFIG_BYPASS, b"\x00")
    capacity = device.events.capacity
    for page in range(capacity + 5):
        device.translate(EP, page * PAGE, 4, Access.READ)
    assert device.pending_event_count == capacity
    assert device.dropped_event_count == 5
    first = decode_fault(device.take_event() or b"")
    assert first.address == 0  # the oldest waits at the head


def test_fault_report_is_one_whole_record(harness: Harness) -> None:
    """Fault reporting, device normative: "If a buffer is too small to contain the fault report, the device
    SHOULD NOT use multiple buffers to describe it. The device MAY fall back to using an older fault report
    format that fits in the buffer." The core hands out each report as one 24-byte record (there is no older
    format); the ring glue gives a smaller eventq buffer back unused rather than split a report."""
    device = harness.device
    harness.write_config(CONFIG_BYPASS, b"\x00")
    device.translate(EP, 0x7000, 4, Access.READ)
    device.translate(EP2, 0x8000, 4, Access.WRITE)
    first, second = device.take_event(), device.take_event()
    assert first is not None and second is not None and len(first) == len(second) == 24
    assert decode_fault(first).address == 0x7000 and decode_fault(second).address == 0x8000


# -- every MAP and UNMAP rule, each broken alone -----------------------------------------------------------


def _attached(make: MakeHarness, **options: int) -> Driver:
    driver = Driver(make(**options))
    assert driver.attach(1) == Status.OK
    return driver


def _without_map_unmap(make: MakeHarness) -> Driver:
    return _attached(make, features=IommuDevice().device_features() & ~F_MAP_UNMAP)


def _with_bypass_domain(make: MakeHarness) -> Driver:
    driver = _attached(make)
    assert driver.attach(7, EP2, ATTACH_F_BYPASS) == Status.OK
    return driver


def _with_two_pages_mapped(make: MakeHarness) -> Driver:
    driver = _attached(make)
    assert driver.map(1, 0, 2 * PAGE - 1, 0) == Status.OK
    return driver


def _with_a_full_table(make: MakeHarness) -> Driver:
    driver = _attached(make, max_mappings=1)
    assert driver.map(1, 0, PAGE - 1, 0) == Status.OK
    return driver


#: For each rule of `vhost_iommu.jit.rules.RULES`: a device, and a request that breaks that rule alone.
RULE_CASES: dict[str, tuple[Callable[[MakeHarness], Driver], bytes]] = {
    "map-size": (_attached, encode_map(1, 0, PAGE - 1, 0) + b"\0"),
    "map-unnegotiated": (_without_map_unmap, encode_map(1, 0, PAGE - 1, 0)),
    "map-flags-unknown": (_attached, encode_map(1, 0, PAGE - 1, 0, RW | 8)),
    "map-domain-range": (_attached, encode_map(0, 0, PAGE - 1, 0)),
    "map-domain-missing": (_attached, encode_map(2, 0, PAGE - 1, 0)),
    "map-bypass-domain": (_with_bypass_domain, encode_map(7, 0, PAGE - 1, 0)),
    "map-end-before-start": (_attached, encode_map(1, 2 * PAGE, PAGE - 1, 0)),
    "map-granule": (_attached, encode_map(1, 0, PAGE - 2, 0)),
    "map-input-range": (_attached, encode_map(1, 1 << 48, (1 << 48) + PAGE - 1, 0)),
    "map-phys-wraps": (_attached, encode_map(1, 0, 2 * PAGE - 1, (1 << 64) - PAGE)),
    "map-reserved-region": (_attached, encode_map(1, MSI_START, MSI_START + PAGE - 1, 0)),
    "map-overlap": (_with_two_pages_mapped, encode_map(1, PAGE, 2 * PAGE - 1, PAGE)),
    "map-table-full": (_with_a_full_table, encode_map(1, PAGE, 2 * PAGE - 1, 0)),
    "unmap-size": (_with_two_pages_mapped, encode_unmap(1, 0, 2 * PAGE - 1)[:-1]),
    "unmap-unnegotiated": (_without_map_unmap, encode_unmap(1, 0, PAGE - 1)),
    "unmap-reserved": (_with_two_pages_mapped, encode_unmap(1, 0, 2 * PAGE - 1, reserved=b"\x01\0\0\0")),
    "unmap-domain-range": (_attached, encode_unmap(0, 0, PAGE - 1)),
    "unmap-domain-missing": (_attached, encode_unmap(2, 0, PAGE - 1)),
    "unmap-bypass-domain": (_with_bypass_domain, encode_unmap(7, 0, PAGE - 1)),
    "unmap-end-before-start": (_with_two_pages_mapped, encode_unmap(1, 2 * PAGE, PAGE - 1)),
    "unmap-split": (_with_two_pages_mapped, encode_unmap(1, 0, PAGE - 1)),
}


def test_every_rule_has_a_case() -> None:
    assert RULE_CASES.keys() == RULES.keys()


@pytest.mark.parametrize("name", list(RULES))
def test_each_rule_broken_alone_gives_its_status_and_changes_nothing(
    make_harness: MakeHarness, name: str
) -> None:
    """The rules of `vhost_iommu.jit.rules.RULES` (the spec's words are there), one request each that breaks
    that rule and no other: the device core's Python path and the compiled path answer the table's status,
    and the refused request leaves the mappings as they were."""
    make_device, request = RULE_CASES[name]
    driver = make_device(make_harness)
    before = {domain.domain: driver.mapped(domain.domain) for domain in driver.device.domains()}
    assert driver.status(request) == RULES[name].status
    assert {domain.domain: driver.mapped(domain.domain) for domain in driver.device.domains()} == before

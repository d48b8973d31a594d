"""The Linux driver's habits since 6.12, replayed request by request against a served device (real sockets,
memfd RAM, split rings, eventfds) on every serving path: the requestq served in Python, by the compiled
kernel from the event loop, and by the kick thread.

Each test names the kernel version and the functions whose requests it replays, in the order they send
them, as read from drivers/iommu/virtio-iommu.c and drivers/iommu/iommu.c at the version that brought the
habit:

- 6.16 (the driver moved to ``domain_alloc_paging``/``domain_alloc_identity``): with
  VIRTIO_IOMMU_F_BYPASS_CONFIG offered, ``viommu_probe`` reserves ``domain_range.start`` for the one identity
  domain (``identity_domain_id = first_domain; first_domain++``), ``viommu_attach_identity_domain`` attaches
  every bypassed endpoint to it with ATTACH_F_BYPASS, and ``viommu_domain_alloc_paging`` takes paging domain
  IDs from ``start + 1`` on.
- the same change: ``viommu_identity_domain`` is a static domain whose ``id`` is never set, so
  ``viommu_release_device`` -> ``viommu_detach_dev`` sends DETACH with domain 0 when a bypassed endpoint goes
  away (hot-unplug); still so in 7.0.
- 7.0 (``pci_dev_reset_iommu_prepare``/``pci_dev_reset_iommu_done``, commit c279e83953d9; as posted they
  act on endpoints with ATS): around a PCI reset the core attaches the endpoint to its group's blocking
  domain, which for a driver without a blocked domain (virtio-iommu) is an empty paging domain, then
  attaches it back; ``viommu_attach_dev`` replays the domain's mappings, one synchronous MAP each, when the
  endpoint is the first attached to it again. (VFIO taking a group attaches the same blocking domain.)
- front-ends may write a kick eventfd with nothing new on the ring (spurious kicks).

The spec (virtio 1.3, device-types/iommu/description.tex) decides every answer; `vhost_iommu.device.domains`
quotes it where it decides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from vhost_iommu.abi import EVENT_QUEUE, REQUEST_QUEUE, VIRTIO_CONFIG_S_NEEDS_RESET
from vhost_iommu.conformance import ConformanceChecker
from vhost_iommu.device import Access, Fault, FaultReason, IommuDevice, Status, Topology, Translation
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_SIZE,
    FAULT_F_ADDRESS,
    FAULT_F_READ,
    MAP_F_READ,
    MAP_F_WRITE,
    TAIL_SIZE,
    decode_config,
    decode_fault,
    decode_status,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
)
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.virtio_iommu import VirtioIommuBackend

PAGE = 0x1000
RW = MAP_F_READ | MAP_F_WRITE
EP, EP2, EP3, EP4 = 0x20, 0x21, 0x22, 0x23  # 0000:00:04.0-0000:00:04.3 in the default topology
WAIT = 30.0  # the machine is shared

#: The ways the requestq is served. ATTACH, DETACH and PROBE always go through the device core; MAP and
#: UNMAP go through the compiled kernel on the last two.
SERVING_PATHS: dict[str, dict[str, Any]] = {
    "python": {"request_path": "python"},
    "event-loop": {"request_path": "compiled", "kick_thread": False},
    "kick-thread": {"request_path": "compiled", "kick_thread": True},
}

Mapping = tuple[int, int, int, int]  # virt_start, virt_end, phys_start, flags
T = TypeVar("T")

pytestmark = pytest.mark.usefixtures("fd_leak_check")


class Guest:
    """A served device and the guest's driver side of it: requests as the Linux driver sends them, and the
    device's state read back through its own inspection API, on its event loop with the kick thread
    parked."""

    def __init__(self, server: RunningServer, driver: IommuDriver) -> None:
        self.server = server
        self.driver = driver
        [backend] = server.backends
        assert isinstance(backend, VirtioIommuBackend)
        self.backend = backend
        # viommu_probe reads these: domain_range.start becomes the identity domain, probe_size the PROBE size.
        config = decode_config(driver.frontend.get_config(0, CONFIG_SIZE))
        self.identity = config.domain_start
        self.probe_size = config.probe_size

    # -- requests ------------------------------------------------------------------------------------------

    def send(self, request: bytes) -> Status:
        """viommu_send_req_sync: one request, kicked and waited for."""
        return self.driver.status(request)

    def batch(self, requests: Sequence[bytes]) -> list[Status]:
        """viommu_add_req for each, then one viommu_sync_req (iotlb_sync_map): one kick for all."""
        return self.driver.statuses(requests)

    def probe(self, endpoint: int) -> Status:
        """viommu_probe_endpoint: PROBE with probe_size bytes of properties before the tail."""
        written = self.driver.send(encode_probe(endpoint), self.probe_size + TAIL_SIZE)
        return Status(decode_status(written))

    def maps(self, domain: int, mappings: Sequence[Mapping]) -> list[bytes]:
        return [encode_map(domain, start, end, phys, flags) for start, end, phys, flags in mappings]

    # -- the device's state --------------------------------------------------------------------------------

    def on_device(self, read: Callable[[IommuDevice], T]) -> T:
        def parked() -> T:
            with self.backend.quiesced():
                return read(self.backend.device)

        return self.server.call(parked)

    def domains(self) -> dict[int, tuple[bool, tuple[int, ...], int]]:
        """Every existing domain: (bypass, endpoints, mapping count)."""
        return self.on_device(
            lambda device: {
                info.domain: (info.bypass, info.endpoints, info.mapping_count) for info in device.domains()
            }
        )

    def mappings(self, domain: int) -> list[Mapping]:
        return self.on_device(lambda device: device.mappings(domain))

    def translate(self, endpoint: int, iova: int) -> Translation | Fault:
        return self.on_device(lambda device: device.translate(endpoint, iova, 4, Access.READ, report=False))

    def settle(self) -> None:
        """Return once the device has read every kick written before: the kick thread settles with no kick
        pending; the event loop wakes for the first call with any earlier kick fd readable too (epoll is
        level-triggered) and runs its handler in that iteration, the second call after what it scheduled."""
        thread = self.server.call(lambda: self.backend._kick_thread)
        if thread is not None:
            assert thread.settle(WAIT)
        for _ in range(2):
            self.server.call(lambda: None)

    def kick_pending(self, queue: int) -> bool:
        readable, _, _ = select.select([self.driver.frontend.kick_fds[queue]], [], [], 0)
        return bool(readable)


@pytest.fixture(params=list(SERVING_PATHS))
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[[Topology], Guest]]:
    """``serve(topology)``: a device on ``topology`` served the parametrised way, and its guest driver."""
    options = SERVING_PATHS[request.param]
    with contextlib.ExitStack() as stack:

        def start(topology: Topology) -> Guest:
            server = stack.enter_context(
                running_server(lambda: VirtioIommuBackend(device=IommuDevice(topology), **options))
            )
            frontend = stack.enter_context(server.connect())
            driver = stack.enter_context(
                IommuDriver(frontend, ram_size=1 << 21, event_idx=True, timeout=WAIT)
            )
            return Guest(server, driver)

        yield start


def default_with(**changes: Any) -> Topology:
    return dataclasses.replace(Topology.default(), **changes)


def two_pages(base: int, phys: int) -> list[Mapping]:
    return [(base, base + PAGE - 1, phys, RW), (base + PAGE, base + 2 * PAGE - 1, phys + PAGE, MAP_F_READ)]


# -- 6.16: one identity domain at domain_range.start ---------------------------------------------------------


def test_bypassed_endpoints_share_one_identity_domain_at_the_range_start(
    serve: Callable[[Topology], Guest],
) -> None:
    """Linux 6.16, viommu_probe + viommu_domain_alloc_identity + viommu_attach_identity_domain: every bypassed
    endpoint is attached to the one domain ``domain_range.start`` with ATTACH_F_BYPASS; paging domains
    (viommu_domain_alloc_paging) come from ``start + 1`` on.

    Spec, ATTACH: "Multiple endpoints can be attached to the same domain", "If another endpoint is already
    attached to the domain identified by domain, then the device MAY attach the endpoint", "the driver can
    set the VIRTIO_IOMMU_ATTACH_F_BYPASS flag to create a bypass domain. Endpoints attached to this domain
    are in bypass mode", and "A device that does not reject the request MUST attach the endpoint". Unattached
    endpoints are not in bypass mode here (bypass 0), so identity translation comes from the domain."""
    guest = serve(default_with(boot_bypass=False))
    identity, paging = guest.identity, guest.identity + 1

    # Boot with identity default domains: per endpoint, viommu_probe_device (PROBE) then the core attaches
    # the identity domain (viommu_attach_identity_domain: ATTACH identity_domain_id, F_BYPASS).
    for endpoint in (EP, EP2, EP3):
        assert guest.probe(endpoint) == Status.OK
        assert guest.send(encode_attach(identity, endpoint, ATTACH_F_BYPASS)) == Status.OK
    assert guest.domains() == {identity: (True, (EP, EP2, EP3), 0)}
    for endpoint in (EP, EP2, EP3):
        result = guest.translate(endpoint, 0x1234_5000)
        assert isinstance(result, Translation) and result.bypass and result.phys == 0x1234_5000

    # A DMA domain for EP4: viommu_domain_alloc_paging takes start + 1; viommu_attach_dev sends ATTACH and
    # replays nothing (PROBE reported an MSI region, so no software MSI mapping); viommu_map_pages queues MAPs
    # that iotlb_sync_map flushes with one kick.
    dma = two_pages(0x10_0000, 0x8_0000)
    assert guest.probe(EP4) == Status.OK
    assert guest.send(encode_attach(paging, EP4)) == Status.OK
    assert guest.batch(guest.maps(paging, dma)) == [Status.OK, Status.OK]
    assert guest.domains() == {identity: (True, (EP, EP2, EP3), 0), paging: (False, (EP4,), 2)}
    assert guest.mappings(paging) == dma

    # The bypassed endpoints move to EP4's domain one by one (viommu_attach_dev: ATTACH, no replay as the
    # domain has an endpoint); the identity domain ceases with its last endpoint...
    for endpoint in (EP, EP2, EP3):
        assert guest.send(encode_attach(paging, endpoint)) == Status.OK
    assert guest.domains() == {paging: (False, (EP, EP2, EP3, EP4), 2)}
    # ...and the next viommu_attach_identity_domain creates it again, a bypass domain as before.
    assert guest.send(encode_attach(identity, EP2, ATTACH_F_BYPASS)) == Status.OK
    assert guest.domains() == {identity: (True, (EP2,), 0), paging: (False, (EP, EP3, EP4), 2)}
    result = guest.translate(EP2, 0x10_0000)
    assert isinstance(result, Translation) and result.bypass and result.phys == 0x10_0000


# -- 7.0: the PCI-reset path ---------------------------------------------------------------------------------


def test_pci_reset_attaches_an_empty_domain_then_the_old_one_with_its_mappings_replayed(
    serve: Callable[[Topology], Guest],
) -> None:
    """Linux 7.0, pci_dev_reset_iommu_prepare -> __iommu_attach_device(group->blocking_domain) ->
    viommu_attach_dev, then pci_dev_reset_iommu_done -> __iommu_attach_device(group->domain) ->
    viommu_attach_dev + viommu_replay_mappings. The blocking domain is an empty paging domain allocated once
    per group, so a second reset uses the same ID.

    Spec, ATTACH: "If the endpoint identified by endpoint is already attached to another domain, then the
    device SHOULD first detach it from that domain and attach it to the one identified by domain. In that
    case the device SHOULD behave as if the driver issued a DETACH request with this endpoint, followed by
    the ATTACH request." DETACH: "After all endpoints have been successfully detached from a domain, it
    ceases to exist and its ID can be reused by the driver for another domain." So each move leaves nothing
    of the domain left behind, and the replayed MAPs land in a new, empty domain: none overlaps, none is
    refused."""
    guest = serve(Topology.default())
    domain, blocking = guest.identity + 1, guest.identity + 2
    expected = two_pages(0x10_0000, 0x8_0000)

    assert guest.probe(EP) == Status.OK
    assert guest.send(encode_attach(domain, EP)) == Status.OK
    assert guest.batch(guest.maps(domain, expected)) == [Status.OK, Status.OK]

    for reset in range(2):
        # prepare: ATTACH to the blocking domain; the driver replays its empty tree: no MAP.
        assert guest.send(encode_attach(blocking, EP)) == Status.OK
        assert guest.domains() == {blocking: (False, (EP,), 0)}  # the old domain went with its mappings
        fault = guest.translate(EP, 0x10_0000)
        assert isinstance(fault, Fault) and fault.reason == FaultReason.MAPPING
        if reset == 0:
            # viommu_map_pages while the domain has no endpoint only records the mapping (no MAP sent);
            # the replay brings it along.
            expected.append((0x20_0000, 0x20_0000 + PAGE - 1, 0x9_0000, RW))
        # done: ATTACH back; the domain had no endpoint, so viommu_replay_mappings sends each mapping of
        # its tree, in address order, one synchronous MAP at a time (it stops at the first failure).
        assert guest.send(encode_attach(domain, EP)) == Status.OK
        assert guest.domains() == {domain: (False, (EP,), 0)}  # a new, empty domain; the blocking one gone
        for request in guest.maps(domain, expected):
            assert guest.send(request) == Status.OK
        assert guest.domains() == {domain: (False, (EP,), len(expected))}
        assert guest.mappings(domain) == expected
        result = guest.translate(EP, 0x10_0010)
        assert isinstance(result, Translation) and result.phys == 0x8_0010


def test_pci_reset_of_one_endpoint_of_a_shared_domain_keeps_the_domain(
    serve: Callable[[Topology], Guest],
) -> None:
    """Linux 7.0, the same path for an endpoint whose domain has another endpoint (two groups in one VFIO
    container): viommu_attach_dev decrements the old domain's count, sends ATTACH, and replays nothing on
    the way back because the domain kept an endpoint.

    Spec, DETACH: "When this request completes, the endpoint cannot access any mapping from that domain
    anymore"; the domain keeps its other endpoint and so exists, mappings and all ("After all endpoints have
    been successfully detached from a domain, it ceases to exist")."""
    guest = serve(Topology.default())
    domain, blocking = guest.identity + 1, guest.identity + 2
    mappings = two_pages(0x10_0000, 0x8_0000)
    for endpoint in (EP, EP2):
        assert guest.probe(endpoint) == Status.OK
        assert guest.send(encode_attach(domain, endpoint)) == Status.OK
    assert guest.batch(guest.maps(domain, mappings)) == [Status.OK, Status.OK]

    assert guest.send(encode_attach(blocking, EP)) == Status.OK
    assert guest.domains() == {domain: (False, (EP2,), 2), blocking: (False, (EP,), 0)}
    fault = guest.translate(EP, 0x10_0000)
    assert isinstance(fault, Fault) and fault.reason == FaultReason.MAPPING
    assert guest.send(encode_attach(domain, EP)) == Status.OK
    assert guest.domains() == {domain: (False, (EP, EP2), 2)}
    assert guest.mappings(domain) == mappings


def test_pci_reset_of_a_bypassed_endpoint_returns_it_to_the_identity_domain(
    serve: Callable[[Topology], Guest],
) -> None:
    """Linux 7.0 on a 6.16 identity domain: prepare attaches the empty blocking domain (``start + 1``, the
    first paging ID) through viommu_attach_dev; done attaches the identity domain again through
    viommu_attach_identity_domain (ATTACH identity_domain_id with F_BYPASS, no replay: it has no mappings).

    Spec: the identity domain loses its only endpoint and "ceases to exist"; the ATTACH with the flag
    creates it again ("If the domain doesn't exist in the device, it is created")."""
    guest = serve(default_with(boot_bypass=False))
    identity, blocking = guest.identity, guest.identity + 1
    assert guest.probe(EP) == Status.OK
    assert guest.send(encode_attach(identity, EP, ATTACH_F_BYPASS)) == Status.OK

    assert guest.send(encode_attach(blocking, EP)) == Status.OK
    assert guest.domains() == {blocking: (False, (EP,), 0)}
    assert isinstance(guest.translate(EP, 0x10_0000), Fault)
    assert guest.send(encode_attach(identity, EP, ATTACH_F_BYPASS)) == Status.OK
    assert guest.domains() == {identity: (True, (EP,), 0)}
    result = guest.translate(EP, 0x10_0000)
    assert isinstance(result, Translation) and result.bypass


# -- 6.16 and later: DETACH of domain 0 on hot-unplug --------------------------------------------------------


def test_hot_unplug_of_a_bypassed_endpoint_detaches_domain_0_outside_the_range(
    serve: Callable[[Topology], Guest],
) -> None:
    """Linux 6.16 to 7.0, viommu_release_device -> viommu_detach_dev for an endpoint in the static identity
    domain: DETACH with ``viommu_identity_domain.id``, which is never set: domain 0, while the endpoint is in
    domain ``domain_range.start`` (1 here).

    Spec, device operations: "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is negotiated, the driver MUST NOT
    send requests with domain less than domain_range.start", and status VIRTIO_IOMMU_S_RANGE is
    "Out-of-range parameters". The device answers RANGE and changes nothing (the driver warns, WARN_ON, and
    forgets the endpoint); it keeps serving: the endpoint plugged again is probed and attached as before,
    and the hot-unplug of an endpoint in a paging domain (DETACH with its real ID) removes the domain."""
    guest = serve(Topology.default())
    identity, paging = guest.identity, guest.identity + 1
    assert identity != 0
    for endpoint in (EP, EP2):
        assert guest.probe(endpoint) == Status.OK
        assert guest.send(encode_attach(identity, endpoint, ATTACH_F_BYPASS)) == Status.OK
    assert guest.probe(EP3) == Status.OK
    assert guest.send(encode_attach(paging, EP3)) == Status.OK
    assert guest.batch(guest.maps(paging, two_pages(0x10_0000, 0x8_0000))) == [Status.OK, Status.OK]

    assert guest.send(encode_detach(0, EP)) == Status.RANGE
    assert guest.domains() == {identity: (True, (EP, EP2), 0), paging: (False, (EP3,), 2)}

    # Plugged again: viommu_probe_device, then viommu_attach_identity_domain.
    assert guest.probe(EP) == Status.OK
    assert guest.send(encode_attach(identity, EP, ATTACH_F_BYPASS)) == Status.OK
    # The endpoint of the paging domain goes: viommu_detach_dev with that domain's ID.
    assert guest.send(encode_detach(paging, EP3)) == Status.OK
    assert guest.domains() == {identity: (True, (EP, EP2), 0)}
    assert guest.mappings(paging) == []


def test_hot_unplug_detaches_domain_0_when_the_range_starts_at_0(serve: Callable[[Topology], Guest]) -> None:
    """Linux 6.16 to 7.0, viommu_detach_dev as above, with ``domain_range.start`` 0: domain 0 is the identity
    domain, so the DETACH names the endpoint's own domain and succeeds; paging domains start at 1.

    Spec, DETACH: "Detach an endpoint from a domain" and "After all endpoints have been successfully detached
    from a domain, it ceases to exist and its ID can be reused by the driver for another domain." """
    guest = serve(default_with(domain_start=0, boot_bypass=False))
    assert guest.identity == 0
    for endpoint in (EP, EP2):
        assert guest.probe(endpoint) == Status.OK
        assert guest.send(encode_attach(0, endpoint, ATTACH_F_BYPASS)) == Status.OK
    assert guest.probe(EP3) == Status.OK
    assert guest.send(encode_attach(1, EP3)) == Status.OK

    assert guest.send(encode_detach(0, EP)) == Status.OK
    assert guest.domains() == {0: (True, (EP2,), 0), 1: (False, (EP3,), 0)}
    fault = guest.translate(EP, 0x10_0000)  # detached, and unattached endpoints are not in bypass mode
    assert isinstance(fault, Fault) and fault.reason == FaultReason.DOMAIN
    assert guest.send(encode_detach(0, EP2)) == Status.OK
    assert guest.domains() == {1: (False, (EP3,), 0)}


# -- spurious kicks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", [REQUEST_QUEUE, EVENT_QUEUE], ids=["requestq", "eventq"])
def test_a_spurious_kick_is_a_no_op(serve: Callable[[Topology], Guest], queue: int) -> None:
    """A kick eventfd written with no new available entry (a front-end may write it at any time): the device
    reads it, uses nothing, reports no error, and goes on serving both queues.

    A notification only tells the device to look at the ring (virtio 1.3, Driver Notifications); with no new
    available entry there is nothing to use. The eventq has a buffer posted but no event pending: still
    nothing to use."""
    guest = serve(Topology.default())
    driver = guest.driver
    domain = guest.identity + 1
    assert guest.send(encode_attach(domain, EP)) == Status.OK
    [event_head] = driver.post_event_buffers(1)
    guest.settle()
    used = (driver.requests.used_idx, driver.events.used_idx)

    for _ in range(3):
        driver.frontend.kick(queue)
        guest.settle()
        assert not guest.kick_pending(queue)  # the device read the kick
        assert (driver.requests.used_idx, driver.events.used_idx) == used
        assert not driver.frontend.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET

    # Still serving: a MAP is answered, a fault event fills the posted buffer.
    assert guest.send(encode_map(domain, 0x10_0000, 0x10_0000 + PAGE - 1, 0x8_0000, RW)) == Status.OK
    assert guest.on_device(
        lambda device: device.report_fault(FaultReason.MAPPING, FAULT_F_READ | FAULT_F_ADDRESS, EP, 0x20_0000)
    )
    guest.server.call(guest.backend.deliver_events)
    [(head, length, data)] = driver.events.used_with_data()
    event = decode_fault(data[:length])
    assert head == event_head
    assert (event.reason, event.endpoint, event.address) == (FaultReason.MAPPING, EP, 0x20_0000)
    assert driver.requests.used_idx == used[0] + 1


def test_the_conformance_checker_flags_only_the_detach_of_domain_0() -> None:
    """``serve --conformance`` on a Linux 7.0 guest: the sequences above break no driver-normative statement
    but one, viommu_detach_dev's DETACH of domain 0 below ``domain_range.start`` ("the driver MUST NOT send
    requests with domain less than domain_range.start"), which the checker counts as domain-range."""
    device = IommuDevice(default_with(boot_bypass=False))
    checker = ConformanceChecker(device)
    features = device.device_features()
    device.set_features(features)
    checker.check_features(features)

    def send(request: bytes, writable: int = TAIL_SIZE) -> Status:
        checker.check_request(request, writable)
        response, _used = device.handle_request(request, writable)
        return Status(decode_status(response))

    identity, paging, blocking = (device.topology.domain_start + n for n in range(3))
    mapping = encode_map(paging, 0x10_0000, 0x10_0000 + PAGE - 1, 0x8_0000, RW)
    for endpoint in (EP, EP2, EP3):
        assert send(encode_probe(endpoint), device.topology.probe_size + TAIL_SIZE) == Status.OK
    for endpoint in (EP, EP2):
        assert send(encode_attach(identity, endpoint, ATTACH_F_BYPASS)) == Status.OK
    assert send(encode_attach(paging, EP3)) == Status.OK
    assert send(mapping) == Status.OK
    # PCI resets: of the endpoint of the paging domain (its mapping replayed), then of a bypassed one.
    for domain, endpoint, flags, replay in ((paging, EP3, 0, [mapping]), (identity, EP, ATTACH_F_BYPASS, [])):
        assert send(encode_attach(blocking, endpoint)) == Status.OK
        assert send(encode_attach(domain, endpoint, flags)) == Status.OK
        assert [send(request) for request in replay] == [Status.OK] * len(replay)
    assert checker.counts == {}
    assert send(encode_detach(0, EP)) == Status.RANGE
    assert checker.counts == {"domain-range": 1}

"""Fuzz target ``requests``: request bytes and writable sizes into :meth:`IommuDevice.handle_request`.

One execution takes a device in its power-on state (the default topology, or one without PROBE and with a
small domain range; a small mapping table so that NOMEM is reachable), acks a feature set (usually
everything offered), sends a prefix of valid requests (ATTACH, MAP, UNMAP, DETACH, PROBE with plausible
fields, so that domains, mappings and bypass state exist) and then hostile ones: every request type with
field values at the edges of the ranges, truncated or extended layouts, unknown types, noise, and writable
sizes around the tail and the probe size, as bytes or as a memoryview.

Checked, for every request: no exception; the used length is 0 or the writable size; with a used length of
0 nothing is written; otherwise the response fills the writable part exactly, its tail holds a defined
status with zero reserved bytes, and anything but PROBE had a 4-byte writable part. At the end: every
domain's mapping count is the number of its mappings, and every mapping is granule-aligned, inside the
input range and of a domain that exists.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from vhost_iommu.device import IommuDevice, Status, Topology
from vhost_iommu.device.layout import (
    HEAD,
    REQUEST_LAYOUT,
    TAIL,
    TAIL_SIZE,
    RequestType,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
    writable_size,
)
from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Hang, Script, struct_fields

__all__ = ["RequestsTarget"]

_STATUSES = frozenset(int(status) for status in Status)
#: The fields of each request after its head: what the hostile requests bend, field by field.
_BODY_FIELDS = {
    kind: [field for field in struct_fields(layout) if field[0] >= HEAD.size]
    for kind, layout in REQUEST_LAYOUT.items()
}
_REQUEST_TYPES = tuple(REQUEST_LAYOUT)
_SMALL_TOPOLOGY = """
granule = 4096
input_range = { start = 0x10000, end = 0xffffffff }
domain_range = { start = 10, end = 17 }
probe_size = 0
boot_bypass = 0
[iommu]
bdf = "00:03.0"
[[endpoints]]
bdf_start = "00:04.0"
bdf_end = "00:05.0"
endpoint_start = 0x20
[[reserved]]
endpoint = 0x20
type = "reserved"
start = 0x80000000
end = 0x8fffffff
"""


class RequestsTarget(FuzzTarget):
    name = "requests"
    description = "random request bytes and writable sizes into IommuDevice.handle_request after valid ones"
    max_input = 2048

    def setup(self) -> None:
        self.topologies = (Topology.default(), Topology.loads(_SMALL_TOPOLOGY))
        self.devices: dict[tuple[Topology, int, int | None], IommuDevice] = {}
        # Compile (or load from numba's cache) whatever the request path compiles, before the time bound.
        for topology in self.topologies:
            scratch = IommuDevice(topology, max_mappings=8)
            scratch.set_features(scratch.device_features())
            domain, endpoint = topology.domain_start, topology.endpoint_ids()[0]
            last = topology.input_start + scratch.granule - 1
            for request in (
                encode_attach(domain, endpoint),
                encode_map(domain, topology.input_start, last, 0),
                encode_unmap(domain, topology.input_start, last),
                encode_probe(endpoint),
                encode_detach(domain, endpoint),
            ):
                scratch.handle_request(request, writable_size(request[0], topology.probe_size))

    def _device(self, topology: Topology, max_mappings: int, max_domains: int | None) -> IommuDevice:
        """A device in its power-on state. Building one for the default topology costs more than an
        execution, so devices are kept and put back to that state with a system reset, which must leave
        nothing behind (checked: a reset is part of what is fuzzed)."""
        key = (topology, max_mappings, max_domains)
        device = self.devices.get(key)
        if device is None:
            device = self.devices[key] = IommuDevice(
                topology, max_mappings=max_mappings, max_domains=max_domains
            )
            return device
        device.system_reset()
        device.clear_injections()
        leftovers = [info for info in device.domains()] + [event for event in device.pending_events()]
        if leftovers or device.acked_features or device.bypass != bool(topology.boot_bypass):
            raise FuzzFailure(f"after system_reset: {leftovers}, features {device.acked_features:#x}")
        if any(device.domain_of(endpoint) is not None for endpoint in topology.endpoint_ids()[:8]):
            raise FuzzFailure("an endpoint is still attached after system_reset")
        return device

    # -- building requests ----------------------------------------------------------------------------------

    def _domain(self, choices: Choices, device: IommuDevice) -> int:
        topology = device.topology
        if choices.chance(224):
            return choices.between(topology.domain_start, min(topology.domain_start + 7, topology.domain_end))
        return choices.near([topology.domain_start, topology.domain_end, 0, 0xFFFFFFFF], spread=2, bits=32)

    def _endpoint(self, choices: Choices, device: IommuDevice) -> int:
        endpoints = device.topology.endpoint_ids()
        if choices.chance(224):
            return choices.pick(endpoints[:8])
        return choices.near([endpoints[0], endpoints[-1], 0, 0xFFFFFFFF], spread=2, bits=32)

    def _range(self, choices: Choices, device: IommuDevice) -> tuple[int, int]:
        topology = device.topology
        granule = device.granule
        if choices.chance(200):
            start = topology.input_start + granule * choices.below(64)
            return start, start + granule * choices.between(1, 8) - 1
        anchors = [topology.input_start, topology.input_end, topology.input_end + 1, 0, (1 << 64) - 1]
        for region in topology.reserved_regions(topology.endpoint_ids()[0]):
            anchors += [region.start, region.end]
        start = choices.near(anchors, spread=granule)
        end = choices.near([*anchors, start + granule - 1], spread=granule)
        return start, end

    def _valid(self, choices: Choices, device: IommuDevice) -> tuple[bytes, int]:
        kind = choices.pick(_REQUEST_TYPES)
        if kind == RequestType.ATTACH:
            request = encode_attach(self._domain(choices, device), self._endpoint(choices, device))
        elif kind == RequestType.MAP:
            start, end = self._range(choices, device)
            phys = device.granule * choices.below(1 << 20)
            request = encode_map(self._domain(choices, device), start, end, phys, choices.between(0, 3))
        elif kind == RequestType.UNMAP:
            start, end = self._range(choices, device)
            request = encode_unmap(self._domain(choices, device), start, end)
        elif kind == RequestType.DETACH:
            request = encode_detach(self._domain(choices, device), self._endpoint(choices, device))
        elif kind == RequestType.PROBE:
            request = encode_probe(self._endpoint(choices, device))
        else:
            raise AssertionError(f"no valid {RequestType(kind).name} request: the device has a new type")
        return request, writable_size(kind, device.topology.probe_size)

    def _hostile(self, choices: Choices, device: IommuDevice) -> tuple[bytes, int]:
        shape = choices.below(8)
        if shape < 4:
            request_type = choices.pick(_REQUEST_TYPES)
            layout = REQUEST_LAYOUT[request_type]
            head_reserved = bytes(HEAD.size - 1)
            fields: list[int | bytes] = [
                int(request_type),
                head_reserved if choices.chance(200) else choices.take(len(head_reserved)),
            ]
            for _offset, width, code in _BODY_FIELDS[request_type]:
                if code == "I":
                    fields.append(
                        choices.pick(
                            (self._domain(choices, device), self._endpoint(choices, device), choices.bits(32))
                        )
                    )
                elif code == "Q":
                    fields.append(
                        self._range(choices, device)[choices.below(2)]
                        if choices.chance(200)
                        else choices.u64()
                    )
                else:
                    fields.append(bytes(width) if choices.chance(200) else choices.take(width))
            data = layout.pack(*fields)
            if choices.chance(48):  # truncated or extended
                data = (
                    data[: choices.below(len(data))]
                    if choices.chance(128)
                    else data + choices.take(choices.between(1, 16))
                )
        elif shape < 6:
            data = HEAD.pack(choices.bits(8), bytes(HEAD.size - 1)) + choices.take(choices.below(96))
        else:
            data = choices.take(choices.below(96))
        tail, probe = TAIL_SIZE, writable_size(RequestType.PROBE, device.topology.probe_size)
        writable = choices.pick(
            (0, 1, tail - 1, tail, tail, tail, tail + 1, 2 * tail, probe - 1, probe, probe, probe + 1)
        )
        if choices.chance(8):
            writable = choices.bits(20)
        return data, writable

    def seeds(self) -> list[bytes]:
        """Each request type once, valid, after an ATTACH of the first domain and endpoint of the default
        topology (its other fields and what follows are the input's own)."""
        topology = Topology.default()
        first_domain = topology.domain_start
        last_domain = min(topology.domain_start + 7, topology.domain_end)
        endpoints = topology.endpoint_ids()[:8]
        seeds = [b""]
        for kind in _REQUEST_TYPES:
            script = Script().chance(200, True).pick((8, 64, 4096), 4096).chance(200, True)
            script.chance(200, True).below(24, 1)  # every feature acked; one valid request: ATTACH
            script.pick(_REQUEST_TYPES, RequestType.ATTACH).chance(224, True)
            script.between(first_domain, last_domain, first_domain).chance(224, True)
            script.pick(endpoints, endpoints[0]).chance(64, False)
            script.between(1, 12, 1).chance(32, True).pick(_REQUEST_TYPES, kind)  # then one of ``kind``
            seeds.append(script.data)
        return seeds

    # -- running them ---------------------------------------------------------------------------------------

    def run(self, choices: Choices) -> Iterable[Hashable]:
        topology = self.topologies[0 if choices.chance(200) else 1]
        key = (topology, choices.pick((8, 64, 4096)), None if choices.chance(200) else choices.between(1, 4))
        device = self._device(*key)
        counted_before = sum(device.request_counts)
        offered = device.device_features()
        acked = (
            offered
            if choices.chance(200)
            else (choices.u64() & offered if choices.chance(200) else choices.u64())
        )
        device.set_features(acked)
        features: list[Hashable] = []
        calls = 0
        for phase, count in (("valid", choices.below(24)), ("hostile", choices.between(1, 12))):
            for _ in range(count):
                if phase == "valid" or choices.chance(32):
                    request, writable = self._valid(choices, device)
                else:
                    request, writable = self._hostile(choices, device)
                if choices.chance(64):
                    status = self._serve(device, memoryview(request), writable)
                else:
                    status = self._serve(device, request, writable)
                calls += 1
                features.append((phase, request[0] if request else -1, status, writable == TAIL_SIZE))
        served = sum(device.request_counts) - counted_before
        if served != calls:
            raise FuzzFailure(f"{calls} requests, the device counted {served}")
        self._check_state(device)
        return features

    @staticmethod
    def _serve(device: IommuDevice, request: bytes | memoryview, writable: int) -> int:
        """One request; its status (-1 when the buffers come back unwritten)."""
        try:
            response, used = device.handle_request(request, writable)
        except Hang:
            raise
        except Exception as exc:
            raise FuzzFailure(
                f"handle_request({bytes(request).hex()}, {writable}) raised {type(exc).__name__}: {exc}"
            ) from exc
        if used not in (0, writable):
            raise FuzzFailure(f"used length {used} for writable size {writable}")
        if used == 0:
            if response:
                raise FuzzFailure(f"used length 0 but {len(response)} bytes to write")
            return -1
        if len(response) != used:
            raise FuzzFailure(f"{len(response)} response bytes for a used length of {used}")
        status: int
        status, reserved = TAIL.unpack(bytes(response[-TAIL_SIZE:]))
        if status not in _STATUSES or any(reserved):
            raise FuzzFailure(
                f"tail {bytes(response[-TAIL_SIZE:]).hex()} is not a status with zero reserved bytes"
            )
        if request[0] != RequestType.PROBE and writable != writable_size(request[0]):
            raise FuzzFailure(f"request type {request[0]} answered in a {writable}-byte writable part")
        return status

    @staticmethod
    def _check_state(device: IommuDevice) -> None:
        topology, granule = device.topology, device.granule
        for info in device.domains():
            mappings = device.mappings(info.domain)
            if len(mappings) != info.mapping_count:
                raise FuzzFailure(
                    f"domain {info.domain}: {len(mappings)} mappings, counted {info.mapping_count}"
                )
            for start, end, phys, _flags in mappings:
                if start % granule or (end + 1) % granule or phys % granule:
                    raise FuzzFailure(
                        f"domain {info.domain}: mapping {start:#x}-{end:#x} -> {phys:#x} not aligned"
                    )
                if not topology.input_start <= start <= end <= topology.input_end:
                    raise FuzzFailure(
                        f"domain {info.domain}: mapping {start:#x}-{end:#x} outside the input range"
                    )

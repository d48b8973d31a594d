"""Random request sequences keep the device's state consistent with itself and with the mapping table."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu.device import IommuDevice, ResvMemType, Status, Topology
from vhost_iommu.device.domains import NO_DOMAIN
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    MAP_F_READ,
    MAP_F_WRITE,
    TAIL_SIZE,
    encode_attach,
    encode_detach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.device.topology import PciRange, ReservedRegion

PAGE = 0x1000
ENDPOINTS = [0x20, 0x21, 0x22, 0x23, 0x24]
DOMAINS = [1, 1, 1, 2, 2, 3, 4, 0]  # weighted towards the domains set up first; 0 is outside the range
RESERVED = ReservedRegion(ResvMemType.RESERVED, 4 * PAGE, 5 * PAGE - 1)

pages = st.integers(min_value=0, max_value=12)
requests = st.one_of(
    st.builds(
        lambda domain, endpoint, bypass: encode_attach(domain, endpoint, ATTACH_F_BYPASS if bypass else 0),
        st.sampled_from(DOMAINS),
        st.sampled_from(ENDPOINTS),
        st.booleans(),
    ),
    st.builds(encode_detach, st.sampled_from(DOMAINS), st.sampled_from(ENDPOINTS)),
    st.builds(
        lambda domain, first, count, flags: encode_map(
            domain, first * PAGE, (first + count) * PAGE - 1, first * PAGE, flags
        ),
        st.sampled_from(DOMAINS),
        pages,
        st.integers(min_value=1, max_value=3),
        st.sampled_from([MAP_F_READ, MAP_F_WRITE, MAP_F_READ | MAP_F_WRITE]),
    ),
    st.builds(
        lambda domain, first, count: encode_unmap(domain, first * PAGE, (first + count) * PAGE - 1),
        st.sampled_from(DOMAINS),
        pages,
        st.integers(min_value=1, max_value=6),
    ),
)


def check_invariants(device: IommuDevice) -> None:
    table = device.domain_table
    for index, exists in enumerate(table.exists):
        domain = index + table.first
        members = [e for slot, e in enumerate(table.endpoint_ids) if table.endpoint_domain[slot] == domain]
        if not exists:
            assert members == [] and device.store.count(domain) == 0 and table.endpoint_count[index] == 0
            continue
        assert len(members) == table.endpoint_count[index] >= 1
        assert table.mapping_count[index] == device.store.count(domain)
        if table.bypass[index]:
            assert table.mapping_count[index] == 0
        reserved_members = [e for e in members if table.endpoint_regions[int(e) - 0x20]]
        for start, last, _phys, _flags in device.store.mappings(domain):
            assert not (reserved_members and start <= RESERVED.end and RESERVED.start <= last)
    assert table.live == int(table.exists.sum())
    assert all(d == NO_DOMAIN or table.exists[d - table.first] for d in table.endpoint_domain)
    device.store.verify()  # type: ignore[attr-defined]


@settings(max_examples=150, deadline=None)
@given(st.lists(requests, max_size=40))
def test_random_requests_keep_state_consistent(sequence: list[bytes]) -> None:
    topology = Topology(
        pci_ranges=(PciRange(0, 0x20, 0x23, 0x20), PciRange(0, 0x24, 0x24, 0x24, (RESERVED,))),
        domain_start=1,
        domain_end=4,
    )
    device = IommuDevice(topology, max_domains=3)
    device.set_features(device.device_features())
    for request in [encode_attach(1, 0x20), encode_attach(2, 0x21), *sequence]:
        response, used = device.handle_request(request, TAIL_SIZE)
        assert used == TAIL_SIZE and response[0] in set(Status)
        check_invariants(device)
    device.reset()
    check_invariants(device)
    assert device.store.count() == 0

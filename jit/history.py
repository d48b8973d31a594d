"""Layout of a device's mapping history: a bounded ring of int64 records of every change of its tables.

Fault explanations (``vhost_iommu.device.history``) read it to say what happened to a faulting address:
which MAP made it, which UNMAP, DETACH, ATTACH or reset took it away, and when. It is written where the
tables change: by the compiled request path for MAP and UNMAP (``jit/requests.py``, given the ring's
host address in the ``R_HISTORY`` word, from the requestq's own thread without the interpreter lock) and
by the device core's Python path for every request it serves and for a reset. Appending costs a few
stores (the compiled path reads the cycle counter once per batch); nothing reads the ring until a fault
is explained.

One writer at a time (whoever serves the requestq; the kick thread hands the ring over before Python
serves a request), any number of readers on other threads: a record's first word is 0 while it is
written and its sequence number + 1 once complete (stored last, after a release fence), so a reader keeps
only records whose first word says they are the ones it expects, and re-reads ``H_NEXT`` afterwards to
drop any overwritten meanwhile.

Words (int64)::

    [H_NEXT]        records ever appended (the next record's sequence number)
    [H_CAPACITY]    records the ring holds (a power of two)
    then ``capacity`` records of RECORD_WORDS words from HEADER_WORDS on, record n at slot n % capacity
"""

from __future__ import annotations

from typing import Final

H_NEXT: Final = 0
H_CAPACITY: Final = 1
HEADER_WORDS: Final = 8

W_COMMIT: Final = 0
"""0 while the record is written, its sequence number + 1 once it is complete."""
W_OP: Final = 1
"""``OP_*``."""
W_DOMAIN: Final = 2
W_START: Final = 3
"""MAP, UNMAP: the request's first byte (virt_start); 0 otherwise."""
W_LAST: Final = 4
"""MAP, UNMAP: the request's last byte (virt_end, inclusive); 0 otherwise."""
W_VALUE: Final = 5
"""MAP: phys_start; UNMAP: mappings removed; ATTACH, DETACH: the endpoint."""
W_EXTRA: Final = 6
"""MAP: the mapping's flags; ATTACH: the domain the endpoint left (-1: none); DETACH: 1 if the domain,
with its mappings, went away with its last endpoint."""
W_TICKS: Final = 7
"""The cycle counter when the change was made (``jit.requests.cycles``; ``ticks_per_us`` converts); for
the compiled path, when its batch started (``R_HISTORY_TICKS``: one counter read per batch)."""
RECORD_WORDS: Final = 8

OP_MAP: Final = 1
OP_UNMAP: Final = 2
OP_ATTACH: Final = 3
OP_DETACH: Final = 4
OP_RESET: Final = 5
"""Device reset: every endpoint detached, every domain and its mappings gone."""
OP_NAMES: Final[dict[int, str]] = {
    OP_MAP: "MAP",
    OP_UNMAP: "UNMAP",
    OP_ATTACH: "ATTACH",
    OP_DETACH: "DETACH",
    OP_RESET: "RESET",
}

DEFAULT_CAPACITY: Final = 4096
"""Records a device keeps: 256 KiB, the last few thousand changes of its tables."""

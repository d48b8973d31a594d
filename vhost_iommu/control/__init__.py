"""The control channel of a back-end process: inspect and break the device while a guest runs.

- `protocol`: JSON-lines framing, the version, argument validation, error codes (sans-I/O)
- `service`: the commands, run on the back-end's event loop against the server's connections
- `instrument`: what the control layer wraps around one back-end (batch timing, added latency, rates)
- `server`: the unix socket (mode 0600, SO_PEERCRED) on the back-end's loop
- `client`: a blocking client; `ctl`: the ``vhost-iommu ctl`` command on top of it

docs/control.md describes the protocol.
"""

# Only the light client side here: `vhost-iommu ctl` must not pay for importing numba through the device.
from vhost_iommu.control.client import ControlClient
from vhost_iommu.control.protocol import VERSION, ControlError

__all__ = ["VERSION", "ControlClient", "ControlError"]

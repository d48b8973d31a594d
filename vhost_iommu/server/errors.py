"""How a request handler says no: refuse the request, or end the connection."""

from __future__ import annotations

from vhost_iommu.protocol import ProtocolError


class RequestFailed(Exception):
    """A well-formed request this back-end refuses (bad index, wrong state, unusable memory, ...)."""


class ConnectionFatal(ProtocolError):
    """The connection must be closed (raised out of :meth:`ConnectionHandler.handle`)."""

    fatal = True


__all__ = ["ConnectionFatal", "RequestFailed"]

"""The vhost-user server: sockets, fds and the event loop around the protocol codec.

``VhostUserServer(factory)`` serves every accepted front-end with a fresh back-end from ``factory``;
:func:`create_unix_listener` (or :func:`bind_unix_socket`) makes a listening socket; :func:`new_event_loop`
picks uvloop on Linux.
"""

from vhost_iommu.server.connection import Connection
from vhost_iommu.server.handler import OFFERED_PROTOCOL_FEATURES, ConnectionHandler
from vhost_iommu.server.listener import (
    BackendFactory,
    SocketFile,
    SocketPathError,
    VhostUserServer,
    bind_unix_socket,
    create_unix_listener,
    new_event_loop,
)
from vhost_iommu.server.vring import VringSlot

__all__ = [
    "OFFERED_PROTOCOL_FEATURES",
    "BackendFactory",
    "Connection",
    "ConnectionHandler",
    "SocketFile",
    "SocketPathError",
    "VhostUserServer",
    "VringSlot",
    "bind_unix_socket",
    "create_unix_listener",
    "new_event_loop",
]

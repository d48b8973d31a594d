"""The vfio-user server side: one client's session (handler.py) and its socket on the event loop
(connection.py). The device models it serves are the endpoints' (vhost_iommu.endpoints)."""

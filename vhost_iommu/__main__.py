"""``python -m vhost_iommu``: the same as the ``vhost-iommu`` command."""

from vhost_iommu.cli import main

raise SystemExit(main())

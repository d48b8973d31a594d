"""``python -m vhost_iommu.fuzz TARGET [--runs N] [--seconds S]``: what ``scripts/fuzz`` runs."""

from vhost_iommu.fuzz.cli import main

raise SystemExit(main())

pytest_plugins = ["vhost_iommu.harness.pytest_plugin"]

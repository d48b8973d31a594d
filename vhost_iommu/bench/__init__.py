"""Benchmarks shared by scripts and tools: the guest VFIO benchmark against QEMU's built-in virtio-iommu.

- `empty`: a back-end that completes MAP/UNMAP without any device work (the floor of the vhost-user path)
- `results`: the guest's VFIO_* lines as figures, combined over repeats, compared, as a markdown table
- `runner`: one guest boot per back-end kind, with progress and a check of the guest's kernel warnings
- `plot`: the PNG bar chart (needs the optional ``bench`` extra: matplotlib)
"""

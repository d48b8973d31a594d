#!/usr/bin/env bash
# arm64 virt guest (GICv3) whose virtio-iommu is vhost-iommu on the virtio-mmio transport at
# 0x0a003e00, with the topology qemu-configs/topologies/arm-virt-mmio.toml: the PCI endpoints
# 00:04.0-00:1e.7 (a pci-testdev at 00:04.0) reach it through the PCIe host's iommu-map in $DTB.
# The guest runs the job $JOB (guest/init).
#
# Set QEMU, KERNEL and INITRD first, e.g. from the repository:
#   export QEMU=$(scripts/get-qemu --arch arm64)
#   eval "$(scripts/build-guest --arch arm64)"; export KERNEL INITRD
# Arguments given to this script go to QEMU.
set -euo pipefail
: "${QEMU:=qemu-system-aarch64}"  # QEMU >= 10.2 (scripts/get-qemu --arch arm64 prints one)
: "${KERNEL:?set KERNEL to the guest kernel (scripts/build-guest --arch arm64 prints it)}"
: "${INITRD:?set INITRD to the guest initramfs (scripts/build-guest --arch arm64 prints it)}"
: "${MEM:=1024}"  # MiB of guest RAM
: "${SOCK:=/tmp/vhost-iommu.sock}"  # vhost-iommu --topology=qemu-configs/topologies/arm-virt-mmio.toml --socket-path=$SOCK must be listening
: "${DTB:=virt.dtb}"  # made by: vhost-iommu dtb --topology=qemu-configs/topologies/arm-virt-mmio.toml --qemu="$QEMU" --memory="$MEM" -o "$DTB"
: "${JOB:=probe}"  # probe, shell, vfio-steps, vfio-bench, vfio-info, blk-io, dma-engine
args=(
    # virt with a GICv3 (its ITS doorbell is the topology's MSI region; TCG would pick GICv2m) under
    # TCG; guest RAM is a shared memfd so a vhost-user back-end can map it
    -M virt,gic-version=3,accel=tcg,memory-backend=mem
    -cpu cortex-a57
    -object memory-backend-memfd,id=mem,size=${MEM}M,share=on
    -m "${MEM}M"
    -smp 1
    # PL011 serial console on stdio, no display, no NIC, exit on reboot (-kernel needs no firmware)
    -nographic
    -nic none
    -no-reboot
    # the virtio-iommu on virt's virtio-mmio transport at 0xa003e00, served
    # by vhost-iommu; modern virtio-mmio (the device offers VERSION_1 only)
    -chardev "socket,id=viommu,path=${SOCK}"
    -device vhost-user-test-device,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,bus=virtio-mmio-bus.31
    -global virtio-mmio.force-legacy=false
    # the device tree with the IOMMU's node and the PCIe host's iommu-map (vhost-iommu dtb):
    # QEMU's virt describes only its own virtio-iommu-pci
    -dtb "${DTB}"
    # pci-testdev: BARs and no DMA, for guest VFIO (real MAP/UNMAP traffic, no device DMA)
    -device pci-testdev,addr=0x4
    # the guest: kernel, busybox initramfs, and its command line (the job to run is vhost_iommu.job=)
    -kernel "${KERNEL}"
    -initrd "${INITRD}"
    -append "console=ttyAMA0 panic=-1 vhost_iommu.job=${JOB}"
)
exec "${QEMU}" "${args[@]}" "$@"

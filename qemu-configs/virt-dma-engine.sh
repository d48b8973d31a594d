#!/usr/bin/env bash
# Translated DMA on arm64: vhost-iommu's DMA test engine at 00:05.0 (inside the device tree's
# iommu-map), served over vfio-user on $ENGINE (qemu-configs/topologies/arm-virt.toml's [[devices]]:
# `vhost-iommu --topology=qemu-configs/topologies/arm-virt.toml --socket-path=$SOCK` listens on
# dma-engine.sock beside $SOCK); /init drives it through VFIO ($DMA).
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
: "${SOCK:=/tmp/vhost-iommu.sock}"  # vhost-iommu --topology=qemu-configs/topologies/arm-virt.toml --socket-path=$SOCK must be listening
: "${DTB:=virt.dtb}"  # made by: vhost-iommu dtb --topology=qemu-configs/topologies/arm-virt.toml --qemu="$QEMU" --memory="$MEM" -o "$DTB"
: "${ENGINE:=$(dirname "$SOCK")/dma-engine.sock}"  # served by vhost-iommu
: "${DMA:=copy,uaf,readonly,busmaster,release}"
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
    # the virtio-iommu (ID 23, requestq + eventq, 40-byte config) served by vhost-iommu;
    # no reconnect-ms: with it the generic device fails to realize
    -chardev "socket,id=viommu,path=${SOCK}"
    -device vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=0x3
    # the device tree with the IOMMU's node and the PCIe host's iommu-map (vhost-iommu dtb):
    # QEMU's virt describes only its own virtio-iommu-pci
    -dtb "${DTB}"
    # pci-testdev: BARs and no DMA, for guest VFIO (real MAP/UNMAP traffic, no device DMA)
    -device pci-testdev,addr=0x4
    # dma-engine: served by vhost-iommu over vfio-user; its every DMA access is
    # translated by vhost-iommu's IOMMU (QEMU wants the JSON form for the socket)
    -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"${ENGINE}\"},\"addr\":\"0x5\"}"
    # the guest: kernel, busybox initramfs, and its command line (the job to run is vhost_iommu.job=)
    -kernel "${KERNEL}"
    -initrd "${INITRD}"
    -append "console=ttyAMA0 panic=-1 vhost_iommu.job=dma-engine vhost_iommu.dma=${DMA}"
)
exec "${QEMU}" "${args[@]}" "$@"

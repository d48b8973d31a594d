#!/usr/bin/env bash
# A DMA-doing endpoint behind vhost-iommu: virtio-blk at 00:05.0 on the raw image $DISK.
# QEMU does the disk's DMA itself with guest-physical addresses and never asks a vhost-user
# device for translations, so the guest gives it an identity domain (iommu.passthrough=1).
#
# Set QEMU, KERNEL and INITRD first, e.g. from the repository:
#   export QEMU=$(scripts/get-qemu); eval "$(scripts/build-guest)"; export KERNEL INITRD
# Arguments given to this script go to QEMU.
set -euo pipefail
: "${QEMU:=qemu-system-x86_64}"  # QEMU >= 10.2 (scripts/get-qemu prints one)
: "${KERNEL:?set KERNEL to the guest kernel (scripts/build-guest prints it)}"
: "${INITRD:?set INITRD to the guest initramfs (scripts/build-guest prints it)}"
: "${MEM:=1024}"  # MiB of guest RAM
: "${SOCK:=/tmp/vhost-iommu.sock}"  # vhost-iommu --socket-path=$SOCK must be listening
: "${VIOT:=viot.bin}"  # made by: vhost-iommu viot -o $VIOT
: "${DISK:?set DISK to a raw disk image, e.g. truncate -s 64M disk.img}"
args=(
    # q35 under TCG; guest RAM is a shared memfd so a vhost-user back-end can map it
    -M q35,accel=tcg,memory-backend=mem
    -object memory-backend-memfd,id=mem,size=${MEM}M,share=on
    -m "${MEM}M"
    -smp 1
    # serial console on stdio, no display, no NIC (its option ROM is not shipped), exit on reboot
    -nographic
    -vga none
    -nic none
    -no-reboot
    # BIOS and option ROMs from Debian's seabios and qemu-system-data
    -L /usr/share/qemu
    -L /usr/share/seabios
    # qboot: boots the kernel at once (SeaBIOS takes ~30 s to get there under TCG)
    -bios /usr/share/qemu/qboot.rom
    # the virtio-iommu (ID 23, requestq + eventq, 40-byte config) served by vhost-iommu;
    # no reconnect-ms: with it the generic device fails to realize
    -chardev "socket,id=viommu,path=${SOCK}"
    -device vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=0x3
    # the ACPI VIOT telling the guest which endpoints the IOMMU manages (QEMU builds none for it)
    -acpitable "file=${VIOT}"
    # pci-testdev: BARs and no DMA, for guest VFIO (real MAP/UNMAP traffic, no device DMA)
    -device pci-testdev,addr=0x4
    # virtio-blk: real DMA, done by QEMU itself with guest-physical addresses,
    # so the guest must give it an identity domain (iommu.passthrough=1)
    -drive "file=${DISK},format=raw,if=none,id=blk1,cache=unsafe"
    -device virtio-blk-pci,drive=blk1,addr=0x5,disable-legacy=on,iommu_platform=on
    # the guest: kernel, busybox initramfs, and its command line (the job to run is vhost_iommu.job=)
    -kernel "${KERNEL}"
    -initrd "${INITRD}"
    -append 'console=ttyS0 panic=-1 iommu.passthrough=1 vhost_iommu.job=blk-io'
)
exec "${QEMU}" "${args[@]}" "$@"

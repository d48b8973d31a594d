#!/usr/bin/env bash
# A disk whose every DMA access vhost-iommu translates: virtio-blk at 00:05.0, served
# by vhost-iommu over vfio-user on $BLK, with the topology
# qemu-configs/topologies/virtio-blk.toml (`vhost-iommu --socket-path=$SOCK
# --topology=qemu-configs/topologies/virtio-blk.toml` serves the raw image disk.img
# beside $SOCK). The guest's own virtio_pci and virtio_blk put IOVAs in the rings and
# buffers. The guest runs the job $JOB (blk-io: write $BLK_MB MiB, read them back, md5).
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
: "${BLK:=$(dirname "$SOCK")/virtio-blk.sock}"  # served by vhost-iommu
: "${JOB:=blk-io}"  # blk-io, probe, shell, ... (guest/init)
: "${BLK_MB:=64}"  # MiB the blk-io job writes and reads back
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
    # virtio-blk: a disk served by vhost-iommu over vfio-user; the guest's virtio_blk puts IOVAs
    # in its rings and buffers and vhost-iommu translates every one (QEMU wants the JSON form for the socket)
    -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"${BLK}\"},\"addr\":\"0x5\"}"
    # the guest: kernel, busybox initramfs, and its command line (the job to run is vhost_iommu.job=)
    -kernel "${KERNEL}"
    -initrd "${INITRD}"
    -append "console=ttyS0 panic=-1 vhost_iommu.job=${JOB} vhost_iommu.blk_mb=${BLK_MB}"
)
exec "${QEMU}" "${args[@]}" "$@"

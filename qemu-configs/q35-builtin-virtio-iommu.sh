#!/usr/bin/env bash
# The same guest and machine behind QEMU's built-in virtio-iommu-pci, for comparisons.
# QEMU builds its own VIOT (one range over the whole root bus), so no table and no back-end.
# The guest runs the job $JOB (guest/init).
#
# Set QEMU, KERNEL and INITRD first, e.g. from the repository:
#   export QEMU=$(scripts/get-qemu); eval "$(scripts/build-guest)"; export KERNEL INITRD
# Arguments given to this script go to QEMU.
set -euo pipefail
: "${QEMU:=qemu-system-x86_64}"  # QEMU >= 10.2 (scripts/get-qemu prints one)
: "${KERNEL:?set KERNEL to the guest kernel (scripts/build-guest prints it)}"
: "${INITRD:?set INITRD to the guest initramfs (scripts/build-guest prints it)}"
: "${MEM:=1024}"  # MiB of guest RAM
: "${JOB:=probe}"  # probe, shell, vfio-steps, vfio-bench, vfio-info, blk-io, dma-engine
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
    # QEMU's built-in virtio-iommu, for comparison; QEMU writes its own VIOT (whole root bus)
    -device virtio-iommu-pci,addr=0x3
    # pci-testdev: BARs and no DMA, for guest VFIO (real MAP/UNMAP traffic, no device DMA)
    -device pci-testdev,addr=0x4
    # the guest: kernel, busybox initramfs, and its command line (the job to run is vhost_iommu.job=)
    -kernel "${KERNEL}"
    -initrd "${INITRD}"
    -append "console=ttyS0 panic=-1 vhost_iommu.job=${JOB}"
)
exec "${QEMU}" "${args[@]}" "$@"

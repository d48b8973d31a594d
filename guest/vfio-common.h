/*
 * What the guest's VFIO programs share: a type1 container and the group of one PCI function, DMA map and
 * unmap, a monotonic clock and the error line. A program defines LINE_TAG, the prefix of its output lines
 * ("VFIO", "DMAE"), before including this file.
 */
#ifndef VHOST_IOMMU_VFIO_COMMON_H
#define VHOST_IOMMU_VFIO_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#ifndef LINE_TAG
#error "define LINE_TAG (the prefix of the program's output lines) before including vfio-common.h"
#endif

#define PAGE 4096ULL

struct vfio {
	int container;
	int group;
	int device;
};

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline int fail(const char *what)
{
	printf(LINE_TAG "_ERROR op=%s errno=%d msg=\"%s\"\n", what, errno, strerror(errno));
	fflush(stdout);
	return 1;
}

static inline int open_vfio(const char *device, struct vfio *vfio)
{
	char path[PATH_MAX + 32], link[PATH_MAX];
	struct vfio_group_status status = { .argsz = sizeof(status) };
	const char *group_name;
	ssize_t length;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", device);
	length = readlink(path, link, sizeof(link) - 1);
	if (length < 0)
		return fail("find-iommu-group");
	link[length] = '\0';
	group_name = strrchr(link, '/');
	group_name = group_name ? group_name + 1 : link;

	vfio->container = open("/dev/vfio/vfio", O_RDWR);
	if (vfio->container < 0)
		return fail("open-container");
	if (ioctl(vfio->container, VFIO_GET_API_VERSION) != VFIO_API_VERSION) {
		errno = EINVAL;
		return fail("api-version");
	}
	if (ioctl(vfio->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1) {
		errno = ENOTSUP;
		return fail("check-type1v2");
	}
	snprintf(path, sizeof(path), "/dev/vfio/%s", group_name);
	vfio->group = open(path, O_RDWR);
	if (vfio->group < 0)
		return fail("open-group");
	if (ioctl(vfio->group, VFIO_GROUP_GET_STATUS, &status) < 0)
		return fail("group-status");
	if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
		/* Another device of the group is bound to a host driver. */
		errno = EBUSY;
		return fail("group-not-viable");
	}
	if (ioctl(vfio->group, VFIO_GROUP_SET_CONTAINER, &vfio->container) < 0)
		return fail("set-container");
	/* EPERM here means vfio_iommu_type1 lacks allow_unsafe_interrupts=1 (no interrupt remapping). */
	if (ioctl(vfio->container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0)
		return fail("set-iommu");
	vfio->device = ioctl(vfio->group, VFIO_GROUP_GET_DEVICE_FD, device);
	if (vfio->device < 0)
		return fail("get-device-fd");
	printf(LINE_TAG "_OPEN device=%s group=%s\n", device, group_name);
	fflush(stdout);
	return 0;
}

static inline int map_dma(int container, uint64_t vaddr, uint64_t iova, uint64_t size, uint32_t flags)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map), .flags = flags, .vaddr = vaddr, .iova = iova, .size = size,
	};

	return ioctl(container, VFIO_IOMMU_MAP_DMA, &map);
}

/* Returns the number of bytes unmapped, or -1. */
static inline int64_t unmap_dma(int container, uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof(unmap), .iova = iova, .size = size };

	if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0)
		return -1;
	return (int64_t)unmap.size;
}

/* The frame number of the page holding address, from /proc/self/pagemap (frames show only to
 * CAP_SYS_ADMIN), or 0 when the page is not present or the entry cannot be read. */
static inline uint64_t page_frame(int pagemap, const void *address)
{
	const uint64_t present = 1ULL << 63, frame_mask = (1ULL << 55) - 1;
	uint64_t entry;
	off_t at = (off_t)((uintptr_t)address / PAGE * sizeof(entry));

	if (pread(pagemap, &entry, sizeof(entry), at) != sizeof(entry) || !(entry & present))
		return 0;
	return entry & frame_mask;
}

static inline int parse_u64(const char *text, uint64_t *value)
{
	char *end;

	if (!text)
		return -1;
	errno = 0;
	*value = strtoull(text, &end, 0);
	return (errno || *end || end == text) ? -1 : 0;
}

#endif

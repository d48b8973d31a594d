/*
 * vfio-dma: drive VFIO type1 DMA mappings from guest user space, to exercise and time a virtio-iommu.
 *
 * Every VFIO MAP_DMA/UNMAP_DMA becomes virtio-iommu MAP/UNMAP requests from the guest's driver, with no
 * device DMA at all, so this works with any endpoint bound to vfio-pci (QEMU's pci-testdev is enough).
 *
 *   vfio-dma DEVICE pairs N       N x (map one 4 KiB page, unmap it); per-pair latency statistics
 *                                 (and every pair's latency when $VFIO_DMA_EACH is set)
 *   vfio-dma DEVICE bulk N        N single-page maps, then one UNMAP_DMA over all of them
 *   vfio-dma DEVICE mixed N       N map+unmap of sizes from 4 KiB to 2 MiB (size-aligned IOVAs)
 *   vfio-dma DEVICE scatter N     one MAP_DMA over N pages that are scattered in guest-physical memory,
 *                                 then one UNMAP_DMA of it (VFIO maps and unmaps it chunk by chunk)
 *   vfio-dma DEVICE steps         commands from stdin, one result line each (see usage())
 *   vfio-dma DEVICE info          the type1 IOMMU's page sizes and usable IOVA ranges
 *   vfio-dma DEVICE virtio-config OFFSET SIZE
 *                                 SIZE bytes (1-64) of a virtio PCI device's device-specific config at
 *                                 OFFSET, read through the VIRTIO_PCI_CAP_PCI_CFG window of its PCI
 *                                 config space (no VFIO: DEVICE stays bound to its virtio driver)
 *
 * DEVICE is a PCI address (0000:00:04.0) already bound to vfio-pci (virtio-config: any virtio PCI device). Output lines start with "VFIO_" and
 * are key=value pairs, for scripts. Exit status: 0 on success, 1 on a failed operation, 2 on bad usage.
 */
#define _GNU_SOURCE
#define LINE_TAG "VFIO"
#include "vfio-common.h"

#include <sys/mman.h>

/* Far from guest RAM and from the x86 MSI window, inside the 48-bit input range every IOMMU here offers. */
#define IOVA_BASE 0x100000000ULL
#define MAX_COUNT 1000000UL

static void usage(void)
{
	fprintf(stderr,
		"usage: vfio-dma DEVICE pairs|bulk|mixed|scatter N\n"
		"       vfio-dma DEVICE steps|info\n"
		"       vfio-dma DEVICE virtio-config OFFSET SIZE\n"
		"steps reads commands from stdin, one per line:\n"
		"  map IOVA SIZE r|w|rw     VFIO_IOMMU_MAP_DMA (numbers in C syntax: 0x1000, 4096)\n"
		"  unmap IOVA SIZE          VFIO_IOMMU_UNMAP_DMA\n"
		"  quit                     stop (end of input does too)\n"
		"after each command it prints one VFIO_STEP line, then VFIO_STEP_READY, then waits for the next.\n");
}

static void *buffer(uint64_t size)
{
	/* Over-allocate to align on 2 MiB, so the largest mixed size is physically plausible as one block. */
	uint64_t align = 2ULL << 20;
	uint8_t *raw = mmap(NULL, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *aligned;

	if (raw == MAP_FAILED)
		return NULL;
	aligned = (uint8_t *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
	memset(aligned, 0x5a, size); /* fault the pages in now rather than inside the timed pins */
	return aligned;
}

static int compare_u64(const void *left, const void *right)
{
	uint64_t a = *(const uint64_t *)left, b = *(const uint64_t *)right;

	return (a > b) - (a < b);
}

static void print_stats(const char *tag, const char *extra, uint64_t *samples, unsigned long count)
{
	uint64_t total = 0;
	unsigned long i;

	for (i = 0; i < count; i++)
		total += samples[i];
	qsort(samples, count, sizeof(*samples), compare_u64);
	printf("%s %s n=%lu mean_ns=%llu min_ns=%llu p50_ns=%llu p99_ns=%llu max_ns=%llu total_ns=%llu\n",
	       tag, extra, count, (unsigned long long)(total / count), (unsigned long long)samples[0],
	       (unsigned long long)samples[count / 2], (unsigned long long)samples[(count * 99) / 100],
	       (unsigned long long)samples[count - 1], (unsigned long long)total);
	fflush(stdout);
}

static int run_pairs(struct vfio *vfio, unsigned long count)
{
	uint64_t *samples = calloc(count, sizeof(*samples));
	void *page = buffer(PAGE);
	unsigned long i;

	if (!samples || !page)
		return fail("alloc");
	for (i = 0; i < count; i++) {
		uint64_t start = now_ns();

		if (map_dma(vfio->container, (uintptr_t)page, IOVA_BASE, PAGE,
			    VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) < 0)
			return fail("map");
		if (unmap_dma(vfio->container, IOVA_BASE, PAGE) != (int64_t)PAGE)
			return fail("unmap");
		samples[i] = now_ns() - start;
	}
	if (getenv("VFIO_DMA_EACH")) {
		/* Every pair's latency, in order, for histograms (before print_stats sorts them). */
		for (i = 0; i < count; i++)
			printf("VFIO_PAIR i=%lu ns=%llu\n", i, (unsigned long long)samples[i]);
	}
	print_stats("VFIO_PAIRS", "size=4096", samples, count);
	free(samples);
	return 0;
}

static int run_bulk(struct vfio *vfio, unsigned long count)
{
	uint64_t *samples = calloc(count, sizeof(*samples));
	uint8_t *pages = buffer(count * PAGE);
	uint64_t start, unmap_ns;
	int64_t unmapped;
	unsigned long i;

	if (!samples || !pages)
		return fail("alloc");
	for (i = 0; i < count; i++) {
		start = now_ns();
		if (map_dma(vfio->container, (uintptr_t)(pages + i * PAGE), IOVA_BASE + i * PAGE, PAGE,
			    VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) < 0)
			return fail("map");
		samples[i] = now_ns() - start;
	}
	start = now_ns();
	unmapped = unmap_dma(vfio->container, IOVA_BASE, count * PAGE);
	unmap_ns = now_ns() - start;
	if (unmapped != (int64_t)(count * PAGE))
		return fail("unmap-all");
	print_stats("VFIO_BULK_MAP", "size=4096", samples, count);
	printf("VFIO_BULK_UNMAP n=%lu bytes=%llu unmap_ns=%llu\n", count, (unsigned long long)unmapped,
	       (unsigned long long)unmap_ns);
	fflush(stdout);
	free(samples);
	return 0;
}

static int run_mixed(struct vfio *vfio, unsigned long count)
{
	static const uint64_t sizes[] = { 4096, 8192, 16384, 65536, 262144, 1048576, 2097152 };
	const unsigned kinds = sizeof(sizes) / sizeof(sizes[0]);
	uint64_t *samples[sizeof(sizes) / sizeof(sizes[0])];
	unsigned long done[sizeof(sizes) / sizeof(sizes[0])] = { 0 };
	uint8_t *block = buffer(sizes[kinds - 1]);
	unsigned seed = 12345, k;
	unsigned long i;
	char extra[32];

	if (!block)
		return fail("alloc");
	for (k = 0; k < kinds; k++) {
		samples[k] = calloc(count, sizeof(uint64_t));
		if (!samples[k])
			return fail("alloc");
	}
	for (i = 0; i < count; i++) {
		/* A fixed pseudo-random order, so runs are comparable but sizes interleave. */
		uint64_t size, iova, start;

		seed = seed * 1103515245u + 12345u;
		k = (seed >> 16) % kinds;
		size = sizes[k];
		iova = IOVA_BASE + (uint64_t)(i % 64) * (2ULL << 20);
		start = now_ns();
		if (map_dma(vfio->container, (uintptr_t)block, iova, size,
			    VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) < 0)
			return fail("map");
		if (unmap_dma(vfio->container, iova, size) != (int64_t)size)
			return fail("unmap");
		samples[k][done[k]++] = now_ns() - start;
	}
	for (k = 0; k < kinds; k++) {
		if (!done[k])
			continue;
		snprintf(extra, sizeof(extra), "size=%llu", (unsigned long long)sizes[k]);
		print_stats("VFIO_MIXED", extra, samples[k], done[k]);
		free(samples[k]);
	}
	return 0;
}

/* How many physically contiguous runs the n pages at pages make (from /proc/self/pagemap), or 0. */
static unsigned long physical_runs(const uint8_t *pages, unsigned long n)
{
	uint64_t frame, previous = 0;
	unsigned long i, runs = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0)
		return 0;
	for (i = 0; i < n; i++) {
		frame = page_frame(fd, pages + i * PAGE);
		if (!frame) {
			runs = 0;
			break;
		}
		if (i == 0 || frame != previous + 1)
			runs++;
		previous = frame;
	}
	close(fd);
	return runs;
}

static int run_scatter(struct vfio *vfio, unsigned long count)
{
	/* VFIO pins and maps a MAP_DMA one physically contiguous chunk at a time (one iommu_map, so one
	 * MAP request and one sync, each), and unmaps it chunk by chunk with a deferred IOTLB sync, so the
	 * driver queues many UNMAP requests per notification: the batched case. First-touching the pages
	 * in a shuffled order, without transparent huge pages, makes their physical pages scattered. */
	uint64_t size = count * PAGE, start, map_ns, unmap_ns;
	uint8_t *pages = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned long *order = calloc(count, sizeof(*order));
	unsigned long i, j, swap, runs;
	uint64_t random = 0x9e3779b97f4a7c15ULL; /* xorshift64: a fixed shuffle, so runs are comparable */
	int64_t unmapped;

	if (pages == MAP_FAILED || !order)
		return fail("alloc");
	madvise(pages, size, MADV_NOHUGEPAGE);
	for (i = 0; i < count; i++)
		order[i] = i;
	for (i = count - 1; i > 0; i--) {
		random ^= random << 13;
		random ^= random >> 7;
		random ^= random << 17;
		j = (unsigned long)(random % (i + 1));
		swap = order[i];
		order[i] = order[j];
		order[j] = swap;
	}
	for (i = 0; i < count; i++)
		pages[order[i] * PAGE] = 0x5a;
	runs = physical_runs(pages, count);
	start = now_ns();
	if (map_dma(vfio->container, (uintptr_t)pages, IOVA_BASE, size,
		    VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) < 0)
		return fail("map");
	map_ns = now_ns() - start;
	start = now_ns();
	unmapped = unmap_dma(vfio->container, IOVA_BASE, size);
	unmap_ns = now_ns() - start;
	if (unmapped != (int64_t)size)
		return fail("unmap");
	printf("VFIO_SCATTER n=%lu bytes=%llu runs=%lu map_ns=%llu unmap_ns=%llu\n", count,
	       (unsigned long long)size, runs, (unsigned long long)map_ns, (unsigned long long)unmap_ns);
	fflush(stdout);
	free(order);
	munmap(pages, size);
	return 0;
}

static int run_steps(struct vfio *vfio)
{
	/* One 64 MiB buffer backs every mapping; a map uses the part at its IOVA modulo the size. */
	const uint64_t backing_size = 64ULL << 20;
	uint8_t *backing = buffer(backing_size);
	char line[256];
	unsigned long sequence = 0;
	int failures = 0;

	if (!backing)
		return fail("alloc");
	printf("VFIO_STEP_READY seq=0\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		char *op = strtok(line, " \t\r\n");
		char *arg1 = strtok(NULL, " \t\r\n"), *arg2 = strtok(NULL, " \t\r\n"), *arg3 = strtok(NULL, " \t\r\n");
		uint64_t iova, size, start, took;
		uint32_t flags = 0;
		int64_t result;
		int saved_errno;

		if (!op)
			continue;
		if (!strcmp(op, "quit"))
			break;
		sequence++;
		if (parse_u64(arg1, &iova) || parse_u64(arg2, &size)) {
			printf("VFIO_STEP seq=%lu op=%s rc=-1 errno=%d error=bad-arguments\n", sequence, op, EINVAL);
			failures++;
		} else if (!strcmp(op, "map")) {
			if (!arg3 || (strcmp(arg3, "r") && strcmp(arg3, "w") && strcmp(arg3, "rw"))) {
				printf("VFIO_STEP seq=%lu op=map rc=-1 errno=%d error=bad-permissions\n", sequence,
				       EINVAL);
				failures++;
			} else if (size == 0 || size > backing_size) {
				printf("VFIO_STEP seq=%lu op=map rc=-1 errno=%d error=size-beyond-backing-%llu\n",
				       sequence, EINVAL, (unsigned long long)backing_size);
				failures++;
			} else {
				if (strchr(arg3, 'r'))
					flags |= VFIO_DMA_MAP_FLAG_READ;
				if (strchr(arg3, 'w'))
					flags |= VFIO_DMA_MAP_FLAG_WRITE;
				/* Distinct IOVAs get distinct pages of the buffer where they fit, so the
				 * host can tell the mappings apart by their guest-physical addresses. */
				uint64_t offset = (iova % backing_size) & ~(PAGE - 1);

				if (offset + size > backing_size)
					offset = 0;
				start = now_ns();
				result = map_dma(vfio->container, (uintptr_t)(backing + offset), iova, size, flags);
				saved_errno = result < 0 ? errno : 0;
				took = now_ns() - start;
				printf("VFIO_STEP seq=%lu op=map iova=0x%llx size=0x%llx perm=%s buffer_offset=0x%llx rc=%d "
				       "errno=%d ns=%llu\n",
				       sequence, (unsigned long long)iova, (unsigned long long)size, arg3,
				       (unsigned long long)offset, result < 0 ? -1 : 0, saved_errno,
				       (unsigned long long)took);
				failures += result < 0;
			}
		} else if (!strcmp(op, "unmap")) {
			start = now_ns();
			result = unmap_dma(vfio->container, iova, size);
			saved_errno = result < 0 ? errno : 0;
			took = now_ns() - start;
			printf("VFIO_STEP seq=%lu op=unmap iova=0x%llx size=0x%llx unmapped=0x%llx rc=%d errno=%d "
			       "ns=%llu\n",
			       sequence, (unsigned long long)iova, (unsigned long long)size,
			       (unsigned long long)(result < 0 ? 0 : result), result < 0 ? -1 : 0, saved_errno,
			       (unsigned long long)took);
			failures += result < 0;
		} else {
			printf("VFIO_STEP seq=%lu op=%s rc=-1 errno=%d error=unknown-command\n", sequence, op, EINVAL);
			failures++;
		}
		printf("VFIO_STEP_READY seq=%lu\n", sequence);
		fflush(stdout);
	}
	printf("VFIO_STEPS_DONE steps=%lu failures=%d\n", sequence, failures);
	fflush(stdout);
	return failures ? 1 : 0;
}

static int run_info(struct vfio *vfio)
{
	/* Ask for the size first: the capability chain follows the fixed part. */
	struct vfio_iommu_type1_info probe = { .argsz = sizeof(probe) };
	struct vfio_iommu_type1_info *info;
	struct vfio_info_cap_header *header;
	uint32_t offset;

	if (ioctl(vfio->container, VFIO_IOMMU_GET_INFO, &probe) < 0)
		return fail("get-info");
	info = calloc(1, probe.argsz);
	if (!info)
		return fail("alloc");
	info->argsz = probe.argsz;
	if (ioctl(vfio->container, VFIO_IOMMU_GET_INFO, info) < 0)
		return fail("get-info");
	printf("VFIO_INFO pgsizes=0x%llx\n", (unsigned long long)info->iova_pgsizes);
	offset = (info->flags & VFIO_IOMMU_INFO_CAPS) ? info->cap_offset : 0;
	while (offset && offset + sizeof(*header) <= info->argsz) {
		header = (struct vfio_info_cap_header *)((uint8_t *)info + offset);
		if (header->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
			struct vfio_iommu_type1_info_cap_iova_range *ranges = (void *)header;
			uint32_t i;

			for (i = 0; i < ranges->nr_iovas; i++)
				printf("VFIO_IOVA_RANGE start=0x%llx end=0x%llx\n",
				       (unsigned long long)ranges->iova_ranges[i].start,
				       (unsigned long long)ranges->iova_ranges[i].end);
		}
		offset = header->next;
	}
	fflush(stdout);
	free(info);
	return 0;
}

/*
 * The virtio 1.x PCI transport offers a window into its BARs through PCI config space (struct
 * virtio_pci_cfg_cap): write the BAR, offset and length into the capability, then read pci_cfg_data, and
 * the device performs the access. Reading the device-specific config this way needs no mapping of a BAR
 * (which the kernel refuses for a BAR its driver claimed) and goes to the device on every read.
 */
#define PCI_CAP_POINTER 0x34
#define PCI_CAP_VENDOR 0x09
#define VIRTIO_CAP_DEVICE_CFG 4
#define VIRTIO_CAP_PCI_CFG 5

static int config_io(int fd, int write, void *buffer, size_t size, off_t offset)
{
	ssize_t done = write ? pwrite(fd, buffer, size, offset) : pread(fd, buffer, size, offset);

	if (done == (ssize_t)size)
		return 0;
	if (done >= 0)
		errno = EIO;
	return -1;
}

static int run_virtio_config(const char *device, uint64_t offset, uint64_t size)
{
	char path[PATH_MAX + 32];
	uint8_t config[256];
	unsigned int position, hops = 0, window = 0;
	uint32_t device_offset = 0, word;
	uint8_t device_bar = 0xff, length[4] = { 1, 0, 0, 0 };
	uint64_t index;
	int fd;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", device);
	fd = open(path, O_RDWR);
	if (fd < 0)
		return fail("open-config");
	if (config_io(fd, 0, config, sizeof(config), 0) < 0)
		return fail("read-config");
	/* Walk the capability list (bounded: a looping list must not hang the guest). */
	for (position = config[PCI_CAP_POINTER] & ~3u; position && position < 0xf0 && hops < 48; hops++) {
		if (config[position] == PCI_CAP_VENDOR) {
			if (config[position + 3] == VIRTIO_CAP_DEVICE_CFG) {
				device_bar = config[position + 4];
				memcpy(&device_offset, &config[position + 8], 4);
			} else if (config[position + 3] == VIRTIO_CAP_PCI_CFG) {
				window = position;
			}
		}
		position = config[position + 1] & ~3u;
	}
	if (device_bar == 0xff || !window) {
		errno = ENODEV;
		close(fd);
		return fail("find-virtio-caps");
	}
	printf("VFIO_VIRTIO_CONFIG device=%s offset=0x%llx size=%llu bytes=", device, (unsigned long long)offset,
	       (unsigned long long)size);
	for (index = 0; index < size; index++) {
		uint32_t at = device_offset + (uint32_t)(offset + index);

		/* cap.bar (byte 4), cap.offset (bytes 8-11), cap.length (bytes 12-15), then pci_cfg_data (16-19). */
		if (config_io(fd, 1, &device_bar, 1, window + 4) < 0 || config_io(fd, 1, &at, 4, window + 8) < 0 ||
		    config_io(fd, 1, length, 4, window + 12) < 0 || config_io(fd, 0, &word, 4, window + 16) < 0) {
			printf("\n");
			close(fd);
			return fail("config-window");
		}
		printf("%02x", word & 0xff);
	}
	printf("\n");
	fflush(stdout);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	struct vfio vfio = { -1, -1, -1 };
	unsigned long count = 0;
	uint64_t parsed;
	const char *mode;

	if (argc < 3) {
		usage();
		return 2;
	}
	mode = argv[2];
	if (!strcmp(mode, "virtio-config")) {
		uint64_t offset, size;

		if (argc != 5 || parse_u64(argv[3], &offset) || parse_u64(argv[4], &size) || size == 0 || size > 64 ||
		    offset > 4096) {
			fprintf(stderr, "vfio-dma: virtio-config needs OFFSET (0-4096) and SIZE (1-64)\n");
			return 2;
		}
		return run_virtio_config(argv[1], offset, size);
	}
	if (!strcmp(mode, "pairs") || !strcmp(mode, "bulk") || !strcmp(mode, "mixed") ||
	    !strcmp(mode, "scatter")) {
		if (argc != 4 || parse_u64(argv[3], &parsed) || parsed == 0 || parsed > MAX_COUNT) {
			fprintf(stderr, "vfio-dma: %s needs a count N, 1 <= N <= %lu\n", mode, MAX_COUNT);
			return 2;
		}
		count = (unsigned long)parsed;
	} else if ((strcmp(mode, "steps") && strcmp(mode, "info")) || argc != 3) {
		usage();
		return 2;
	}
	if (open_vfio(argv[1], &vfio))
		return 1;
	if (!strcmp(mode, "pairs"))
		return run_pairs(&vfio, count);
	if (!strcmp(mode, "bulk"))
		return run_bulk(&vfio, count);
	if (!strcmp(mode, "mixed"))
		return run_mixed(&vfio, count);
	if (!strcmp(mode, "scatter"))
		return run_scatter(&vfio, count);
	if (!strcmp(mode, "steps"))
		return run_steps(&vfio);
	return run_info(&vfio);
}

/*
 * dma-engine: drive vhost-iommu's DMA test engine (docs/dma-engine.md) from guest user space and check that
 * every DMA it makes does what the guest's IOMMU state allows, and nothing more.
 *
 *   dma-engine DEVICE copy       COPY, FILL and COMPARE (equal, then one differing byte) of 4 KiB, 64 KiB and
 *                                1 MiB between two VFIO-mapped buffers (1 MiB: one VFIO map per 4 KiB page),
 *                                checked byte for byte
 *   dma-engine DEVICE uaf        use after unmap: a COPY into a destination whose VFIO mapping is gone faults
 *                                with WRITE at its IOVA and changes no byte; with only its first page still
 *                                mapped, that page is written and nothing after it
 *   dma-engine DEVICE readonly   a COPY into a read-only mapping faults with WRITE; one out of it works
 *   dma-engine DEVICE busmaster  with Bus Master clear a COPY ends in ERROR NO_BUS_MASTER and writes nothing;
 *                                with it set again the COPY works
 *   dma-engine DEVICE release    a COPY through VFIO; then VFIO closed, the device unbound from vfio-pci and
 *                                reached through sysfs, a COPY and a FILL at the old IOVAs end in FAULT or
 *                                ERROR and leave the old buffers untouched (DMAE_OP says which, for the host)
 *   dma-engine DEVICE bypass     no VFIO (DEVICE bound to no driver): COPY and FILL between guest-physical
 *                                addresses of locked pages, which only an endpoint in bypass reaches
 *
 * DEVICE is the engine's PCI address (0000:00:05.0), bound to vfio-pci for every test but bypass. Output
 * lines start with "DMAE_" and are key=value pairs, for scripts:
 *   DMAE_OPEN     the VFIO group and device were opened
 *   DMAE_ENGINE   how the engine is reached (bar=mmap|rw|sysfs, irq=msix|poll) and its identification
 *   DMAE_BUFFERS  the buffers of a step: IOVAs (or guest-physical addresses), size, VFIO maps each
 *   DMAE_COMMAND  the command register after this program changed it
 *   DMAE_OP       one operation and the engine's registers when it ended, with the time it took
 *   DMAE_CHECK    one expectation (check=engine: the registers; bytes: the buffers; irq: MSI-X vector 0
 *                 fired for the operation) and ok=0|1
 *   DMAE_RELEASED release: VFIO let go of the device
 *   DMAE_ERROR    a system call that failed
 *   DMAE_RESULT   test=NAME rc=0|1, always last: 0 when every check held
 * Exit status: the result's rc, or 2 on bad usage.
 */
#define _GNU_SOURCE
#define LINE_TAG "DMAE"
#include "vfio-common.h"

#include <linux/pci_regs.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

/* The engine's registers (docs/dma-engine.md), offsets in BAR0. */
#define REG_MAGIC 0x00
#define REG_VERSION 0x04
#define REG_SRC 0x08
#define REG_DST 0x10
#define REG_LENGTH 0x18
#define REG_PATTERN 0x20
#define REG_OP 0x28
#define REG_DOORBELL 0x2c
#define REG_STATUS 0x30
#define REG_ERROR 0x34
#define REG_FAULT_ADDRESS 0x38
#define REG_FAULT_REASON 0x40
#define REG_FAULT_FLAGS 0x44
#define REG_DONE_BYTES 0x48
#define REG_MISMATCH_OFFSET 0x50
#define REG_COMPLETED 0x58
#define REG_IRQ_ENABLE 0x60
#define REG_MAX_LENGTH 0x64

#define ENGINE_MAGIC 0x45414d44u /* "DMAE" */
#define ENGINE_VERSION 1u

#define OP_COPY 1u
#define OP_FILL 2u
#define OP_COMPARE 3u

#define STATUS_DONE (1u << 0)
#define STATUS_FAULT (1u << 1)
#define STATUS_MISMATCH (1u << 2)
#define STATUS_ERROR (1u << 3)
#define STATUS_ENDED_BADLY (STATUS_FAULT | STATUS_MISMATCH | STATUS_ERROR)

#define ERROR_NO_BUS_MASTER 3u

/* virtio-iommu fault reason and flags, as the engine reports them. */
#define FAULT_REASON_MAPPING 2u
#define FAULT_FLAG_READ (1u << 0)
#define FAULT_FLAG_WRITE (1u << 1)
#define FAULT_FLAG_ADDRESS (1u << 8)

/* Far from guest RAM and from the x86 MSI window, inside the 48-bit input range of every IOMMU here; an
 * identity domain finds no guest RAM there either (the lab's guests have less than 4 GiB). */
#define IOVA_SRC 0x100000000ULL
#define IOVA_DST 0x200000000ULL
#define FILL_PATTERN 0x0123456789abcdefULL
#define CANARY 0xa5
/* Generous under TCG: a 1 MiB translated copy is served by Python between the guest's two accesses. */
#define COMPLETION_TIMEOUT_MS 20000

struct engine {
	volatile uint8_t *registers; /* BAR0's register page when mapped, else NULL: */
	int bar_fd;		     /* pread/pwrite of the BAR at bar_offset of this fd */
	off_t bar_offset;
	int config_fd; /* PCI config space at config_offset of this fd (VFIO config region or sysfs) */
	off_t config_offset;
	int irq_fd; /* eventfd of MSI-X vector 0, or -1: completion by reading STATUS */
	int bus_master; /* as last written: an engine without it can signal no MSI either */
};

struct outcome {
	uint32_t status, error, fault_reason, fault_flags;
	uint64_t fault_address, done_bytes, mismatch_offset, completed, ns;
	const char *irq; /* fired, missed (no interrupt within the timeout) or off */
};

/* A DMA buffer: memory of this process, and the address the engine is given for it. */
struct buffer {
	uint8_t *bytes;
	uint64_t size;
	uint64_t address;
};

static const char *test_name = "none";
static int failures;

static void check(const char *step, const char *kind, int ok, const char *format, ...)
{
	va_list args;

	printf("DMAE_CHECK test=%s step=%s check=%s ok=%d ", test_name, step, kind, ok ? 1 : 0);
	va_start(args, format);
	vprintf(format, args);
	va_end(args);
	printf("\n");
	fflush(stdout);
	failures += !ok;
}

static int failed(const char *what)
{
	failures++;
	return fail(what);
}

/* -- the engine's registers and config space ------------------------------------------------------------ */

static uint32_t read32(const struct engine *engine, uint32_t offset)
{
	uint32_t value = ~0u; /* what a PCI read that fails returns */

	if (engine->registers)
		return *(volatile uint32_t *)(engine->registers + offset);
	if (pread(engine->bar_fd, &value, sizeof(value), engine->bar_offset + offset) != sizeof(value))
		failed("bar-read");
	return value;
}

static void write32(const struct engine *engine, uint32_t offset, uint32_t value)
{
	if (engine->registers)
		*(volatile uint32_t *)(engine->registers + offset) = value;
	else if (pwrite(engine->bar_fd, &value, sizeof(value), engine->bar_offset + offset) != sizeof(value))
		failed("bar-write");
}

/* 64-bit registers as two 4-byte halves, low half first: every way of reaching the BAR supports that. */
static uint64_t read64(const struct engine *engine, uint32_t offset)
{
	uint64_t low = read32(engine, offset);

	return low | (uint64_t)read32(engine, offset + 4) << 32;
}

static void write64(const struct engine *engine, uint32_t offset, uint64_t value)
{
	write32(engine, offset, (uint32_t)value);
	write32(engine, offset + 4, (uint32_t)(value >> 32));
}

/* Sets then clears bits of the command register (read-modify-write) and prints what it holds after. */
static int change_command(struct engine *engine, uint16_t set, uint16_t clear)
{
	off_t at = engine->config_offset + PCI_COMMAND;
	uint16_t command;

	if (pread(engine->config_fd, &command, sizeof(command), at) != sizeof(command))
		return failed("config-read");
	command = (uint16_t)((command | set) & ~clear);
	if (pwrite(engine->config_fd, &command, sizeof(command), at) != sizeof(command))
		return failed("config-write");
	if (pread(engine->config_fd, &command, sizeof(command), at) != sizeof(command))
		return failed("config-read");
	engine->bus_master = !!(command & PCI_COMMAND_MASTER);
	printf("DMAE_COMMAND test=%s command=0x%04x memory=%d bus_master=%d\n", test_name, command,
	       !!(command & PCI_COMMAND_MEMORY), engine->bus_master);
	fflush(stdout);
	return 0;
}

static int identify(const struct engine *engine, const char *device, const char *bar)
{
	uint32_t magic = read32(engine, REG_MAGIC), version = read32(engine, REG_VERSION);
	uint32_t max_length = read32(engine, REG_MAX_LENGTH);

	printf("DMAE_ENGINE test=%s device=%s bar=%s irq=%s magic=0x%08x version=%u max_length=%u\n", test_name,
	       device, bar, engine->irq_fd >= 0 ? "msix" : "poll", magic, version, max_length);
	fflush(stdout);
	if (magic != ENGINE_MAGIC || version != ENGINE_VERSION) {
		errno = ENODEV;
		return failed("not-the-dma-engine");
	}
	return 0;
}

/* -- reaching the engine: through VFIO, or through sysfs with no driver ---------------------------------- */

static int region_info(const struct vfio *vfio, uint32_t index, struct vfio_region_info *info)
{
	memset(info, 0, sizeof(*info));
	info->argsz = sizeof(*info);
	info->index = index;
	return ioctl(vfio->device, VFIO_DEVICE_GET_REGION_INFO, info);
}

/* MSI-X vector 0 signals an eventfd; -1 when the device or VFIO offers none (then STATUS is polled). */
static int msix_eventfd(const struct vfio *vfio)
{
	struct vfio_irq_info info = { .argsz = sizeof(info), .index = VFIO_PCI_MSIX_IRQ_INDEX };
	uint8_t storage[sizeof(struct vfio_irq_set) + sizeof(int32_t)] __attribute__((aligned(8)));
	struct vfio_irq_set *set = (struct vfio_irq_set *)storage;
	int32_t fd;

	if (ioctl(vfio->device, VFIO_DEVICE_GET_IRQ_INFO, &info) < 0 || info.count < 1 ||
	    !(info.flags & VFIO_IRQ_INFO_EVENTFD))
		return -1;
	fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (fd < 0)
		return -1;
	set->argsz = sizeof(storage);
	set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->index = VFIO_PCI_MSIX_IRQ_INDEX;
	set->start = 0;
	set->count = 1;
	memcpy(set->data, &fd, sizeof(fd));
	if (ioctl(vfio->device, VFIO_DEVICE_SET_IRQS, set) < 0) {
		fail("set-irqs-msix"); /* not a failed check: polling STATUS still tells when an operation ended */
		close(fd);
		return -1;
	}
	return fd;
}

static int engine_from_vfio(const char *device, struct vfio *vfio, struct engine *engine)
{
	struct vfio_region_info bar, config;
	void *mapped = MAP_FAILED;

	if (open_vfio(device, vfio)) {
		failures++;
		return 1;
	}
	if (region_info(vfio, VFIO_PCI_BAR0_REGION_INDEX, &bar) < 0)
		return failed("bar0-region-info");
	if (region_info(vfio, VFIO_PCI_CONFIG_REGION_INDEX, &config) < 0)
		return failed("config-region-info");
	if (bar.size < PAGE) {
		errno = ENODEV;
		return failed("bar0-too-small");
	}
	/* Only the register page: the MSI-X table that follows belongs to vfio-pci. */
	if (bar.flags & VFIO_REGION_INFO_FLAG_MMAP)
		mapped = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, vfio->device, (off_t)bar.offset);
	engine->registers = mapped == MAP_FAILED ? NULL : mapped;
	engine->bar_fd = vfio->device;
	engine->bar_offset = (off_t)bar.offset;
	engine->config_fd = vfio->device;
	engine->config_offset = (off_t)config.offset;
	engine->irq_fd = msix_eventfd(vfio);
	/* vfio-pci enabled memory decoding; DMA waits for the user to set Bus Master, as a driver does. */
	if (change_command(engine, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0))
		return 1;
	return identify(engine, device, engine->registers ? "mmap" : "rw");
}

/* The engine of a device bound to no driver: its config file and a mapping of its resource0 file. */
static int engine_from_sysfs(const char *device, struct engine *engine)
{
	char path[PATH_MAX + 64];
	void *mapped;
	int fd;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", device);
	if (access(path, F_OK) == 0) {
		errno = EBUSY;
		return failed("device-has-a-driver");
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", device);
	engine->config_fd = open(path, O_RDWR);
	if (engine->config_fd < 0)
		return failed("open-sysfs-config");
	engine->config_offset = 0;
	if (change_command(engine, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0))
		return 1;
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", device);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		return failed("open-sysfs-resource0");
	mapped = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mapped == MAP_FAILED)
		return failed("mmap-sysfs-resource0");
	engine->registers = mapped;
	engine->bar_fd = fd;
	engine->bar_offset = 0;
	engine->irq_fd = -1; /* no driver, no interrupt: STATUS tells */
	return identify(engine, device, "sysfs");
}

/* Every reference to the device VFIO holds goes: the interrupt, the BAR mapping, the device, its group and
 * the container (VFIO then detaches the group from its domain and unmaps everything). */
static void close_vfio(struct vfio *vfio, struct engine *engine)
{
	if (engine->registers)
		munmap((void *)engine->registers, PAGE);
	if (engine->irq_fd >= 0)
		close(engine->irq_fd);
	close(vfio->device);
	close(vfio->group);
	close(vfio->container);
	memset(engine, 0, sizeof(*engine));
	engine->irq_fd = -1;
	printf("DMAE_RELEASED test=%s\n", test_name);
	fflush(stdout);
}

/* -- one operation --------------------------------------------------------------------------------------- */

static const char *op_name(uint32_t op)
{
	return op == OP_COPY ? "copy" : op == OP_FILL ? "fill" : op == OP_COMPARE ? "compare" : "other";
}

/* Waits up to the timeout for vector 0: 1 when it fired. */
static int wait_irq(int fd)
{
	struct pollfd ready = { .fd = fd, .events = POLLIN };
	uint64_t count;

	if (poll(&ready, 1, COMPLETION_TIMEOUT_MS) != 1)
		return 0;
	return read(fd, &count, sizeof(count)) == sizeof(count);
}

/* Runs one operation and prints its DMAE_OP line. The engine answers a read only after every earlier
 * write was served, so STATUS is normally set at the first read; the loop bounds a device that is late. */
static struct outcome run(const struct engine *engine, const char *step, uint32_t op, uint64_t src, uint64_t dst,
			  uint64_t length, uint64_t pattern)
{
	struct outcome out = { .irq = "off" };
	int with_irq = engine->irq_fd >= 0 && engine->bus_master;
	uint64_t start, deadline, stale;

	write64(engine, REG_SRC, src);
	write64(engine, REG_DST, dst);
	write64(engine, REG_LENGTH, length);
	write64(engine, REG_PATTERN, pattern);
	write32(engine, REG_OP, op);
	write32(engine, REG_IRQ_ENABLE, with_irq ? 1u : 0u);
	if (with_irq && read(engine->irq_fd, &stale, sizeof(stale)) < 0 && errno != EAGAIN)
		failed("irq-drain");
	start = now_ns();
	write32(engine, REG_DOORBELL, 1);
	if (with_irq)
		out.irq = wait_irq(engine->irq_fd) ? "fired" : "missed";
	deadline = now_ns() + COMPLETION_TIMEOUT_MS * 1000000ULL;
	while ((out.status = read32(engine, REG_STATUS)) == 0 && now_ns() < deadline)
		sched_yield();
	out.ns = now_ns() - start;
	out.error = read32(engine, REG_ERROR);
	out.fault_address = read64(engine, REG_FAULT_ADDRESS);
	out.fault_reason = read32(engine, REG_FAULT_REASON);
	out.fault_flags = read32(engine, REG_FAULT_FLAGS);
	out.done_bytes = read64(engine, REG_DONE_BYTES);
	out.mismatch_offset = read64(engine, REG_MISMATCH_OFFSET);
	out.completed = read64(engine, REG_COMPLETED);
	printf("DMAE_OP test=%s step=%s op=%s src=0x%llx dst=0x%llx length=%llu status=0x%x error=%u "
	       "fault_reason=%u fault_flags=0x%x fault_address=0x%llx done_bytes=%llu mismatch_offset=%llu "
	       "completed=%llu irq=%s ns=%llu\n",
	       test_name, step, op_name(op), (unsigned long long)src, (unsigned long long)dst,
	       (unsigned long long)length, out.status, out.error, out.fault_reason, out.fault_flags,
	       (unsigned long long)out.fault_address, (unsigned long long)out.done_bytes,
	       (unsigned long long)out.mismatch_offset, (unsigned long long)out.completed, out.irq,
	       (unsigned long long)out.ns);
	fflush(stdout);
	if (with_irq)
		check(step, "irq", !strcmp(out.irq, "fired"), "want=\"MSI-X vector 0 within %d ms\"",
		      COMPLETION_TIMEOUT_MS);
	return out;
}

/* What the registers must say. DONE is not asked of a fault, a mismatch or an error: it ends them too. */

static void expect_done(const char *step, const struct outcome *out, uint64_t length)
{
	check(step, "engine",
	      (out->status & STATUS_DONE) && !(out->status & STATUS_ENDED_BADLY) && out->done_bytes == length,
	      "want=\"DONE done_bytes=%llu\"", (unsigned long long)length);
}

static void expect_fault(const char *step, const struct outcome *out, uint32_t access, uint64_t address,
			 uint64_t done_bytes)
{
	uint32_t flags = access | FAULT_FLAG_ADDRESS;

	check(step, "engine",
	      (out->status & STATUS_FAULT) && !(out->status & STATUS_ERROR) &&
		      out->fault_reason == FAULT_REASON_MAPPING && out->fault_flags == flags &&
		      out->fault_address == address && out->done_bytes == done_bytes,
	      "want=\"FAULT reason=%u flags=0x%x address=0x%llx done_bytes=%llu\"", FAULT_REASON_MAPPING, flags,
	      (unsigned long long)address, (unsigned long long)done_bytes);
}

static void expect_error(const char *step, const struct outcome *out, uint32_t error)
{
	check(step, "engine", (out->status & STATUS_ERROR) && out->error == error && out->done_bytes == 0,
	      "want=\"ERROR error=%u done_bytes=0\"", error);
}

static void expect_mismatch(const char *step, const struct outcome *out, uint64_t offset)
{
	check(step, "engine",
	      (out->status & STATUS_MISMATCH) && !(out->status & (STATUS_FAULT | STATUS_ERROR)) &&
		      out->mismatch_offset == offset,
	      "want=\"MISMATCH mismatch_offset=%llu\"", (unsigned long long)offset);
}

/* -- buffers and their bytes ----------------------------------------------------------------------------- */

/* Bytes that differ from page to page, so a page copied to the wrong place shows. */
static uint8_t pattern_byte(uint64_t offset)
{
	return (uint8_t)(offset * 7 + (offset / PAGE) * 31 + 1);
}

static int new_buffer(struct buffer *buffer, uint64_t size, uint64_t address)
{
	void *bytes = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (bytes == MAP_FAILED)
		return failed("alloc");
	/* Separate small pages: a multi-page operation crosses pages that are not contiguous. */
	madvise(bytes, size, MADV_NOHUGEPAGE);
	buffer->bytes = bytes;
	buffer->size = size;
	buffer->address = address;
	return 0;
}

static void free_buffer(struct buffer *buffer)
{
	munmap(buffer->bytes, buffer->size);
}

static void fill_pattern(struct buffer *buffer)
{
	uint64_t i;

	for (i = 0; i < buffer->size; i++)
		buffer->bytes[i] = pattern_byte(i);
}

/* The first offset in [from, to) where the buffer does not hold the pattern (with_pattern) or the canary,
 * or `to` when there is none. */
static uint64_t first_unexpected(const struct buffer *buffer, uint64_t from, uint64_t to, int with_pattern)
{
	uint64_t i;

	for (i = from; i < to; i++)
		if (buffer->bytes[i] != (with_pattern ? pattern_byte(i) : CANARY))
			return i;
	return to;
}

static void expect_copied(const char *step, const struct buffer *dst, uint64_t from, uint64_t to)
{
	uint64_t at = first_unexpected(dst, from, to, 1);

	check(step, "bytes", at == to, "want=\"copied 0x%llx-0x%llx\" first_wrong=%lld", (unsigned long long)from,
	      (unsigned long long)to, at == to ? -1LL : (long long)at);
}

static void expect_untouched(const char *step, const struct buffer *dst, uint64_t from, uint64_t to)
{
	uint64_t at = first_unexpected(dst, from, to, 0);

	check(step, "bytes", at == to, "want=\"canary 0x%llx-0x%llx\" first_wrong=%lld", (unsigned long long)from,
	      (unsigned long long)to, at == to ? -1LL : (long long)at);
}

static void expect_filled(const char *step, const struct buffer *dst, uint64_t pattern)
{
	uint64_t i;

	for (i = 0; i < dst->size; i++)
		if (dst->bytes[i] != (uint8_t)(pattern >> (8 * (i % 8))))
			break;
	check(step, "bytes", i == dst->size, "want=\"pattern 0x%016llx repeated\" first_wrong=%lld",
	      (unsigned long long)pattern, i == dst->size ? -1LL : (long long)i);
}

/* One VFIO map over the buffer, or one per 4 KiB page of it. */
static int map_buffer(const struct vfio *vfio, const struct buffer *buffer, uint32_t flags, int per_page)
{
	uint64_t chunk = per_page ? PAGE : buffer->size, offset;

	for (offset = 0; offset < buffer->size; offset += chunk)
		if (map_dma(vfio->container, (uintptr_t)(buffer->bytes + offset), buffer->address + offset, chunk,
			    flags) < 0)
			return failed("map-dma");
	return 0;
}

/* Unmaps bytes [from, to) of the buffer: whole VFIO maps only (type1 v2 splits none). */
static int unmap_buffer(const struct vfio *vfio, const struct buffer *buffer, uint64_t from, uint64_t to)
{
	if (unmap_dma(vfio->container, buffer->address + from, to - from) != (int64_t)(to - from))
		return failed("unmap-dma");
	return 0;
}

static void print_buffers(const struct buffer *src, const struct buffer *dst, const char *maps)
{
	printf("DMAE_BUFFERS test=%s src=0x%llx dst=0x%llx size=%llu maps=%s\n", test_name,
	       (unsigned long long)src->address, (unsigned long long)dst->address, (unsigned long long)src->size,
	       maps);
	fflush(stdout);
}

#define RW (VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)

/* src (pattern) and dst (canary) of size bytes at IOVA_SRC and IOVA_DST, mapped with these flags. */
static int mapped_pair(const struct vfio *vfio, struct buffer *src, struct buffer *dst, uint64_t size,
		       uint32_t src_flags, uint32_t dst_flags, int per_page)
{
	if (new_buffer(src, size, IOVA_SRC) || new_buffer(dst, size, IOVA_DST))
		return 1;
	fill_pattern(src);
	memset(dst->bytes, CANARY, size);
	if (map_buffer(vfio, src, src_flags, per_page) || map_buffer(vfio, dst, dst_flags, per_page))
		return 1;
	print_buffers(src, dst, per_page ? "page" : "one");
	return 0;
}

static int unmap_pair(const struct vfio *vfio, struct buffer *src, struct buffer *dst)
{
	int rc = unmap_buffer(vfio, src, 0, src->size) | unmap_buffer(vfio, dst, 0, dst->size);

	free_buffer(src);
	free_buffer(dst);
	return rc;
}

/* -- the tests ------------------------------------------------------------------------------------------- */

static int test_copy(const struct vfio *vfio, const struct engine *engine)
{
	static const struct {
		uint64_t size;
		int per_page;
	} cases[] = { { 4096, 0 }, { 65536, 0 }, { 1 << 20, 1 } };
	unsigned i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t size = cases[i].size, differing = size / 2 + 3;
		struct buffer src, dst;
		struct outcome out;
		char step[48];

		if (mapped_pair(vfio, &src, &dst, size, RW, RW, cases[i].per_page))
			return 1;
		snprintf(step, sizeof(step), "copy-%llu", (unsigned long long)size);
		out = run(engine, step, OP_COPY, src.address, dst.address, size, 0);
		expect_done(step, &out, size);
		expect_copied(step, &dst, 0, size);

		snprintf(step, sizeof(step), "fill-%llu", (unsigned long long)size);
		out = run(engine, step, OP_FILL, 0, dst.address, size, FILL_PATTERN);
		expect_done(step, &out, size);
		expect_filled(step, &dst, FILL_PATTERN);

		memcpy(dst.bytes, src.bytes, size);
		snprintf(step, sizeof(step), "compare-equal-%llu", (unsigned long long)size);
		out = run(engine, step, OP_COMPARE, src.address, dst.address, size, 0);
		expect_done(step, &out, size);

		dst.bytes[differing] ^= 0xff;
		snprintf(step, sizeof(step), "compare-differing-%llu", (unsigned long long)size);
		out = run(engine, step, OP_COMPARE, src.address, dst.address, size, 0);
		expect_mismatch(step, &out, differing);

		if (unmap_pair(vfio, &src, &dst))
			return 1;
	}
	return 0;
}

static int test_uaf(const struct vfio *vfio, const struct engine *engine)
{
	const uint64_t size = 4 * PAGE;
	struct buffer src, dst;
	struct outcome out;

	/* The destination in one map per page, so that its pages after the first can be unmapped alone. */
	if (mapped_pair(vfio, &src, &dst, size, RW, RW, 1))
		return 1;
	out = run(engine, "copy-while-mapped", OP_COPY, src.address, dst.address, size, 0);
	expect_done("copy-while-mapped", &out, size);
	expect_copied("copy-while-mapped", &dst, 0, size);

	/* The whole destination unmapped: the first destination chunk faults, nothing is written. */
	memset(dst.bytes, CANARY, size);
	if (unmap_buffer(vfio, &dst, 0, size))
		return 1;
	out = run(engine, "copy-after-unmap", OP_COPY, src.address, dst.address, size, 0);
	expect_fault("copy-after-unmap", &out, FAULT_FLAG_WRITE, dst.address, 0);
	expect_untouched("copy-after-unmap", &dst, 0, size);

	/* Only its first page mapped again: that page is written, nothing from the fault on. */
	if (map_buffer(vfio, &dst, RW, 1) || unmap_buffer(vfio, &dst, PAGE, size))
		return 1;
	out = run(engine, "copy-after-partial-unmap", OP_COPY, src.address, dst.address, size, 0);
	expect_fault("copy-after-partial-unmap", &out, FAULT_FLAG_WRITE, dst.address + PAGE, PAGE);
	expect_copied("copy-after-partial-unmap", &dst, 0, PAGE);
	expect_untouched("copy-after-partial-unmap", &dst, PAGE, size);

	if (unmap_buffer(vfio, &dst, 0, PAGE) || unmap_buffer(vfio, &src, 0, size))
		return 1;
	free_buffer(&src);
	free_buffer(&dst);
	return 0;
}

static int test_readonly(const struct vfio *vfio, const struct engine *engine)
{
	const uint64_t size = 2 * PAGE;
	struct buffer src, dst;
	struct outcome out;

	if (mapped_pair(vfio, &src, &dst, size, RW, VFIO_DMA_MAP_FLAG_READ, 0))
		return 1;
	out = run(engine, "copy-into-readonly", OP_COPY, src.address, dst.address, size, 0);
	expect_fault("copy-into-readonly", &out, FAULT_FLAG_WRITE, dst.address, 0);
	expect_untouched("copy-into-readonly", &dst, 0, size);
	if (unmap_pair(vfio, &src, &dst))
		return 1;

	if (mapped_pair(vfio, &src, &dst, size, VFIO_DMA_MAP_FLAG_READ, RW, 0))
		return 1;
	out = run(engine, "copy-from-readonly", OP_COPY, src.address, dst.address, size, 0);
	expect_done("copy-from-readonly", &out, size);
	expect_copied("copy-from-readonly", &dst, 0, size);
	return unmap_pair(vfio, &src, &dst);
}

static int test_busmaster(const struct vfio *vfio, struct engine *engine)
{
	const uint64_t size = 2 * PAGE;
	struct buffer src, dst;
	struct outcome out;

	if (mapped_pair(vfio, &src, &dst, size, RW, RW, 0))
		return 1;
	if (change_command(engine, 0, PCI_COMMAND_MASTER))
		return 1;
	out = run(engine, "copy-without-bus-master", OP_COPY, src.address, dst.address, size, 0);
	expect_error("copy-without-bus-master", &out, ERROR_NO_BUS_MASTER);
	expect_untouched("copy-without-bus-master", &dst, 0, size);
	if (change_command(engine, PCI_COMMAND_MASTER, 0))
		return 1;
	out = run(engine, "copy-with-bus-master", OP_COPY, src.address, dst.address, size, 0);
	expect_done("copy-with-bus-master", &out, size);
	expect_copied("copy-with-bus-master", &dst, 0, size);
	return unmap_pair(vfio, &src, &dst);
}

/* After VFIO let the device go, nothing the engine is told may reach the buffers VFIO had mapped: the
 * endpoint is back in its default domain (no mapping at the old IOVAs: a fault) or an identity one (no
 * guest RAM there: an error). Whichever, the old buffers keep their bytes and no operation is DONE. */
static void expect_blocked(const char *step, const struct outcome *out, const struct buffer *dst)
{
	check(step, "engine", out->status != 0 && (out->status & (STATUS_FAULT | STATUS_ERROR)),
	      "want=\"FAULT or ERROR\"");
	expect_untouched(step, dst, 0, dst->size);
}

static int test_release(const char *device, struct vfio *vfio, struct engine *engine)
{
	const uint64_t size = 2 * PAGE;
	char path[PATH_MAX + 64];
	struct buffer src, dst;
	struct outcome out;
	int fd;

	if (mapped_pair(vfio, &src, &dst, size, RW, RW, 0))
		return 1;
	out = run(engine, "copy-before-release", OP_COPY, src.address, dst.address, size, 0);
	expect_done("copy-before-release", &out, size);
	expect_copied("copy-before-release", &dst, 0, size);
	memset(dst.bytes, CANARY, size);
	/* The buffers stay in this process (VFIO only unpins them), so a stale translation would show here. */
	close_vfio(vfio, engine);

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", device);
	fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, device, strlen(device)) != (ssize_t)strlen(device))
		return failed("unbind-vfio-pci");
	close(fd);
	if (engine_from_sysfs(device, engine))
		return 1;
	out = run(engine, "copy-after-release", OP_COPY, src.address, dst.address, size, 0);
	expect_blocked("copy-after-release", &out, &dst);
	out = run(engine, "fill-after-release", OP_FILL, 0, dst.address, size, FILL_PATTERN);
	expect_blocked("fill-after-release", &out, &dst);
	return 0;
}

/* Locked pages and their guest-physical addresses: the addresses a bypassing endpoint is given. */
static int physical_pages(struct buffer *pages, unsigned count)
{
	int pagemap = open("/proc/self/pagemap", O_RDONLY);
	unsigned i;

	if (pagemap < 0)
		return failed("open-pagemap");
	for (i = 0; i < count; i++) {
		uint64_t frame;

		if (new_buffer(&pages[i], PAGE, 0))
			return 1;
		if (mlock(pages[i].bytes, PAGE) < 0)
			return failed("mlock");
		frame = page_frame(pagemap, pages[i].bytes);
		if (!frame) {
			errno = EPERM;
			return failed("pagemap-frame");
		}
		pages[i].address = frame * PAGE;
	}
	close(pagemap);
	return 0;
}

static int test_bypass(const char *device, struct engine *engine)
{
	enum { PAGES = 4 };
	struct buffer src[PAGES], dst[PAGES];
	struct outcome out;
	char step[32];
	unsigned i;

	if (engine_from_sysfs(device, engine) || physical_pages(src, PAGES) || physical_pages(dst, PAGES))
		return 1;
	for (i = 0; i < PAGES; i++) {
		fill_pattern(&src[i]);
		memset(dst[i].bytes, CANARY, PAGE);
		print_buffers(&src[i], &dst[i], "none");
		snprintf(step, sizeof(step), "copy-page-%u", i);
		out = run(engine, step, OP_COPY, src[i].address, dst[i].address, PAGE, 0);
		expect_done(step, &out, PAGE);
		expect_copied(step, &dst[i], 0, PAGE);
	}
	out = run(engine, "fill-page", OP_FILL, 0, dst[0].address, PAGE, FILL_PATTERN);
	expect_done("fill-page", &out, PAGE);
	expect_filled("fill-page", &dst[0], FILL_PATTERN);
	return 0;
}

static int run_test(const char *device, const char *test)
{
	struct vfio vfio = { -1, -1, -1 };
	struct engine engine = { .irq_fd = -1 };

	if (!strcmp(test, "bypass"))
		return test_bypass(device, &engine);
	if (engine_from_vfio(device, &vfio, &engine))
		return 1;
	if (!strcmp(test, "copy"))
		return test_copy(&vfio, &engine);
	if (!strcmp(test, "uaf"))
		return test_uaf(&vfio, &engine);
	if (!strcmp(test, "readonly"))
		return test_readonly(&vfio, &engine);
	if (!strcmp(test, "busmaster"))
		return test_busmaster(&vfio, &engine);
	return test_release(device, &vfio, &engine);
}

int main(int argc, char **argv)
{
	static const char *const tests[] = { "copy", "uaf", "readonly", "busmaster", "release", "bypass" };
	unsigned i;

	for (i = 0; argc == 3 && i < sizeof(tests) / sizeof(tests[0]); i++)
		if (!strcmp(argv[2], tests[i]))
			break;
	if (argc != 3 || i == sizeof(tests) / sizeof(tests[0])) {
		fprintf(stderr, "usage: dma-engine DEVICE copy|uaf|readonly|busmaster|release|bypass\n");
		return 2;
	}
	test_name = tests[i];
	/* A test that stops early (a failed system call) has printed why. */
	if (run_test(argv[1], test_name) && !failures)
		failures = 1;
	printf("DMAE_RESULT test=%s rc=%d\n", test_name, failures ? 1 : 0);
	fflush(stdout);
	return failures ? 1 : 0;
}

/* blk-bench: block I/O timing of a virtio-blk disk in the test guest (scripts/bench-blk).
 *
 *   blk-bench DEVICE WORKLOAD DEPTH SECONDS
 *
 * WORKLOAD is randread4k (4 KiB reads at random 4 KiB-aligned offsets), seqread1m or seqwrite1m (1 MiB
 * transfers in order, wrapping at the disk's end). DEPTH threads each keep one O_DIRECT request in flight
 * (DEPTH 1 is queue depth 1; DEPTH 16 keeps the virtqueue 16 deep). Each thread runs until SECONDS have
 * passed since the start. One line on stdout:
 *
 *   BLK_BENCH workload=W depth=D ops=N bytes=B ns=T iops=I mbps=M lat_ns=L errors=E
 *
 * lat_ns is the mean time of one request as its thread saw it. The writes destroy the disk's contents.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 64

enum workload { RANDREAD4K, SEQREAD1M, SEQWRITE1M };

struct shared {
	int fd;
	enum workload workload;
	uint64_t disk_bytes;
	uint64_t deadline_ns;
	unsigned depth;
};

struct worker {
	pthread_t thread;
	const struct shared *shared;
	unsigned index;
	uint64_t ops, bytes, busy_ns, errors;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: a per-thread stream of offsets, the same on every run. */
static uint64_t next_random(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static void *run(void *argument)
{
	struct worker *worker = argument;
	const struct shared *shared = worker->shared;
	size_t size = shared->workload == RANDREAD4K ? 4096 : 1 << 20;
	uint64_t blocks = shared->disk_bytes / size;
	/* Sequential threads start evenly spread over the disk, so that they do not read the same blocks. */
	uint64_t block = blocks * worker->index / shared->depth;
	uint64_t random = 0x9E3779B97F4A7C15ULL * (worker->index + 1);
	void *buffer;

	if (posix_memalign(&buffer, 4096, size)) {
		worker->errors++;
		return NULL;
	}
	memset(buffer, 0x5A, size);
	while (now_ns() < shared->deadline_ns) {
		off_t offset;
		ssize_t done;
		uint64_t began;

		if (shared->workload == RANDREAD4K)
			block = next_random(&random) % blocks;
		else
			block = (block + 1) % blocks;
		offset = (off_t)(block * size);
		began = now_ns();
		if (shared->workload == SEQWRITE1M)
			done = pwrite(shared->fd, buffer, size, offset);
		else
			done = pread(shared->fd, buffer, size, offset);
		worker->busy_ns += now_ns() - began;
		if (done != (ssize_t)size) {
			worker->errors++;
			continue;
		}
		worker->ops++;
		worker->bytes += size;
	}
	free(buffer);
	return NULL;
}

int main(int argc, char **argv)
{
	static struct worker workers[MAX_DEPTH];
	struct shared shared;
	struct stat status;
	uint64_t ops = 0, bytes = 0, busy = 0, errors = 0, began, elapsed;
	unsigned seconds, i;
	int writing;

	if (argc != 5) {
		fprintf(stderr, "usage: blk-bench DEVICE randread4k|seqread1m|seqwrite1m DEPTH SECONDS\n");
		return 2;
	}
	if (!strcmp(argv[2], "randread4k"))
		shared.workload = RANDREAD4K;
	else if (!strcmp(argv[2], "seqread1m"))
		shared.workload = SEQREAD1M;
	else if (!strcmp(argv[2], "seqwrite1m"))
		shared.workload = SEQWRITE1M;
	else {
		fprintf(stderr, "blk-bench: unknown workload %s\n", argv[2]);
		return 2;
	}
	shared.depth = (unsigned)strtoul(argv[3], NULL, 0);
	seconds = (unsigned)strtoul(argv[4], NULL, 0);
	if (shared.depth < 1 || shared.depth > MAX_DEPTH || seconds < 1) {
		fprintf(stderr, "blk-bench: DEPTH is 1..%d and SECONDS at least 1\n", MAX_DEPTH);
		return 2;
	}
	writing = shared.workload == SEQWRITE1M;
	shared.fd = open(argv[1], (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (shared.fd < 0) {
		fprintf(stderr, "blk-bench: open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	if (fstat(shared.fd, &status) == 0 && S_ISREG(status.st_mode))
		shared.disk_bytes = (uint64_t)status.st_size; /* a file: for trying the program on a host */
	else if (ioctl(shared.fd, BLKGETSIZE64, &shared.disk_bytes))
		shared.disk_bytes = 0;
	if (shared.disk_bytes < (1 << 20) * (uint64_t)shared.depth) {
		fprintf(stderr, "blk-bench: %s: no size, or smaller than 1 MiB per thread\n", argv[1]);
		return 1;
	}
	began = now_ns();
	shared.deadline_ns = began + (uint64_t)seconds * 1000000000u;
	for (i = 0; i < shared.depth; i++) {
		workers[i].shared = &shared;
		workers[i].index = i;
		if (pthread_create(&workers[i].thread, NULL, run, &workers[i])) {
			fprintf(stderr, "blk-bench: pthread_create failed\n");
			return 1;
		}
	}
	for (i = 0; i < shared.depth; i++) {
		pthread_join(workers[i].thread, NULL);
		ops += workers[i].ops;
		bytes += workers[i].bytes;
		busy += workers[i].busy_ns;
		errors += workers[i].errors;
	}
	elapsed = now_ns() - began;
	if (writing && fsync(shared.fd))
		errors++;
	close(shared.fd);
	printf("BLK_BENCH workload=%s depth=%u ops=%llu bytes=%llu ns=%llu iops=%.0f mbps=%.1f lat_ns=%llu "
	       "errors=%llu\n",
	       argv[2], shared.depth, (unsigned long long)ops, (unsigned long long)bytes,
	       (unsigned long long)elapsed, ops * 1e9 / (double)elapsed, bytes * 1e3 / (double)elapsed,
	       (unsigned long long)(ops ? busy / ops : 0), (unsigned long long)errors);
	return errors ? 1 : 0;
}

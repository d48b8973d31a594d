/*
 * guest/dma-engine.c's judging of the engine, on the host: the program's own run() and checks against a
 * page of memory standing for BAR0, preset with what the engine would report after an operation (run()
 * writes only the registers the driver writes, so the preset ones stay). Prints the program's real lines.
 */
#define main dma_engine_main
#include "dma-engine.c"
#undef main

static uint8_t bar0[PAGE] __attribute__((aligned(PAGE)));

static void preset(uint32_t status, uint32_t error, uint32_t reason, uint32_t flags, uint64_t address,
		   uint64_t done_bytes)
{
	memset(bar0, 0, sizeof(bar0));
	memcpy(bar0 + REG_STATUS, &status, 4);
	memcpy(bar0 + REG_ERROR, &error, 4);
	memcpy(bar0 + REG_FAULT_REASON, &reason, 4);
	memcpy(bar0 + REG_FAULT_FLAGS, &flags, 4);
	memcpy(bar0 + REG_FAULT_ADDRESS, &address, 8);
	memcpy(bar0 + REG_DONE_BYTES, &done_bytes, 8);
}

static void result(void)
{
	printf("DMAE_RESULT test=%s rc=%d\n", test_name, failures ? 1 : 0);
	failures = 0;
}

int main(void)
{
	struct engine engine = { .registers = bar0, .irq_fd = -1 };
	struct buffer dst;
	struct outcome out;

	test_name = "uaf";
	if (new_buffer(&dst, 2 * PAGE, IOVA_DST))
		return 1;
	/* The fault of a use after unmap: the destination's first byte, nothing done. */
	preset(STATUS_DONE | STATUS_FAULT, 0, FAULT_REASON_MAPPING, FAULT_FLAG_WRITE | FAULT_FLAG_ADDRESS, IOVA_DST, 0);
	out = run(&engine, "copy-after-unmap", OP_COPY, IOVA_SRC, IOVA_DST, 2 * PAGE, 0);
	expect_fault("copy-after-unmap", &out, FAULT_FLAG_WRITE, IOVA_DST, 0);
	memset(dst.bytes, CANARY, dst.size);
	expect_untouched("copy-after-unmap", &dst, 0, dst.size);
	/* The same fault where one page should have been done, and one byte the engine should not have
	 * written: both checks fail. */
	expect_fault("copy-after-partial-unmap", &out, FAULT_FLAG_WRITE, IOVA_DST + PAGE, PAGE);
	dst.bytes[PAGE + 4] = 0;
	expect_untouched("copy-after-partial-unmap", &dst, PAGE, dst.size);
	result();

	test_name = "busmaster";
	preset(STATUS_DONE | STATUS_ERROR, ERROR_NO_BUS_MASTER, 0, 0, 0, 0);
	out = run(&engine, "copy-without-bus-master", OP_COPY, IOVA_SRC, IOVA_DST, 2 * PAGE, 0);
	expect_error("copy-without-bus-master", &out, ERROR_NO_BUS_MASTER);
	preset(STATUS_DONE, 0, 0, 0, 0, 2 * PAGE);
	out = run(&engine, "copy-with-bus-master", OP_COPY, IOVA_SRC, IOVA_DST, 2 * PAGE, 0);
	expect_done("copy-with-bus-master", &out, 2 * PAGE);
	fill_pattern(&dst);
	expect_copied("copy-with-bus-master", &dst, 0, dst.size);
	result();

	test_name = "copy";
	/* A COMPARE that found a difference, and one where DONE is set beside MISMATCH: not a success. */
	preset(STATUS_DONE | STATUS_MISMATCH, 0, 0, 0, 0, 0);
	memcpy(bar0 + REG_MISMATCH_OFFSET, &(uint64_t){ 2051 }, 8);
	out = run(&engine, "compare-differing-4096", OP_COMPARE, IOVA_SRC, IOVA_DST, PAGE, 0);
	expect_mismatch("compare-differing-4096", &out, 2051);
	expect_done("compare-differing-4096", &out, PAGE);
	result();
	return 0;
}

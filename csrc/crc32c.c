/*
 * crc32c (Castagnoli), as thin-provisioning-tools and the kernel use for
 * metadata.  The SSE4.2 instruction when the CPU has it, else a table.
 */
#include <string.h>

#include "cowblock.h"

static uint32_t table[256];
static int have_hw = -1;

static void init_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        table[i] = c;
    }
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t cb_crc32c(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    if (have_hw < 0) {
        init_table();
#if defined(__x86_64__)
        __builtin_cpu_init();
        have_hw = __builtin_cpu_supports("sse4.2");
#else
        have_hw = 0;
#endif
    }
    crc = ~crc;
#if defined(__x86_64__)
    if (have_hw)
        return ~crc_hw(crc, p, len);
#endif
    while (len--)
        crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

uint32_t cb_block_csum(const void *block, uint32_t type)
{
    return cb_crc32c(0, (const uint8_t *)block + 4, CB_META_BLOCK_SIZE - 4) ^ type;
}

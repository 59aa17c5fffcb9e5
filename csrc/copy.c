/*
 * Copying a read's data out of the data file's mapping.
 *
 * glibc's memcpy copies 2 KiB .. 512 KiB with `rep movsb` on this AMD EPYC
 * (its rep_movsb_threshold .. rep_movsb_stop_threshold), and `rep movsb`
 * here runs at 0.9-2.3 GB/s when the destination is not 64-byte aligned
 * relative to the source (a Python bytearray's buffer starts 16 bytes into
 * its page; NBD and FUSE buffers sit behind headers), against 6-9 GB/s for
 * its vector loop, which it uses for one copy of 1 MiB or more.  So a read
 * whose 1 MiB comes in one piece (a device's own blocks, adjacent in the
 * data file) ran twice as fast as one split into pieces by a snapshot's
 * rewritten block: 1 MiB reads at snapshot depth 128 with divergence ran at
 * 0.77 of the base's throughput.  A vector loop with aligned stores copies
 * every piece at the speed of the whole (benchmarks/compare.py, the depth
 * target).
 */
#include <stdint.h>
#include <string.h>

#include "cowblock.h"

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2"))) static void copy_avx2(uint8_t *dst, const uint8_t *src,
                                                      size_t len)
{
    size_t head = (32 - ((uintptr_t)dst & 31)) & 31;     /* align the stores */
    if (head > len)
        head = len;
    memcpy(dst, src, head);
    dst += head, src += head, len -= head;
    size_t i = 0;
    for (; i + 128 <= len; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(src + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(src + i + 96));
        _mm256_store_si256((__m256i *)(dst + i), a);
        _mm256_store_si256((__m256i *)(dst + i + 32), b);
        _mm256_store_si256((__m256i *)(dst + i + 64), c);
        _mm256_store_si256((__m256i *)(dst + i + 96), d);
    }
    memcpy(dst + i, src + i, len - i);
}
#endif

/* Pieces below this are memcpy's to copy (below its rep movsb range). */
enum { VECTOR_MIN = 2048 };

void cb_copy_out(void *dst, const void *src, size_t len)
{
#if defined(__x86_64__)
    static int have_avx2 = -1;
    if (have_avx2 < 0)
        have_avx2 = __builtin_cpu_supports("avx2");
    if (have_avx2 && len >= VECTOR_MIN && (((uintptr_t)dst - (uintptr_t)src) & 63)) {
        copy_avx2(dst, src, len);
        return;
    }
#endif
    memcpy(dst, src, len);
}

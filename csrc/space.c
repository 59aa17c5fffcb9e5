/*
 * Writes that find the pool full: the one rule the NBD loop and the FUSE
 * device files share (api.h, cb_space_retry).
 *
 * First the low-water hook (dm-thin's low-water event): the waiter blocks
 * while the hook grows the pool, up to the hook's timeout, and the write is
 * tried once more.  The waiter runs Python code on this thread, which may
 * overwrite the thread's last error, so the write is always tried again
 * after it: the error a failed write reports is then the retry's own.
 * Then --on-full wait=S: retried every 100 ms for S seconds, for whoever
 * grows the pool by hand.
 */
#include <errno.h>
#include <time.h>

#include "cowblock.h"

#define RETRY_EVERY_MS 100

int cb_space_retry(int r, int attempt, cb_space_wait_fn wait, void *ctx, uint32_t wait_ms)
{
    if (r != -ENOSPC)
        return 0;
    if (wait && attempt == 0) {
        wait(ctx);
        return 1;
    }
    int polled = attempt - (wait ? 1 : 0);
    if ((uint64_t)polled * RETRY_EVERY_MS >= wait_ms)
        return 0;
    struct timespec ts = {0, RETRY_EVERY_MS * 1000 * 1000};
    nanosleep(&ts, NULL);
    return 1;
}

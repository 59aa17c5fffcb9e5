/*
 * Shared by the libFuzzer harnesses: a scratch directory on tmpfs for the
 * pools they fuzz, removed at exit.
 */
#ifndef COWBLOCK_FUZZ_COMMON_H
#define COWBLOCK_FUZZ_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowblock.h"

static char fuzz_dir[256];

static void fuzz_die(const char *what)
{
    perror(what);
    abort();
}

static void fuzz_remove_dir(void)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fuzz_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", fuzz_dir);
}

/* A fresh directory for this process's pools (tmpfs when there is one). */
static const char *fuzz_scratch(void)
{
    if (!fuzz_dir[0]) {
        const char *base = getenv("COWBLOCK_FUZZ_TMP");
        snprintf(fuzz_dir, sizeof fuzz_dir, "%s/cowblock-fuzz-XXXXXX", base ? base : "/dev/shm");
        if (!mkdtemp(fuzz_dir)) {
            snprintf(fuzz_dir, sizeof fuzz_dir, "/tmp/cowblock-fuzz-XXXXXX");
            if (!mkdtemp(fuzz_dir))
                fuzz_die(fuzz_dir);
        }
        atexit(fuzz_remove_dir);
    }
    return fuzz_dir;
}

static void fuzz_must(int r, const char *what)
{
    if (r < 0) {
        fprintf(stderr, "harness setup failed: %s: %s\n", what, cb_last_error());
        abort();
    }
}

#endif

/*
 * Shared by the libFuzzer harnesses: a scratch directory on tmpfs for the
 * pools they fuzz, removed at exit.
 */
#ifndef COWBLOCK_FUZZ_COMMON_H
#define COWBLOCK_FUZZ_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* Remove what earlier runs left behind: libFuzzer leaves by _Exit after a
 * crash or a timeout, so their atexit cleanup never ran. */
static void fuzz_remove_stale(const char *base)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd,
             "for d in '%s'/cowblock-fuzz-*-*; do p=${d##*/cowblock-fuzz-}; p=${p%%%%-*}; "
             "[ -d \"$d\" ] && ! kill -0 \"$p\" 2>/dev/null && rm -rf \"$d\"; done; true", base);
    if (system(cmd) != 0)
        fprintf(stderr, "could not clean %s\n", base);
}

/* A fresh directory for this process's pools (tmpfs when there is one),
 * named with the pid so that a later run can tell it is stale. */
static const char *fuzz_scratch(void)
{
    if (!fuzz_dir[0]) {
        const char *base = getenv("COWBLOCK_FUZZ_TMP");
        if (!base)
            base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        fuzz_remove_stale(base);
        snprintf(fuzz_dir, sizeof fuzz_dir, "%s/cowblock-fuzz-%d-XXXXXX", base, (int)getpid());
        if (!mkdtemp(fuzz_dir))
            fuzz_die(fuzz_dir);
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

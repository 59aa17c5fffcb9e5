/* Per-thread error messages and kinds, and small shared helpers.
 *
 * A failing call records what went wrong for its thread with cb_err(kind,
 * ...): a message for people, a kind (enum cb_error_kind) for programs, and
 * optionally the values a comparison expected and found.  The errno a call
 * returns is the kind's, from the one table below. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cowblock.h"

static const int kind_errno[] = {
    [CB_E_NONE] = 0,
    [CB_E_INVALID] = EINVAL,
    [CB_E_NOT_FOUND] = ENOENT,
    [CB_E_EXISTS] = EEXIST,
    [CB_E_READ_ONLY] = EROFS,
    [CB_E_DATA_SPACE] = ENOSPC,
    [CB_E_METADATA_SPACE] = ENOSPC,
    [CB_E_HOST_SPACE] = ENOSPC,
    [CB_E_LIMIT] = ENOSPC,
    [CB_E_CORRUPT] = EUCLEAN,
    [CB_E_IO] = EIO,
    [CB_E_NO_MEMORY] = ENOMEM,
    [CB_E_OVERFLOW] = EOVERFLOW,
    [CB_E_BUSY] = EBUSY,
    [CB_E_TIMEOUT] = ETIMEDOUT,
    [CB_E_PROTOCOL] = EPROTO,
    [CB_E_DENIED] = EACCES,
    [CB_E_CLOSED] = EPIPE,
    [CB_E_UNSUPPORTED] = ENOTSUP,
};
#define NR_KINDS (int)(sizeof kind_errno / sizeof kind_errno[0])

static __thread char last_error[512];
static __thread int last_kind;
static __thread struct {
    bool set;
    uint64_t expected, found;
} last_values;

int cb_kind_errno(int kind) { return kind > 0 && kind < NR_KINDS ? kind_errno[kind] : EIO; }

int cb_host_errno_kind(int err)
{
    switch (err) {
    case ENOENT: case ENOTDIR: return CB_E_NOT_FOUND;
    case EACCES: case EPERM: return CB_E_DENIED;
    case EISDIR: case ENAMETOOLONG: case ELOOP: return CB_E_INVALID;
    case ENOMEM: return CB_E_NO_MEMORY;
    default: return CB_E_IO;
    }
}

int cb_err(enum cb_error_kind kind, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    last_kind = kind;
    last_values.set = false;
    return -cb_kind_errno(kind);
}

void cb_err_values(uint64_t expected, uint64_t found)
{
    last_values.set = true;
    last_values.expected = expected;
    last_values.found = found;
}

bool cb_last_error_values(uint64_t *expected, uint64_t *found)
{
    *expected = last_values.expected;
    *found = last_values.found;
    return last_values.set;
}

const char *cb_last_error(void) { return last_error; }

int cb_error_kind(int code)
{
    if (code >= 0)
        return CB_E_NONE;
    if (last_kind > 0 && cb_kind_errno(last_kind) == -code)
        return last_kind;
    for (int k = 1; k < NR_KINDS; k++) /* the first kind of that errno */
        if (kind_errno[k] == -code)
            return k;
    return CB_E_IO; /* an errno no kind names: the I/O seam passed it on */
}

void cb_free(void *p) { free(p); }

int u32vec_push(struct u32vec *vec, uint32_t x)
{
    if (vec->n == vec->cap) {
        size_t cap = vec->cap ? vec->cap * 2 : 64;
        uint32_t *v = realloc(vec->v, cap * sizeof *v);
        if (!v)
            return cb_err(CB_E_NO_MEMORY, "out of memory growing a vector to %zu entries", cap);
        vec->v = v;
        vec->cap = cap;
    }
    vec->v[vec->n++] = x;
    return 0;
}

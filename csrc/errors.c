/* Per-thread error messages and small shared helpers. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cowblock.h"

static __thread char last_error[512];

int cb_err(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return -err;
}

const char *cb_last_error(void) { return last_error; }

void cb_free(void *p) { free(p); }

int u32vec_push(struct u32vec *vec, uint32_t x)
{
    if (vec->n == vec->cap) {
        size_t cap = vec->cap ? vec->cap * 2 : 64;
        uint32_t *v = realloc(vec->v, cap * sizeof *v);
        if (!v)
            return cb_err(ENOMEM, "out of memory growing a vector to %zu entries", cap);
        vec->v = v;
        vec->cap = cap;
    }
    vec->v[vec->n++] = x;
    return 0;
}

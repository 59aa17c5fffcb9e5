/*
 * Atomic sections: several changes that land in one commit, so that no
 * commit can fall between them (a device created and the record that names
 * it; a device deleted with its records).
 *
 * States: a pool has `open` sections, one per thread that holds one (a
 * thread's sections nest: only its outermost begin and end count), and
 * `commits_waiting`, the commits that wait for them.
 *  - Inside a section, the calling thread's changes do not commit: every
 *    operation that would commit before it returns (create, snapshot,
 *    delete, labels, records, resize...) leaves its change to the running
 *    transaction, and the section's end commits (CB_TXN_COMMIT) or leaves
 *    it to the next commit.  An explicit commit from inside is refused, as
 *    is a check or a trim, which need one: it would split the section.
 *  - Every other commit waits until no section is open: the periodic
 *    committer and explicit commits (cb_pool_commit, so an NBD FLUSH or FUA
 *    from the C transmission loop too), and the commit another thread's
 *    change makes before it returns (pool_commit_locked: it lets go of the
 *    pool lock while it waits, so the sections can finish).
 *  - A commit that waits keeps new sections from opening until it is done
 *    (they queue in cb_pool_txn_begin), so sections cannot starve commits:
 *    a commit waits at most for the sections open when it came.  Sections
 *    are meant to be short: a few metadata changes, no waiting on the
 *    outside world.  A thread already in a section may nest further.
 *  - A write that finds the pool full commits to recycle the blocks freed
 *    in the transaction; while a section is open it does not (it cannot
 *    wait with the lock held mid-write) and fails with ENOSPC instead.
 *  - There is no abort: the running transaction also holds other threads'
 *    changes (an NBD client's writes), so it cannot be thrown away.  A
 *    caller whose section fails half-way undoes its own changes inside the
 *    section (the Python layer does, cowblock/atomic.py) and, if it cannot,
 *    ends it with CB_TXN_FAIL: the pool turns read-only with needs_check
 *    before the section closes, so the half-made section is never committed
 *    and the pool reopens at the last commit.
 *
 * Locking: sections.lock protects the counters and the holder list; it is
 * taken after the pool lock when both are held, never before it.
 */
#include <stdlib.h>

#include "cowblock.h"

void txn_init(cb_pool *p)
{
    pthread_mutex_init(&p->sections.lock, NULL);
    pthread_cond_init(&p->sections.cond, NULL);
}

void txn_destroy(cb_pool *p)
{
    pthread_mutex_destroy(&p->sections.lock);
    pthread_cond_destroy(&p->sections.cond);
    free(p->sections.v);
}

/* This thread's entry in the holder list (gate locked), or NULL. */
static struct cb_section *mine(struct cb_sections *s)
{
    pthread_t self = pthread_self();
    for (size_t i = 0; i < s->n; i++)
        if (pthread_equal(s->v[i].thread, self))
            return &s->v[i];
    return NULL;
}

uint32_t txn_depth(cb_pool *p)
{
    struct cb_sections *s = &p->sections;
    pthread_mutex_lock(&s->lock);
    struct cb_section *me = s->open ? mine(s) : NULL;
    uint32_t depth = me ? me->depth : 0;
    pthread_mutex_unlock(&s->lock);
    return depth;
}

enum txn_turn txn_turn(cb_pool *p)
{
    struct cb_sections *s = &p->sections;
    pthread_mutex_lock(&s->lock);
    enum txn_turn t = TXN_NOW;
    if (s->open && mine(s))
        t = TXN_DEFER;
    else if (s->open) {
        s->commits_waiting++;
        t = TXN_WAIT;
    }
    pthread_mutex_unlock(&s->lock);
    return t;
}

void txn_wait_idle(cb_pool *p)
{
    struct cb_sections *s = &p->sections;
    pthread_mutex_lock(&s->lock);
    while (s->open)
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

void commit_gate_enter(cb_pool *p)
{
    struct cb_sections *s = &p->sections;
    pthread_mutex_lock(&s->lock);
    s->commits_waiting++;
    while (s->open)
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

void commit_gate_leave(cb_pool *p)
{
    struct cb_sections *s = &p->sections;
    pthread_mutex_lock(&s->lock);
    if (--s->commits_waiting == 0)
        pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

bool txn_any_open(cb_pool *p)
{
    struct cb_sections *s = &p->sections;
    pthread_mutex_lock(&s->lock);
    bool open = s->open != 0;
    pthread_mutex_unlock(&s->lock);
    return open;
}

int cb_pool_txn_begin(cb_pool *p)
{
    if (p->read_only)
        return cb_err(CB_E_READ_ONLY, "the pool is open read-only: no atomic section");
    struct cb_sections *s = &p->sections;
    pthread_mutex_lock(&s->lock);
    struct cb_section *me = mine(s);
    if (me) {
        me->depth++;
        pthread_mutex_unlock(&s->lock);
        return 0;
    }
    while (s->commits_waiting)
        pthread_cond_wait(&s->cond, &s->lock);
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 8;
        struct cb_section *v = realloc(s->v, cap * sizeof *v);
        if (!v) {
            pthread_mutex_unlock(&s->lock);
            return cb_err(CB_E_NO_MEMORY, "out of memory for an atomic section");
        }
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = (struct cb_section){pthread_self(), 1};
    s->open++;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int cb_pool_txn_depth(cb_pool *p) { return (int)txn_depth(p); }

int cb_pool_txn_end(cb_pool *p, int flags)
{
    struct cb_sections *s = &p->sections;
    if (!txn_depth(p))
        return cb_err(CB_E_INVALID, "no atomic section is open in this thread");
    int r = 0;
    if (flags & CB_TXN_FAIL) {
        /* Before the section closes: no commit may take what it left. */
        pthread_rwlock_wrlock(&p->lock);
        r = pool_fail(p, cb_err(CB_E_IO, "an atomic section failed half-way and could not be "
                                "undone; its changes are not committed"));
        pthread_rwlock_unlock(&p->lock);
    }
    pthread_mutex_lock(&s->lock);
    struct cb_section *me = mine(s);
    bool outermost = --me->depth == 0;
    if (outermost) {
        *me = s->v[--s->n];
        if (--s->open == 0)
            pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);
    if (!r && outermost && (flags & CB_TXN_COMMIT))
        r = cb_pool_commit(p);
    return r;
}

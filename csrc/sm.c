/*
 * Space maps: persistent 32-bit reference counts, one per block, for the
 * data blocks and for the metadata blocks.
 *
 * Layout: a three-level copy-on-write radix array (format.h, struct
 * cb_sm_page).  Entry b lives at root[b / E^2] -> index[(b / E) % E] ->
 * refs[b % E], E = CB_SM_ENTRIES.  A zero pointer stands for a page of zeros,
 * so a fresh pool's space maps cost nothing.  Pages belong to their space map
 * alone (count 1) and are shadowed on their first change in a transaction.
 *
 * The metadata space map counts its own pages, so changing a count can
 * allocate a page whose count must be changed.  This terminates because a
 * page is shadowed at most once per transaction and because every new page
 * is linked into its parent before it is counted (meta_new's slot argument):
 * the nested update then finds the page already writable.
 *
 * Allocation: a block is free when its count is 0 and it was neither freed
 * nor allocated in the running transaction (the busy bitmap): the last
 * commit may still use a block freed since.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cowblock.h"

#define E ((uint64_t)CB_SM_ENTRIES)

static inline bool busy_test(const struct cb_sm *sm, uint64_t b)
{
    return sm->busy[b >> 3] & (1u << (b & 7));
}

int sm_reserve(struct cb_sm *sm, uint64_t b)
{
    if (busy_test(sm, b))
        return 0;
    sm->busy[b >> 3] |= (uint8_t)(1u << (b & 7));
    return u32vec_push(&sm->busy_list, (uint32_t)b);
}

int sm_init(struct cb_sm *sm, uint32_t *root, uint64_t *used, uint64_t nr_blocks)
{
    memset(sm, 0, sizeof *sm);
    sm->root = root;
    sm->used = used;
    return sm_grow(sm, nr_blocks);
}

int sm_grow(struct cb_sm *sm, uint64_t nr_blocks)
{
    if (nr_blocks > CB_MAX_BLOCKS)
        return cb_err(CB_E_INVALID, "%llu blocks is more than a space map holds (%llu)",
                      (unsigned long long)nr_blocks, (unsigned long long)CB_MAX_BLOCKS);
    uint64_t bytes = (nr_blocks + 7) / 8, old = (sm->busy_bits + 7) / 8;
    if (bytes > old) {
        uint8_t *b = realloc(sm->busy, bytes);
        if (b)
            sm->busy = b;
        uint8_t *d = b ? realloc(sm->dropped, bytes) : NULL;
        if (d)
            sm->dropped = d;
        if (!b || !d)
            return cb_err(CB_E_NO_MEMORY, "out of memory for a space map of %llu blocks",
                          (unsigned long long)nr_blocks);
        memset(b + old, 0, bytes - old);
        memset(d + old, 0, bytes - old);
    }
    sm->busy_bits = nr_blocks;
    sm->nr_blocks = nr_blocks;
    sm->run_none = false;
    return 0;
}

void sm_destroy(struct cb_sm *sm)
{
    free(sm->busy);
    free(sm->busy_list.v);
    free(sm->dropped);
    free(sm->dropped_list.v);
    free(sm->held_busy.v);
    free(sm->held_dropped.v);
    memset(sm, 0, sizeof *sm);
}

static int out_of_range(const struct cb_sm *sm, uint64_t b)
{
    return cb_err(CB_E_CORRUPT, "metadata is corrupt: block %llu is past the end of its space map "
                  "(%llu blocks)", (unsigned long long)b, (unsigned long long)sm->nr_blocks);
}

static const struct cb_sm_page *read_page(struct cb_meta *m, uint32_t pb, uint32_t type,
                                          uint32_t level, int *err)
{
    const struct cb_sm_page *p = (const void *)meta_read(m, pb, type, type, err);
    if (p && p->level != level) {
        *err = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: space map page level %u, expected %u",
                      pb, p->level, level);
        return NULL;
    }
    return p;
}

int sm_get(struct cb_meta *m, struct cb_sm *sm, uint64_t b, uint32_t *out)
{
    if (b >= sm->nr_blocks)
        return out_of_range(sm, b);
    int err = 0;
    uint32_t pb = *sm->root;
    static const uint32_t type[3] = {CB_BT_SM_INDEX, CB_BT_SM_INDEX, CB_BT_SM_REFS};
    uint64_t idx[3] = {b / (E * E), (b / E) % E, b % E};
    for (int lvl = 0; lvl < 3; lvl++) {
        if (pb == 0) {
            *out = 0;
            return 0;
        }
        const struct cb_sm_page *p = read_page(m, pb, type[lvl], 2 - (uint32_t)lvl, &err);
        if (!p)
            return err;
        pb = p->entries[idx[lvl]];
    }
    *out = pb;
    return 0;
}

/* The writable page in *slot, made or shadowed as needed. */
static struct cb_sm_page *writable(struct cb_meta *m, uint32_t *slot, uint32_t type, uint32_t level,
                                   int *err)
{
    struct cb_sm_page *p;
    if (*slot == 0) { /* fill in the level before counting: counting may read it */
        uint32_t b;
        if (!(p = (void *)meta_alloc_uncounted(m, type, &b, err)))
            return NULL;
        p->level = level;
        *slot = b;
        int r = sm_set(m, &m->msm, b, 1);
        if (r) {
            *err = r;
            return NULL;
        }
        return p;
    }
    if (meta_is_new(m, *slot))
        return (void *)m->dirty[*slot];
    p = (void *)meta_shadow(m, slot, type, type, NULL, err);
    if (p && p->level != level) {
        *err = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: space map page level %u, expected %u",
                      *slot, p->level, level);
        return NULL;
    }
    return p;
}

int sm_set(struct cb_meta *m, struct cb_sm *sm, uint64_t b, uint32_t v)
{
    if (b >= sm->nr_blocks)
        return out_of_range(sm, b);
    int err = 0;
    uint64_t i0 = b / (E * E), i1 = (b / E) % E, i2 = b % E;
    /* The page pointers held here stay valid across the nested updates
     * that allocation causes: a page new in this transaction never moves. */
    struct cb_sm_page *root = writable(m, sm->root, CB_BT_SM_INDEX, 2, &err);
    if (!root)
        return err;
    struct cb_sm_page *index = writable(m, &root->entries[i0], CB_BT_SM_INDEX, 1, &err);
    if (!index)
        return err;
    struct cb_sm_page *refs = writable(m, &index->entries[i1], CB_BT_SM_REFS, 0, &err);
    if (!refs)
        return err;
    uint32_t old = refs->entries[i2];
    if (old == 0 && v != 0) {
        refs->entries[i2] = v;
        refs->nr_nonzero++;
        (*sm->used)++;
    } else if (old != 0 && v == 0) {
        refs->entries[i2] = 0;
        refs->nr_nonzero--;
        (*sm->used)--;
    } else {
        refs->entries[i2] = v;
    }
    return 0;
}

int sm_inc(struct cb_meta *m, struct cb_sm *sm, uint64_t b)
{
    uint32_t v;
    int r = sm_get(m, sm, b, &v);
    if (r)
        return r;
    if (v == UINT32_MAX)
        return cb_err(CB_E_OVERFLOW, "reference count of block %llu would overflow",
                      (unsigned long long)b);
    return sm_set(m, sm, b, v + 1);
}

int sm_dec(struct cb_meta *m, struct cb_sm *sm, uint64_t b, bool *now_zero)
{
    uint32_t v;
    int r = sm_get(m, sm, b, &v);
    if (r)
        return r;
    if (v == 0)
        return cb_err(CB_E_CORRUPT, "metadata is corrupt: block %llu is referenced but its reference "
                      "count is already 0", (unsigned long long)b);
    if ((r = sm_set(m, sm, b, v - 1)) != 0)
        return r;
    if (!sm_dropped(sm, b)) {
        sm->dropped[b >> 3] |= (uint8_t)(1u << (b & 7));
        if ((r = u32vec_push(&sm->dropped_list, (uint32_t)b)) != 0)
            return r;
    }
    *now_zero = v == 1;
    if (v == 1) {
        sm->freed_this_txn++;
        return sm_reserve(sm, b);
    }
    return 0;
}

/* The reference page covering block b: *refs NULL when every count there is
 * 0 (no page yet). */
static int refs_page(struct cb_meta *m, struct cb_sm *sm, uint64_t b, const struct cb_sm_page **refs)
{
    int err = 0;
    *refs = NULL;
    uint32_t pb = *sm->root;
    if (!pb)
        return 0;
    const struct cb_sm_page *p = read_page(m, pb, CB_BT_SM_INDEX, 2, &err);
    if (!p)
        return err;
    if (!(pb = p->entries[b / (E * E)]))
        return 0;
    if (!(p = read_page(m, pb, CB_BT_SM_INDEX, 1, &err)))
        return err;
    if (!(pb = p->entries[(b / E) % E]))
        return 0;
    return (*refs = read_page(m, pb, CB_BT_SM_REFS, 0, &err)) ? 0 : err;
}

/* A scan that has read LONG_SCAN space map pages reads ahead for the rest
 * (meta_walk_begin): the metadata mapping reads a page a fault otherwise,
 * and a scan across a nearly full pool reads thousands of them. */
enum { LONG_SCAN = 8 };
struct scan {
    struct cb_meta *m;
    unsigned pages;
};

static int scan_page(struct scan *sc, struct cb_sm *sm, uint64_t b, const struct cb_sm_page **refs)
{
    if (++sc->pages == LONG_SCAN)
        meta_walk_begin(sc->m);
    return refs_page(sc->m, sm, b, refs);
}

static int scan_done(struct scan *sc, int r)
{
    if (sc->pages >= LONG_SCAN)
        meta_walk_end(sc->m);
    return r;
}

int sm_find_free(struct cb_meta *m, struct cb_sm *sm, uint64_t *out)
{
    if (*sm->used + sm->freed_this_txn + sm->held_free >= sm->nr_blocks)
        return -ENOSPC;
    uint64_t n = sm->nr_blocks, scanned = 0, b = sm->alloc_hint % n;
    struct scan sc = {m};
    while (scanned < n) {
        uint64_t page_start = b - b % E;
        uint64_t page_end = page_start + E < n ? page_start + E : n;
        const struct cb_sm_page *refs;
        int err = scan_page(&sc, sm, b, &refs);
        if (err)
            return scan_done(&sc, err);
        if (!refs || refs->nr_nonzero < E) {
            for (uint64_t x = b; x < page_end; x++) {
                if ((!refs || refs->entries[x % E] == 0) && !busy_test(sm, x)) {
                    int r = sm_reserve(sm, x);
                    if (r)
                        return scan_done(&sc, r);
                    sm->alloc_hint = x + 1;
                    *out = x;
                    return scan_done(&sc, 0);
                }
            }
        }
        scanned += page_end - b;
        b = page_end == n ? 0 : page_end;
    }
    return scan_done(&sc, -ENOSPC);
}

int sm_take_run(struct cb_meta *m, struct cb_sm *sm, uint64_t count, uint64_t align, uint64_t *out)
{
    uint64_t n = sm->nr_blocks;
    if (sm->run_none || !count || count > n ||
        *sm->used + sm->freed_this_txn + sm->held_free + count > n)
        return 0;
    align = align ? align : 1;
    uint64_t start = (sm->run_hint + align - 1) / align * align, scanned = 0;
    const struct cb_sm_page *refs = NULL;
    uint64_t page_start = UINT64_MAX;
    struct scan sc = {m};
    while (scanned < n) {
        if (start + count > n) { /* wrap */
            scanned += start < n ? n - start : 0;
            start = 0;
            continue;
        }
        uint64_t x = start;
        for (; x < start + count; x++) {
            if (x - x % E != page_start) {
                int err = scan_page(&sc, sm, x, &refs);
                if (err)
                    return scan_done(&sc, err);
                page_start = x - x % E;
            }
            if ((refs && refs->entries[x % E]) || busy_test(sm, x))
                break;
        }
        if (x == start + count) {
            for (x = start; x < start + count; x++) {
                int r = sm_reserve(sm, x);
                if (r)
                    return scan_done(&sc, r);
            }
            sm->run_hint = start + count;
            *out = start;
            return scan_done(&sc, 1);
        }
        /* the next candidate starts past the block in use */
        uint64_t next = (x + 1 + align - 1) / align * align;
        scanned += next - start;
        start = next;
    }
    sm->run_none = true; /* until blocks are freed: no need to look again */
    return scan_done(&sc, 0);
}

int sm_take_if_free(struct cb_meta *m, struct cb_sm *sm, uint64_t b)
{
    if (b >= sm->nr_blocks || busy_test(sm, b) ||
        *sm->used + sm->freed_this_txn + sm->held_free >= sm->nr_blocks)
        return 0;
    uint32_t ref;
    int r = sm_get(m, sm, b, &ref);
    if (r || ref)
        return r ? r : 0;
    return (r = sm_reserve(sm, b)) ? r : 1;
}

static void set_bits(uint8_t *map, const struct u32vec *v, bool on)
{
    for (size_t i = 0; i < v->n; i++) {
        uint32_t b = v->v[i];
        if (on)
            map[b >> 3] |= (uint8_t)(1u << (b & 7));
        else
            map[b >> 3] &= (uint8_t)~(1u << (b & 7));
    }
}

/* Search from the lowest block freed: reusing freed blocks first keeps the
 * sparse metadata file (and the data file) from growing. */
static void lower_hint(struct cb_sm *sm, const struct u32vec *v)
{
    for (size_t i = 0; i < v->n; i++)
        if (v->v[i] < sm->alloc_hint)
            sm->alloc_hint = v->v[i];
}

static void swap_vec(struct u32vec *a, struct u32vec *b)
{
    struct u32vec t = *a;
    *a = *b;
    *b = t;
}

/* Nothing for sm_commit_done to do: no block freed or allocated in this
 * transaction, none held for readers, no failed run search to forget.
 * With the pool lock held, shared or not. */
bool sm_commit_idle(const struct cb_sm *sm)
{
    return !sm->busy_list.n && !sm->dropped_list.n && !sm->held_busy.n && !sm->held_dropped.n &&
           !sm->freed_this_txn && !sm->run_none;
}

void sm_commit_done(struct cb_sm *sm)
{
    uint32_t live[2] = {__atomic_load_n(&sm->readers[0], __ATOMIC_ACQUIRE),
                        __atomic_load_n(&sm->readers[1], __ATOMIC_ACQUIRE)};
    bool held = sm->held_busy.n || sm->held_dropped.n;
    if (held && live[sm->held_parity] == 0) {
        set_bits(sm->busy, &sm->held_busy, false);
        set_bits(sm->dropped, &sm->held_dropped, false);
        lower_hint(sm, &sm->held_busy);
        sm->held_busy.n = sm->held_dropped.n = 0;
        sm->held_free = 0;
        /* A held block may also be busy or dropped in the running lists. */
        set_bits(sm->busy, &sm->busy_list, true);
        set_bits(sm->dropped, &sm->dropped_list, true);
        held = false;
    }
    sm->run_none = false;
    uint32_t cur = sm->read_epoch & 1;
    if (!held && live[0] == 0 && live[1] == 0) {
        set_bits(sm->busy, &sm->busy_list, false);
        set_bits(sm->dropped, &sm->dropped_list, false);
        lower_hint(sm, &sm->busy_list);
        sm->busy_list.n = sm->dropped_list.n = 0;
        sm->freed_this_txn = 0;
    } else if (!held && live[cur ^ 1] == 0) {
        /* Readers from now on count in the other parity, so readers[cur]
         * draining means every reader that could see these blocks is done. */
        swap_vec(&sm->held_busy, &sm->busy_list);
        swap_vec(&sm->held_dropped, &sm->dropped_list);
        sm->held_free = sm->freed_this_txn;
        sm->freed_this_txn = 0;
        sm->held_parity = cur;
        __atomic_store_n(&sm->read_epoch, sm->read_epoch + 1, __ATOMIC_RELEASE);
    }
    /* else both parities have readers: the running lists stay busy until a
     * later commit finds the held ones released. */
}

bool sm_wait_readers(struct cb_sm *sm, int timeout_ms)
{
    struct timespec nap = {0, 100000};
    for (long waited_us = 0;; waited_us += 100) {
        if (__atomic_load_n(&sm->readers[0], __ATOMIC_ACQUIRE) == 0 &&
            __atomic_load_n(&sm->readers[1], __ATOMIC_ACQUIRE) == 0)
            return true;
        if (timeout_ms >= 0 && waited_us >= (long)timeout_ms * 1000)
            return false;
        nanosleep(&nap, NULL);
    }
}

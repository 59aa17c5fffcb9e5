/*
 * check: a metadata fsck in the spirit of thin_check.
 *
 * It reads the committed metadata from scratch (checksums re-verified,
 * whatever was verified before) and recomputes every reference count from
 * what references it:
 *  - metadata blocks: the two superblock slots, every space map page, every
 *    b-tree node once per parent node (or device) that points at it, every
 *    catalog block;
 *  - data blocks: once per distinct mapping leaf that holds them (a shared
 *    leaf holds its blocks once, as in dm-thin).
 * It then compares them with the stored counts: a stored count above the
 * references is a leak, below them an error (a block could be handed out
 * twice).  It also checks the b-tree invariants (sorted keys, keys inside
 * their parent's bounds, uniform leaf depth), each device's mapped-block
 * count and size bound, and the space map counters.
 *
 * The records store is walked too: every node and value block once, keys
 * in order within the bounds their parents give, levels going down by one,
 * each value's chain as long as its value, and the superblock's count.
 *
 * Each finding is a record (cb_check_record): its kind, the block or device
 * it concerns, what was expected and what was found where a count or a
 * value was compared, and the sentence a person reads.
 *
 * The caller holds the pool lock exclusively and has committed.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowblock.h"

struct checker {
    cb_pool *p;
    struct cb_meta *m;
    uint32_t *meta_refs;      /* expected counts */
    uint32_t *data_refs;
    uint8_t *visited;         /* nodes already walked */
    uint64_t *entries;        /* entries below each visited node */
    cb_check_record *records;
    size_t nr_records, cap_records;
    uint64_t findings;        /* errors and leaks found, listed or not */
    cb_check_summary *sum;
    uint64_t count_errors;    /* reference counts, used counters, mapped counts: repairable */
    uint64_t tree_errors;     /* errors inside device mapping trees (repair drops the device) */
    uint8_t *sm_pages;        /* bitmap: metadata blocks that are space map pages */
    uint64_t records_errors;  /* inside the records store (repair rebuilds it) */
    uint64_t records_found;   /* records its tree holds */
    bool records_recount;     /* its count (or feature flag) is wrong, the tree is fine */
    struct u32vec lost;       /* devices whose mapping tree is damaged */
    struct u32vec recount;    /* devices whose mapped-block count is wrong */
};

/* What a record is about. */
struct about {
    uint32_t space, device;
    uint64_t block;
    bool has_values;
    uint64_t expected, found;
};
static const struct about nothing;

static struct about meta_block(uint32_t b, uint32_t device)
{
    return (struct about){.space = CB_SPACE_METADATA, .device = device, .block = b};
}

static struct about space_block(bool data, uint64_t b)
{
    return (struct about){.space = data ? CB_SPACE_DATA : CB_SPACE_METADATA, .block = b};
}

static struct about device(uint32_t id) { return (struct about){.device = id}; }

static struct about values(struct about a, uint64_t expected, uint64_t found)
{
    a.has_values = true;
    a.expected = expected;
    a.found = found;
    return a;
}

static void vrecord(struct checker *c, uint32_t kind, struct about a, const char *fmt, va_list ap)
{
    if (c->nr_records == c->cap_records) {
        size_t cap = c->cap_records ? 2 * c->cap_records : 16;
        cb_check_record *r = realloc(c->records, cap * sizeof *r);
        if (!r)
            return; /* counted in the summary all the same */
        c->records = r;
        c->cap_records = cap;
    }
    cb_check_record *r = &c->records[c->nr_records++];
    *r = (cb_check_record){.kind = kind, .space = a.space, .device = a.device, .block = a.block,
                           .has_values = a.has_values, .expected = a.expected, .found = a.found};
    vsnprintf(r->message, sizeof r->message, fmt, ap);
}

/* Something done (by a repair): always listed. */
static void record(struct checker *c, uint32_t kind, struct about a, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void record(struct checker *c, uint32_t kind, struct about a, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vrecord(c, kind, a, fmt, ap);
    va_end(ap);
}

/* Something found: counted, and listed up to the first 1000. */
static void say(struct checker *c, bool leak, struct about a, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void say(struct checker *c, bool leak, struct about a, const char *fmt, ...)
{
    if (leak)
        c->sum->leaks++;
    else
        c->sum->errors++;
    if (c->findings++ >= 1000)
        return;
    va_list ap;
    va_start(ap, fmt);
    vrecord(c, leak ? CB_CHECK_LEAK : CB_CHECK_ERROR, a, fmt, ap);
    va_end(ap);
}

/* Verify a committed block from the file, not from the verified cache. */
static const uint8_t *read_block(struct checker *c, uint32_t b, uint32_t t1, uint32_t t2,
                                 const char *what, uint32_t dev)
{
    if (b < 2 || b >= c->m->nr_blocks) {
        say(c, false, meta_block(b, dev), "%s points at metadata block %u, outside 2..%llu", what,
            b, (unsigned long long)c->m->nr_blocks - 1);
        return NULL;
    }
    c->m->verified[b >> 3] &= (uint8_t)~(1u << (b & 7));
    int err = 0;
    const uint8_t *blk = meta_read(c->m, b, t1, t2, &err);
    if (!blk) {
        struct about a = meta_block(b, dev);
        uint64_t expected, found;
        if (cb_last_error_values(&expected, &found))
            a = values(a, expected, found);
        say(c, false, a, "%s: %s", what, cb_last_error());
    }
    c->sum->blocks_checked++;
    return blk;
}

static void ref_meta(struct checker *c, uint32_t b)
{
    if (b < c->m->nr_blocks)
        c->meta_refs[b]++;
}

static void ref_page(struct checker *c, uint32_t b)
{
    ref_meta(c, b);
    if (b < c->m->nr_blocks)
        c->sm_pages[b >> 3] |= (uint8_t)(1u << (b & 7));
}

/* Walk a node below bounds [lo, hi); returns its entry count (memoized). */
/* dev: the device whose mapping tree this is, 0 for the device-details tree. */
static uint64_t walk(struct checker *c, uint32_t b, uint32_t leaf_type, uint64_t lo, uint64_t hi,
                     int depth, int *leaf_depth, const char *owner, uint32_t dev)
{
    char what[128];
    snprintf(what, sizeof what, "%s, node %u", owner, b);
    struct about here = meta_block(b, dev);
    if (depth > CB_MAX_TREE_DEPTH) {
        say(c, false, here, "%s: tree deeper than %d levels (a cycle?)", what, CB_MAX_TREE_DEPTH);
        return 0;
    }
    if (b < c->m->nr_blocks && (c->visited[b >> 3] & (1u << (b & 7))))
        return c->entries[b];
    const uint8_t *n = read_block(c, b, CB_BT_INTERNAL, leaf_type, what, dev);
    if (!n)
        return 0;
    c->visited[b >> 3] |= (uint8_t)(1u << (b & 7));
    c->sum->nodes_checked++;
    uint32_t nr = node_hdr(n)->nr_entries;
    const uint32_t *keys = node_keys(n);
    bool internal = node_hdr(n)->h.type == CB_BT_INTERNAL;
    if (nr == 0)
        say(c, false, here, "%s: empty node", what);
    uint64_t count = 0;
    for (uint32_t i = 0; i < nr; i++) {
        if (i > 0 && keys[i] <= keys[i - 1])
            say(c, false, here, "%s: keys not sorted: key %u at %u follows %u", what, keys[i], i,
                keys[i - 1]);
        if (keys[i] < lo || keys[i] >= hi)
            if (!(internal && i == 0 && keys[i] < lo)) /* a root's first bound may be lower */
                say(c, false, here, "%s: key %u outside its parent's range [%llu, %llu)", what,
                    keys[i], (unsigned long long)lo, (unsigned long long)hi);
    }
    if (internal) {
        for (uint32_t i = 0; i < nr; i++) {
            uint32_t child = node_u32_values(n)[i];
            ref_meta(c, child);
            uint64_t clo = keys[i] > lo ? keys[i] : lo;
            uint64_t chi = i + 1 < nr ? keys[i + 1] : hi;
            count += walk(c, child, leaf_type, clo, chi, depth + 1, leaf_depth, owner, dev);
        }
    } else {
        if (*leaf_depth < 0)
            *leaf_depth = depth;
        else if (*leaf_depth != depth)
            say(c, false, values(here, (uint64_t)*leaf_depth, (uint64_t)depth),
                "%s: leaf at depth %d, others at %d (tree unbalanced)", what, depth, *leaf_depth);
        if (leaf_type == CB_BT_MAP_LEAF) {
            for (uint32_t i = 0; i < nr; i++) {
                uint32_t v = node_u32_values(n)[i];
                if (v >= c->m->sb.nr_data_blocks)
                    say(c, false, here, "%s: virtual block %u maps to data block %u, past the end "
                        "of the pool (%llu blocks)", what, keys[i], v,
                        (unsigned long long)c->m->sb.nr_data_blocks);
                else
                    c->data_refs[v]++;
            }
        }
        count = nr;
    }
    c->entries[b] = count;
    return count;
}

static void check_devices(struct checker *c)
{
    uint32_t root = c->m->sb.device_root;
    uint64_t in_tree = 0;
    if (root) {
        ref_meta(c, root);
        int leaf_depth = -1;
        in_tree = walk(c, root, CB_BT_DEV_LEAF, 0, (uint64_t)UINT32_MAX + 1, 0, &leaf_depth,
                       "device-details tree", 0);
    }
    if (in_tree != c->p->nr_devices)
        say(c, false, values(nothing, c->p->nr_devices, in_tree),
            "device-details tree holds %llu devices, %u are loaded", (unsigned long long)in_tree,
            c->p->nr_devices);
    for (uint32_t id = 0; id < c->p->devs_cap; id++) {
        struct cb_dev *d = c->p->devs[id];
        if (!d)
            continue;
        struct cb_dev_detail stored;
        int r = bt_lookup(c->m, root, id, &stored, sizeof stored);
        if (r != 1)
            say(c, false, device(id), "device %u is not in the device-details tree", id);
        else if (memcmp(&stored, &d->d, sizeof stored))
            say(c, false, device(id), "device %u: its committed details differ from the loaded ones",
                id);
        if (id >= c->m->sb.next_dev_id)
            say(c, false, device(id), "device %u: id not below next_dev_id %u", id,
                c->m->sb.next_dev_id);
        if (d->d.catalog_block) {
            ref_meta(c, d->d.catalog_block);
            char what[64];
            snprintf(what, sizeof what, "device %u catalog", id);
            read_block(c, d->d.catalog_block, CB_BT_CATALOG, CB_BT_CATALOG, what, id);
        }
        uint64_t mapped = 0, before = c->sum->errors;
        if (d->d.mapping_root) {
            char owner[64];
            snprintf(owner, sizeof owner, "device %u mapping tree", id);
            ref_meta(c, d->d.mapping_root);
            int leaf_depth = -1;
            uint64_t nblocks = (d->d.size + c->p->block_size - 1) >> c->p->block_shift;
            mapped = walk(c, d->d.mapping_root, CB_BT_MAP_LEAF, 0, nblocks, 0, &leaf_depth, owner,
                          id);
        }
        if (c->sum->errors > before) { /* its tree is damaged: repair can only drop it */
            c->tree_errors += c->sum->errors - before;
            u32vec_push(&c->lost, id);
        } else if (mapped != d->d.mapped_blocks) {
            say(c, false, values(device(id), mapped, d->d.mapped_blocks),
                "device %u: mapped-block count says %llu, its tree holds %llu", id,
                (unsigned long long)d->d.mapped_blocks, (unsigned long long)mapped);
            c->count_errors++;
            u32vec_push(&c->recount, id);
        }
    }
}

/* A record's value chain, from block b. */
static void check_value_chain(struct checker *c, uint32_t b, uint32_t len, uint32_t leaf)
{
    uint32_t nblocks = rec_value_blocks(len), at = 0;
    for (uint32_t i = 0; i < nblocks; i++) {
        char what[96];
        snprintf(what, sizeof what, "records store, value block %u of a record in leaf %u", i, leaf);
        struct about here = meta_block(b, 0);
        if (b < c->m->nr_blocks && (c->visited[b >> 3] & (1u << (b & 7)))) {
            say(c, false, here, "%s: block %u is reached twice", what, b);
            return;
        }
        ref_meta(c, b);
        const struct cb_rec_value_block *v = (const void *)read_block(c, b, CB_BT_REC_VALUE,
                                                                      CB_BT_REC_VALUE, what, 0);
        if (!v)
            return;
        c->visited[b >> 3] |= (uint8_t)(1u << (b & 7));
        uint32_t want = len - at < CB_REC_VALUE_BYTES ? len - at : (uint32_t)CB_REC_VALUE_BYTES;
        if (v->index != i || v->len != want) {
            say(c, false, values(here, v->index != i ? i : want, v->index != i ? v->index : v->len),
                "%s: %s %u, expected %u", what, v->index != i ? "index" : "length",
                v->index != i ? v->index : v->len, v->index != i ? i : want);
            return;
        }
        if ((i + 1 < nblocks) != (v->next != 0)) {
            say(c, false, here, "%s: %s", what, v->next ? "the chain goes on past the value's "
                "length" : "the chain ends before the value does");
            return;
        }
        at += want;
        b = v->next;
    }
}

struct key_bound {
    const uint8_t *key;   /* NULL: no bound */
    uint32_t len;
};

static int bound_cmp(const struct rec_entry *e, struct key_bound k)
{
    uint32_t n = e->key_len < k.len ? e->key_len : k.len;
    int r = n ? memcmp(e->key, k.key, n) : 0;
    return r ? r : (e->key_len > k.len) - (e->key_len < k.len);
}

/* A records node below bounds [lo, hi), at the level its parent wants. */
static void walk_records(struct checker *c, uint32_t b, uint32_t level, struct key_bound lo,
                         struct key_bound hi)
{
    char what[64];
    snprintf(what, sizeof what, "records store, node %u", b);
    struct about here = meta_block(b, 0);
    if (b < c->m->nr_blocks && (c->visited[b >> 3] & (1u << (b & 7)))) {
        say(c, false, here, "%s: reached twice", what);
        return;
    }
    const uint8_t *n = read_block(c, b, CB_BT_REC_INTERNAL, CB_BT_REC_LEAF, what, 0);
    if (!n)
        return;
    c->visited[b >> 3] |= (uint8_t)(1u << (b & 7));
    c->sum->nodes_checked++;
    const struct cb_rec_node *node = (const void *)n;
    if (level != UINT32_MAX && node->level != level) {
        say(c, false, values(here, level, node->level), "%s: at level %u, its parent wants %u",
            what, node->level, level);
        return;
    }
    struct rec_entry e, next;
    uint32_t at = 0;
    for (uint32_t i = 0; i < node->nr_entries; i++, at += e.size) {
        rec_entry_at(n, at, &e);
        bool keyed = node->level == 0 || i > 0;
        if (keyed && ((lo.key && bound_cmp(&e, lo) < 0) || (hi.key && bound_cmp(&e, hi) >= 0)))
            say(c, false, here, "%s: key of entry %u outside the range its parent gives", what, i);
        if (node->level == 0) {
            c->records_found++;
            if (e.flags & CB_REC_IN_BLOCKS)
                check_value_chain(c, e.first_block, e.value_len, b);
            continue;
        }
        struct key_bound clo = i ? (struct key_bound){e.key, e.key_len} : lo, chi = hi;
        if (i + 1 < node->nr_entries) {
            rec_entry_at(n, at + e.size, &next);
            chi = (struct key_bound){next.key, next.key_len};
        }
        ref_meta(c, e.child);
        walk_records(c, e.child, node->level - 1, clo, chi);
    }
}

static void check_records(struct checker *c)
{
    const struct cb_superblock *sb = &c->m->sb;
    uint64_t before = c->sum->errors;
    if (sb->records_root) {
        ref_meta(c, sb->records_root);
        walk_records(c, sb->records_root, UINT32_MAX, (struct key_bound){0},
                     (struct key_bound){0});
    }
    if (c->sum->errors > before) {
        c->records_errors += c->sum->errors - before;
        return;
    }
    if (c->records_found != sb->records_count) {
        say(c, false, values(nothing, c->records_found, sb->records_count),
            "records store: the superblock says %llu records, its tree holds %llu",
            (unsigned long long)sb->records_count, (unsigned long long)c->records_found);
        c->records_errors++;
        c->records_recount = true;
    }
    if (sb->records_root && !(sb->ro_compat & CB_RO_COMPAT_RECORDS)) {
        say(c, false, nothing, "records store: in use, but the superblock lacks its feature "
            "flag (an older build would take its blocks for leaks)");
        c->records_errors++;
        c->records_recount = true;
    }
}

/* Walk a space map's pages.  Pass 1 (compare false) verifies and counts
 * the pages themselves; pass 2 compares the stored counts with the expected
 * ones, which are complete only after both space maps had their pass 1. */
static void walk_space_map(struct checker *c, struct cb_sm *sm, const uint32_t *expected,
                           const char *name, bool compare)
{
    bool data = sm == &c->m->dsm;
    const uint64_t E = CB_SM_ENTRIES;
    uint64_t nonzero = 0, nb = sm->nr_blocks;
    uint32_t root = *sm->root;
    const struct cb_sm_page *rp = NULL;
    char what[96];
    if (root) {
        if (!compare)
            ref_page(c, root);
        snprintf(what, sizeof what, "%s space map root", name);
        rp = (const void *)read_block(c, root, CB_BT_SM_INDEX, CB_BT_SM_INDEX, what, 0);
    }
    for (uint64_t i0 = 0; i0 * E * E < nb; i0++) {
        const struct cb_sm_page *ip = NULL;
        if (rp && rp->entries[i0]) {
            if (!compare)
                ref_page(c, rp->entries[i0]);
            snprintf(what, sizeof what, "%s space map index %llu", name, (unsigned long long)i0);
            ip = (const void *)read_block(c, rp->entries[i0], CB_BT_SM_INDEX, CB_BT_SM_INDEX, what,
                                          0);
        }
        for (uint64_t i1 = 0; i1 < E && (i0 * E + i1) * E < nb; i1++) {
            const struct cb_sm_page *refs = NULL;
            if (ip && ip->entries[i1]) {
                if (!compare)
                    ref_page(c, ip->entries[i1]);
                snprintf(what, sizeof what, "%s space map page %llu", name,
                         (unsigned long long)(i0 * E + i1));
                refs = (const void *)read_block(c, ip->entries[i1], CB_BT_SM_REFS, CB_BT_SM_REFS,
                                                what, 0);
            }
            if (!compare)
                continue;
            uint64_t base = (i0 * E + i1) * E;
            uint32_t page_nonzero = 0;
            for (uint64_t k = 0; k < E; k++) {
                uint64_t b = base + k;
                uint32_t stored = refs ? refs->entries[k] : 0;
                if (b >= nb) {
                    if (stored)
                        say(c, false, space_block(data, b),
                            "%s space map counts block %llu past its end", name,
                            (unsigned long long)b);
                    continue;
                }
                page_nonzero += stored != 0;
                uint32_t want = expected[b];
                struct about a = values(space_block(data, b), want, stored);
                if (stored > want)
                    say(c, true, a, "%s block %llu: reference count %u, but %u references found",
                        name, (unsigned long long)b, stored, want);
                else if (stored < want)
                    say(c, false, a, "%s block %llu: reference count %u, but %u references found "
                        "(it could be handed out twice)", name, (unsigned long long)b, stored, want);
                if (stored < want)
                    c->count_errors++;
            }
            if (refs && page_nonzero != refs->nr_nonzero)
                say(c, false, values(meta_block(ip->entries[i1], 0), page_nonzero, refs->nr_nonzero),
                    "%s space map page %llu: says %u non-zero counts, holds %u", name,
                    (unsigned long long)(i0 * E + i1), refs->nr_nonzero, page_nonzero);
            nonzero += page_nonzero;
        }
    }
    if (compare && nonzero != *sm->used && ++c->count_errors)
        say(c, false, values(nothing, nonzero, *sm->used),
            "%s space map: superblock says %llu blocks used, the counts say %llu", name,
            (unsigned long long)*sm->used, (unsigned long long)nonzero);
}

/* Walk everything and compare; the caller holds the write lock. */
static int run_check(cb_pool *p, struct checker *c)
{
    uint64_t nm = p->m.nr_blocks, nd = p->m.sb.nr_data_blocks;
    c->p = p;
    c->m = &p->m;
    c->meta_refs = calloc(nm, sizeof *c->meta_refs);
    c->data_refs = calloc(nd, sizeof *c->data_refs);
    c->visited = calloc((nm + 7) / 8, 1);
    c->sm_pages = calloc((nm + 7) / 8, 1);
    c->entries = calloc(nm, sizeof *c->entries);
    if (!c->meta_refs || !c->data_refs || !c->visited || !c->entries || !c->sm_pages)
        return cb_err(CB_E_NO_MEMORY, "out of memory checking %llu metadata and %llu data blocks",
                      (unsigned long long)nm, (unsigned long long)nd);
    c->meta_refs[0] = c->meta_refs[1] = 1;
    check_devices(c);
    check_records(c);
    for (int pass = 0; pass < 2; pass++) {
        walk_space_map(c, &p->m.dsm, c->data_refs, "data", pass == 1);
        walk_space_map(c, &p->m.msm, c->meta_refs, "metadata", pass == 1);
    }
    c->sum->blocks_checked += nd;
    return 0;
}

static void free_checker(struct checker *c)
{
    free(c->meta_refs);
    free(c->data_refs);
    free(c->visited);
    free(c->sm_pages);
    free(c->entries);
    free(c->records);
    free(c->lost.v);
    free(c->recount.v);
}

static int take_records(struct checker *c, cb_check_record **records, uint64_t *count)
{
    *records = c->records ? c->records : malloc(sizeof **records);
    *count = c->nr_records;
    c->records = NULL;
    return *records ? 0 : cb_err(CB_E_NO_MEMORY, "out of memory");
}

int cb_pool_check(cb_pool *p, cb_check_summary *sum, cb_check_record **records, uint64_t *count)
{
    memset(sum, 0, sizeof *sum);
    *records = NULL;
    *count = 0;
    if (txn_depth(p))
        return cb_err(CB_E_INVALID, "a check inside an atomic section would commit half of it");
    commit_gate_enter(p);
    pthread_rwlock_wrlock(&p->lock);
    meta_walk_begin(&p->m);
    int r = 0;
    if (!p->read_only && !p->failed)
        r = pool_commit_locked(p);
    struct checker c = {.sum = sum};
    if (!r)
        r = run_check(p, &c);
    if (!r)
        r = take_records(&c, records, count);
    free_checker(&c);
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    commit_gate_leave(p);
    return r;
}

static void record_lost(void *ctx, const uint8_t *key, uint32_t len)
{
    char text[300];
    rec_key_text(text, sizeof text, key, len);
    record(ctx, CB_CHECK_REPAIRED, nothing, "record \"%s\" dropped: its value is damaged", text);
}

/* Count the non-zero entries of a space map again (the superblock's counter). */
static int recount_used(struct cb_meta *m, struct cb_sm *sm)
{
    uint64_t used = 0;
    for (uint64_t b = 0; b < sm->nr_blocks; b++) {
        uint32_t v;
        int r = sm_get(m, sm, b, &v);
        if (r)
            return r;
        used += v != 0;
    }
    *sm->used = used;
    return 0;
}

/* Count the entries of a mapping tree (repairing a device's mapped count). */
static uint64_t tree_entries(cb_pool *p, uint32_t root)
{
    uint64_t n = 0;
    struct bt_cursor cur = {.m = &p->m};
    for (int r = root ? bt_seek(&cur, root, 0, false) : 0; r == 1; r = bt_next(&cur, root, false))
        n++;
    return n;
}

/* Set every reference count to what the trees say (c from run_check). */
static int fix_counts(cb_pool *p, struct checker *c, uint64_t *fixed)
{
    struct cb_meta *m = &p->m;
    int r = 0;
    /* Keep every block in use from being handed out by the page copies the
     * repair itself makes; space map pages are recounted by those copies. */
    for (uint64_t b = 2; !r && b < m->nr_blocks; b++)
        if (c->meta_refs[b])
            r = sm_reserve(&m->msm, b);
    for (uint64_t b = 2; !r && b < m->nr_blocks; b++) {
        uint32_t v;
        if ((c->sm_pages[b >> 3] & (1u << (b & 7))) || (r = sm_get(m, &m->msm, b, &v)) != 0)
            continue;
        if (v != c->meta_refs[b] && !meta_is_new(m, b)) {
            r = sm_set(m, &m->msm, b, c->meta_refs[b]);
            (*fixed)++;
        }
    }
    for (uint64_t b = 0; !r && b < m->sb.nr_data_blocks; b++) {
        uint32_t v;
        if ((r = sm_get(m, &m->dsm, b, &v)) == 0 && v != c->data_refs[b]) {
            r = sm_set(m, &m->dsm, b, c->data_refs[b]);
            (*fixed)++;
        }
    }
    if (!r)
        r = recount_used(m, &m->dsm);
    if (!r)
        r = recount_used(m, &m->msm);
    return r;
}

int cb_pool_repair(cb_pool *p, cb_check_summary *sum, cb_check_record **records,
                   uint64_t *count)
{
    memset(sum, 0, sizeof *sum);
    *records = NULL;
    *count = 0;
    if (txn_depth(p))
        return cb_err(CB_E_INVALID, "a repair inside an atomic section would commit half of it");
    commit_gate_enter(p);
    pthread_rwlock_wrlock(&p->lock);
    meta_walk_begin(&p->m);
    int r = pool_writable(p);
    if (!r)
        r = pool_commit_locked(p);
    struct checker c = {.sum = sum};
    if (!r)
        r = run_check(p, &c);
    uint64_t structural = sum->errors - c.count_errors - c.tree_errors - c.records_errors;
    if (!r && structural)
        r = cb_err(CB_E_CORRUPT, "cannot repair: %llu errors are outside the devices' mapping trees "
                   "(superblock, device details or space map structure); nothing was changed",
                   (unsigned long long)structural);
    if (r || (!sum->errors && !sum->leaks))
        goto done;
    for (size_t i = 0; i < c.nr_records; i++) /* all repaired, or dropped, below */
        c.records[i].before_repair = 1;
    /* 1. Drop the devices whose trees are damaged (their data is lost) and
     *    correct mapped counts; blocks in use stay reserved meanwhile. */
    for (uint64_t b = 2; !r && b < p->m.nr_blocks; b++)
        if (c.meta_refs[b])
            r = sm_reserve(&p->m.msm, b);
    struct bt_ctx dc = {&p->m, CB_BT_DEV_LEAF};
    for (size_t i = 0; !r && i < c.lost.n; i++) {
        uint32_t id = c.lost.v[i];
        if ((r = bt_remove(&dc, &p->m.sb.device_root, id, NULL)) < 0)
            break;
        r = 0;
        dev_free(p->devs[id]);
        p->devs[id] = NULL;
        p->nr_devices--;
        record(&c, CB_CHECK_REPAIRED, device(id),
               "dropped device %u: its mapping tree is damaged, its data is lost", id);
    }
    for (size_t i = 0; !r && i < c.recount.n; i++) {
        struct cb_dev *d = p->devs[c.recount.v[i]];
        uint64_t n = tree_entries(p, d->d.mapping_root);
        record(&c, CB_CHECK_REPAIRED, values(device(d->id), n, d->d.mapped_blocks),
               "device %u's mapped-block count set from %llu to %llu", d->id,
               (unsigned long long)d->d.mapped_blocks, (unsigned long long)n);
        d->d.mapped_blocks = n;
        d->changed = true;
    }
    /* The records store: kept whole when only its count or flag is off,
     * else rebuilt from every record that reads back. */
    if (!r && c.records_errors && c.records_recount) {
        record(&c, CB_CHECK_REPAIRED, values(nothing, c.records_found, p->m.sb.records_count),
               "records store: count set from %llu to %llu", (unsigned long long)p->m.sb.records_count,
               (unsigned long long)c.records_found);
        p->m.sb.records_count = c.records_found;
    } else if (!r && c.records_errors) {
        uint64_t kept = 0, lost = 0, lost_nodes = 0, had = p->m.sb.records_count;
        uint32_t root = 0;
        if ((r = rec_salvage(&p->m, p->m.sb.records_root, &root, &kept, &lost, &lost_nodes,
                             record_lost, &c)) == 0) {
            p->m.sb.records_root = root;
            p->m.sb.records_count = kept;
            record(&c, CB_CHECK_REPAIRED, values(nothing, had, kept),
                   "records store rebuilt: kept %llu of %llu records; %llu lost with a damaged "
                   "value, and what %llu unreadable nodes held", (unsigned long long)kept,
                   (unsigned long long)had, (unsigned long long)lost, (unsigned long long)lost_nodes);
        }
    }
    rec_update_flag(&p->m);
    p->dirty = true;
    /* 2. Count again with those devices gone, set every count from the trees,
     *    commit, and check from scratch: the repair must leave a clean pool. */
    uint64_t fixed = 0;
    struct checker c2 = {0};
    cb_check_summary again = {0};
    c2.sum = &again;
    if (!r && (r = run_check(p, &c2)) == 0)
        r = fix_counts(p, &c2, &fixed);
    free_checker(&c2);
    if (r) {
        r = pool_fail(p, r);
        goto done;
    }
    if ((r = pool_commit_locked(p)) != 0)
        goto done;
    memset(&c2, 0, sizeof c2);
    memset(&again, 0, sizeof again);
    c2.sum = &again;
    if ((r = run_check(p, &c2)) == 0) {
        record(&c, CB_CHECK_REPAIRED, nothing, "%llu reference counts set from the trees; check "
               "afterwards: %llu errors, %llu leaks", (unsigned long long)fixed,
               (unsigned long long)again.errors, (unsigned long long)again.leaks);
        for (size_t i = 0; i < c2.nr_records; i++) { /* what the check after it found */
            cb_check_record *f = &c2.records[i];
            struct about a = {f->space, f->device, f->block, f->has_values, f->expected, f->found};
            record(&c, f->kind, a, "%s", f->message);
        }
        sum->errors = again.errors;
        sum->leaks = again.leaks;
    }
    free_checker(&c2);
done:
    if (!r)
        r = take_records(&c, records, count);
    free_checker(&c);
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    commit_gate_leave(p);
    return r;
}

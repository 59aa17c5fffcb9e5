/*
 * Thin devices: the in-memory device table and the operations that create,
 * snapshot, change and delete devices.
 *
 * Every device is loaded into memory at open (struct cb_dev, indexed by id)
 * and changed there; commit writes the changed details back into the
 * device-details b-tree (dev_write_back), as dm-thin does.  The device, not
 * the tree entry, owns one reference to its mapping root and to its
 * overflow catalog block.
 *
 * Each operation here commits before it returns, so a create, snapshot,
 * delete or rename is durable when the call returns.  Each checks first
 * that metadata space is there for it (meta_reserve_check); a failure after
 * it started changing metadata turns the pool read-only (pool_fail), since
 * a half-made change must never be committed.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cowblock.h"

static struct bt_ctx dev_tree(cb_pool *p) { return (struct bt_ctx){&p->m, CB_BT_DEV_LEAF}; }
static struct bt_ctx map_tree(cb_pool *p) { return (struct bt_ctx){&p->m, CB_BT_MAP_LEAF}; }

struct cb_dev *pool_dev(cb_pool *p, uint32_t id)
{
    return id < p->devs_cap ? p->devs[id] : NULL;
}

static int no_device(uint32_t id) { return cb_err(CB_E_NOT_FOUND, "no device with id %u", id); }

void dev_free(struct cb_dev *d)
{
    if (d) {
        free(d->catalog);
        free(d);
    }
}

static int dev_slot(cb_pool *p, uint32_t id)
{
    if (id < p->devs_cap)
        return 0;
    uint32_t cap = p->devs_cap ? p->devs_cap : 64;
    while (cap <= id)
        cap *= 2;
    struct cb_dev **v = realloc(p->devs, cap * sizeof *v);
    if (!v)
        return cb_err(CB_E_NO_MEMORY, "out of memory for %u devices", cap);
    memset(v + p->devs_cap, 0, (cap - p->devs_cap) * sizeof *v);
    p->devs = v;
    p->devs_cap = cap;
    return 0;
}

static int add_dev(cb_pool *p, uint32_t id, const struct cb_dev_detail *d, const uint8_t *cat)
{
    int r = dev_slot(p, id);
    if (r)
        return r;
    struct cb_dev *dev = calloc(1, sizeof *dev);
    uint8_t *c = malloc(d->catalog_len ? d->catalog_len : 1);
    if (!dev || !c) {
        free(dev);
        free(c);
        return cb_err(CB_E_NO_MEMORY, "out of memory loading device %u", id);
    }
    dev->id = id;
    dev->d = *d;
    if (d->catalog_len)
        memcpy(c, cat, d->catalog_len);
    dev->catalog = c;
    p->devs[id] = dev;
    p->nr_devices++;
    return 0;
}

static int load_leaf_entry(cb_pool *p, uint32_t id, const struct cb_dev_detail *d)
{
    const uint8_t *cat = d->catalog;
    int err = 0;
    if (d->catalog_len > CB_CATALOG_MAX)
        return cb_err(CB_E_CORRUPT, "device %u is corrupt: catalog length %u exceeds %zu", id,
                      d->catalog_len, (size_t)CB_CATALOG_MAX);
    if (d->catalog_len > CB_CATALOG_INLINE) {
        const struct cb_catalog_block *cb = (const void *)meta_read(&p->m, d->catalog_block,
                                                                    CB_BT_CATALOG, CB_BT_CATALOG, &err);
        if (!cb)
            return err;
        if (cb->len != d->catalog_len)
            return cb_err(CB_E_CORRUPT, "device %u is corrupt: catalog block %u holds %u bytes, the "
                          "device says %u", id, d->catalog_block, cb->len, d->catalog_len);
        cat = cb->bytes;
    }
    if (d->size % 4096 || (d->size >> p->block_shift) > ((uint64_t)1 << 32))
        return cb_err(CB_E_CORRUPT, "device %u is corrupt: size %llu", id, (unsigned long long)d->size);
    /* Callers size arrays by it: it must be possible, not just plausible. */
    uint64_t dev_blocks = (d->size >> p->block_shift) + ((d->size & (p->block_size - 1)) != 0);
    if (d->mapped_blocks > dev_blocks || d->mapped_blocks > p->m.sb.nr_data_blocks)
        return cb_err(CB_E_CORRUPT, "device %u is corrupt: %llu mapped blocks, more than its size "
                      "or the pool holds", id, (unsigned long long)d->mapped_blocks);
    /* Devices live in an array indexed by id: a wild id would cost gigabytes. */
    if (id >= p->m.sb.next_dev_id || id >= CB_MAX_DEV_ID)
        return cb_err(CB_E_CORRUPT, "device-details tree is corrupt: device id %u, but ids given out "
                      "so far are below %u", id, p->m.sb.next_dev_id);
    if (id < p->devs_cap && p->devs[id])
        return cb_err(CB_E_CORRUPT, "device-details tree is corrupt: device %u appears twice", id);
    return add_dev(p, id, d, cat);
}

static int load_node(cb_pool *p, uint32_t b, int depth)
{
    int err = 0;
    if (depth > CB_MAX_TREE_DEPTH)
        return cb_err(CB_E_CORRUPT, "device-details tree is corrupt: deeper than %d levels at block %u",
                      CB_MAX_TREE_DEPTH, b);
    const uint8_t *n = meta_read(&p->m, b, CB_BT_INTERNAL, CB_BT_DEV_LEAF, &err);
    if (!n)
        return err;
    uint32_t nr = node_hdr(n)->nr_entries;
    for (uint32_t i = 0; i < nr && !err; i++) {
        if (node_hdr(n)->h.type == CB_BT_INTERNAL)
            err = load_node(p, node_u32_values(n)[i], depth + 1);
        else {
            struct cb_dev_detail detail; /* values sit unaligned in the node: copy out */
            memcpy(&detail, node_values(n) + i * sizeof detail, sizeof detail);
            err = load_leaf_entry(p, node_keys(n)[i], &detail);
        }
    }
    return err;
}

int dev_load_all(cb_pool *p)
{
    return p->m.sb.device_root ? load_node(p, p->m.sb.device_root, 0) : 0;
}

int dev_write_back(cb_pool *p)
{
    struct bt_ctx c = dev_tree(p);
    for (uint32_t i = 0; i < p->devs_cap; i++) {
        struct cb_dev *d = p->devs[i];
        if (!d || !d->changed)
            continue;
        bool replaced;
        int r = bt_insert(&c, &p->m.sb.device_root, d->id, &d->d, NULL, &replaced);
        if (r)
            return r;
        d->changed = false;
    }
    return 0;
}

/* Store a device's catalog: inline in the detail, or in its own block. */
static int set_catalog(cb_pool *p, struct cb_dev *d, const void *cat, uint32_t len)
{
    if (!cat) /* no catalog */
        cat = "", len = 0;
    if (len > CB_CATALOG_MAX)
        return cb_err(CB_E_INVALID, "device catalog of %u bytes is larger than %zu (names and labels "
                      "too long)", len, (size_t)CB_CATALOG_MAX);
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    memcpy(copy, cat, len);
    int err = 0;
    if (len <= CB_CATALOG_INLINE) {
        if (d->d.catalog_block && (err = meta_dec(&p->m, d->d.catalog_block, NULL)) != 0)
            goto fail;
        d->d.catalog_block = 0;
        memset(d->d.catalog, 0, sizeof d->d.catalog);
        memcpy(d->d.catalog, cat, len);
    } else {
        struct cb_catalog_block *cb;
        if (d->d.catalog_block && meta_is_new(&p->m, d->d.catalog_block)) {
            cb = (void *)p->m.dirty[d->d.catalog_block];
        } else {
            uint32_t old = d->d.catalog_block;
            if (!(cb = (void *)meta_new(&p->m, CB_BT_CATALOG, &d->d.catalog_block, &err)))
                goto fail;
            if (old && (err = meta_dec(&p->m, old, NULL)) != 0)
                goto fail;
        }
        memset(cb->bytes, 0, sizeof cb->bytes);
        memcpy(cb->bytes, cat, len);
        cb->len = len;
        memset(d->d.catalog, 0, sizeof d->d.catalog);
    }
    free(d->catalog);
    d->catalog = copy;
    d->d.catalog_len = len;
    d->changed = true;
    p->dirty = true;
    return 0;
fail:
    free(copy);
    return err;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int check_size(cb_pool *p, uint64_t size)
{
    if (size == 0 || size % 4096)
        return cb_err(CB_E_INVALID, "device size %llu is not a positive multiple of 4096",
                      (unsigned long long)size);
    uint64_t blocks = (size >> p->block_shift) + ((size & (p->block_size - 1)) != 0);
    if (blocks > ((uint64_t)1 << 32))
        return cb_err(CB_E_INVALID, "device size %llu is more than 2^32 blocks of %u",
                      (unsigned long long)size, p->block_size);
    return 0;
}

/* Make a device; the caller holds the write lock and has checked space. */
static int new_device(cb_pool *p, const struct cb_dev_detail *tmpl, const void *cat, uint32_t len,
                      uint32_t *id_out)
{
    uint32_t id = p->m.sb.next_dev_id;
    if (id >= CB_MAX_DEV_ID)
        return cb_err(CB_E_LIMIT, "device ids are exhausted (dm-thin's 24 bits)");
    struct cb_dev_detail d = *tmpl;
    d.catalog_len = 0;
    d.catalog_block = 0;
    int r = add_dev(p, id, &d, NULL);
    if (r)
        return r;
    p->m.sb.next_dev_id++;
    p->dirty = true;
    if ((r = set_catalog(p, p->devs[id], cat, len)) != 0) {
        dev_free(p->devs[id]);
        p->devs[id] = NULL;
        p->nr_devices--;
        return r;
    }
    *id_out = id;
    return 0;
}

int cb_dev_create(cb_pool *p, uint64_t size, const uint8_t *uuid16, const void *catalog,
                  uint32_t catalog_len, uint32_t *id_out)
{
    pthread_rwlock_wrlock(&p->lock);
    int r = pool_writable(p);
    if (!r)
        r = check_size(p, size);
    if (!r)
        r = meta_reserve_check(&p->m, 16);
    if (r)
        goto out;
    struct cb_dev_detail d;
    memset(&d, 0, sizeof d);
    d.size = size;
    d.created_ns = now_ns();
    d.transaction_id = p->m.sb.transaction_id + 1;
    d.creation_time = d.snap_time = p->m.sb.snap_time;
    uuid_or_random(d.uuid, uuid16);
    if ((r = new_device(p, &d, catalog, catalog_len, id_out)) == 0)
        r = pool_commit_locked(p);
out:
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_dev_snapshot(cb_pool *p, uint32_t origin, uint32_t flags, const uint8_t *uuid16,
                    const void *catalog, uint32_t catalog_len, uint32_t *id_out)
{
    pthread_rwlock_wrlock(&p->lock);
    struct cb_dev *o = pool_dev(p, origin);
    int r = pool_writable(p);
    if (!r && !o)
        r = no_device(origin);
    if (!r)
        r = meta_reserve_check(&p->m, 16);
    if (r)
        goto out;
    if (p->m.sb.snap_time + 1 >= (1u << 24)) {
        r = cb_err(CB_E_LIMIT, "snapshot time counter is exhausted (dm-thin's 24 bits)");
        goto out;
    }
    /* The snapshot shares the origin's whole tree: one reference, no walk. */
    if (o->d.mapping_root && (r = meta_inc(&p->m, o->d.mapping_root)) != 0) {
        r = pool_fail(p, r);
        goto out;
    }
    p->m.sb.snap_time++;
    struct cb_dev_detail d = o->d;
    d.flags = flags;
    d.created_ns = now_ns();
    d.transaction_id = p->m.sb.transaction_id + 1;
    d.origin_id = origin;
    d.creation_time = d.snap_time = p->m.sb.snap_time;
    uuid_or_random(d.uuid, uuid16);
    o->d.snap_time = p->m.sb.snap_time;
    o->changed = true;
    if ((r = new_device(p, &d, catalog, catalog_len, id_out)) != 0) {
        r = pool_fail(p, r);
        goto out;
    }
    r = pool_commit_locked(p);
out:
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_dev_delete(cb_pool *p, uint32_t id)
{
    pthread_rwlock_wrlock(&p->lock);
    meta_walk_begin(&p->m);
    struct cb_dev *d = pool_dev(p, id);
    int r = pool_writable(p);
    if (!r && !d)
        r = no_device(id);
    /* Freeing touches a space map page per CB_SM_ENTRIES blocks at most. */
    if (!r)
        r = meta_reserve_check(&p->m, 2 * (d->d.mapped_blocks / CB_SM_ENTRIES) + 32);
    if (r)
        goto out;
    struct bt_ctx mc = map_tree(p), dc = dev_tree(p);
    if ((r = bt_dec_tree(&mc, d->d.mapping_root)) != 0 ||
        (d->d.catalog_block && (r = meta_dec(&p->m, d->d.catalog_block, NULL)) != 0) ||
        (r = bt_remove(&dc, &p->m.sb.device_root, id, NULL)) < 0) {
        r = pool_fail(p, r);
        goto out;
    }
    dev_free(d);
    p->devs[id] = NULL;
    p->nr_devices--;
    p->dirty = true;
    r = pool_commit_locked(p);
out:
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_dev_info(cb_pool *p, uint32_t id, cb_devinfo *out)
{
    pthread_rwlock_rdlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    int r = 0;
    if (!d) {
        r = no_device(id);
    } else {
        out->id = id;
        out->flags = d->d.flags;
        out->size = d->d.size;
        out->mapped_blocks = d->d.mapped_blocks;
        out->created_ns = d->d.created_ns;
        out->transaction_id = d->d.transaction_id;
        out->origin_id = d->d.origin_id;
        out->creation_time = d->d.creation_time;
        out->snap_time = d->d.snap_time;
        out->catalog_len = d->d.catalog_len;
        memcpy(out->uuid, d->d.uuid, 16);
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_dev_catalog(cb_pool *p, uint32_t id, void *buf, uint32_t cap)
{
    pthread_rwlock_rdlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    int r;
    if (!d) {
        r = no_device(id);
    } else {
        memcpy(buf, d->catalog, d->d.catalog_len < cap ? d->d.catalog_len : cap);
        r = (int)d->d.catalog_len;
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

/* Start a change to device id: take the write lock and check that the pool
 * is writable, the device exists (and is writable, if asked) and metadata
 * space for `reserve` blocks is there.  Returns the device, or NULL with *r
 * set; the caller unlocks in both cases. */
static struct cb_dev *begin_change(cb_pool *p, uint32_t id, bool need_writable_dev,
                                   uint64_t reserve, int *r)
{
    pthread_rwlock_wrlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    *r = pool_writable(p);
    if (!*r && !d)
        *r = no_device(id);
    if (!*r && need_writable_dev && (d->d.flags & CB_DEV_READ_ONLY))
        *r = cb_err(CB_E_READ_ONLY, "device %u is read-only", id);
    if (!*r)
        *r = meta_reserve_check(&p->m, reserve);
    return *r ? NULL : d;
}

int cb_dev_set_catalog(cb_pool *p, uint32_t id, const void *catalog, uint32_t len)
{
    int r;
    struct cb_dev *d = begin_change(p, id, false, 8, &r);
    if (d && (r = set_catalog(p, d, catalog, len)) == 0)
        r = pool_commit_locked(p);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_dev_set_flags(cb_pool *p, uint32_t id, uint32_t flags)
{
    int r;
    struct cb_dev *d = begin_change(p, id, false, 8, &r);
    if (d) {
        d->d.flags = flags;
        d->changed = true;
        p->dirty = true;
        r = pool_commit_locked(p);
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_dev_resize(cb_pool *p, uint32_t id, uint64_t size)
{
    int r;
    struct cb_dev *d = begin_change(p, id, true, 64, &r);
    if (!r)
        r = check_size(p, size);
    if (r)
        goto out;
    if (size < d->d.size) {
        /* First zero the tail of a block the new end cuts (so growing again
         * reads zeroes there): the one step that may need a new block, done
         * before anything else changes, so ENOSPC leaves the device as it was.
         * Then drop every block past the end. */
        uint64_t first_gone = (size + p->block_size - 1) >> p->block_shift;
        uint64_t cut_end = first_gone << p->block_shift, removed = 0;
        if (cut_end > size && cut_end <= d->d.size &&
            (r = dev_zero_range_locked(p, d, size, cut_end - size)) != 0)
            goto out;
        struct bt_ctx mc = map_tree(p);
        d->changed = true;
        p->dirty = true;
        if ((r = bt_remove_range(&mc, &d->d.mapping_root, (uint32_t)first_gone,
                                 (uint64_t)UINT32_MAX + 1, &removed)) != 0) {
            r = pool_fail(p, r);
            goto out;
        }
        d->d.mapped_blocks -= removed;
    }
    d->d.size = size;
    d->changed = true;
    p->dirty = true;
    r = pool_commit_locked(p);
out:
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_dev_usage(cb_pool *p, uint32_t id, uint64_t *exclusive, uint64_t *shared)
{
    pthread_rwlock_rdlock(&p->lock);
    meta_walk_begin(&p->m);
    struct cb_dev *d = pool_dev(p, id);
    int r = d ? 0 : no_device(id);
    *exclusive = *shared = 0;
    if (!r && d->d.mapping_root) {
        struct bt_cursor cur = {.m = &p->m};
        for (r = bt_seek(&cur, d->d.mapping_root, 0, true); r == 1;
             r = bt_next(&cur, d->d.mapping_root, true)) {
            uint32_t ref = 1;
            if (!cur.shared_path && (r = sm_get(&p->m, &p->m.dsm, bt_cur_value(&cur), &ref)) != 0)
                break;
            if (cur.shared_path || ref > 1)
                (*shared)++;
            else
                (*exclusive)++;
        }
    }
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    return r < 0 ? r : 0;
}

int cb_dev_rollback(cb_pool *p, uint32_t id, uint32_t snap_id)
{
    int r;
    struct cb_dev *d = begin_change(p, id, true, 32, &r), *s = pool_dev(p, snap_id);
    meta_walk_begin(&p->m);
    if (!r && !s)
        r = no_device(snap_id);
    if (!r && id == snap_id)
        r = cb_err(CB_E_INVALID, "cannot roll device %u back to itself", id);
    if (!r)
        r = meta_reserve_check(&p->m, 2 * (d->d.mapped_blocks / CB_SM_ENTRIES) + 32);
    if (r)
        goto out;
    /* Share the snapshot's tree, as a snapshot of it would; then drop ours. */
    struct bt_ctx mc = map_tree(p);
    uint32_t old = d->d.mapping_root;
    if ((s->d.mapping_root && (r = meta_inc(&p->m, s->d.mapping_root)) != 0) ||
        (r = bt_dec_tree(&mc, old)) != 0) {
        r = pool_fail(p, r);
        goto out;
    }
    p->m.sb.snap_time = p->m.sb.snap_time + 1 < (1u << 24) ? p->m.sb.snap_time + 1 : p->m.sb.snap_time;
    d->d.mapping_root = s->d.mapping_root;
    d->d.mapped_blocks = s->d.mapped_blocks;
    d->d.size = s->d.size;
    d->d.snap_time = s->d.snap_time = p->m.sb.snap_time;
    d->changed = s->changed = true;
    p->dirty = true;
    r = pool_commit_locked(p);
out:
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

/* Append device d's mappings at keys/values/shared + *at (lock held). */
static int collect_mappings(cb_pool *p, struct cb_dev *d, uint32_t *keys, uint32_t *values,
                           uint8_t *shared, uint64_t *at)
{
    uint64_t n = d->d.mapped_blocks, i = 0;
    int r = 0;
    struct bt_cursor cur = {.m = &p->m};
    for (r = d->d.mapping_root ? bt_seek(&cur, d->d.mapping_root, 0, true) : 0; r == 1;
         r = bt_next(&cur, d->d.mapping_root, true)) {
        if (i == n)
            return cb_err(CB_E_CORRUPT, "device %u maps more blocks than its count %llu", d->id,
                          (unsigned long long)n);
        uint32_t ref = 1;
        if (!cur.shared_path && (r = sm_get(&p->m, &p->m.dsm, bt_cur_value(&cur), &ref)) != 0)
            return r;
        keys[*at + i] = bt_cur_key(&cur);
        values[*at + i] = bt_cur_value(&cur);
        shared[*at + i] = cur.shared_path || ref > 1;
        i++;
    }
    if (r < 0)
        return r;
    if (i != n)
        return cb_err(CB_E_CORRUPT, "device %u maps %llu blocks, its count says %llu", d->id,
                      (unsigned long long)i, (unsigned long long)n);
    *at += n;
    return 0;
}

static int alloc_mapping_arrays(uint64_t n, uint32_t **keys, uint32_t **values, uint8_t **shared)
{
    *keys = malloc(n * 4 + 4);
    *values = malloc(n * 4 + 4);
    *shared = malloc(n + 1);
    if (*keys && *values && *shared)
        return 0;
    free(*keys);
    free(*values);
    free(*shared);
    *keys = *values = NULL;
    *shared = NULL;
    return cb_err(CB_E_NO_MEMORY, "out of memory for %llu mappings", (unsigned long long)n);
}

int cb_dev_mappings(cb_pool *p, uint32_t id, uint32_t **keys, uint32_t **values,
                    uint8_t **shared, uint64_t *count)
{
    *keys = *values = NULL;
    *shared = NULL;
    *count = 0;
    pthread_rwlock_rdlock(&p->lock);
    meta_walk_begin(&p->m);
    struct cb_dev *d = pool_dev(p, id);
    int r = d ? alloc_mapping_arrays(d->d.mapped_blocks, keys, values, shared) : no_device(id);
    if (!r)
        r = collect_mappings(p, d, *keys, *values, *shared, count);
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    if (r < 0) {
        free(*keys);
        free(*values);
        free(*shared);
        *keys = *values = NULL;
        *shared = NULL;
        *count = 0;
    }
    return r;
}

int cb_pool_mappings(cb_pool *p, uint32_t **ids, uint64_t **counts, uint32_t *nr_devices,
                     uint32_t **keys, uint32_t **values, uint8_t **shared, uint64_t *total)
{
    *ids = NULL;
    *counts = NULL;
    *keys = *values = NULL;
    *shared = NULL;
    *nr_devices = 0;
    *total = 0;
    /* Mappings change only under the write lock: holding it shared for the
     * whole walk gives every device as of one instant. */
    pthread_rwlock_rdlock(&p->lock);
    meta_walk_begin(&p->m);
    uint64_t n = 0;
    for (uint32_t i = 0; i < p->devs_cap; i++)
        if (p->devs[i])
            n += p->devs[i]->d.mapped_blocks;
    int r = alloc_mapping_arrays(n, keys, values, shared);
    if (!r) {
        *ids = malloc(sizeof **ids * (p->nr_devices + 1));
        *counts = malloc(sizeof **counts * (p->nr_devices + 1));
        if (!*ids || !*counts)
            r = cb_err(CB_E_NO_MEMORY, "out of memory");
    }
    for (uint32_t i = 0; !r && i < p->devs_cap; i++) {
        struct cb_dev *d = p->devs[i];
        if (!d)
            continue;
        uint64_t before = *total;
        r = collect_mappings(p, d, *keys, *values, *shared, total);
        (*ids)[*nr_devices] = d->id;
        (*counts)[(*nr_devices)++] = *total - before;
    }
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    if (r < 0) {
        free(*ids);
        free(*counts);
        free(*keys);
        free(*values);
        free(*shared);
        *ids = NULL;
        *counts = NULL;
        *keys = *values = NULL;
        *shared = NULL;
        *nr_devices = 0;
        *total = 0;
    }
    return r;
}

int cb_dev_add_mappings(cb_pool *p, uint32_t id, const uint32_t *keys, const uint32_t *values,
                        uint64_t count)
{
    pthread_rwlock_wrlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    int r = pool_writable(p);
    uint64_t dev_blocks = d ? (d->d.size + p->block_size - 1) >> p->block_shift : 0;
    if (!r && !d)
        r = no_device(id);
    if (!r && d->d.mapping_root)
        r = cb_err(CB_E_INVALID, "device %u already maps blocks", id);
    for (uint64_t i = 0; !r && i < count; i++) {
        if (i && keys[i] <= keys[i - 1])
            r = cb_err(CB_E_INVALID, "mappings are not sorted and unique at virtual block %u", keys[i]);
        else if (keys[i] >= dev_blocks)
            r = cb_err(CB_E_INVALID, "virtual block %u is past the end of device %u (%llu blocks)",
                       keys[i], id, (unsigned long long)dev_blocks);
        else if (values[i] >= p->m.sb.nr_data_blocks)
            r = cb_err(CB_E_INVALID, "data block %u is past the end of the pool (%llu blocks)",
                       values[i], (unsigned long long)p->m.sb.nr_data_blocks);
    }
    /* Sorted inserts into an empty tree leave each leaf half full (splits
     * are in the middle) and shadow nothing (every node is new): count /
     * (leaf_max / 2) leaves and a few internal nodes, twice that to be safe,
     * plus the data space map's pages.  (2 blocks for every 64 mappings,
     * 8 times what they take, refused the restore of any pool more than half
     * mapped: its metadata is sized at 1 block for 64 data blocks.) */
    uint64_t per_leaf = p->m.leaf_max / 2 ? p->m.leaf_max / 2 : 1;
    if (!r)
        r = meta_reserve_check(&p->m, 2 * (count / per_leaf) + 2 * (count / CB_SM_ENTRIES) + 32);
    struct bt_ctx c = map_tree(p);
    for (uint64_t i = 0; !r && i < count; i++) {
        bool replaced;
        if ((r = sm_inc(&p->m, &p->m.dsm, values[i])) != 0 ||
            (r = bt_insert(&c, &d->d.mapping_root, keys[i], &values[i], NULL, &replaced)) != 0)
            r = pool_fail(p, r);
        else
            d->d.mapped_blocks++;
    }
    if (!r && count) {
        d->changed = true;
        p->dirty = true;
        r = pool_commit_locked(p);
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

/* Copying a pool: give a device the lineage and times of the one it copies
 * (origin_id names a device of this pool, or 0), raising the pool's
 * snapshot time to at least snap_time so later snapshots stay above it. */
int cb_dev_set_history(cb_pool *p, uint32_t id, uint32_t origin_id, uint64_t created_ns,
                       uint32_t creation_time, uint32_t snap_time)
{
    int r;
    struct cb_dev *d = begin_change(p, id, false, 8, &r);
    if (d && origin_id && !pool_dev(p, origin_id))
        r = no_device(origin_id);
    else if (d && (creation_time >= (1u << 24) || snap_time >= (1u << 24)))
        r = cb_err(CB_E_INVALID, "snapshot times %u and %u do not fit dm-thin's 24 bits",
                   creation_time, snap_time);
    if (d && !r) {
        d->d.origin_id = origin_id;
        d->d.created_ns = created_ns;
        d->d.creation_time = creation_time;
        d->d.snap_time = snap_time;
        if (p->m.sb.snap_time < snap_time)
            p->m.sb.snap_time = snap_time;
        d->changed = true;
        p->dirty = true;
        r = pool_commit_locked(p);
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

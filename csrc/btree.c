/*
 * Copy-on-write b-trees with 32-bit keys and reference-counted nodes.
 *
 * Two kinds of tree use this code: a device's mapping tree (virtual block ->
 * data block, 4-byte values counted in the data space map) and the device
 * details tree (device id -> struct cb_dev_detail, whose mapping roots and
 * catalog blocks are counted in the metadata space map).
 *
 * Sharing, as in dm-thin (persistent-data/dm-btree-spine.c): a snapshot
 * takes another reference to a root.  A node with count > 1 is shared; to
 * change it we shadow it (meta_shadow): the copy takes its own reference to
 * every child or value (bt_inc_values), the original loses one.  A node
 * new in this transaction with count 1 is changed in place.  So a snapshot
 * costs one reference-count change, a write after it copies one path, and
 * reading any device costs the same whatever its snapshot depth.
 *
 * Invariants: keys in a leaf are sorted and unique; in an internal node,
 * keys[i] <= every key under child i < keys[i + 1].  Inserts split full
 * nodes on the way down, so a parent always has room for a new separator.
 * Removals free empty nodes but do not merge under-full ones.
 */
#include <string.h>

#include "cowblock.h"

/* Deeper than any real tree: a cycle in corrupt metadata. */
#define MAX_DEPTH CB_MAX_TREE_DEPTH

static int too_deep(uint32_t b)
{
    return cb_err(CB_E_CORRUPT, "metadata is corrupt: a b-tree is deeper than %d levels at block %u "
                  "(a cycle?)", MAX_DEPTH, b);
}

static uint32_t max_entries(struct cb_meta *m, uint32_t type)
{
    return type == CB_BT_INTERNAL ? m->internal_max : type == CB_BT_MAP_LEAF ? m->leaf_max
                                                                           : m->dev_leaf_max;
}

static uint32_t value_size(uint32_t type)
{
    return type == CB_BT_DEV_LEAF ? sizeof(struct cb_dev_detail) : 4;
}

static uint32_t node_type(const uint8_t *n) { return node_hdr(n)->h.type; }

/* First index i with keys[i] >= key. */
static uint32_t lower_bound(const uint32_t *keys, uint32_t n, uint32_t key)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The child of an internal node whose range holds key. */
static uint32_t child_index(const uint8_t *n, uint32_t key)
{
    const uint32_t *keys = node_keys(n);
    uint32_t nr = node_hdr(n)->nr_entries;
    uint32_t lo = 0, hi = nr; /* first index with keys[i] > key */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (keys[mid] <= key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo ? lo - 1 : 0;
}

static const uint8_t *read_node(struct cb_meta *m, uint32_t b, uint32_t leaf_type, int *err)
{
    return meta_read(m, b, CB_BT_INTERNAL, leaf_type, err);
}

static uint8_t *new_node(struct cb_meta *m, uint32_t type, uint32_t *b, int *err)
{
    uint8_t *n = meta_new(m, type, b, err);
    if (n) {
        node_hdr(n)->max_entries = max_entries(m, type);
        node_hdr(n)->value_size = value_size(type);
        node_hdr(n)->nr_entries = 0;
    }
    return n;
}

/* The copy of a shared node takes its own reference to everything below. */
int bt_inc_values(struct cb_meta *m, const uint8_t *n)
{
    uint32_t nr = node_hdr(n)->nr_entries;
    int r = 0;
    switch (node_type(n)) {
    case CB_BT_INTERNAL:
        for (uint32_t i = 0; i < nr && !r; i++)
            r = meta_inc(m, node_u32_values(n)[i]);
        break;
    case CB_BT_MAP_LEAF:
        for (uint32_t i = 0; i < nr && !r; i++)
            r = sm_inc(m, &m->dsm, node_u32_values(n)[i]);
        break;
    case CB_BT_DEV_LEAF:
        /* The device, not the tree, owns its mapping root and catalog block
         * (device.c): the in-memory device is newer than its detail here. */
        break;
    }
    return r;
}

static uint8_t *shadow(struct bt_ctx *c, uint32_t *slot, int *err)
{
    return meta_shadow(c->m, slot, CB_BT_INTERNAL, c->leaf_type, bt_inc_values, err);
}

static int dec_node(struct bt_ctx *c, uint32_t b, int depth);

/* Drop the reference a leaf entry's value holds (mapping leaves only: see
 * bt_inc_values for device leaves). */
static int dec_value(struct bt_ctx *c, uint32_t type, const uint8_t *v)
{
    if (type != CB_BT_MAP_LEAF)
        return 0;
    bool z;
    uint32_t blk;
    memcpy(&blk, v, 4);
    return sm_dec(c->m, &c->m->dsm, blk, &z);
}

/* Drop one reference to node b; if that was the last, drop what it holds. */
static int dec_node(struct bt_ctx *c, uint32_t b, int depth)
{
    uint32_t ref;
    if (depth > MAX_DEPTH)
        return too_deep(b);
    int r = sm_get(c->m, &c->m->msm, b, &ref);
    if (r)
        return r;
    if (ref == 1) {
        const uint8_t *n = read_node(c->m, b, c->leaf_type, &r);
        if (!n)
            return r;
        uint32_t nr = node_hdr(n)->nr_entries, type = node_type(n), vs = node_hdr(n)->value_size;
        for (uint32_t i = 0; i < nr && !r; i++) {
            if (type == CB_BT_INTERNAL)
                r = dec_node(c, node_u32_values(n)[i], depth + 1);
            else
                r = dec_value(c, type, node_values(n) + (size_t)i * vs);
        }
        if (r)
            return r;
    }
    return meta_dec(c->m, b, NULL);
}

int bt_dec_tree(struct bt_ctx *c, uint32_t root) { return root ? dec_node(c, root, 0) : 0; }

int bt_lookup(struct cb_meta *m, uint32_t root, uint32_t key, void *value, uint32_t vsize)
{
    int err = 0, depth = 0;
    uint32_t b = root;
    while (b) {
        if (++depth > MAX_DEPTH)
            return too_deep(b);
        const uint8_t *n = meta_read(m, b, CB_BT_INTERNAL, vsize == 4 ? CB_BT_MAP_LEAF : CB_BT_DEV_LEAF,
                                     &err);
        if (!n)
            return err;
        uint32_t nr = node_hdr(n)->nr_entries;
        if (node_type(n) == CB_BT_INTERNAL) {
            if (nr == 0)
                return cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: empty internal node", b);
            b = node_u32_values(n)[child_index(n, key)];
            continue;
        }
        uint32_t i = lower_bound(node_keys(n), nr, key);
        if (i < nr && node_keys(n)[i] == key) {
            memcpy(value, node_values(n) + (size_t)i * vsize, vsize);
            return 1;
        }
        return 0;
    }
    return 0;
}

/* Move the upper half of parent's child i into a new sibling at i + 1. */
static int split_child(struct bt_ctx *c, uint8_t *parent, uint32_t i)
{
    int err = 0;
    uint8_t *child = c->m->dirty[node_u32_values(parent)[i]];
    uint32_t type = node_type(child), vs = node_hdr(child)->value_size;
    uint32_t nr = node_hdr(child)->nr_entries, mid = nr / 2, sib_b;
    uint8_t *sib = new_node(c->m, type, &sib_b, &err);
    if (!sib)
        return err;
    uint32_t moved = nr - mid;
    memcpy(node_keys(sib), node_keys(child) + mid, 4u * moved);
    memcpy(node_values(sib), node_values(child) + (size_t)mid * vs, (size_t)moved * vs);
    node_hdr(sib)->nr_entries = moved;
    node_hdr(child)->nr_entries = mid;
    uint32_t pnr = node_hdr(parent)->nr_entries;
    uint32_t *pk = node_keys(parent), *pv = node_u32_values(parent);
    memmove(pk + i + 2, pk + i + 1, 4u * (pnr - i - 1));
    memmove(pv + i + 2, pv + i + 1, 4u * (pnr - i - 1));
    pk[i + 1] = node_keys(sib)[0];
    pv[i + 1] = sib_b;
    node_hdr(parent)->nr_entries = pnr + 1;
    return 0;
}

static bool full(const uint8_t *n) { return node_hdr(n)->nr_entries >= node_hdr(n)->max_entries; }

int bt_insert(struct bt_ctx *c, uint32_t *root, uint32_t key, const void *value, void *old_value,
              bool *replaced)
{
    int err = 0;
    uint32_t vs = value_size(c->leaf_type);
    *replaced = false;
    if (*root == 0) {
        uint8_t *leaf = new_node(c->m, c->leaf_type, root, &err);
        if (!leaf)
            return err;
        node_keys(leaf)[0] = key;
        memcpy(node_values(leaf), value, vs);
        node_hdr(leaf)->nr_entries = 1;
        return 0;
    }
    uint8_t *n = shadow(c, root, &err);
    if (!n)
        return err;
    if (full(n)) { /* grow a level: a new root above the old one, then split it */
        uint32_t old_root = *root;
        uint8_t *top = new_node(c->m, CB_BT_INTERNAL, root, &err);
        if (!top)
            return err;
        node_keys(top)[0] = node_keys(n)[0];
        node_u32_values(top)[0] = old_root;
        node_hdr(top)->nr_entries = 1;
        if ((err = split_child(c, top, 0)) != 0)
            return err;
        n = top;
    }
    for (int depth = 0;; depth++) {
        if (depth > MAX_DEPTH)
            return too_deep(*root);
        uint32_t nr = node_hdr(n)->nr_entries;
        uint32_t *keys = node_keys(n);
        if (node_type(n) != CB_BT_INTERNAL) {
            uint32_t i = lower_bound(keys, nr, key);
            uint8_t *vals = node_values(n);
            if (i < nr && keys[i] == key) {
                if (old_value)
                    memcpy(old_value, vals + (size_t)i * vs, vs);
                memcpy(vals + (size_t)i * vs, value, vs);
                *replaced = true;
                return 0;
            }
            memmove(keys + i + 1, keys + i, 4u * (nr - i));
            memmove(vals + (size_t)(i + 1) * vs, vals + (size_t)i * vs, (size_t)(nr - i) * vs);
            keys[i] = key;
            memcpy(vals + (size_t)i * vs, value, vs);
            node_hdr(n)->nr_entries = nr + 1;
            return 0;
        }
        uint32_t i = child_index(n, key);
        if (key < keys[0])
            keys[0] = key;
        uint8_t *child = shadow(c, &node_u32_values(n)[i], &err);
        if (!child)
            return err;
        if (full(child)) {
            if ((err = split_child(c, n, i)) != 0)
                return err;
            if (key >= keys[i + 1])
                i++;
            child = c->m->dirty[node_u32_values(n)[i]];
        }
        n = child;
    }
}

/* Entries under node b (walks the subtree). */
static int count_entries(struct bt_ctx *c, uint32_t b, uint64_t *count, int depth)
{
    int err = 0;
    if (depth > MAX_DEPTH)
        return too_deep(b);
    const uint8_t *n = read_node(c->m, b, c->leaf_type, &err);
    if (!n)
        return err;
    uint32_t nr = node_hdr(n)->nr_entries;
    if (node_type(n) != CB_BT_INTERNAL) {
        *count += nr;
        return 0;
    }
    for (uint32_t i = 0; i < nr; i++)
        if ((err = count_entries(c, node_u32_values(n)[i], count, depth + 1)) != 0)
            return err;
    return 0;
}

static void remove_entries(uint8_t *n, uint32_t i, uint32_t j)
{
    uint32_t nr = node_hdr(n)->nr_entries, vs = node_hdr(n)->value_size;
    uint32_t *keys = node_keys(n);
    uint8_t *vals = node_values(n);
    memmove(keys + i, keys + j, 4u * (nr - j));
    memmove(vals + (size_t)i * vs, vals + (size_t)j * vs, (size_t)(nr - j) * vs);
    node_hdr(n)->nr_entries = nr - (j - i);
}

/* Remove keys in [begin, end) below *slot; end is exclusive, 64-bit so that
 * the whole 32-bit key space can be named.  *empty: the node is now empty. */
static int remove_range(struct bt_ctx *c, uint32_t *slot, uint32_t begin, uint64_t end,
                        uint64_t *removed, bool *empty, int depth)
{
    int err = 0;
    if (depth > MAX_DEPTH)
        return too_deep(*slot);
    const uint8_t *ro = read_node(c->m, *slot, c->leaf_type, &err);
    if (!ro)
        return err;
    uint32_t nr = node_hdr(ro)->nr_entries;
    *empty = nr == 0;
    if (nr == 0 || end <= node_keys(ro)[0])
        return 0;
    if (node_type(ro) != CB_BT_INTERNAL) {
        uint32_t i = lower_bound(node_keys(ro), nr, begin);
        uint32_t j = end > UINT32_MAX ? nr : lower_bound(node_keys(ro), nr, (uint32_t)end);
        if (i == j)
            return 0;
        uint8_t *n = shadow(c, slot, &err);
        if (!n)
            return err;
        for (uint32_t k = i; k < j && !err; k++)
            err = dec_value(c, node_type(n), node_values(n) + (size_t)k * node_hdr(n)->value_size);
        if (err)
            return err;
        remove_entries(n, i, j);
        *removed += j - i;
        *empty = node_hdr(n)->nr_entries == 0;
        return 0;
    }
    uint32_t first = child_index(ro, begin);
    uint32_t last = end > UINT32_MAX ? nr - 1 : child_index(ro, (uint32_t)(end - 1));
    uint8_t *n = shadow(c, slot, &err);
    if (!n)
        return err;
    for (uint32_t k = last + 1; k-- > first;) {
        uint32_t *keys = node_keys(n), *vals = node_u32_values(n);
        uint64_t lo = keys[k];
        uint64_t hi = k + 1 < node_hdr(n)->nr_entries ? keys[k + 1] : (uint64_t)UINT32_MAX + 1;
        bool gone;
        if (lo >= begin && hi <= end) {
            if ((err = count_entries(c, vals[k], removed, 1)) != 0)
                return err;
            gone = true;
        } else if ((err = remove_range(c, &vals[k], begin, end, removed, &gone, depth + 1)) != 0) {
            return err;
        }
        if (gone) {
            if ((err = dec_node(c, vals[k], depth + 1)) != 0)
                return err;
            remove_entries(n, k, k + 1);
        }
    }
    *empty = node_hdr(n)->nr_entries == 0;
    return 0;
}

int bt_remove_range(struct bt_ctx *c, uint32_t *root, uint32_t begin, uint64_t end, uint64_t *removed)
{
    if (*root == 0 || end <= begin)
        return 0;
    if (c->leaf_type == CB_BT_MAP_LEAF) { /* nothing there: copy no node */
        struct bt_cursor cur = {.m = c->m};
        int r = bt_seek(&cur, *root, begin, false);
        if (r <= 0)
            return r;
        if (bt_cur_key(&cur) >= end)
            return 0;
    }
    bool empty;
    int err = remove_range(c, root, begin, end, removed, &empty, 0);
    if (err)
        return err;
    if (empty) {
        err = dec_node(c, *root, 0);
        *root = 0;
        return err;
    }
    /* Drop root levels that have a single child. */
    for (;;) {
        const uint8_t *n = read_node(c->m, *root, c->leaf_type, &err);
        if (!n)
            return err;
        if (node_type(n) != CB_BT_INTERNAL || node_hdr(n)->nr_entries != 1)
            return 0;
        uint32_t child = node_u32_values(n)[0], old = *root;
        if ((err = meta_inc(c->m, child)) != 0 || (err = dec_node(c, old, 0)) != 0)
            return err;
        *root = child;
    }
}

int bt_remove(struct bt_ctx *c, uint32_t *root, uint32_t key, void *old_value)
{
    if (old_value) {
        int r = bt_lookup(c->m, *root, key, old_value, value_size(c->leaf_type));
        if (r <= 0)
            return r;
    }
    uint64_t removed = 0;
    return bt_remove_range(c, root, key, (uint64_t)key + 1, &removed);
}

/* ---- cursor ---- */

int bt_seek(struct bt_cursor *cur, uint32_t root, uint32_t key, bool want_sharing)
{
    int err = 0;
    struct cb_meta *m = cur->m;
    bool shared = false, has_next = false;
    uint32_t next_key = 0, b = root;
    int depth = 0, restarts = 0;
    cur->leaf = NULL;
    while (b) {
        if (++depth > MAX_DEPTH)
            return too_deep(b);
        const uint8_t *n = read_node(m, b, CB_BT_MAP_LEAF, &err);
        if (!n)
            return err;
        if (want_sharing && !shared) {
            /* Shared now, or possibly in the last commit (count dropped in
             * this transaction): either way a write must not go in place. */
            uint32_t ref;
            if ((err = sm_get(m, &m->msm, b, &ref)) != 0)
                return err;
            shared = ref > 1 || (!meta_is_new(m, b) && sm_dropped(&m->msm, b));
        }
        uint32_t nr = node_hdr(n)->nr_entries;
        if (node_type(n) == CB_BT_INTERNAL) {
            if (nr == 0)
                return cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: empty internal node", b);
            uint32_t i = child_index(n, key);
            if (i + 1 < nr) {
                has_next = true;
                next_key = node_keys(n)[i + 1];
            }
            b = node_u32_values(n)[i];
            continue;
        }
        uint32_t pos = lower_bound(node_keys(n), nr, key);
        if (pos < nr) {
            cur->leaf = n;
            cur->leaf_block = b;
            cur->pos = pos;
            cur->nr = nr;
            cur->shared_path = shared;
            return 1;
        }
        if (!has_next)
            return 0;
        /* Past this leaf: restart at the next subtree's lower bound (which
         * only grows; bounded in case corrupt keys say otherwise). */
        if (next_key <= key || ++restarts > MAX_DEPTH)
            return cb_err(CB_E_CORRUPT, "metadata is corrupt: b-tree keys out of order near block %u", b);
        key = next_key;
        depth = 0;
        b = root;
        shared = false;
        has_next = false;
    }
    return 0;
}

/* Every step must go to a greater key: on damaged metadata (unsorted keys,
 * a subtree reachable twice) a walk would otherwise go round forever, or
 * for an exponential time. */
int bt_next(struct bt_cursor *cur, uint32_t root, bool want_sharing)
{
    uint32_t prev = bt_cur_key(cur);
    int r = 1;
    if (++cur->pos >= cur->nr) {
        if (prev == UINT32_MAX)
            return 0;
        r = bt_seek(cur, root, prev + 1, want_sharing);
    }
    if (r == 1 && bt_cur_key(cur) <= prev)
        return cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: its keys are out of order (%u "
                      "after %u)", cur->leaf_block, bt_cur_key(cur), prev);
    return r;
}

uint32_t bt_cur_key(const struct bt_cursor *cur) { return node_keys(cur->leaf)[cur->pos]; }
uint32_t bt_cur_value(const struct bt_cursor *cur) { return node_u32_values(cur->leaf)[cur->pos]; }

/*
 * The records store: a pool-wide map of byte-string keys to byte-string
 * values, kept in the metadata and committed with everything else.
 *
 * Design
 *  - An ordered copy-on-write B+tree (format.h, struct cb_rec_node), rooted
 *    at the superblock's records_root.  Keys are 1 to CB_RECORD_KEY_MAX
 *    bytes of anything, ordered bytewise; listing by prefix is a walk of one
 *    key range, resumable from any key.  The device trees' btree.c cannot
 *    carry this: its keys are u32 and its values of one fixed size, and a
 *    tree keyed by a hash of the key would lose the order that prefix
 *    listing needs.  What is shared with them is everything below: blocks
 *    come from meta_new and are changed only after meta_shadow, read through
 *    meta_read (type, checksum, self-location, and for these nodes the
 *    structure, verified once), counted in the metadata space map, and
 *    subject to the same reserve (meta_reserve_check).
 *  - Nodes pack variable-length entries in key order.  A leaf entry holds
 *    the key and the value inline when the entry fits in CB_REC_ENTRY_MAX (a
 *    third of a node: small values cost no block of their own), or the
 *    number of the first of a chain of value blocks.  A value is written
 *    whole and read whole, never changed in part, so a chain is all it
 *    needs; a put of a new value writes a new chain and frees the old.
 *  - Internal entry i holds child i and its lower bound; entry 0 has none,
 *    its bound is the one its parent gives the node.  Separators pushed up
 *    by a leaf split are the shortest prefix of the right half's first key
 *    above the left half's last.  Every node has a level (0 for leaves), a
 *    child exactly one below its parent, so no walk can go round.
 *  - Inserts split on the way down, as btree.c does: an internal node with
 *    no room for one more entry of the largest size (or at the pool's node
 *    capacity) is split before it is entered, so the leaf's parent always
 *    has room for the separator its split pushes up.  Any node with one
 *    entry too many splits into two that fit, since no entry exceeds a third
 *    of a node.  Deletes free empty nodes and drop a root with one child;
 *    under-full nodes are not merged.
 *  - The tree is never shared (nothing snapshots it), so every node and
 *    value block has count 1 and a shadow just moves it; rec_inc_children
 *    is there for a count above 1 all the same, as for any CoW block.
 *
 * The calls of api.h over this tree are in records_api.c.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowblock.h"

#define LEAF_HDR ((uint32_t)sizeof(struct cb_rec_leaf_entry))
#define INT_HDR ((uint32_t)sizeof(struct cb_rec_internal_entry))
#define SPACE ((uint32_t)CB_REC_NODE_SPACE)
#define MAX_INT_ENTRY (INT_HDR + CB_RECORD_KEY_MAX)
#define MAX_ENTRIES (SPACE / INT_HDR + 1) /* more than any node can hold */

static struct cb_rec_node *rnode(const uint8_t *b) { return (struct cb_rec_node *)b; }
static bool is_leaf(const uint8_t *n) { return rnode(n)->h.type == CB_BT_REC_LEAF; }

static int keycmp(const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen)
{
    uint32_t n = alen < blen ? alen : blen;
    int c = n ? memcmp(a, b, n) : 0;
    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

static bool has_prefix(const uint8_t *k, uint32_t klen, const uint8_t *pre, uint32_t plen)
{
    return klen >= plen && (plen == 0 || memcmp(k, pre, plen) == 0);
}

/* The size of the entry at p, and its key: only its lengths are read. */
static inline uint32_t entry_size(const uint8_t *p, bool leaf)
{
    uint16_t klen;
    if (!leaf) {
        memcpy(&klen, p + offsetof(struct cb_rec_internal_entry, key_len), 2);
        return INT_HDR + klen;
    }
    uint32_t vlen;
    memcpy(&klen, p + offsetof(struct cb_rec_leaf_entry, key_len), 2);
    memcpy(&vlen, p + offsetof(struct cb_rec_leaf_entry, value_len), 4);
    return LEAF_HDR + klen + ((p[offsetof(struct cb_rec_leaf_entry, flags)] & CB_REC_IN_BLOCKS)
                              ? 4 : vlen);
}

static inline int entry_keycmp(const uint8_t *p, bool leaf, const uint8_t *key, uint32_t klen)
{
    uint16_t len;
    memcpy(&len, p + (leaf ? offsetof(struct cb_rec_leaf_entry, key_len)
                           : offsetof(struct cb_rec_internal_entry, key_len)), 2);
    return keycmp(p + (leaf ? LEAF_HDR : INT_HDR), len, key, klen);
}

void rec_entry_at(const uint8_t *n, uint32_t at, struct rec_entry *e)
{
    const uint8_t *p = rnode(n)->entries + at;
    e->value = NULL;
    e->first_block = e->child = e->flags = e->value_len = 0;
    if (is_leaf(n)) {
        struct cb_rec_leaf_entry h;
        memcpy(&h, p, sizeof h);
        e->key = p + LEAF_HDR;
        e->key_len = h.key_len;
        e->flags = h.flags;
        e->value_len = h.value_len;
        if (h.flags & CB_REC_IN_BLOCKS) {
            memcpy(&e->first_block, p + LEAF_HDR + h.key_len, 4);
            e->size = LEAF_HDR + h.key_len + 4;
        } else {
            e->value = p + LEAF_HDR + h.key_len;
            e->size = LEAF_HDR + h.key_len + h.value_len;
        }
    } else {
        struct cb_rec_internal_entry h;
        memcpy(&h, p, sizeof h);
        e->child = h.child;
        e->key = p + INT_HDR;
        e->key_len = h.key_len;
        e->size = INT_HDR + h.key_len;
    }
}

uint32_t rec_value_blocks(uint32_t value_len)
{
    return (uint32_t)((value_len + CB_REC_VALUE_BYTES - 1) / CB_REC_VALUE_BYTES);
}

/* ---- verification of a committed node, once (from meta.c) ---- */

static int bad_node(uint32_t b, const char *what, uint64_t expected, uint64_t found)
{
    int r = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: records node %s: expected %llu, "
                   "found %llu", b, what, (unsigned long long)expected, (unsigned long long)found);
    cb_err_values(expected, found);
    return r;
}

int rec_verify_node(struct cb_meta *m, uint32_t b, const uint8_t *blk)
{
    const struct cb_rec_node *n = (const void *)blk;
    bool leaf = n->h.type == CB_BT_REC_LEAF;
    if (n->level > CB_MAX_TREE_DEPTH || (n->level == 0) != leaf)
        return bad_node(b, leaf ? "level of a leaf" : "level of an internal node", leaf ? 0 : 1,
                        n->level);
    if (n->used > SPACE)
        return bad_node(b, "bytes in use", SPACE, n->used);
    if (n->nr_entries == 0 || n->nr_entries > m->rec_max_entries)
        return bad_node(b, "entry count", n->nr_entries ? m->rec_max_entries : 1, n->nr_entries);
    uint64_t at = 0;
    const uint8_t *prev = NULL;
    uint32_t prev_len = 0;
    for (uint32_t i = 0; i < n->nr_entries; i++) {
        uint32_t hdr = leaf ? LEAF_HDR : INT_HDR;
        if (at + hdr > n->used)
            return bad_node(b, "entries overrun the bytes in use", n->used, at + hdr);
        const uint8_t *p = n->entries + at;
        uint64_t size;
        uint32_t key_len;
        if (leaf) {
            struct cb_rec_leaf_entry h;
            memcpy(&h, p, sizeof h);
            key_len = h.key_len;
            if (key_len == 0 || key_len > CB_RECORD_KEY_MAX)
                return bad_node(b, "key length", CB_RECORD_KEY_MAX, key_len);
            if (h.flags & ~CB_REC_IN_BLOCKS)
                return bad_node(b, "entry flags", CB_REC_IN_BLOCKS, h.flags);
            if (h.flags & CB_REC_IN_BLOCKS) {
                if (h.value_len == 0 || h.value_len > CB_RECORD_VALUE_MAX)
                    return bad_node(b, "value length", CB_RECORD_VALUE_MAX, h.value_len);
                size = LEAF_HDR + key_len + 4;
            } else {
                size = (uint64_t)LEAF_HDR + key_len + h.value_len;
                if (size > CB_REC_ENTRY_MAX)
                    return bad_node(b, "inline entry size", CB_REC_ENTRY_MAX, size);
            }
        } else {
            struct cb_rec_internal_entry h;
            memcpy(&h, p, sizeof h);
            key_len = h.key_len;
            if (i == 0 ? key_len != 0 : key_len == 0 || key_len > CB_RECORD_KEY_MAX)
                return bad_node(b, i == 0 ? "first separator length" : "separator length",
                                i == 0 ? 0 : CB_RECORD_KEY_MAX, key_len);
            size = INT_HDR + key_len;
        }
        if (at + size > n->used)
            return bad_node(b, "entries overrun the bytes in use", n->used, at + size);
        const uint8_t *key = p + (leaf ? LEAF_HDR : INT_HDR);
        if (prev && keycmp(prev, prev_len, key, key_len) >= 0)
            return cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: records node keys out of "
                          "order at entry %u", b, i);
        if (leaf || i > 0) {
            prev = key;
            prev_len = key_len;
        }
        at += size;
    }
    if (at != n->used)
        return bad_node(b, "bytes of its entries", n->used, at);
    return 0;
}

int rec_verify_value(uint32_t b, const uint8_t *blk)
{
    const struct cb_rec_value_block *v = (const void *)blk;
    if (v->len == 0 || v->len > CB_REC_VALUE_BYTES)
        return bad_node(b, "value block length", CB_REC_VALUE_BYTES, v->len);
    return 0;
}

/* ---- reading ---- */

static const uint8_t *read_node(struct cb_meta *m, uint32_t b, int *err)
{
    return meta_read(m, b, CB_BT_REC_INTERNAL, CB_BT_REC_LEAF, err);
}

static int wrong_level(uint32_t b, uint32_t expected, uint32_t found)
{
    int r = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: records node at level %u, its "
                   "parent wants %u", b, found, expected);
    cb_err_values(expected, found);
    return r;
}

/* Byte offsets of a node's entries (off[nr] is the end); returns how many. */
static uint32_t offsets(const uint8_t *n, uint16_t *off)
{
    const uint8_t *entries = rnode(n)->entries;
    bool leaf = is_leaf(n);
    uint32_t at = 0, nr = rnode(n)->nr_entries;
    for (uint32_t i = 0; i < nr; i++) {
        off[i] = (uint16_t)at;
        at += entry_size(entries + at, leaf);
    }
    off[nr] = (uint16_t)at;
    return nr;
}

/* The child of internal node n whose range holds key: the last entry i >= 1
 * whose separator is <= key, else 0.  *at gets its byte offset. */
static uint32_t child_for(const uint8_t *n, const uint8_t *key, uint32_t klen, uint32_t *at)
{
    uint16_t off[MAX_ENTRIES + 1];
    uint32_t lo = 1, hi = offsets(n, off); /* the first separator above key, in [1, nr] */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (entry_keycmp(rnode(n)->entries + off[mid], false, key, klen) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *at = off[lo - 1];
    return lo - 1;
}

/* The first leaf entry with key >= key: its index and offset, and whether
 * it is equal. */
static uint32_t leaf_find(const uint8_t *n, const uint8_t *key, uint32_t klen, uint32_t *at, bool *eq)
{
    uint16_t off[MAX_ENTRIES + 1];
    uint32_t nr = offsets(n, off), lo = 0, hi = nr;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (entry_keycmp(rnode(n)->entries + off[mid], true, key, klen) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *eq = lo < nr && entry_keycmp(rnode(n)->entries + off[lo], true, key, klen) == 0;
    *at = off[lo];
    return lo;
}

/* Find key: 1 and its entry (pointing into the leaf), 0 if absent. */
int rec_lookup(struct cb_meta *m, uint32_t root, const uint8_t *key, uint32_t klen,
               struct rec_entry *out)
{
    int err = 0;
    uint32_t b = root, want = UINT32_MAX;
    while (b) {
        const uint8_t *n = read_node(m, b, &err);
        if (!n)
            return err;
        if (want != UINT32_MAX && rnode(n)->level != want)
            return wrong_level(b, want, rnode(n)->level);
        want = rnode(n)->level - 1;
        uint32_t at;
        if (!is_leaf(n)) {
            child_for(n, key, klen, &at);
            struct rec_entry e;
            rec_entry_at(n, at, &e);
            b = e.child;
            continue;
        }
        bool eq;
        leaf_find(n, key, klen, &at, &eq);
        if (!eq)
            return 0;
        rec_entry_at(n, at, out);
        return 1;
    }
    return 0;
}

static int value_corrupt(uint32_t b, const char *what, uint64_t expected, uint64_t found)
{
    int r = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: record value block %s: expected "
                   "%llu, found %llu", b, what, (unsigned long long)expected,
                   (unsigned long long)found);
    cb_err_values(expected, found);
    return r;
}

/* Walk a value's chain: copy it to out (if not NULL), or drop a reference
 * to each block (free) until one is still held elsewhere. */
static int walk_value(struct cb_meta *m, uint32_t b, uint32_t len, uint8_t *out, bool free_it)
{
    uint32_t nblocks = rec_value_blocks(len), at = 0;
    for (uint32_t i = 0; i < nblocks; i++) {
        int err = 0;
        const struct cb_rec_value_block *v = (const void *)meta_read(m, b, CB_BT_REC_VALUE,
                                                                     CB_BT_REC_VALUE, &err);
        if (!v)
            return err;
        uint32_t want = len - at < CB_REC_VALUE_BYTES ? len - at : (uint32_t)CB_REC_VALUE_BYTES;
        if (v->index != i)
            return value_corrupt(b, "index", i, v->index);
        if (v->len != want)
            return value_corrupt(b, "length", want, v->len);
        if ((i + 1 < nblocks) != (v->next != 0))
            return value_corrupt(b, "next block", i + 1 < nblocks, v->next);
        uint32_t next = v->next;
        if (out)
            memcpy(out + at, v->bytes, want);
        at += want;
        if (free_it) {
            bool gone;
            int r = meta_dec(m, b, &gone);
            if (r)
                return r;
            if (!gone) /* shared: the rest of the chain belongs to the other holder too */
                return 0;
        }
        b = next;
    }
    return 0;
}

int rec_read_value(struct cb_meta *m, const struct rec_entry *e, uint8_t *out)
{
    if (!(e->flags & CB_REC_IN_BLOCKS)) {
        if (e->value_len)
            memcpy(out, e->value, e->value_len);
        return 0;
    }
    return walk_value(m, e->first_block, e->value_len, out, false);
}

/* ---- changing ---- */

static uint8_t *new_node(struct cb_meta *m, uint32_t type, uint32_t level, uint32_t *slot, int *err)
{
    uint8_t *n = meta_new(m, type, slot, err);
    if (n)
        rnode(n)->level = level;
    return n;
}

int rec_inc_children(struct cb_meta *m, const uint8_t *n)
{
    struct rec_entry e;
    int r = 0;
    for (uint32_t i = 0, at = 0; i < rnode(n)->nr_entries && !r; i++, at += e.size) {
        rec_entry_at(n, at, &e);
        if (!is_leaf(n))
            r = meta_inc(m, e.child);
        else if (e.flags & CB_REC_IN_BLOCKS)
            r = meta_inc(m, e.first_block);
    }
    return r;
}

static uint8_t *shadow(struct cb_meta *m, uint32_t *slot, int *err)
{
    return meta_shadow(m, slot, CB_BT_REC_INTERNAL, CB_BT_REC_LEAF, rec_inc_children, err);
}

/* Shadow the child whose entry starts at byte `at` of n, checking its level. */
static uint8_t *shadow_child(struct cb_meta *m, uint8_t *n, uint32_t at, int *err)
{
    uint8_t *field = rnode(n)->entries + at; /* child is the entry's first field */
    uint32_t child;
    memcpy(&child, field, 4);
    uint8_t *c = shadow(m, &child, err);
    if (!c)
        return NULL;
    memcpy(field, &child, 4);
    if (rnode(c)->level + 1 != rnode(n)->level) {
        *err = wrong_level(child, rnode(n)->level - 1, rnode(c)->level);
        return NULL;
    }
    return c;
}

static void node_insert(uint8_t *n, uint32_t at, const uint8_t *entry, uint32_t len)
{
    struct cb_rec_node *r = rnode(n);
    memmove(r->entries + at + len, r->entries + at, r->used - at);
    memcpy(r->entries + at, entry, len);
    r->used += len;
    r->nr_entries++;
}

static uint32_t make_internal_entry(uint8_t *dst, uint32_t child, const uint8_t *key, uint32_t klen)
{
    struct cb_rec_internal_entry h = {.child = child, .key_len = (uint16_t)klen};
    memcpy(dst, &h, sizeof h);
    if (klen)
        memcpy(dst + INT_HDR, key, klen);
    return INT_HDR + klen;
}

/* Where to split a run of entries (offsets off[0..nr], nr >= 2): halves
 * within `limit` bytes (an internal half loses the right's first key), and
 * of them the most even in bytes, or, when the split is for the entry count
 * (by_count), the most even in entries with the left one the larger (so
 * that appending keys in order leaves full nodes behind, not a chain). */
static uint32_t split_point(const uint8_t *entries, const uint16_t *off, uint32_t nr, bool leaf,
                            uint32_t limit, bool by_count)
{
    uint32_t best = 0, best_bytes = UINT32_MAX, best_count = UINT32_MAX, total = off[nr];
    for (uint32_t k = 1; k < nr; k++) {
        uint32_t left = off[k], right = total - off[k];
        if (!leaf) {
            struct cb_rec_internal_entry h;
            memcpy(&h, entries + off[k], sizeof h);
            right -= h.key_len;
        }
        uint32_t bytes = left > right ? left : right;
        uint32_t count = 2 * (k > nr - k ? k : nr - k) + (k < nr - k); /* ties: the left larger */
        bool better = by_count ? count < best_count || (count == best_count && bytes < best_bytes)
                               : bytes < best_bytes || (bytes == best_bytes && count < best_count);
        if (bytes <= limit && better) {
            best = k;
            best_bytes = bytes;
            best_count = count;
        }
    }
    return best ? best : nr / 2; /* never: any run with one entry too many splits within limit */
}

static bool needs_split(struct cb_meta *m, const uint8_t *n)
{
    return rnode(n)->nr_entries >= m->rec_max_entries || rnode(n)->used + MAX_INT_ENTRY > SPACE;
}

/* Insert the separator of a new right sibling after parent's entry i. */
static void add_separator(uint8_t *parent, uint32_t i, uint32_t right, const uint8_t *sep,
                          uint32_t sep_len)
{
    uint16_t off[MAX_ENTRIES + 1];
    offsets(parent, off);
    uint8_t entry[MAX_INT_ENTRY];
    uint32_t len = make_internal_entry(entry, right, sep, sep_len);
    node_insert(parent, off[i + 1], entry, len);
}

/* Split internal child i of parent (the child is writable) before it is
 * entered: its upper part moves to a new right sibling. */
static int split_internal_child(struct cb_meta *m, uint8_t *parent, uint32_t i)
{
    int err = 0;
    uint16_t poff[MAX_ENTRIES + 1], off[MAX_ENTRIES + 1];
    offsets(parent, poff);
    uint32_t child;
    memcpy(&child, rnode(parent)->entries + poff[i], 4);
    uint8_t *c = m->dirty[child];
    uint32_t nr = offsets(c, off);
    uint32_t k = split_point(rnode(c)->entries, off, nr, false, SPACE - MAX_INT_ENTRY,
                             nr >= m->rec_max_entries);
    struct rec_entry e;
    rec_entry_at(c, off[k], &e);
    uint8_t sep[CB_RECORD_KEY_MAX];
    uint32_t sep_len = e.key_len;
    memcpy(sep, e.key, sep_len);
    uint32_t rb;
    uint8_t *right = new_node(m, CB_BT_REC_INTERNAL, rnode(c)->level, &rb, &err);
    if (!right)
        return err;
    uint8_t first[INT_HDR];
    node_insert(right, 0, first, make_internal_entry(first, e.child, NULL, 0));
    uint32_t rest = off[k] + e.size;
    memcpy(rnode(right)->entries + rnode(right)->used, rnode(c)->entries + rest, off[nr] - rest);
    rnode(right)->used += off[nr] - rest;
    rnode(right)->nr_entries += nr - k - 1;
    rnode(c)->used = off[k];
    rnode(c)->nr_entries = k;
    add_separator(parent, i, rb, sep, sep_len);
    return 0;
}

/* A new root above *root, holding it as its only child. */
static uint8_t *grow(struct cb_meta *m, uint32_t *root, uint32_t level, int *err)
{
    uint32_t old = *root;
    uint8_t *top = new_node(m, CB_BT_REC_INTERNAL, level, root, err);
    if (!top)
        return NULL;
    uint8_t entry[INT_HDR];
    node_insert(top, 0, entry, make_internal_entry(entry, old, NULL, 0));
    return top;
}

/* Put entry (for key) into leaf n, which parent's entry pidx points at
 * (parent NULL: n is the root), replacing the entry of the same key: *old
 * gets that one's value chain, if it had one.  Splits n when it overflows. */
static int leaf_put(struct cb_meta *m, uint32_t *root, uint8_t *parent, uint32_t pidx, uint8_t *n,
                    const uint8_t *key, uint32_t klen, const uint8_t *entry, uint32_t esize,
                    bool *replaced, struct rec_entry *old)
{
    int err = 0;
    uint32_t at;
    bool eq;
    leaf_find(n, key, klen, &at, &eq);
    uint32_t old_size = 0;
    *replaced = eq;
    if (eq) {
        rec_entry_at(n, at, old);
        old_size = old->size;
    }
    struct cb_rec_node *r = rnode(n);
    uint32_t used = r->used - old_size + esize, nr = r->nr_entries + !eq;
    if (used <= SPACE && nr <= m->rec_max_entries) {
        memmove(r->entries + at + esize, r->entries + at + old_size, r->used - at - old_size);
        memcpy(r->entries + at, entry, esize);
        r->used = used;
        r->nr_entries = nr;
        return 0;
    }
    /* Overflow: lay the entries out with the new one in a scratch area, and
     * give the upper part to a new right sibling. */
    uint8_t tmp[2 * CB_REC_NODE_SPACE];
    memcpy(tmp, r->entries, at);
    memcpy(tmp + at, entry, esize);
    memcpy(tmp + at + esize, r->entries + at + old_size, r->used - at - old_size);
    uint16_t off[MAX_ENTRIES + 1];
    for (uint32_t i = 0, pos = 0; i <= nr; i++) {
        off[i] = (uint16_t)pos;
        if (i < nr) {
            struct cb_rec_leaf_entry h;
            memcpy(&h, tmp + pos, sizeof h);
            pos += LEAF_HDR + h.key_len + ((h.flags & CB_REC_IN_BLOCKS) ? 4 : h.value_len);
        }
    }
    uint32_t k = split_point(tmp, off, nr, true, SPACE, nr > m->rec_max_entries);
    if (!parent) {
        if (!(parent = grow(m, root, 1, &err)))
            return err;
        pidx = 0;
    }
    uint32_t rb;
    uint8_t *right = new_node(m, CB_BT_REC_LEAF, 0, &rb, &err);
    if (!right)
        return err;
    memcpy(rnode(right)->entries, tmp + off[k], off[nr] - off[k]);
    rnode(right)->used = off[nr] - off[k];
    rnode(right)->nr_entries = nr - k;
    memcpy(r->entries, tmp, off[k]);
    r->used = off[k];
    r->nr_entries = k;
    /* The separator: the shortest prefix of the right's first key above the
     * left's last. */
    struct cb_rec_leaf_entry lh, rh;
    memcpy(&lh, tmp + off[k - 1], sizeof lh);
    memcpy(&rh, tmp + off[k], sizeof rh);
    const uint8_t *lk = tmp + off[k - 1] + LEAF_HDR, *rk = tmp + off[k] + LEAF_HDR;
    uint32_t common = 0;
    while (common < lh.key_len && common < rh.key_len && lk[common] == rk[common])
        common++;
    add_separator(parent, pidx, rb, rk, common + 1);
    return 0;
}

static int write_value(struct cb_meta *m, const uint8_t *v, uint32_t len, uint32_t *head)
{
    uint32_t *slot = head;
    for (uint32_t i = 0, at = 0; at < len; i++) {
        int err = 0;
        struct cb_rec_value_block *vb = (void *)meta_new(m, CB_BT_REC_VALUE, slot, &err);
        if (!vb)
            return err;
        uint32_t n = len - at < CB_REC_VALUE_BYTES ? len - at : (uint32_t)CB_REC_VALUE_BYTES;
        vb->index = i;
        vb->len = n;
        memcpy(vb->bytes, v + at, n);
        at += n;
        slot = &vb->next;
    }
    return 0;
}

int rec_put_locked(struct cb_meta *m, uint32_t *root, uint64_t *count, const uint8_t *key,
                   uint32_t klen, const uint8_t *value, uint32_t vlen)
{
    int err = 0;
    uint8_t entry[CB_REC_ENTRY_MAX];
    struct cb_rec_leaf_entry h = {.key_len = (uint16_t)klen, .value_len = vlen};
    uint32_t esize = LEAF_HDR + klen + vlen;
    if (esize > CB_REC_ENTRY_MAX) {
        uint32_t head = 0;
        if ((err = write_value(m, value, vlen, &head)) != 0)
            return err;
        h.flags = CB_REC_IN_BLOCKS;
        esize = LEAF_HDR + klen + 4;
        memcpy(entry + LEAF_HDR + klen, &head, 4);
    } else if (vlen) {
        memcpy(entry + LEAF_HDR + klen, value, vlen);
    }
    memcpy(entry, &h, sizeof h);
    memcpy(entry + LEAF_HDR, key, klen);
    if (*root == 0) {
        uint8_t *leaf = new_node(m, CB_BT_REC_LEAF, 0, root, &err);
        if (!leaf)
            return err;
        node_insert(leaf, 0, entry, esize);
        (*count)++;
        return 0;
    }
    uint8_t *n = shadow(m, root, &err), *parent = NULL;
    if (!n)
        return err;
    uint32_t pidx = 0;
    if (!is_leaf(n) && needs_split(m, n)) {
        if (!(parent = grow(m, root, rnode(n)->level + 1, &err)) ||
            (err = split_internal_child(m, parent, 0)) != 0)
            return err;
        n = parent;
        parent = NULL;
    }
    for (int depth = 0; !is_leaf(n); depth++) {
        if (depth > CB_MAX_TREE_DEPTH)
            return cb_err(CB_E_CORRUPT, "metadata is corrupt: the records tree is deeper than %d",
                          CB_MAX_TREE_DEPTH);
        uint32_t at, i = child_for(n, key, klen, &at);
        uint8_t *c = shadow_child(m, n, at, &err);
        if (!c)
            return err;
        if (!is_leaf(c) && needs_split(m, c)) {
            if ((err = split_internal_child(m, n, i)) != 0)
                return err;
            i = child_for(n, key, klen, &at);
            struct rec_entry e;
            rec_entry_at(n, at, &e);
            c = m->dirty[e.child];
        }
        parent = n;
        pidx = i;
        n = c;
    }
    bool replaced;
    struct rec_entry old;
    if ((err = leaf_put(m, root, parent, pidx, n, key, klen, entry, esize, &replaced, &old)) != 0)
        return err;
    if (!replaced)
        (*count)++;
    else if (old.flags & CB_REC_IN_BLOCKS)
        return walk_value(m, old.first_block, old.value_len, NULL, true);
    return 0;
}

/* Remove the entry at byte `at` (of `size` bytes) from node n; an internal
 * node's new first entry loses its separator. */
static void node_remove(uint8_t *n, uint32_t at, uint32_t size)
{
    struct cb_rec_node *r = rnode(n);
    memmove(r->entries + at, r->entries + at + size, r->used - at - size);
    r->used -= size;
    r->nr_entries--;
    if (!is_leaf(n) && at == 0 && r->nr_entries) {
        struct cb_rec_internal_entry h;
        memcpy(&h, r->entries, sizeof h);
        uint32_t drop = h.key_len;
        h.key_len = 0;
        memcpy(r->entries, &h, sizeof h);
        memmove(r->entries + INT_HDR, r->entries + INT_HDR + drop, r->used - INT_HDR - drop);
        r->used -= drop;
    }
}

int rec_delete_locked(struct cb_meta *m, uint32_t *root, uint64_t *count, const uint8_t *key,
                      uint32_t klen)
{
    struct rec_entry e;
    int err = rec_lookup(m, *root, key, klen, &e);
    if (err <= 0)
        return err;
    /* The path from the root, each node writable, with the entry followed. */
    uint8_t *path[CB_MAX_TREE_DEPTH + 2];
    uint32_t at_in[CB_MAX_TREE_DEPTH + 2];
    int depth = 0;
    uint8_t *n = shadow(m, root, &err);
    if (!n)
        return err;
    path[0] = n;
    while (!is_leaf(n)) {
        if (depth >= CB_MAX_TREE_DEPTH)
            return cb_err(CB_E_CORRUPT, "metadata is corrupt: the records tree is deeper than %d",
                          CB_MAX_TREE_DEPTH);
        child_for(n, key, klen, &at_in[depth]);
        if (!(n = shadow_child(m, n, at_in[depth], &err)))
            return err;
        path[++depth] = n;
    }
    uint32_t at;
    bool eq;
    leaf_find(n, key, klen, &at, &eq);
    if (!eq)
        return cb_err(CB_E_CORRUPT, "metadata is corrupt: a record found in the records tree is "
                      "gone on the way down");
    rec_entry_at(n, at, &e);
    uint32_t head = (e.flags & CB_REC_IN_BLOCKS) ? e.first_block : 0, vlen = e.value_len;
    node_remove(n, at, e.size);
    /* Empty nodes go, from the leaf up. */
    for (int d = depth; d >= 0 && rnode(path[d])->nr_entries == 0; d--) {
        uint32_t b;
        if (d == 0) {
            b = *root;
            *root = 0;
        } else {
            rec_entry_at(path[d - 1], at_in[d - 1], &e);
            b = e.child;
            node_remove(path[d - 1], at_in[d - 1], e.size);
        }
        if ((err = meta_dec(m, b, NULL)) != 0)
            return err;
    }
    /* A root with one child gives way to it. */
    while (*root) {
        const uint8_t *top = read_node(m, *root, &err);
        if (!top)
            return err;
        if (is_leaf(top) || rnode(top)->nr_entries != 1)
            break;
        rec_entry_at(top, 0, &e);
        uint32_t old = *root;
        *root = e.child;
        if ((err = meta_dec(m, old, NULL)) != 0)
            return err;
    }
    (*count)--;
    if (head && (err = walk_value(m, head, vlen, NULL, true)) != 0)
        return err;
    return 1;
}

/* ---- listing ---- */


static int emit(struct rec_lister *l, uint32_t b, const struct rec_entry *e)
{
    if (l->n && keycmp(l->last, l->last_len, e->key, e->key_len) >= 0)
        return cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: records keys out of order", b);
    memcpy(l->last, e->key, e->key_len);
    l->last_len = e->key_len;
    l->n++;
    if (l->want_output) {
        uint64_t need = 8 + e->key_len + (l->with_values ? e->value_len : 0);
        if (l->out_len + need > l->out_cap) {
            uint64_t cap = l->out_cap ? 2 * l->out_cap : 65536;
            while (cap < l->out_len + need)
                cap *= 2;
            uint8_t *o = realloc(l->out, cap);
            if (!o)
                return cb_err(CB_E_NO_MEMORY, "out of memory listing records");
            l->out = o;
            l->out_cap = cap;
        }
        uint8_t *p = l->out + l->out_len;
        uint32_t lens[2] = {e->key_len, e->value_len};
        memcpy(p, lens, 8);
        memcpy(p + 8, e->key, e->key_len);
        if (l->with_values) {
            int r = rec_read_value(l->m, e, p + 8 + e->key_len);
            if (r)
                return r;
        }
        l->out_len += need;
    }
    if (l->n >= l->max_entries || (l->want_output && l->out_len >= l->max_bytes))
        l->done = true;
    return 0;
}

/* Is key past every key the listing wants (beyond the prefix's range)? */
static bool past_prefix(const struct rec_lister *l, const uint8_t *key, uint32_t klen)
{
    return !has_prefix(key, klen, l->prefix, l->plen) && keycmp(key, klen, l->prefix, l->plen) > 0;
}

static int list_node(struct rec_lister *l, uint32_t b, uint32_t want_level)
{
    int err = 0;
    const uint8_t *n = read_node(l->m, b, &err);
    if (!n)
        return err;
    if (want_level != UINT32_MAX && rnode(n)->level != want_level)
        return wrong_level(b, want_level, rnode(n)->level);
    struct rec_entry e;
    uint32_t nr = rnode(n)->nr_entries;
    bool from_after = l->alen && keycmp(l->after, l->alen, l->prefix, l->plen) >= 0;
    if (!is_leaf(n)) {
        uint32_t at, i = child_for(n, from_after ? l->after : l->prefix,
                                    from_after ? l->alen : l->plen, &at);
        for (; i < nr && !l->done; i++) {
            rec_entry_at(n, at, &e);
            if (i > 0 && past_prefix(l, e.key, e.key_len)) {
                l->done = true;
                break;
            }
            if ((err = list_node(l, e.child, rnode(n)->level - 1)) != 0)
                return err;
            at += e.size;
        }
        return 0;
    }
    for (uint32_t i = 0, at = 0; i < nr && !l->done; i++, at += e.size) {
        rec_entry_at(n, at, &e);
        if (l->alen && keycmp(e.key, e.key_len, l->after, l->alen) <= 0)
            continue;
        if (keycmp(e.key, e.key_len, l->prefix, l->plen) < 0)
            continue;
        if (!has_prefix(e.key, e.key_len, l->prefix, l->plen)) {
            l->done = true;
            break;
        }
        if ((err = emit(l, b, &e)) != 0)
            return err;
    }
    return 0;
}

/* ---- repair: salvage what reads back into a new tree ---- */

struct salvage {
    struct cb_meta *m;
    uint32_t *root;
    uint64_t *kept, *lost, *lost_nodes;
    uint8_t *seen;            /* nodes walked, so a damaged tree cannot send us round */
    rec_lost_fn on_lost;
    void *ctx;
};

static int salvage_node(struct salvage *s, uint32_t b, uint32_t level)
{
    struct cb_meta *m = s->m;
    int err = 0;
    if (b < 2 || b >= m->nr_blocks || (s->seen[b >> 3] & (1u << (b & 7)))) {
        (*s->lost_nodes)++;
        return 0;
    }
    s->seen[b >> 3] |= (uint8_t)(1u << (b & 7));
    const uint8_t *n = read_node(m, b, &err);
    if (!n || (level != UINT32_MAX && rnode(n)->level != level)) {
        (*s->lost_nodes)++;
        return 0;
    }
    struct rec_entry e;
    uint32_t at = 0;
    for (uint32_t i = 0; i < rnode(n)->nr_entries; i++, at += e.size) {
        rec_entry_at(n, at, &e);
        if (!is_leaf(n)) {
            if ((err = salvage_node(s, e.child, rnode(n)->level - 1)) != 0)
                return err;
            continue;
        }
        uint8_t *v = malloc(e.value_len ? e.value_len : 1);
        if (!v)
            return cb_err(CB_E_NO_MEMORY, "out of memory for a value of %u bytes", e.value_len);
        if (rec_read_value(m, &e, v) == 0) {
            err = rec_put_locked(m, s->root, s->kept, e.key, e.key_len, v, e.value_len);
        } else {
            (*s->lost)++;
            s->on_lost(s->ctx, e.key, e.key_len);
        }
        free(v);
        if (err)
            return err;
    }
    return 0;
}

int rec_salvage(struct cb_meta *m, uint32_t old_root, uint32_t *new_root, uint64_t *kept,
                uint64_t *lost, uint64_t *lost_nodes, rec_lost_fn on_lost, void *ctx)
{
    *new_root = 0;
    *kept = *lost = *lost_nodes = 0;
    struct salvage s = {m, new_root, kept, lost, lost_nodes, calloc((m->nr_blocks + 7) / 8, 1),
                        on_lost, ctx};
    if (!s.seen)
        return cb_err(CB_E_NO_MEMORY, "out of memory salvaging the records store");
    int r = old_root ? salvage_node(&s, old_root, UINT32_MAX) : 0;
    free(s.seen);
    return r;
}

int rec_list(struct rec_lister *l, uint32_t root)
{
    return root ? list_node(l, root, UINT32_MAX) : 0;
}

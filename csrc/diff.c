/*
 * Differences between two devices' mappings, thin_delta's way:
 * left_only / right_only / different / same, in virtual blocks.
 *
 * Both trees are walked together as two key-ordered streams of "items": an
 * item is either one leaf entry or a whole subtree not yet read (a node
 * block and the lower bound of its keys).  When both streams front the same
 * node block, that whole subtree is identical in both devices and is skipped
 * unread; otherwise the item with the lower key bound is expanded or emitted.
 * So the cost is the parts of the trees that are not shared.  Asking for
 * "same" ranges forces the shared subtrees to be read for their keys.
 */
#include <stdlib.h>
#include <string.h>

#include "cowblock.h"


struct item {
    uint64_t lo;      /* lower bound of keys (the key itself for an entry) */
    uint64_t hi;      /* upper bound (exclusive), for subtrees */
    uint32_t block;   /* subtree node, 0 for an entry */
    uint32_t value;   /* entry value */
    uint32_t depth;   /* of a subtree: bounds the walk if corrupt metadata has a cycle */
};

struct stream {
    struct item *v;   /* a stack: the front is the last element */
    size_t n, cap;
};

static int push(struct stream *s, struct item it)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        struct item *v = realloc(s->v, cap * sizeof *v);
        if (!v)
            return cb_err(CB_E_NO_MEMORY, "out of memory walking two trees");
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = it;
    return 0;
}

/* Replace the front subtree by its children or entries. */
static int expand(struct cb_meta *m, struct stream *s)
{
    struct item it = s->v[--s->n];
    int err = 0;
    if (it.depth > CB_MAX_TREE_DEPTH)
        return cb_err(CB_E_CORRUPT, "metadata is corrupt: a mapping tree is deeper than %d levels at "
                      "block %u (a cycle?)", CB_MAX_TREE_DEPTH, it.block);
    const uint8_t *n = meta_read(m, it.block, CB_BT_INTERNAL, CB_BT_MAP_LEAF, &err);
    if (!n)
        return err;
    uint32_t nr = node_hdr(n)->nr_entries;
    const uint32_t *keys = node_keys(n), *vals = node_u32_values(n);
    bool internal = node_hdr(n)->h.type == CB_BT_INTERNAL;
    for (uint32_t i = nr; i-- > 0 && !err;) {
        if (internal) {
            uint64_t lo = keys[i] > it.lo ? keys[i] : it.lo;
            uint64_t hi = i + 1 < nr ? keys[i + 1] : it.hi;
            err = push(s, (struct item){lo, hi, vals[i], 0, it.depth + 1});
        } else {
            err = push(s, (struct item){keys[i], keys[i] + 1ull, 0, vals[i], 0});
        }
    }
    return err;
}

struct out {
    cb_range *v;
    uint64_t n, cap;
};

static int emit(struct out *o, uint64_t key, uint32_t kind)
{
    return cb_range_push(&o->v, &o->n, &o->cap, key, 1, kind);
}

/* Emit "same" for every entry of the front subtree of s, and drop it. */
static int emit_same_subtree(struct cb_meta *m, struct stream *s, struct out *o)
{
    size_t base = s->n - 1;
    int r = 0;
    while (s->n > base && !r) {
        if (s->v[s->n - 1].block)
            r = expand(m, s);
        else
            r = emit(o, s->v[--s->n].lo, CB_DIFF_SAME);
    }
    return r;
}

static int diff_walk(struct cb_meta *m, uint32_t ra, uint32_t rb, bool with_same, struct out *o)
{
    struct stream a = {0}, b = {0};
    const uint64_t top = (uint64_t)UINT32_MAX + 1;
    int r = 0;
    if (ra)
        r = push(&a, (struct item){0, top, ra, 0, 0});
    if (!r && rb)
        r = push(&b, (struct item){0, top, rb, 0, 0});
    while (!r && (a.n || b.n)) {
        struct item *x = a.n ? &a.v[a.n - 1] : NULL, *y = b.n ? &b.v[b.n - 1] : NULL;
        if (x && y && x->block && x->block == y->block) { /* shared subtree */
            if (with_same)
                r = emit_same_subtree(m, &a, o);
            else
                a.n--;
            b.n--;
            continue;
        }
        bool act_on_a;
        if (!x || !y)
            act_on_a = x != NULL;
        else if (x->lo != y->lo)
            act_on_a = x->lo < y->lo;
        else if (x->block || y->block)
            act_on_a = x->block != 0; /* a tie: open a subtree first */
        else { /* the same key on both sides */
            if (x->value != y->value)
                r = emit(o, x->lo, CB_DIFF_DIFFERENT);
            else if (with_same)
                r = emit(o, x->lo, CB_DIFF_SAME);
            a.n--;
            b.n--;
            continue;
        }
        /* The acting item's key is below everything left on the other side. */
        if (act_on_a) {
            if (x->block)
                r = expand(m, &a);
            else {
                r = emit(o, x->lo, CB_DIFF_LEFT_ONLY);
                a.n--;
            }
        } else {
            if (y->block)
                r = expand(m, &b);
            else {
                r = emit(o, y->lo, CB_DIFF_RIGHT_ONLY);
                b.n--;
            }
        }
    }
    free(a.v);
    free(b.v);
    return r;
}

int cb_pool_diff(cb_pool *p, uint32_t a, uint32_t b, int with_same, cb_range **out, uint64_t *count)
{
    *out = NULL;
    *count = 0;
    pthread_rwlock_rdlock(&p->lock);
    meta_walk_begin(&p->m);
    struct cb_dev *da = pool_dev(p, a), *db = pool_dev(p, b);
    int r = 0;
    if (!da || !db) {
        r = cb_err(CB_E_NOT_FOUND, "no device with id %u", da ? b : a);
    } else {
        struct out o = {0};
        r = diff_walk(&p->m, da->d.mapping_root, db->d.mapping_root, with_same != 0, &o);
        if (r)
            free(o.v);
        else {
            *out = o.v;
            *count = o.n;
        }
    }
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

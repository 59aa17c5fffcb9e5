/*
 * The records store's calls (api.h) over its tree (records.c).
 *
 * Each call takes the pool lock, read for lookups and listings, write for
 * changes.  A change checks its arguments and the metadata space it may
 * need (the same reserve as device changes: MetadataSpaceError before
 * anything changed), turns the pool read-only if it fails part-way
 * (pool_fail: a half-made change is never committed), keeps the
 * superblock's feature flag in step (CB_RO_COMPAT_RECORDS while the store
 * holds blocks), and commits before it returns, unless the calling thread
 * is inside an atomic section (txn.c), whose end commits it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowblock.h"

void rec_key_text(char *dst, size_t cap, const uint8_t *key, uint32_t len)
{
    size_t at = 0;
    uint32_t i = 0;
    for (; i < len && at + 5 < cap; i++) { /* room for one \xNN and the NUL */
        uint8_t c = key[i];
        if (c >= 0x20 && c < 0x7f && c != '\\')
            dst[at++] = (char)c;
        else
            at += (size_t)snprintf(dst + at, cap - at, "\\x%02x", c);
    }
    dst[at] = 0;
    if (i < len && at >= 3) /* cut short */
        memcpy(dst + at - 3, "...", 4);
}

/* ---- the API ---- */

static int check_key(const void *key, uint32_t klen)
{
    if (klen == 0 || klen > CB_RECORD_KEY_MAX || !key)
        return cb_err(CB_E_INVALID, "a record key of %u bytes: keys are 1 to %u bytes", klen,
                      CB_RECORD_KEY_MAX);
    return 0;
}

void rec_update_flag(struct cb_meta *m)
{
    if (m->sb.records_root)
        m->sb.ro_compat |= CB_RO_COMPAT_RECORDS;
    else
        m->sb.ro_compat &= ~CB_RO_COMPAT_RECORDS;
}

/* Blocks a change may take: its new value blocks, and per level of the
 * tree (one more for a new root) a shadow, a split and the space map pages
 * of the blocks counted and freed; space map pages for the value chains. */
static uint64_t room_for(struct cb_meta *m, uint32_t new_len, uint32_t klen, uint32_t old_blocks)
{
    uint64_t blocks = sizeof(struct cb_rec_leaf_entry) + klen + new_len > CB_REC_ENTRY_MAX
                          ? rec_value_blocks(new_len) : 0;
    int err = 0;
    const struct cb_rec_node *root = m->sb.records_root
        ? (const void *)meta_read(m, m->sb.records_root, CB_BT_REC_INTERNAL, CB_BT_REC_LEAF, &err)
        : NULL;
    uint64_t levels = root ? root->level + 2 : 1;
    return blocks + 2 * (blocks / CB_SM_ENTRIES) + 2 * ((uint64_t)old_blocks / CB_SM_ENTRIES) +
           4 * levels + 8;
}

static uint32_t blocks_of(const struct rec_entry *e)
{
    return (e->flags & CB_REC_IN_BLOCKS) ? rec_value_blocks(e->value_len) : 0;
}

int cb_rec_put(cb_pool *p, const void *key, uint32_t klen, const void *value, uint32_t vlen)
{
    int r = check_key(key, klen);
    if (!r && vlen > CB_RECORD_VALUE_MAX)
        r = cb_err(CB_E_INVALID, "a record value of %u bytes is larger than %u", vlen,
                   CB_RECORD_VALUE_MAX);
    if (!r && vlen && !value)
        r = cb_err(CB_E_INVALID, "a record value of %u bytes at NULL", vlen);
    if (r)
        return r;
    pthread_rwlock_wrlock(&p->lock);
    struct cb_meta *m = &p->m;
    struct rec_entry old = {0};
    if (!(r = pool_writable(p)) && (r = rec_lookup(m, m->sb.records_root, key, klen, &old)) > 0)
        r = 0;
    if (!r)
        r = meta_reserve_check(m, room_for(m, vlen, klen, blocks_of(&old)));
    if (r)
        goto out;
    p->dirty = true;
    if ((r = rec_put_locked(m, &m->sb.records_root, &m->sb.records_count, key, klen, value,
                            vlen)) != 0) {
        r = pool_fail(p, r);
        goto out;
    }
    rec_update_flag(m);
    r = pool_commit_locked(p);
out:
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_rec_get(cb_pool *p, const void *key, uint32_t klen, uint8_t **value, uint32_t *vlen)
{
    *value = NULL;
    *vlen = 0;
    int r = check_key(key, klen);
    if (r)
        return r;
    pthread_rwlock_rdlock(&p->lock);
    struct rec_entry e;
    r = rec_lookup(&p->m, p->m.sb.records_root, key, klen, &e);
    if (r == 1) {
        uint8_t *buf = malloc(e.value_len ? e.value_len : 1);
        int err = buf ? rec_read_value(&p->m, &e, buf)
                      : cb_err(CB_E_NO_MEMORY, "out of memory for a value of %u bytes", e.value_len);
        if (err) {
            free(buf);
            r = err;
        } else {
            *value = buf;
            *vlen = e.value_len;
        }
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_rec_delete(cb_pool *p, const void *key, uint32_t klen)
{
    int r = check_key(key, klen);
    if (r)
        return r;
    pthread_rwlock_wrlock(&p->lock);
    struct cb_meta *m = &p->m;
    struct rec_entry old;
    if ((r = pool_writable(p)) != 0 || (r = rec_lookup(m, m->sb.records_root, key, klen, &old)) <= 0)
        goto out;
    if ((r = meta_reserve_check(m, room_for(m, 0, klen, blocks_of(&old)))) != 0)
        goto out;
    p->dirty = true;
    if ((r = rec_delete_locked(m, &m->sb.records_root, &m->sb.records_count, key, klen)) < 0) {
        r = pool_fail(p, r);
        goto out;
    }
    rec_update_flag(m);
    r = pool_commit_locked(p);
    if (!r)
        r = 1;
out:
    pthread_rwlock_unlock(&p->lock);
    return r;
}

static int run_list(cb_pool *p, struct rec_lister *l)
{
    int r = 0;
    if (l->plen > CB_RECORD_KEY_MAX || l->alen > CB_RECORD_KEY_MAX ||
        (l->plen && !l->prefix) || (l->alen && !l->after))
        return cb_err(CB_E_INVALID, "a record prefix or start key longer than %u bytes, or at NULL",
                      CB_RECORD_KEY_MAX);
    pthread_rwlock_rdlock(&p->lock);
    r = rec_list(l, p->m.sb.records_root);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_rec_list(cb_pool *p, const void *prefix, uint32_t plen, const void *after, uint32_t alen,
                uint32_t max_entries, uint64_t max_bytes, int with_values, uint8_t **out,
                uint64_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    if (max_entries > (1u << 30))
        max_entries = 1u << 30;
    struct rec_lister l = {.prefix = prefix, .plen = plen, .after = after, .alen = alen,
                       .max_entries = max_entries ? max_entries : 1,
                       .max_bytes = max_bytes ? max_bytes : 1, .with_values = with_values != 0,
                       .want_output = true, .m = &p->m};
    int r = run_list(p, &l);
    if (r) {
        free(l.out);
        return r;
    }
    *out = l.out ? l.out : malloc(1);
    *out_len = l.out_len;
    return *out ? (int)l.n : cb_err(CB_E_NO_MEMORY, "out of memory");
}

int64_t cb_rec_count(cb_pool *p, const void *prefix, uint32_t plen)
{
    if (plen == 0) {
        pthread_rwlock_rdlock(&p->lock);
        int64_t n = (int64_t)p->m.sb.records_count;
        pthread_rwlock_unlock(&p->lock);
        return n;
    }
    struct rec_lister l = {.prefix = prefix, .plen = plen, .max_entries = UINT64_MAX, .m = &p->m};
    int r = run_list(p, &l);
    return r ? r : (int64_t)l.n;
}

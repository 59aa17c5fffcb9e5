/*
 * The metadata block manager: reading, allocating, shadowing and committing
 * 4 KiB metadata blocks.
 *
 * Design
 *  - The metadata file is mapped read-only.  A committed block is read
 *    straight from the map; the first read after open verifies its checksum,
 *    type and self-location, and a bitmap remembers that it passed.
 *  - A block allocated in the running transaction lives in a malloc()ed
 *    buffer (dirty[b]) and is the only kind of block ever modified.  Changing
 *    a committed block means shadowing it: copy it to a new block, point the
 *    parent at the copy, drop a reference to the original.  Committed blocks
 *    are therefore never overwritten, and a crash at any point leaves the last
 *    committed tree intact.
 *  - Blocks freed in a transaction are not reused before it commits (the
 *    space maps' busy bitmaps), since the committed tree may still use them.
 *
 * Commit, in order (docs/FORMAT.md has the same list):
 *  1. fsync the data file, if data was written: data blocks that the new
 *     mappings point at must be on disk before the mappings are.
 *  2. write every new metadata block, with its checksum.
 *  3. fsync the metadata file.
 *  4. write the superblock, transaction id + 1, into slot (id + 1) % 2; the
 *     other slot keeps the previous commit.
 *  5. fsync the metadata file.  The commit has happened.
 *  6. make this transaction's freed blocks reusable.
 * A failure at any step returns the error and leaves the previous commit on
 * disk; the caller turns the pool read-only and never retries (a failed
 * fsync may have dropped writes we cannot know about).
 *
 * Locking: the pool's rwlock.  Readers may call meta_read concurrently (the
 * verified bitmap is updated atomically); everything else needs the write lock.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cowblock.h"

static const char *type_name(uint32_t t)
{
    switch (t) {
    case CB_BT_SUPERBLOCK: return "superblock";
    case CB_BT_INTERNAL: return "b-tree internal node";
    case CB_BT_MAP_LEAF: return "mapping leaf";
    case CB_BT_DEV_LEAF: return "device-details leaf";
    case CB_BT_SM_INDEX: return "space map index";
    case CB_BT_SM_REFS: return "space map reference page";
    case CB_BT_CATALOG: return "catalog block";
    case CB_BT_REC_INTERNAL: return "records internal node";
    case CB_BT_REC_LEAF: return "records leaf";
    case CB_BT_REC_VALUE: return "record value block";
    default: return "unknown block type";
    }
}

static int corrupt(uint32_t b, const char *what, uint64_t expected, uint64_t found)
{
    int r = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: %s: expected %#llx, found %#llx", b,
                   what, (unsigned long long)expected, (unsigned long long)found);
    cb_err_values(expected, found);
    return r;
}

/* Verify a committed block; returns 0 or -EUCLEAN. */
static int verify_block(struct cb_meta *m, uint32_t b, const uint8_t *blk, uint32_t t1, uint32_t t2)
{
    const struct cb_block_header *h = (const void *)blk;
    if (h->type != t1 && h->type != t2)
        return cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: expected a %s, found type %#x (%s)", b,
                      type_name(t1), h->type, type_name(h->type));
    uint32_t csum = cb_block_csum(blk, h->type);
    if (csum != h->csum)
        return corrupt(b, "checksum", csum, h->csum);
    if (h->blocknr != b)
        return corrupt(b, "self location", b, h->blocknr);
    if (h->type == CB_BT_INTERNAL || h->type == CB_BT_MAP_LEAF || h->type == CB_BT_DEV_LEAF) {
        const struct cb_node_header *n = (const void *)blk;
        uint32_t vs = h->type == CB_BT_DEV_LEAF ? sizeof(struct cb_dev_detail) : 4;
        if (n->value_size != vs)
            return corrupt(b, "node value size", vs, n->value_size);
        /* Every node of a type has the pool's capacity: a split moves half
         * of a node into a new one, which must have room for it. */
        uint32_t cap = h->type == CB_BT_INTERNAL ? m->internal_max
                       : h->type == CB_BT_MAP_LEAF ? m->leaf_max : m->dev_leaf_max;
        if (n->max_entries != cap)
            return corrupt(b, "node capacity", cap, n->max_entries);
        if (n->nr_entries > n->max_entries)
            return corrupt(b, "node entry count", n->max_entries, n->nr_entries);
    }
    int r = 0;
    if (h->type == CB_BT_REC_INTERNAL || h->type == CB_BT_REC_LEAF)
        r = rec_verify_node(m, b, blk);
    else if (h->type == CB_BT_REC_VALUE)
        r = rec_verify_value(b, blk);
    if (r)
        return r;
    __atomic_fetch_add(&m->blocks_verified, 1, __ATOMIC_RELAXED);
    return 0;
}

const uint8_t *meta_read(struct cb_meta *m, uint32_t b, uint32_t t1, uint32_t t2, int *err)
{
    if (b < 2 || b >= m->nr_blocks) {
        *err = cb_err(CB_E_CORRUPT, "metadata is corrupt: a %s pointer names block %u, outside 2..%llu",
                      type_name(t1), b, (unsigned long long)m->nr_blocks - 1);
        return NULL;
    }
    const uint8_t *blk = m->dirty[b];
    if (blk) {
        /* New in this transaction, so not verified; but a damaged pointer
         * can still name it, and a block of another type must not be taken
         * for what the pointer expects. */
        uint32_t type = ((const struct cb_block_header *)blk)->type;
        if (type == t1 || type == t2)
            return blk;
        *err = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: expected a %s, found a %s", b,
                      type_name(t1), type_name(type));
        return NULL;
    }
    blk = m->map + (uint64_t)b * CB_META_BLOCK_SIZE;
    uint8_t bit = (uint8_t)(1u << (b & 7));
    if (!(__atomic_load_n(&m->verified[b >> 3], __ATOMIC_ACQUIRE) & bit)) {
        /* first use: a pool on RADOS fetches it (verified means cached) */
        struct cb_range at = {(uint64_t)b * CB_META_BLOCK_SIZE, CB_META_BLOCK_SIZE};
        int r = m->file.remote ? remote_need(&m->file, &at, 1) : 0;
        if (r) {
            *err = r;
            return NULL;
        }
        r = verify_block(m, b, blk, t1, t2);
        if (r) {
            *err = r;
            return NULL;
        }
        __atomic_fetch_or(&m->verified[b >> 3], bit, __ATOMIC_RELEASE);
    } else if (((const struct cb_block_header *)blk)->type != t1 &&
               ((const struct cb_block_header *)blk)->type != t2) {
        *err = cb_err(CB_E_CORRUPT, "metadata block %u is corrupt: expected a %s, found a %s", b,
                      type_name(t1), type_name(((const struct cb_block_header *)blk)->type));
        return NULL;
    }
    return blk;
}

bool meta_is_new(struct cb_meta *m, uint32_t b) { return b < m->nr_blocks && m->dirty[b] != NULL; }

/* Allocate a block without counting it yet; the caller stores the block
 * number where it belongs and then counts it, so that space map pages
 * allocated by the counting never see a half-made parent. */
uint8_t *meta_alloc_uncounted(struct cb_meta *m, uint32_t type, uint32_t *b_out, int *err)
{
    uint64_t b;
    int r = sm_find_free(m, &m->msm, &b);
    if (r) {
        *err = cb_err(CB_E_METADATA_SPACE, "metadata space is exhausted (%llu of %llu blocks used); grow it with "
                      "resize_metadata", (unsigned long long)m->sb.meta_used,
                      (unsigned long long)m->nr_blocks);
        return NULL;
    }
    uint8_t *buf = aligned_alloc(CB_META_BLOCK_SIZE, CB_META_BLOCK_SIZE);
    if (!buf) {
        *err = cb_err(CB_E_NO_MEMORY, "out of memory for a metadata block");
        return NULL;
    }
    memset(buf, 0, CB_META_BLOCK_SIZE);
    struct cb_block_header *h = (void *)buf;
    h->type = type;
    h->blocknr = b;
    r = u32vec_push(&m->dirty_list, (uint32_t)b);
    if (r) {
        free(buf);
        *err = r;
        return NULL;
    }
    m->dirty[b] = buf;
    *b_out = (uint32_t)b;
    return buf;
}

uint8_t *meta_new(struct cb_meta *m, uint32_t type, uint32_t *slot, int *err)
{
    uint32_t b;
    uint8_t *buf = meta_alloc_uncounted(m, type, &b, err);
    if (!buf)
        return NULL;
    *slot = b;
    int r = sm_set(m, &m->msm, b, 1);
    if (r) {
        *err = r;
        return NULL;
    }
    return buf;
}

int meta_inc(struct cb_meta *m, uint32_t b) { return sm_inc(m, &m->msm, b); }

int meta_dec(struct cb_meta *m, uint32_t b, bool *now_free)
{
    bool z = false;
    int r = sm_dec(m, &m->msm, b, &z);
    if (r)
        return r;
    if (z && m->dirty[b]) {
        free(m->dirty[b]);
        m->dirty[b] = NULL; /* dropped from dirty_list lazily at commit */
    }
    if (now_free)
        *now_free = z;
    return 0;
}

uint8_t *meta_shadow(struct cb_meta *m, uint32_t *slot, uint32_t t1, uint32_t t2,
                     meta_inc_fn inc_children, int *err)
{
    uint32_t old = *slot;
    uint32_t ref;
    int r = sm_get(m, &m->msm, old, &ref);
    if (r) {
        *err = r;
        return NULL;
    }
    if (ref == 0) {
        *err = cb_err(CB_E_CORRUPT, "metadata is corrupt: block %u is in use but its reference count is 0",
                      old);
        return NULL;
    }
    const uint8_t *src = meta_read(m, old, t1, t2, err);
    if (!src)
        return NULL;
    if (src == m->dirty[old] && ref == 1) /* new in this transaction: already ours */
        return m->dirty[old];
    uint32_t nb;
    uint8_t *buf = meta_alloc_uncounted(m, ((const struct cb_block_header *)src)->type, &nb, err);
    if (!buf)
        return NULL;
    memcpy(buf + sizeof(struct cb_block_header), src + sizeof(struct cb_block_header),
           CB_META_BLOCK_SIZE - sizeof(struct cb_block_header));
    *slot = nb;
    if ((r = sm_set(m, &m->msm, nb, 1)) != 0) {
        *err = r;
        return NULL;
    }
    if (ref > 1 && inc_children && (r = inc_children(m, buf)) != 0) {
        *err = r;
        return NULL;
    }
    if ((r = meta_dec(m, old, NULL)) != 0) {
        *err = r;
        return NULL;
    }
    return buf;
}

int meta_reserve_check(struct cb_meta *m, uint64_t blocks)
{
    uint64_t free_blocks = m->nr_blocks - m->sb.meta_used - m->msm.freed_this_txn;
    if (free_blocks < m->reserve + blocks)
        return cb_err(CB_E_METADATA_SPACE,
                      "metadata space is low: %llu of %llu blocks free, %llu kept in reserve for "
                      "commits; grow it with resize_metadata",
                      (unsigned long long)free_blocks, (unsigned long long)m->nr_blocks,
                      (unsigned long long)m->reserve);
    return 0;
}

void meta_set_capacities(struct cb_meta *m)
{
    uint32_t cap = m->sb.node_capacity;
    m->leaf_max = CB_NODE_SPACE / 8;
    m->internal_max = CB_NODE_SPACE / 8;
    m->dev_leaf_max = CB_NODE_SPACE / (4 + sizeof(struct cb_dev_detail));
    m->rec_max_entries = cap ? cap : CB_REC_NODE_SPACE / sizeof(struct cb_rec_internal_entry);
    if (cap) {
        if (cap < m->leaf_max) m->leaf_max = cap;
        if (cap < m->internal_max) m->internal_max = cap;
        if (cap < m->dev_leaf_max) m->dev_leaf_max = cap;
    }
    /* 1/64 of the metadata, at least 64 blocks: enough for one commit's
     * device-detail write-back and the space map pages it shadows. */
    m->reserve = m->nr_blocks / 64;
    if (m->reserve < 64)
        m->reserve = 64;
}

/* A lookup touches 3-5 metadata blocks, and a fault of the mapping with
 * the default advice reads the disk's whole readahead window around the
 * block (read_ahead_kb: 8 MiB on this VM's disk), so after the pages were
 * dropped a 1 MiB device read took 17 ms, and 3.4 ms with MADV_RANDOM (one
 * page a fault); a cold read of an 8 MiB file through a mount, 11.9 ms and
 * 8.1 ms (benchmarks/cold_depth.py).  A walk of whole trees is the other
 * way round: node by node, a cold check of 43 MB of metadata took 870 ms,
 * against 45-50 ms reading ahead, so while walks run the mapping reads
 * ahead again.  The count and the advice change together under walk_mu:
 * walkers may run side by side under the pool's lock shared. */
static pthread_mutex_t walk_mu = PTHREAD_MUTEX_INITIALIZER;

static void advise_map(struct cb_meta *m)
{
    if (m->map)
        madvise(m->map, m->map_len, m->walkers ? MADV_NORMAL : MADV_RANDOM);
}

void meta_walk_begin(struct cb_meta *m)
{
    pthread_mutex_lock(&walk_mu);
    if (m->walkers++ == 0)
        advise_map(m);
    pthread_mutex_unlock(&walk_mu);
}

void meta_walk_end(struct cb_meta *m)
{
    pthread_mutex_lock(&walk_mu);
    if (--m->walkers == 0)
        advise_map(m);
    pthread_mutex_unlock(&walk_mu);
}

static int map_file(struct cb_meta *m, uint64_t nr_blocks)
{
    if (m->map)
        munmap(m->map, m->map_len);
    m->map_len = nr_blocks * CB_META_BLOCK_SIZE;
    m->map = mmap(NULL, m->map_len, PROT_READ, MAP_SHARED, m->file.fd, 0);
    if (m->map == MAP_FAILED) {
        m->map = NULL;
        return cb_err(CB_E_NO_MEMORY, "cannot map the metadata file (%llu bytes): %s",
                      (unsigned long long)m->map_len, strerror(errno));
    }
    pthread_mutex_lock(&walk_mu);
    advise_map(m);
    pthread_mutex_unlock(&walk_mu);
    return 0;
}

static int alloc_tables(struct cb_meta *m, uint64_t nr_blocks)
{
    uint8_t **dirty = realloc(m->dirty, nr_blocks * sizeof *dirty);
    uint8_t *ver = realloc(m->verified, (nr_blocks + 7) / 8);
    if (dirty)
        m->dirty = dirty;
    if (ver)
        m->verified = ver;
    if (!dirty || !ver)
        return cb_err(CB_E_NO_MEMORY, "out of memory for %llu metadata blocks", (unsigned long long)nr_blocks);
    uint64_t old = m->nr_blocks;
    memset(m->dirty + old, 0, (nr_blocks - old) * sizeof *dirty);
    memset(m->verified + (old + 7) / 8, 0, (nr_blocks + 7) / 8 - (old + 7) / 8);
    if (old % 8) /* bits of the partial byte above the old end start unverified */
        m->verified[old / 8] &= (uint8_t)((1u << (old % 8)) - 1);
    m->nr_blocks = nr_blocks;
    return 0;
}

static int check_superblock(const struct cb_superblock *sb, uint32_t slot, char *why, size_t n)
{
    if (sb->magic != CB_MAGIC) {
        snprintf(why, n, "slot %u: bad magic %#llx (not a cowblock pool?)", slot,
                 (unsigned long long)sb->magic);
        return -1;
    }
    uint32_t csum = cb_block_csum(sb, CB_BT_SUPERBLOCK);
    if (csum != sb->csum || sb->type != CB_BT_SUPERBLOCK) {
        snprintf(why, n, "slot %u: checksum expected %#x, found %#x", slot, csum, sb->csum);
        return -1;
    }
    if (sb->blocknr != slot) {
        snprintf(why, n, "slot %u: self location says %llu", slot, (unsigned long long)sb->blocknr);
        return -1;
    }
    return 0;
}

static int setup_space_maps(struct cb_meta *m)
{
    int r = sm_init(&m->msm, &m->sb.meta_sm_root, &m->sb.meta_used, m->sb.nr_meta_blocks);
    if (!r)
        r = sm_init(&m->dsm, &m->sb.data_sm_root, &m->sb.data_used, m->sb.nr_data_blocks);
    return r;
}

int meta_open(struct cb_meta *m, int fd, bool read_only)
{
    m->file.fd = fd; /* m->file.remote: the caller's */
    m->file.name = "metadata";
    m->read_only = read_only;
    struct stat st;
    if (fstat(fd, &st) != 0)
        return cb_err(CB_E_IO, "cannot stat the metadata file: %s", strerror(errno));
    if ((uint64_t)st.st_size < 2 * CB_META_BLOCK_SIZE)
        return cb_err(CB_E_CORRUPT, "metadata file is truncated: %lld bytes, less than its two "
                      "superblocks (8192 bytes)", (long long)st.st_size);
    struct cb_superblock sbs[2];
    char why[2][160];
    int valid[2];
    for (uint32_t s = 0; s < 2; s++) {
        ssize_t n = pread(fd, &sbs[s], sizeof sbs[s], (off_t)s * CB_META_BLOCK_SIZE);
        if (n != (ssize_t)sizeof sbs[s])
            return cb_err(CB_E_IO, "cannot read superblock slot %u: %s", s,
                          n < 0 ? strerror(errno) : "short read");
        valid[s] = check_superblock(&sbs[s], s, why[s], sizeof why[s]) == 0;
    }
    if (!valid[0] && !valid[1])
        return cb_err(CB_E_CORRUPT, "metadata file has no valid superblock: %s; %s", why[0], why[1]);
    int pick;
    if (valid[0] && valid[1]) {
        if (sbs[0].transaction_id != sbs[1].transaction_id)
            pick = sbs[0].transaction_id > sbs[1].transaction_id ? 0 : 1;
        else /* the same commit, once re-written with needs_check: keep the flag */
            pick = (sbs[1].flags & CB_SB_NEEDS_CHECK) ? 1 : 0;
    } else {
        pick = valid[0] ? 0 : 1;
    }
    m->sb = sbs[pick];
    if (m->sb.version != CB_FORMAT_VERSION)
        return cb_err(CB_E_CORRUPT, "metadata format version %u is not supported (this build reads %u)",
                      m->sb.version, CB_FORMAT_VERSION);
    if (m->sb.incompat & ~CB_INCOMPAT_SUPPORTED)
        return cb_err(CB_E_INVALID, "pool uses incompatible features %#x this build does not know",
                      m->sb.incompat & ~CB_INCOMPAT_SUPPORTED);
    if ((m->sb.ro_compat & ~CB_RO_COMPAT_SUPPORTED) && !read_only)
        return cb_err(CB_E_READ_ONLY, "pool uses features %#x this build can only read; open it read-only",
                      m->sb.ro_compat & ~CB_RO_COMPAT_SUPPORTED);
    uint32_t bs = m->sb.data_block_size;
    if (bs < 4096 || bs > (1u << 30) || (bs & (bs - 1)))
        return cb_err(CB_E_CORRUPT, "superblock is corrupt: data block size %u is not a power of two "
                      "from 4 KiB to 1 GiB", bs);
    uint64_t want = m->sb.nr_meta_blocks * CB_META_BLOCK_SIZE;
    if (m->sb.nr_meta_blocks < 16 || m->sb.nr_meta_blocks > UINT32_MAX)
        return cb_err(CB_E_CORRUPT, "superblock is corrupt: %llu metadata blocks",
                      (unsigned long long)m->sb.nr_meta_blocks);
    if ((uint64_t)st.st_size < want)
        return cb_err(CB_E_CORRUPT, "metadata file is truncated: %lld bytes, but the superblock "
                      "(transaction %llu) says %llu blocks = %llu bytes",
                      (long long)st.st_size, (unsigned long long)m->sb.transaction_id,
                      (unsigned long long)m->sb.nr_meta_blocks, (unsigned long long)want);
    if (m->sb.nr_data_blocks == 0 || m->sb.nr_data_blocks > CB_MAX_BLOCKS)
        return cb_err(CB_E_CORRUPT, "superblock is corrupt: %llu data blocks",
                      (unsigned long long)m->sb.nr_data_blocks);
    int r = alloc_tables(m, m->sb.nr_meta_blocks);
    if (!r)
        r = map_file(m, m->sb.nr_meta_blocks);
    if (!r)
        r = setup_space_maps(m);
    meta_set_capacities(m);
    return r;
}

int meta_format(struct cb_meta *m, int fd, uint64_t nr_blocks, uint32_t block_size,
                uint64_t nr_data_blocks, uint32_t node_capacity, const uint8_t *uuid)
{
    m->file.fd = fd; /* m->file.remote: the caller's */
    m->file.name = "metadata";
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    memset(&m->sb, 0, sizeof m->sb);
    m->sb.type = CB_BT_SUPERBLOCK;
    m->sb.magic = CB_MAGIC;
    m->sb.version = CB_FORMAT_VERSION;
    m->sb.data_block_size = block_size;
    uuid_or_random(m->sb.pool_uuid, uuid);
    m->sb.created_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    m->sb.nr_data_blocks = nr_data_blocks;
    m->sb.nr_meta_blocks = nr_blocks;
    m->sb.next_dev_id = 1;
    m->sb.node_capacity = node_capacity;
    int r = io_truncate(&m->file, nr_blocks * CB_META_BLOCK_SIZE);
    if (!r)
        r = alloc_tables(m, nr_blocks);
    if (!r)
        r = map_file(m, nr_blocks);
    if (!r)
        r = setup_space_maps(m);
    if (r)
        return r;
    meta_set_capacities(m);
    /* The two superblock slots are in use from the start; mark them busy so
     * that the space map pages made while counting them go elsewhere. */
    for (uint64_t b = 0; b < 2; b++) {
        m->msm.busy[b >> 3] |= (uint8_t)(1u << (b & 7));
    }
    if ((r = sm_set(m, &m->msm, 0, 1)) || (r = sm_set(m, &m->msm, 1, 1)))
        return r;
    return meta_commit(m, NULL, false);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int write_new_blocks(struct cb_meta *m)
{
    struct u32vec *dl = &m->dirty_list;
    if (dl->n)
        qsort(dl->v, dl->n, sizeof *dl->v, cmp_u32);
    size_t i = 0;
    while (i < dl->n) {
        if (!m->dirty[dl->v[i]]) { /* freed again in this transaction */
            i++;
            continue;
        }
        struct iovec iov[256];
        int cnt = 0;
        uint32_t first = dl->v[i];
        while (i < dl->n && cnt < 256 && m->dirty[dl->v[i]] && dl->v[i] == first + (uint32_t)cnt) {
            uint8_t *blk = m->dirty[dl->v[i]];
            struct cb_block_header *h = (void *)blk;
            h->blocknr = dl->v[i];
            h->csum = cb_block_csum(blk, h->type);
            iov[cnt++] = (struct iovec){blk, CB_META_BLOCK_SIZE};
            i++;
        }
        int r = io_pwritev(&m->file, iov, cnt, (uint64_t)first * CB_META_BLOCK_SIZE);
        if (r)
            return r;
        m->blocks_written += (uint64_t)cnt;
    }
    return 0;
}

static void drop_new_blocks(struct cb_meta *m, bool written)
{
    for (size_t i = 0; i < m->dirty_list.n; i++) {
        uint32_t b = m->dirty_list.v[i];
        if (m->dirty[b]) {
            free(m->dirty[b]);
            m->dirty[b] = NULL;
            if (written) /* we wrote it with its checksum: no need to verify it again */
                m->verified[b >> 3] |= (uint8_t)(1u << (b & 7));
        }
    }
    m->dirty_list.n = 0;
}

int meta_commit(struct cb_meta *m, struct cb_file *data, bool data_dirty)
{
    int r;
    if (data && data_dirty && (r = io_fsync(data)) != 0)
        return r;
    if ((r = write_new_blocks(m)) != 0)
        return r;
    if ((r = io_fsync(&m->file)) != 0)
        return r;
    struct cb_superblock sb = m->sb;
    sb.transaction_id++;
    sb.blocknr = sb.transaction_id % 2;
    sb.type = CB_BT_SUPERBLOCK;
    sb.csum = cb_block_csum(&sb, CB_BT_SUPERBLOCK);
    if ((r = io_pwrite(&m->file, &sb, sizeof sb, sb.blocknr * CB_META_BLOCK_SIZE)) != 0)
        return r;
    if ((r = io_fsync(&m->file)) != 0)
        return r;
    m->blocks_written++;
    m->sb = sb;
    drop_new_blocks(m, true);
    sm_commit_done(&m->msm);
    sm_commit_done(&m->dsm);
    return 0;
}

int meta_grow(struct cb_meta *m, uint64_t nr_blocks)
{
    if (nr_blocks <= m->nr_blocks)
        return 0;
    int r = io_truncate(&m->file, nr_blocks * CB_META_BLOCK_SIZE);
    if (!r)
        r = alloc_tables(m, nr_blocks);
    if (!r)
        r = map_file(m, nr_blocks);
    if (!r)
        r = sm_grow(&m->msm, nr_blocks);
    if (r)
        return r;
    m->sb.nr_meta_blocks = nr_blocks;
    meta_set_capacities(m);
    return 0;
}

int meta_persist_needs_check(struct cb_meta *m)
{
    /* Re-write the last commit, flagged, into the other slot: the committed
     * slot is never touched, and on open the flagged twin wins the tie. */
    struct cb_superblock sb;
    ssize_t n = pread(m->file.fd, &sb, sizeof sb, (off_t)(m->sb.blocknr * CB_META_BLOCK_SIZE));
    if (n != (ssize_t)sizeof sb)
        return -EIO;
    sb.flags |= CB_SB_NEEDS_CHECK;
    sb.blocknr ^= 1;
    sb.csum = cb_block_csum(&sb, CB_BT_SUPERBLOCK);
    m->sb.flags |= CB_SB_NEEDS_CHECK;
    int r = io_pwrite(&m->file, &sb, sizeof sb, sb.blocknr * CB_META_BLOCK_SIZE);
    return r ? r : io_fsync(&m->file);
}

void meta_close(struct cb_meta *m)
{
    drop_new_blocks(m, false);
    free(m->dirty_list.v);
    free(m->dirty);
    free(m->verified);
    sm_destroy(&m->msm);
    sm_destroy(&m->dsm);
    if (m->map)
        munmap(m->map, m->map_len);
    memset(m, 0, sizeof *m);
}

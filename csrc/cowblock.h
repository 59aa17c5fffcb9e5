/* Internal declarations shared by the C core's modules. */
#ifndef COWBLOCK_INTERNAL_H
#define COWBLOCK_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/uio.h>

#include "format.h"
#include "api.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "cowblock's on-disk format is little-endian; this host is not"
#endif

#ifndef EUCLEAN
#define EUCLEAN 117
#endif

/* ---- errors (errors.c) ---- */
/* Record a message and its kind for the calling thread; returns -errno of
 * the kind (enum cb_error_kind in api.h). */
int cb_err(enum cb_error_kind kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Attach the values a failed comparison expected and found to the error just
 * recorded (check reports them); cb_err forgets them. */
void cb_err_values(uint64_t expected, uint64_t found);
bool cb_last_error_values(uint64_t *expected, uint64_t *found);
/* The errno of a kind. */
int cb_kind_errno(int kind);
/* The kind for an errno a host call (open, access) set: a missing file, a
 * refused one, or an I/O error. */
int cb_host_errno_kind(int err);

/* ---- copying a read's data out of the data file's mapping (copy.c) ---- */
void cb_copy_out(void *dst, const void *src, size_t len);

/* ---- checksum (crc32c.c): cb_crc32c and cb_block_csum are in api.h ---- */
/* A UUID given by the caller, or a random one when it passes NULL. */
static inline void uuid_or_random(uint8_t dst[16], const uint8_t *src)
{
    if (src)
        memcpy(dst, src, 16);
    else if (getrandom(dst, 16, 0) != 16)
        memset(dst, 0, 16);
}

/* ---- the I/O seam (io.c): every persistent write goes through here ---- */
struct cb_remote;
struct cb_file {
    int fd;
    const char *name;   /* "data" or "metadata", for messages (and RADOS object names) */
    struct cb_remote *remote; /* the pool lives in RADOS: fd is its cache (remote.c) */
    uint32_t write_piece; /* the most a write syscall writes, aligned (0: no limit; see io.c) */
};
/* The data file's write piece: 64 KiB (see write_all in io.c). */
#define CB_DATA_WRITE_PIECE (64u << 10)
int io_pwrite(struct cb_file *f, const void *buf, size_t len, uint64_t off);
int io_pwritev(struct cb_file *f, struct iovec *iov, int cnt, uint64_t off);
int io_write_zeroes(struct cb_file *f, uint64_t off, uint64_t len);
int io_fsync(struct cb_file *f);
int io_truncate(struct cb_file *f, uint64_t size);
int io_punch_hole(struct cb_file *f, uint64_t off, uint64_t len);
/* The RADOS side of the seam (remote.c), for files with a remote: writes
 * are sent in the order their local copies are made (remote_begin/end
 * around both), and remote_wait is the remote file's fsync. */
void remote_begin(struct cb_file *f);
void remote_end(struct cb_file *f);
int remote_write(struct cb_file *f, const struct iovec *iov, int cnt, uint64_t off);
int remote_discard(struct cb_file *f, uint64_t off, uint64_t len);
int remote_set_size(struct cb_file *f, uint64_t size);
int remote_wait(struct cb_file *f);
/* The cache is filled on demand (remote.c): remote_need before reading
 * ranges of a file through its mapping, remote_will_write before writing,
 * zeroing or punching a range of the cache. */
struct cb_range {
    uint64_t off, len;
};
int remote_need(struct cb_file *f, const struct cb_range *ranges, int count);
int remote_will_write(struct cb_file *f, uint64_t off, uint64_t len);
void remote_set_block_size(struct cb_file *f, uint32_t block_size);
/* Around reading a data file's cache through its mapping (from before its
 * remote_need to the last byte copied) and around writing it: while a
 * thread is pinned, no unit it may touch is dropped from a bounded cache
 * (remote.c, "the bound").  Nests; 0 for files without a bound. */
uint32_t remote_pin(struct cb_file *f);
void remote_unpin(struct cb_file *f, uint32_t pin);
/* Bytes of a data or metadata object: one RADOS write per object a write
 * of the file spans. */
uint64_t remote_object_size(void);

/* ---- growable vector of u32 ---- */
struct u32vec {
    uint32_t *v;
    size_t n, cap;
};
int u32vec_push(struct u32vec *vec, uint32_t x);

/* ---- space maps (sm.c) ---- */
struct cb_meta;
struct cb_sm {
    uint32_t *root;            /* points into the in-memory superblock */
    uint64_t *used;            /* ditto: count of non-zero entries */
    uint64_t nr_blocks;        /* capacity */
    uint64_t alloc_hint;
    uint64_t run_hint;         /* where sm_take_run looks first */
    bool run_none;             /* it found none: not again before blocks are freed */
    uint8_t *busy;             /* bitmap: allocated or freed this transaction */
    uint64_t busy_bits;
    struct u32vec busy_list;   /* which bits to clear at commit */
    uint8_t *dropped;          /* bitmap: count decremented this transaction, so the
                                  block may still be shared in the last commit */
    struct u32vec dropped_list;
    uint64_t freed_this_txn;   /* blocks freed but not reusable before commit */
    /* Reads copy data blocks without the pool lock (dataio.c).  A reader
     * registers under the lock in readers[read_epoch & 1]; a commit keeps the
     * busy and dropped bits of its transaction set ("held") until every
     * reader that may have looked those blocks up is done, so a block is
     * neither reused nor written in place under a reader's feet.  Only the
     * data space map has readers. */
    uint32_t readers[2];
    uint32_t read_epoch;
    uint32_t held_parity;      /* the readers[] the held blocks wait for */
    struct u32vec held_busy, held_dropped;
    uint64_t held_free;        /* freed blocks among held_busy */
};
int sm_init(struct cb_sm *sm, uint32_t *root, uint64_t *used, uint64_t nr_blocks);
void sm_destroy(struct cb_sm *sm);
int sm_grow(struct cb_sm *sm, uint64_t nr_blocks);
int sm_get(struct cb_meta *m, struct cb_sm *sm, uint64_t b, uint32_t *out);
int sm_set(struct cb_meta *m, struct cb_sm *sm, uint64_t b, uint32_t v);
int sm_inc(struct cb_meta *m, struct cb_sm *sm, uint64_t b);
/* Decrement; *now_zero tells whether the block just became free. */
int sm_dec(struct cb_meta *m, struct cb_sm *sm, uint64_t b, bool *now_zero);
/* Find a block with count 0 that was not freed in this transaction, and mark
 * it busy.  Does not set its count. -ENOSPC when there is none. */
int sm_find_free(struct cb_meta *m, struct cb_sm *sm, uint64_t *out);
/* Block b, if it is free as sm_find_free means it, marked busy: 1; 0 when
 * it is not free. */
int sm_take_if_free(struct cb_meta *m, struct cb_sm *sm, uint64_t b);
/* count contiguous free blocks, the first a multiple of align, marked busy:
 * 1 and *out the first; 0 when no such run is free.  Searches from where
 * the last run ended, so runs taken one after another cost no rescan. */
int sm_take_run(struct cb_meta *m, struct cb_sm *sm, uint64_t count, uint64_t align, uint64_t *out);
/* After a commit: blocks freed or dropped in the transaction become reusable
 * (or are held while readers that may see them remain). */
bool sm_commit_idle(const struct cb_sm *sm);
void sm_commit_done(struct cb_sm *sm);
/* Register a lock-free reader; call with the pool lock held (any mode). */
static inline uint32_t sm_read_begin(struct cb_sm *sm)
{
    uint32_t parity = __atomic_load_n(&sm->read_epoch, __ATOMIC_RELAXED) & 1;
    __atomic_add_fetch(&sm->readers[parity], 1, __ATOMIC_ACQ_REL);
    return parity;
}
static inline void sm_read_end(struct cb_sm *sm, uint32_t parity)
{
    __atomic_sub_fetch(&sm->readers[parity], 1, __ATOMIC_RELEASE);
}
/* Wait (at most timeout_ms, forever if negative) until no reader is copying;
 * with the pool write lock held no new one can start.  Returns whether none is. */
bool sm_wait_readers(struct cb_sm *sm, int timeout_ms);
/* Was b's count decremented in this transaction?  Then the last commit may
 * still share it, and it must not be written in place (see dataio.c). */
static inline bool sm_dropped(const struct cb_sm *sm, uint64_t b)
{
    return b < sm->busy_bits && (sm->dropped[b >> 3] & (1u << (b & 7)));
}
/* Keep block b from being handed out until the next commit. */
int sm_reserve(struct cb_sm *sm, uint64_t b);

/* ---- metadata block manager (meta.c) ----
 * Committed blocks are read through a read-only mmap of the metadata file and
 * verified once each (a bitmap remembers which).  A block allocated in the
 * running transaction lives in a malloc()ed buffer until commit writes it.
 * Only such new blocks are ever written: committed blocks are immutable, and
 * that is the whole crash-safety argument (see docs/FORMAT.md).
 */
struct cb_meta {
    struct cb_file file;
    uint8_t *map;
    uint64_t map_len;
    uint64_t nr_blocks;
    uint8_t **dirty;           /* [nr_blocks]: buffer of a block new this txn, else NULL */
    uint8_t *verified;         /* bitmap: checksum verified since open */
    struct u32vec dirty_list;
    struct cb_superblock sb;   /* in-memory superblock of the running transaction */
    struct cb_sm msm;          /* metadata space map */
    struct cb_sm dsm;          /* data space map */
    uint64_t reserve;          /* metadata blocks kept for commits */
    uint32_t leaf_max, internal_max, dev_leaf_max;
    uint32_t rec_max_entries;  /* entries per records node: the node capacity, if any */
    bool read_only;
    uint64_t blocks_written, blocks_verified;
    int walkers;               /* walks of whole trees running (meta_walk_begin) */
};
/* Around a walk of whole trees (check, delete, diff, usage, mappings,
 * trim): the metadata mapping reads ahead while one runs (see meta.c). */
void meta_walk_begin(struct cb_meta *m);
void meta_walk_end(struct cb_meta *m);
/* A committed or new block, verified: NULL and an error if corrupt. */
const uint8_t *meta_read(struct cb_meta *m, uint32_t b, uint32_t t1, uint32_t t2, int *err);
/* Allocate a new block (count 1), zeroed, writable until commit; its number
 * is stored in *slot before it is counted (see sm.c). */
uint8_t *meta_new(struct cb_meta *m, uint32_t type, uint32_t *slot, int *err);
/* The first half of meta_new: a zeroed new block, not yet counted. */
uint8_t *meta_alloc_uncounted(struct cb_meta *m, uint32_t type, uint32_t *b_out, int *err);
/* Writable copy of block *b: the same block if new this txn and unshared,
 * else a copy.  If the original was shared, inc_children is called on the
 * copy so that it holds its own references. *b is updated. */
typedef int (*meta_inc_fn)(struct cb_meta *m, const uint8_t *block);
uint8_t *meta_shadow(struct cb_meta *m, uint32_t *slot, uint32_t t1, uint32_t t2,
                     meta_inc_fn inc_children, int *err);
bool meta_is_new(struct cb_meta *m, uint32_t b);
/* Free check: would this many new blocks fit above the reserve? */
int meta_reserve_check(struct cb_meta *m, uint64_t blocks);
int meta_inc(struct cb_meta *m, uint32_t b);
int meta_dec(struct cb_meta *m, uint32_t b, bool *now_free);
int meta_open(struct cb_meta *m, int fd, bool read_only);
int meta_format(struct cb_meta *m, int fd, uint64_t nr_blocks, uint32_t block_size,
                uint64_t nr_data_blocks, uint32_t node_capacity, const uint8_t *uuid);
int meta_commit(struct cb_meta *m, struct cb_file *data, bool data_dirty);
int meta_grow(struct cb_meta *m, uint64_t nr_blocks);
int meta_persist_needs_check(struct cb_meta *m);
void meta_close(struct cb_meta *m);
void meta_set_capacities(struct cb_meta *m);

/* ---- b-trees (btree.c) ---- */
struct bt_ctx {
    struct cb_meta *m;
    uint32_t leaf_type;        /* CB_BT_MAP_LEAF or CB_BT_DEV_LEAF */
};
int bt_lookup(struct cb_meta *m, uint32_t root, uint32_t key, void *value, uint32_t vsize);
int bt_insert(struct bt_ctx *c, uint32_t *root, uint32_t key, const void *value,
              void *old_value, bool *replaced);
int bt_remove(struct bt_ctx *c, uint32_t *root, uint32_t key, void *old_value);
/* Remove [begin, end); *removed gets the number of entries removed. */
int bt_remove_range(struct bt_ctx *c, uint32_t *root, uint32_t begin, uint64_t end,
                    uint64_t *removed);
/* Drop one reference to a tree; frees what it alone held. */
int bt_dec_tree(struct bt_ctx *c, uint32_t root);
int bt_inc_values(struct cb_meta *m, const uint8_t *node);

/* A read-only cursor over a mapping tree. shared_path says whether any node
 * above the current leaf (or the leaf) has a count above 1. */
struct bt_cursor {
    struct cb_meta *m;
    const uint8_t *leaf;
    uint32_t leaf_block;
    uint32_t pos;
    uint32_t nr;
    bool shared_path;
};
/* Position at the first entry with key >= key. Returns 1 if positioned, 0 if
 * no such entry, negative on error. */
int bt_seek(struct bt_cursor *cur, uint32_t root, uint32_t key, bool want_sharing);
int bt_next(struct bt_cursor *cur, uint32_t root, bool want_sharing);
uint32_t bt_cur_key(const struct bt_cursor *cur);
uint32_t bt_cur_value(const struct bt_cursor *cur);

/* node accessors */
static inline struct cb_node_header *node_hdr(const uint8_t *n) { return (struct cb_node_header *)n; }
static inline uint32_t *node_keys(const uint8_t *n) { return (uint32_t *)(n + sizeof(struct cb_node_header)); }
static inline uint8_t *node_values(const uint8_t *n)
{
    return (uint8_t *)(n + sizeof(struct cb_node_header) + CB_NODE_KEY_SIZE * node_hdr(n)->max_entries);
}
static inline uint32_t *node_u32_values(const uint8_t *n) { return (uint32_t *)node_values(n); }

/* ---- the records store (records.c) ---- */
/* One entry of a records node, decoded (key and inline value point into it). */
struct rec_entry {
    const uint8_t *key;
    uint32_t key_len;
    uint32_t size;             /* bytes the entry takes in its node */
    uint32_t flags, value_len; /* leaf entries */
    const uint8_t *value;      /* inline value, NULL when in blocks */
    uint32_t first_block;      /* the value's first block, with CB_REC_IN_BLOCKS */
    uint32_t child;            /* internal entries */
};
/* The entry at byte `at` of a verified node's entries. */
void rec_entry_at(const uint8_t *node, uint32_t at, struct rec_entry *e);
uint32_t rec_value_blocks(uint32_t value_len);
/* Structure checks of a committed records node or value block (meta_read). */
int rec_verify_node(struct cb_meta *m, uint32_t b, const uint8_t *blk);
int rec_verify_value(uint32_t b, const uint8_t *blk);
/* Copy a value out (value_len bytes), checking its chain. */
int rec_read_value(struct cb_meta *m, const struct rec_entry *e, uint8_t *out);
int rec_inc_children(struct cb_meta *m, const uint8_t *node);
/* Changes of a tree at *root holding *count records (write lock held):
 * put (create or replace), delete (1 deleted, 0 absent). */
int rec_put_locked(struct cb_meta *m, uint32_t *root, uint64_t *count, const uint8_t *key,
                   uint32_t klen, const uint8_t *value, uint32_t vlen);
int rec_delete_locked(struct cb_meta *m, uint32_t *root, uint64_t *count, const uint8_t *key,
                      uint32_t klen);
int rec_lookup(struct cb_meta *m, uint32_t root, const uint8_t *key, uint32_t klen,
               struct rec_entry *out);
/* A walk of the records in key order whose key has the prefix and is above
 * `after` (alen 0: from the first): output as api.h's cb_rec_list says
 * (want_output), or only counted; it stops at max_entries or max_bytes. */
struct rec_lister {
    struct cb_meta *m;
    const uint8_t *prefix, *after;
    uint32_t plen, alen;
    uint64_t max_entries, max_bytes;
    bool with_values;
    bool want_output;
    uint8_t *out;              /* malloc()ed output, out_len bytes of it used */
    uint64_t out_len, out_cap;
    uint64_t n;                /* records found */
    bool done;
    uint8_t last[CB_RECORD_KEY_MAX]; /* the last key found: keys must only grow */
    uint32_t last_len;
};
int rec_list(struct rec_lister *l, uint32_t root);
/* Repair: a new tree of every record of the tree at old_root that reads
 * back whole (kept); lost: records whose value is damaged; lost_nodes:
 * unreadable nodes, whose records are lost uncounted. */
typedef void (*rec_lost_fn)(void *ctx, const uint8_t *key, uint32_t key_len);
int rec_salvage(struct cb_meta *m, uint32_t old_root, uint32_t *new_root, uint64_t *kept,
                uint64_t *lost, uint64_t *lost_nodes, rec_lost_fn on_lost, void *ctx);
/* The superblock's CB_RO_COMPAT_RECORDS: set while the store holds blocks. */
void rec_update_flag(struct cb_meta *m);
/* A key as text for messages: printable ASCII as it is, other bytes \xNN. */
void rec_key_text(char *dst, size_t cap, const uint8_t *key, uint32_t len);

/* ---- the pool (pool.c, device.c, dataio.c) ---- */
struct cb_dev {
    uint32_t id;
    struct cb_dev_detail d;
    uint8_t *catalog;          /* full catalog bytes (d.catalog_len) */
    bool changed;              /* detail must be written back at commit */
};

/* Atomic sections (txn.c): who holds them, and the commits that wait. */
struct cb_section {
    pthread_t thread;
    uint32_t depth;            /* nested begins of this thread */
};
struct cb_sections {
    pthread_mutex_t lock;      /* taken after the pool lock, never before it */
    pthread_cond_t cond;       /* open reached 0, or commits_waiting did */
    uint32_t open;             /* threads inside a section */
    uint32_t commits_waiting;  /* commits waiting for them: no new section opens */
    struct cb_section *v;
    size_t n, cap;
};

struct cb_pool {
    pthread_rwlock_t lock;     /* metadata: read for lookups and in-place I/O, write for changes */
    pthread_mutex_t commit_lock;
    uint64_t commit_tickets;   /* atomic: explicit commits asked for so far */
    uint64_t commits_done;     /* under commit_lock: tickets the last full round covered */
    int dirfd;
    struct cb_file data;
    uint8_t *data_map;         /* read-only shared mmap of the data file */
    uint64_t data_map_len;
    struct retired_map {       /* mappings replaced by a resize while readers used them */
        uint8_t *addr;
        uint64_t len;
    } *retired;
    size_t nr_retired;
    struct cb_meta m;
    struct cb_dev **devs;      /* indexed by id */
    uint32_t devs_cap;
    uint32_t nr_devices;
    bool dirty;                /* metadata changed since commit */
    /* Data durability, in counts of data writes: data_writes is bumped
     * after every write to the data file returns, data_synced is the count
     * read before a data fsync that has completed (the largest such); the
     * data is unsynced while data_synced < data_writes.  Counts, not a flag,
     * so that data fsyncs can run side by side (data_only_commit). */
    uint64_t data_writes;      /* atomic */
    uint64_t data_synced;      /* atomic */
    uint64_t alloc_gen;        /* +1 per write into a newly allocated block */
    uint64_t synced_gen;       /* alloc_gen that the last data fsync covered */
    struct u32vec pending;     /* data blocks being filled outside the write lock */
    pthread_mutex_t cell_lock; /* protects cells: (device, block) pieces in the slow path */
    pthread_cond_t cell_cond;
    struct cb_cell *cells;
    size_t nr_cells, cap_cells;
    size_t cells_busy;         /* nr_cells, readable without cell_lock */
    bool failed;               /* an I/O error: read-only until checked */
    bool read_only;
    uint32_t block_size;
    uint32_t block_shift;
    uint32_t commits_waited;
    struct cb_sections sections;
};

struct cb_dev *pool_dev(cb_pool *p, uint32_t id);
/* Commit with the write lock held, as an operation's last step.  Inside the
 * calling thread's atomic section it does nothing (the section's end
 * commits); while another thread's section is open it lets go of the lock,
 * waits for it and takes the lock again: the caller must hold on to nothing
 * found under the lock across it. */
int pool_commit_locked(cb_pool *p);
/* The same, but only if no section is open (else nothing): for commits in
 * the middle of a change, which cannot let go of the lock. */
int pool_commit_locked_nowait(cb_pool *p);
int pool_fail(cb_pool *p, int err);
int pool_writable(cb_pool *p);
void dev_free(struct cb_dev *d);
int dev_load_all(cb_pool *p);
int dev_write_back(cb_pool *p);
int dev_zero_range_locked(cb_pool *p, struct cb_dev *d, uint64_t off, uint64_t len);
/* ---- atomic sections (txn.c) ---- */
enum txn_turn { TXN_NOW, TXN_DEFER, TXN_WAIT };
void txn_init(cb_pool *p);
void txn_destroy(cb_pool *p);
/* The calling thread's nesting depth of sections on p, 0 outside. */
uint32_t txn_depth(cb_pool *p);
bool txn_any_open(cb_pool *p);
/* May a commit run now (write lock held)?  TXN_DEFER: inside this thread's
 * section; TXN_WAIT: counted as a waiting commit, to txn_wait_idle without
 * the lock and commit_gate_leave after committing. */
enum txn_turn txn_turn(cb_pool *p);
void txn_wait_idle(cb_pool *p);
/* Around a commit made without holding the pool lock yet: wait until no
 * section is open, and keep new ones out until leave. */
void commit_gate_enter(cb_pool *p);
void commit_gate_leave(cb_pool *p);

int cb_range_push(cb_range **v, uint64_t *n, uint64_t *cap, uint64_t begin, uint64_t len,
                  uint32_t kind);

#endif

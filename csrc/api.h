/*
 * The C core's public API: what the Python layer calls through cffi.
 *
 * This file is also the cffi cdef (csrc/build_ffi.py reads it), so it holds
 * plain declarations only.  Every int-returning call returns 0 (or a count)
 * on success and a negative errno on failure; cb_last_error() then gives a
 * message for the calling thread naming what went wrong, and
 * cb_error_kind() what kind of failure it was.
 *
 * A NULL uuid16 argument asks for a random UUID.
 * A failed fsync, or any failure part-way through a metadata change, turns
 * the pool read-only with needs_check set; a failed data write does not (the
 * data of that range is undefined, as on a disk that returned EIO).
 */

/* What went wrong, so that a caller can act on a failure without reading its
 * message.  Each kind has one errno (returned negated); kinds that share an
 * errno tell apart what the errno alone cannot (which space ran out). */
enum cb_error_kind {
    CB_E_NONE = 0,
    CB_E_INVALID = 1,         /* EINVAL: a bad argument, or features this build does not know */
    CB_E_NOT_FOUND = 2,       /* ENOENT: no such device, or a pool file is missing */
    CB_E_EXISTS = 3,          /* EEXIST */
    CB_E_READ_ONLY = 4,       /* EROFS: a read-only device or pool */
    CB_E_DATA_SPACE = 5,      /* ENOSPC: every data block is in use */
    CB_E_METADATA_SPACE = 6,  /* ENOSPC: metadata blocks exhausted, or down to the reserve */
    CB_E_HOST_SPACE = 7,      /* ENOSPC: the filesystem that holds the pool files is full */
    CB_E_LIMIT = 8,           /* ENOSPC: a counter of the format is used up (device ids, snapshot time) */
    CB_E_CORRUPT = 9,         /* EUCLEAN: metadata failed a checksum or an invariant */
    CB_E_IO = 10,             /* EIO: an I/O error, or the pool is read-only after one */
    CB_E_NO_MEMORY = 11,      /* ENOMEM */
    CB_E_OVERFLOW = 12,       /* EOVERFLOW: a reference count would overflow */
    CB_E_BUSY = 13,           /* EBUSY: in use */
    /* the network side (NBD over TLS) */
    CB_E_TIMEOUT = 14,        /* ETIMEDOUT: the peer said nothing in time */
    CB_E_PROTOCOL = 15,       /* EPROTO: the peer broke the protocol */
    CB_E_DENIED = 16,         /* EACCES: the peer's credentials were refused, or a file's mode */
    CB_E_CLOSED = 17,         /* EPIPE: the peer went away */
    CB_E_UNSUPPORTED = 18,    /* ENOTSUP: this build lacks a feature (GnuTLS) */
};

const char *cb_last_error(void);
/* The kind of the failure `code` (a negative errno) that a call just returned
 * to this thread: the kind recorded with its message, or, when the call
 * recorded none for that errno, the kind the errno stands for. */
int cb_error_kind(int code);
void cb_free(void *p);

typedef struct cb_pool cb_pool;

typedef struct {
    uint32_t data_block_size;
    uint32_t node_capacity;
    uint64_t nr_data_blocks;
    uint64_t data_used;
    uint64_t data_free;          /* blocks free now, including ones freed this transaction */
    uint64_t nr_meta_blocks;
    uint64_t meta_used;
    uint64_t meta_reserve;       /* blocks kept back so a commit always fits */
    uint64_t transaction_id;     /* last committed */
    uint64_t created_ns;
    uint32_t nr_devices;
    uint32_t snap_time;
    uint32_t needs_check;
    uint32_t read_only;          /* opened read-only, or turned read-only by an I/O error */
    uint32_t dirty;              /* uncommitted changes exist */
    uint32_t commits_waited;     /* internal counter: commits done to free space */
    uint8_t pool_uuid[16];
} cb_stats;

typedef struct {
    uint32_t id;
    uint32_t flags;
    uint64_t size;
    uint64_t mapped_blocks;
    uint64_t created_ns;
    uint64_t transaction_id;
    uint32_t origin_id;
    uint32_t creation_time;
    uint32_t snap_time;
    uint32_t catalog_len;
    uint8_t uuid[16];
} cb_devinfo;

/* What a run of blocks is: for block status, and for diff. */
enum cb_range_kind {
    CB_RANGE_UNMAPPED = 0,
    CB_RANGE_MAPPED = 1,
    CB_RANGE_SHARED = 2,      /* mapped, and the data block is shared with another device */
    CB_DIFF_LEFT_ONLY = 1,
    CB_DIFF_RIGHT_ONLY = 2,
    CB_DIFF_DIFFERENT = 3,
    CB_DIFF_SAME = 4,
};
typedef struct {
    uint64_t begin;    /* first virtual block */
    uint64_t length;   /* blocks */
    uint32_t kind;     /* enum cb_range_kind */
    uint32_t padding;
} cb_range;

typedef struct {
    uint64_t blocks_checked;
    uint64_t nodes_checked;
    uint64_t errors;
    uint64_t leaks;
} cb_check_summary;

/* One problem a check found, or one thing a repair did. */
enum cb_check_kind {
    CB_CHECK_ERROR = 1,       /* wrong: a count too low, a broken tree, a bad block */
    CB_CHECK_LEAK = 2,        /* a stored count above the references found: space lost, no harm */
    CB_CHECK_REPAIRED = 3,    /* what a repair did */
};
/* Which blocks a record's block number counts in. */
enum cb_check_space {
    CB_SPACE_NONE = 0,        /* the record names no block */
    CB_SPACE_METADATA = 1,
    CB_SPACE_DATA = 2,
};
typedef struct {
    uint32_t kind;            /* enum cb_check_kind */
    uint32_t before_repair;   /* 1: found by the check a repair ran first, since repaired */
    uint32_t space;           /* enum cb_check_space */
    uint32_t device;          /* id of the device concerned, 0 = none */
    uint64_t block;           /* the block concerned (space says of which kind) */
    uint64_t expected;        /* with has_values: what the references or the */
    uint64_t found;           /*   structure call for, and what is stored */
    uint32_t has_values;
    char message[484];        /* the whole sentence, as a person reads it */
} cb_check_record;

int cb_pool_create(const char *dir, uint64_t data_size, uint32_t block_size,
                   uint64_t meta_size, uint32_t node_capacity, const uint8_t *uuid16);
int cb_pool_open(const char *dir, int read_only, cb_pool **out);
int cb_pool_close(cb_pool *p);
int cb_pool_commit(cb_pool *p);
/* The periodic commit: the metadata, after an fsync of the data file only
 * when blocks were allocated since the last one (the data a mapping names
 * must be durable before the mapping).  Data overwritten in place in blocks
 * the metadata already maps is left to the kernel's writeback until the
 * next cb_pool_commit (an NBD FLUSH, a FUSE fsync, commit()), as dm-thin's
 * periodic commit leaves it: no rewrite of a hot range every second. */
int cb_pool_checkpoint(cb_pool *p);
int cb_pool_clear_needs_check(cb_pool *p);
int cb_pool_stats(cb_pool *p, cb_stats *out);
int cb_pool_resize(cb_pool *p, uint64_t data_size);
int cb_pool_resize_metadata(cb_pool *p, uint64_t meta_size);
int cb_pool_list(cb_pool *p, uint32_t *ids, uint32_t cap);
/* The pool's opaque configuration blob, committed with everything else. */
int cb_pool_config(cb_pool *p, void *buf, uint32_t cap);
int cb_pool_set_config(cb_pool *p, const void *buf, uint32_t len);
/* Give the unused part of the data file back to the host (punch holes in
 * every free block, like thin_trim); *bytes gets what was punched. */
int cb_pool_trim(cb_pool *p, uint64_t *bytes);
/* Verify all metadata.  *records gets what was found (at most 1000 are
 * listed; the summary counts all), malloc()ed: free it with cb_free. */
int cb_pool_check(cb_pool *p, cb_check_summary *summary, cb_check_record **records,
                  uint64_t *count);
/* Set every reference count from the trees (leaks and miscounts); refuses
 * when the trees themselves are damaged.  The summary is of the check run
 * after the repair; the records list what was found (before_repair), what
 * was done (CB_CHECK_REPAIRED), then what the check after it found. */
int cb_pool_repair(cb_pool *p, cb_check_summary *summary, cb_check_record **records,
                   uint64_t *count);
int cb_pool_diff(cb_pool *p, uint32_t a, uint32_t b, int with_same,
                 cb_range **out, uint64_t *count);

/* ---- atomic sections (txn.c) ----
 * Changes made by this thread between begin and end land in one commit: no
 * commit falls between them.  Inside, operations that commit before they
 * return do not; every other commit (the periodic one, an explicit one, an
 * NBD FLUSH, another thread's change) waits for the section to end, and
 * while one waits no new section begins.  Sections nest per thread.  A
 * commit, check, trim or repair from inside the section fails (EINVAL).
 * There is no abort: end with CB_TXN_COMMIT to commit as the outermost
 * section ends, 0 to leave the changes to the next commit, or CB_TXN_FAIL
 * when the section failed half-way and could not be undone: the pool turns
 * read-only with needs_check, so it is never committed. */
#define CB_TXN_COMMIT 1
#define CB_TXN_FAIL 2
int cb_pool_txn_begin(cb_pool *p);
int cb_pool_txn_end(cb_pool *p, int flags);
/* This thread's nesting depth of sections on p, 0 outside any. */
int cb_pool_txn_depth(cb_pool *p);

/* ---- the records store (records.c) ----
 * Keys are 1 to CB_RECORD_KEY_MAX bytes of anything, ordered bytewise;
 * values 0 to CB_RECORD_VALUE_MAX bytes.  put and delete commit before they
 * return, unless inside an atomic section.  get gives a malloc()ed copy
 * (free it with cb_free) and returns 1, or 0 when the key is absent.
 * delete returns 1, or 0 when the key was absent.  list gives the records
 * whose key starts with prefix and is above `after` (alen 0: from the
 * first), in key order, at most max_entries of them and stopping once
 * max_bytes are out (at least one): packed as u32 key length, u32 value
 * length, the key, and the value with with_values; it returns how many.
 * count counts the keys with the prefix (all of them in O(1)). */
int cb_rec_put(cb_pool *p, const void *key, uint32_t key_len, const void *value,
               uint32_t value_len);
int cb_rec_get(cb_pool *p, const void *key, uint32_t key_len, uint8_t **value,
               uint32_t *value_len);
int cb_rec_delete(cb_pool *p, const void *key, uint32_t key_len);
int cb_rec_list(cb_pool *p, const void *prefix, uint32_t prefix_len, const void *after,
                uint32_t after_len, uint32_t max_entries, uint64_t max_bytes, int with_values,
                uint8_t **out, uint64_t *out_len);
int64_t cb_rec_count(cb_pool *p, const void *prefix, uint32_t prefix_len);

int cb_dev_create(cb_pool *p, uint64_t size, const uint8_t *uuid16,
                  const void *catalog, uint32_t catalog_len, uint32_t *id_out);
int cb_dev_snapshot(cb_pool *p, uint32_t origin, uint32_t flags, const uint8_t *uuid16,
                    const void *catalog, uint32_t catalog_len, uint32_t *id_out);
int cb_dev_delete(cb_pool *p, uint32_t id);
int cb_dev_info(cb_pool *p, uint32_t id, cb_devinfo *out);
int cb_dev_catalog(cb_pool *p, uint32_t id, void *buf, uint32_t cap);
int cb_dev_set_catalog(cb_pool *p, uint32_t id, const void *catalog, uint32_t len);
int cb_dev_set_flags(cb_pool *p, uint32_t id, uint32_t flags);
int cb_dev_resize(cb_pool *p, uint32_t id, uint64_t size);
/* Device id becomes a copy of snapshot snap_id again, in O(1). */
int cb_dev_rollback(cb_pool *p, uint32_t id, uint32_t snap_id);
int cb_dev_usage(cb_pool *p, uint32_t id, uint64_t *exclusive, uint64_t *shared);

int64_t cb_dev_read(cb_pool *p, uint32_t id, void *buf, uint64_t len, uint64_t off);
int64_t cb_dev_write(cb_pool *p, uint32_t id, const void *buf, uint64_t len, uint64_t off);
int cb_dev_discard(cb_pool *p, uint32_t id, uint64_t off, uint64_t len);
int cb_dev_write_zeroes(cb_pool *p, uint32_t id, uint64_t off, uint64_t len, int may_unmap);
int cb_dev_block_status(cb_pool *p, uint32_t id, uint64_t off, uint64_t len,
                        cb_range **out, uint64_t *count);

/* The I/O seam's fault injection, for tests.  mode 0: off.  mode 1: power
 * cut at the Nth write or fsync (counted from this call): every write not yet
 * fsynced is lost, except all but the last one (flags CB_CUT_KEEP_NEWEST) or
 * a random half of them (CB_CUT_KEEP_RANDOM); with CB_CUT_TEAR the Nth
 * operation, if a write, lands torn (its first half); then every further I/O
 * fails with EIO.  mode 2: the Nth write or fsync fails with EIO.  Returns
 * the number of I/O operations counted since the last call. */
#define CB_CUT_KEEP_NEWEST 1
#define CB_CUT_KEEP_RANDOM 2
#define CB_CUT_TEAR 4
int64_t cb_fault_set(int mode, int64_t nth, int flags);
/* For tests: on 1, local pools too redirect scattered writes of whole
 * blocks to fresh contiguous ones, as pools on RADOS do (dataio.c), so the
 * power-cut tests cover that path; 0 (the default): RADOS pools only. */
void cb_fault_redirect_local(int on);
/* Debug counters: metadata blocks written and read (verified) since open. */
int cb_pool_counters(cb_pool *p, uint64_t *meta_written, uint64_t *meta_verified);

/* ---- writes that find the pool full (csrc/space.c) ----
 * What the NBD and FUSE loops call when a write fails with ENOSPC, on the
 * thread that ran it: it may block while the pool is grown (the low-water
 * hook, cowblock/lowwater.py); the write is then tried once more.  NULL: no
 * such wait. */
typedef void (*cb_space_wait_fn)(void *ctx);
/* Whether to try a write again after it returned r on its attempt-th try
 * (from 0): an ENOSPC write waits for wait(ctx) once and is tried again,
 * then (wait_ms, --on-full wait=S) is retried every 100 ms for wait_ms. */
int cb_space_retry(int r, int attempt, cb_space_wait_fn wait, void *ctx, uint32_t wait_ms);

/* ---- NBD transmission phase (csrc/nbd/transmit.c) ----
 * Serve NBD requests for one device on a connected socket, after the
 * handshake (done by the caller), until the client disconnects.  `workers`
 * threads (the calling one among them) take turns reading a request and
 * run it, so replies may go out of order.  Returns 0 on a clean
 * disconnect, else a negative errno. */
typedef struct {
    uint32_t dev_id;
    int fd;
    void *transport;            /* NULL: read and write fd; else a struct cb_nbd_transport
                                 * (csrc/nbd/transport.h), e.g. a cb_tls_session */
    uint32_t structured;        /* structured replies negotiated */
    uint32_t read_only;
    uint32_t ctx_allocation;    /* base:allocation context id, 0 = not selected */
    uint32_t ctx_shared;        /* cowblock:shared context id, 0 = not selected */
    uint32_t workers;           /* worker threads, 1..64 */
    uint32_t on_full_wait_ms;   /* 0: ENOSPC at once; else retry writes this long */
    cb_space_wait_fn space_wait; /* NULL, or what an ENOSPC write waits for first */
    void *space_ctx;
    uint64_t max_buffered;      /* bytes of request payload held in memory at most */
    uint64_t requests;          /* out: requests served */
    uint64_t bytes_read;        /* out */
    uint64_t bytes_written;     /* out */
} cb_nbd_conn;

int cb_nbd_transmit(cb_pool *p, cb_nbd_conn *conn);

/* ---- bulk mappings, for interchange (thin_dump XML) ----
 * Every mapping of a device in key order: virtual block, data block, and
 * whether the data block is shared with another device (keys, values and
 * shared are malloc()ed arrays; free them with cb_free). */
int cb_dev_mappings(cb_pool *p, uint32_t id, uint32_t **keys, uint32_t **values,
                    uint8_t **shared, uint64_t *count);
/* Map virtual blocks to given data blocks in an empty device (restore):
 * each data block gains a reference.  Keys must be sorted and unique. */
int cb_dev_add_mappings(cb_pool *p, uint32_t id, const uint32_t *keys, const uint32_t *values,
                        uint64_t count);
/* Every device's mappings at one instant (one lock hold: a consistent
 * metadata snapshot, as thin_dump -m gives): for device i, ids[i] and
 * counts[i]; its mappings follow the previous devices' in keys/values/shared. */
int cb_pool_mappings(cb_pool *p, uint32_t **ids, uint64_t **counts, uint32_t *nr_devices,
                     uint32_t **keys, uint32_t **values, uint8_t **shared, uint64_t *total);
/* Copying a pool block for block (cowblock/poolcopy.py): read count whole
 * data blocks from first on; write them, only into blocks no device maps
 * (EBUSY otherwise), durable at the next commit.  Then a copied device
 * takes its original's origin, creation time and dm-thin times. */
int cb_pool_read_data(cb_pool *p, uint64_t first, uint64_t count, void *buf);
int cb_pool_write_data(cb_pool *p, uint64_t first, uint64_t count, const void *buf);
int cb_dev_set_history(cb_pool *p, uint32_t id, uint32_t origin_id, uint64_t created_ns,
                       uint32_t creation_time, uint32_t snap_time);

/* ---- the on-disk format (format.c), for tools that read pool files ----
 * Every field of every record of csrc/format.h with its offset and size
 * (offsetof, sizeof), and the format's constants, so that no other
 * language writes the layout down again (cowblock/format.py reads these). */
typedef struct {
    const char *record;       /* "superblock", "node_header", ... */
    uint32_t size;            /* sizeof the whole record */
} cb_format_record;
typedef struct {
    const char *record;
    const char *name;
    uint32_t offset;          /* offsetof */
    uint32_t size;            /* sizeof the field */
    uint32_t item_size;       /* sizeof one element: the field's own size unless it is an array */
} cb_format_field;
typedef struct {
    const char *name;         /* the C name: "CB_META_BLOCK_SIZE", "CB_BT_MAP_LEAF", ... */
    uint64_t value;
} cb_format_constant;
const cb_format_record *cb_format_records(uint32_t *count);
const cb_format_field *cb_format_fields(uint32_t *count);
const cb_format_constant *cb_format_constants(uint32_t *count);
/* CRC-32C as the format uses it: crc32c(crc, buf) continues from crc (0 to
 * start); cb_block_csum is a metadata block's checksum, salted with its type. */
uint32_t cb_crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t cb_block_csum(const void *block, uint32_t type);

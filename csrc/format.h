/*
 * cowblock on-disk format: every persistent structure, in one place.
 *
 * docs/FORMAT.md describes the same layout in prose, with the commit protocol.
 * Everything here is little-endian on disk (this engine only builds on
 * little-endian hosts, checked at compile time in cowblock.h), laid out with
 * natural alignment and no padding (the size asserts at the end guard it), and
 * covered by a crc32c checksum that is salted per block type, so a block read
 * from the wrong place or of the wrong kind fails verification.
 *
 * A pool directory holds:
 *   data      data blocks, block N at byte N * block_size, no header (so the
 *             file can serve as a dm-thin data device as it is)
 *   metadata  4 KiB metadata blocks; blocks 0 and 1 are the two superblock
 *             slots, every other block is handed out by the metadata space map
 *   lock      flock()ed: exclusively by the writer (which writes "pid=N" into
 *             it, informational only), shared by read-only openers
 *
 * The directory is made CB_POOL_DIR_MODE and data and metadata
 * CB_POOL_FILE_MODE, whatever the umask: only the owner reads the blocks.
 *
 * Metadata block numbers and data block numbers are 32-bit: a pool holds up
 * to CB_MAX_BLOCKS data blocks and a device up to 2^32 blocks.
 */
#ifndef COWBLOCK_FORMAT_H
#define COWBLOCK_FORMAT_H

#include <stdint.h>

#define CB_META_BLOCK_SIZE 4096u
#define CB_MAGIC 0x4b4c42574f434243ull /* ASCII "CBCOWBLK" on disk */
#define CB_FORMAT_VERSION 1u

/* Feature flags.  A reader refuses a pool with an incompat bit it does not
 * know; it may open one with an unknown ro_compat bit read-only only. */
#define CB_RO_COMPAT_RECORDS 1u /* the records store holds blocks: a build that does not know
                                   it would count them as leaks, and its repair free them */
#define CB_INCOMPAT_SUPPORTED 0u
#define CB_RO_COMPAT_SUPPORTED CB_RO_COMPAT_RECORDS
#define CB_COMPAT_SUPPORTED 0u

#define CB_POOL_CONFIG_MAX 3072u

/* Modes of a new pool directory and of its data and metadata files. */
#define CB_POOL_DIR_MODE 0700u
#define CB_POOL_FILE_MODE 0600u

/* Superblock flags. */
#define CB_SB_NEEDS_CHECK 1u /* a change failed part-way (I/O error, fsync failure,
                                  exhausted space or memory mid-change): check first */

/* Block types: each is also the salt XORed into that block's checksum. */
enum cb_block_type {
    CB_BT_SUPERBLOCK = 0x53425550u,   /* "PUBS" */
    CB_BT_INTERNAL = 0x4e544e49u,     /* "INTN": b-tree internal node */
    CB_BT_MAP_LEAF = 0x4641454du,     /* "MEAF": device mapping b-tree leaf */
    CB_BT_DEV_LEAF = 0x46414544u,     /* "DEAF": device details b-tree leaf */
    CB_BT_SM_INDEX = 0x58444e49u,     /* "INDX": space map index page */
    CB_BT_SM_REFS = 0x53464552u,      /* "REFS": space map reference counts */
    CB_BT_CATALOG = 0x47544143u,      /* "CATG": overflow catalog blob */
    CB_BT_REC_INTERNAL = 0x49434552u, /* "RECI": records tree internal node */
    CB_BT_REC_LEAF = 0x4c434552u,     /* "RECL": records tree leaf */
    CB_BT_REC_VALUE = 0x56434552u,    /* "RECV": a block of a record's value */
};

/* Every metadata block but the superblock starts with this header. */
struct cb_block_header {
    uint32_t csum;     /* crc32c of bytes 4..4095, XOR block type */
    uint32_t type;     /* enum cb_block_type */
    uint64_t blocknr;  /* where this block lives: catches misdirected I/O */
};

/* ---- Superblock: metadata blocks 0 and 1, written alternately ---------- */
struct cb_superblock {
    uint32_t csum;              /* crc32c of bytes 4..4095, XOR CB_BT_SUPERBLOCK */
    uint32_t type;              /* CB_BT_SUPERBLOCK */
    uint64_t blocknr;           /* 0 or 1: the slot this copy was written to */
    uint64_t magic;             /* CB_MAGIC */
    uint32_t version;           /* CB_FORMAT_VERSION */
    uint32_t flags;             /* CB_SB_* */
    uint32_t compat;            /* feature words, see CB_*_SUPPORTED */
    uint32_t ro_compat;
    uint32_t incompat;
    uint32_t data_block_size;   /* bytes, power of two, 4 KiB .. 1 GiB */
    uint8_t pool_uuid[16];
    uint64_t transaction_id;    /* +1 per commit; the newer valid slot wins */
    uint64_t created_ns;        /* CLOCK_REALTIME at pool creation */
    uint64_t nr_data_blocks;    /* data file size / data_block_size */
    uint64_t nr_meta_blocks;    /* metadata file size / 4096 (capacity) */
    uint64_t data_used;         /* data blocks with a non-zero reference count */
    uint64_t meta_used;         /* metadata blocks in use, superblocks included */
    uint32_t data_sm_root;      /* index-root page of the data space map, 0 = all free */
    uint32_t meta_sm_root;      /* index-root page of the metadata space map */
    uint32_t device_root;       /* root of the device-details b-tree, 0 = no devices */
    uint32_t next_dev_id;       /* ids are never reused; 24-bit like dm-thin */
    uint32_t snap_time;         /* +1 per snapshot, dm-thin's pool "time" (24-bit) */
    uint32_t node_capacity;     /* max entries per b-tree node, 0 = as many as fit */
    uint32_t config_len;        /* bytes of pool configuration that follow */
    uint8_t config[CB_POOL_CONFIG_MAX]; /* opaque to C: the Python layer's pool settings (JSON) */
    uint32_t records_root;      /* root of the records tree, 0 = no records */
    uint64_t records_count;     /* records in the store */
    uint8_t reserved[872];      /* zero */
};

/* ---- B-tree nodes ------------------------------------------------------
 * Keys are 32-bit; the node stores keys[max_entries] then
 * values[max_entries * value_size].  Internal nodes hold 32-bit child block
 * numbers and keys[i] is a lower bound of every key under child i.  Leaves
 * hold sorted, unique keys.  Nodes are reference counted in the metadata
 * space map: a snapshot shares a root, and a shared node is copied
 * ("shadowed") only when a write reaches it.  A mapping leaf's values are
 * data block numbers, reference counted in the data space map; a device leaf's
 * values are struct cb_dev_detail.
 */
struct cb_node_header {
    struct cb_block_header h;   /* type = CB_BT_INTERNAL / _MAP_LEAF / _DEV_LEAF */
    uint32_t nr_entries;
    uint32_t max_entries;
    uint32_t value_size;        /* 4 for internal and mapping leaves */
    uint32_t padding;
};

#define CB_NODE_SPACE (CB_META_BLOCK_SIZE - sizeof(struct cb_node_header))
#define CB_NODE_KEY_SIZE sizeof(uint32_t)  /* keys[i] is at header + i * this */

/* ---- Device details: the value of a device-details b-tree entry --------- */
#define CB_DEV_READ_ONLY 1u
#define CB_DEV_DELETING 2u  /* removal deferred: hidden, reclaimed in the background */
#define CB_CATALOG_INLINE 160u
#define CB_CATALOG_MAX (CB_META_BLOCK_SIZE - sizeof(struct cb_block_header) - 4)

struct cb_dev_detail {
    uint32_t mapping_root;      /* root of this device's mapping b-tree, 0 = empty */
    uint32_t flags;             /* CB_DEV_* */
    uint64_t size;              /* bytes, a multiple of 4096 */
    uint64_t mapped_blocks;     /* entries in the mapping tree */
    uint64_t created_ns;        /* CLOCK_REALTIME at creation */
    uint64_t transaction_id;    /* transaction that created the device */
    uint32_t origin_id;         /* device this one was snapshotted from, 0 = none */
    uint32_t creation_time;     /* pool snap_time at creation */
    uint32_t snap_time;         /* pool snap_time when last snapshotted (or created) */
    uint32_t catalog_len;       /* bytes of catalog (opaque to C: the Python layer's JSON) */
    uint32_t catalog_block;     /* CB_BT_CATALOG block when catalog_len > INLINE, else 0 */
    uint8_t uuid[16];
    uint8_t catalog[CB_CATALOG_INLINE];
    uint8_t reserved[20];
};

/* An overflow catalog block: header, length, bytes. */
struct cb_catalog_block {
    struct cb_block_header h;
    uint32_t len;
    uint8_t bytes[CB_CATALOG_MAX];
};

/* ---- Space maps ---------------------------------------------------------
 * A space map is a copy-on-write radix array of 32-bit reference counts:
 * root index page -> index pages -> reference pages, each holding
 * CB_SM_ENTRIES entries.  A zero pointer means "every count below is 0", so
 * untouched ranges cost no metadata.  Pages are owned by their space map
 * (count 1 in the metadata space map) and shadowed on first change in a
 * transaction like b-tree nodes.
 */
#define CB_SM_ENTRIES ((CB_META_BLOCK_SIZE - sizeof(struct cb_block_header) - 16) / 4)
struct cb_sm_page {
    struct cb_block_header h;   /* CB_BT_SM_INDEX or CB_BT_SM_REFS */
    uint32_t nr_nonzero;        /* entries that are not zero */
    uint32_t level;             /* 0 = reference page, 1 = index, 2 = root */
    uint64_t padding;
    uint32_t entries[CB_SM_ENTRIES];
};

#define CB_MAX_BLOCKS ((uint64_t)CB_SM_ENTRIES * CB_SM_ENTRIES * CB_SM_ENTRIES)

/* ---- The records store: byte-string keys to byte-string values ----------
 * A copy-on-write B+tree ordered by key (bytewise, a shorter key before its
 * extensions), rooted at the superblock's records_root, whose nodes pack
 * variable-length entries in key order after their header.  Leaf entries
 * hold a key and its value, inline when the entry stays within
 * CB_REC_ENTRY_MAX bytes, else in a chain of value blocks.  Internal entry i
 * holds child i and a separator: every key under child i is >= it and below
 * entry i+1's; entry 0 has no separator (key_len 0).  Nodes and value blocks
 * are counted in the metadata space map (count 1: the store is never
 * shared).  A node's level is 0 for a leaf and its parent's minus one below
 * the root, so every walk goes strictly down.
 */
#define CB_RECORD_KEY_MAX 1024u            /* bytes; keys have at least one */
#define CB_RECORD_VALUE_MAX (16u << 20)    /* bytes */
#define CB_REC_IN_BLOCKS 1u                /* leaf entry flag: the value is in value blocks */

struct cb_rec_node {
    struct cb_block_header h;   /* CB_BT_REC_INTERNAL or CB_BT_REC_LEAF */
    uint32_t nr_entries;        /* at least 1 */
    uint32_t used;              /* bytes of entries[] in use, from its start */
    uint32_t level;             /* 0 = leaf; a child is one level below its parent */
    uint32_t padding;           /* zero */
    uint8_t entries[CB_META_BLOCK_SIZE - sizeof(struct cb_block_header) - 16];
};
#define CB_REC_NODE_SPACE (sizeof(((struct cb_rec_node *)0)->entries))
/* The largest entry: a third of a node, so that any node that overflows by
 * one entry splits into two that fit. */
#define CB_REC_ENTRY_MAX (CB_REC_NODE_SPACE / 3)

/* A leaf entry: this header, key[key_len], then value[value_len] inline, or
 * with CB_REC_IN_BLOCKS the u32 number of the value's first block.  Entries
 * are packed, so read them with memcpy. */
struct cb_rec_leaf_entry {
    uint16_t key_len;           /* 1 .. CB_RECORD_KEY_MAX */
    uint8_t flags;              /* CB_REC_IN_BLOCKS */
    uint8_t reserved;           /* zero */
    uint32_t value_len;         /* bytes, <= CB_RECORD_VALUE_MAX */
};

/* An internal entry: this header, then key[key_len] (0 for entry 0). */
struct cb_rec_internal_entry {
    uint32_t child;             /* the child node's block */
    uint16_t key_len;
    uint16_t reserved;          /* zero */
};

/* A block of a record's value: the value in order, CB_REC_VALUE_BYTES a
 * block (the last one holds the rest), each block pointing at the next. */
struct cb_rec_value_block {
    struct cb_block_header h;   /* CB_BT_REC_VALUE */
    uint32_t next;              /* the next block of the value, 0 in the last */
    uint32_t index;             /* this block's place in the value: 0, 1, ... */
    uint32_t len;               /* bytes of the value in this block */
    uint32_t padding;           /* zero */
    uint8_t bytes[CB_META_BLOCK_SIZE - sizeof(struct cb_block_header) - 16];
};
#define CB_REC_VALUE_BYTES (sizeof(((struct cb_rec_value_block *)0)->bytes))
/* Device ids are below 2^24, as dm-thin's; they are never reused. */
#define CB_MAX_DEV_ID (1u << 24)
/* Deeper b-trees are corrupt (a cycle, most likely): every walk stops there. */
#define CB_MAX_TREE_DEPTH 32

_Static_assert(sizeof(struct cb_superblock) == CB_META_BLOCK_SIZE, "superblock size");
_Static_assert(sizeof(struct cb_node_header) == 32, "node header size");
_Static_assert(sizeof(struct cb_dev_detail) == 256, "device detail size");
_Static_assert(sizeof(struct cb_catalog_block) == CB_META_BLOCK_SIZE, "catalog block size");
_Static_assert(sizeof(struct cb_sm_page) <= CB_META_BLOCK_SIZE, "space map page size");
_Static_assert(sizeof(struct cb_rec_node) == CB_META_BLOCK_SIZE, "records node size");
_Static_assert(sizeof(struct cb_rec_value_block) == CB_META_BLOCK_SIZE, "record value block size");
_Static_assert(sizeof(struct cb_rec_leaf_entry) == 8 && sizeof(struct cb_rec_internal_entry) == 8,
               "record entry header size");
_Static_assert(sizeof(struct cb_rec_leaf_entry) + CB_RECORD_KEY_MAX + 4 <= CB_REC_ENTRY_MAX,
               "a leaf entry with the longest key fits");

#endif

/*
 * The on-disk layout of format.h as data: every record, every field with
 * its offsetof and sizeof, and the format's constants, for the tools that
 * read pool files in another language (cowblock/format.py builds its pack
 * and unpack on these tables, so no offset is written down twice).
 *
 * Each record's fields are listed once, in order, below.  From that one
 * list come the table and a compile-time check that the fields' sizes add
 * up to the record's: a field left out of the list, or padding the compiler
 * put in, fails the build.
 */
#include "cowblock.h"

/* Fields in order, of record T (struct cb_T): S(T, member, name) a scalar,
 * A(T, member, name) an array.  P is the path to an embedded block header
 * ("h." or nothing). */
#define HEADER_FIELDS(S, A, T, P) S(T, P csum, csum) S(T, P type, type) S(T, P blocknr, blocknr)

#define BLOCK_HEADER_FIELDS(S, A, T) HEADER_FIELDS(S, A, T, )

#define SUPERBLOCK_FIELDS(S, A, T)                                                          \
    HEADER_FIELDS(S, A, T, ) S(T, magic, magic) S(T, version, version) S(T, flags, flags)   \
    S(T, compat, compat) S(T, ro_compat, ro_compat) S(T, incompat, incompat)                \
    S(T, data_block_size, data_block_size) A(T, pool_uuid, pool_uuid)                      \
    S(T, transaction_id, transaction_id) S(T, created_ns, created_ns)                      \
    S(T, nr_data_blocks, nr_data_blocks) S(T, nr_meta_blocks, nr_meta_blocks)              \
    S(T, data_used, data_used) S(T, meta_used, meta_used) S(T, data_sm_root, data_sm_root) \
    S(T, meta_sm_root, meta_sm_root) S(T, device_root, device_root)                        \
    S(T, next_dev_id, next_dev_id) S(T, snap_time, snap_time)                              \
    S(T, node_capacity, node_capacity) S(T, config_len, config_len) A(T, config, config)   \
    S(T, records_root, records_root) S(T, records_count, records_count)                    \
    A(T, reserved, reserved)

#define NODE_HEADER_FIELDS(S, A, T)                                                         \
    HEADER_FIELDS(S, A, T, h.) S(T, nr_entries, nr_entries) S(T, max_entries, max_entries)  \
    S(T, value_size, value_size) S(T, padding, padding)

#define DEV_DETAIL_FIELDS(S, A, T)                                                          \
    S(T, mapping_root, mapping_root) S(T, flags, flags) S(T, size, size)                   \
    S(T, mapped_blocks, mapped_blocks) S(T, created_ns, created_ns)                        \
    S(T, transaction_id, transaction_id) S(T, origin_id, origin_id)                        \
    S(T, creation_time, creation_time) S(T, snap_time, snap_time)                          \
    S(T, catalog_len, catalog_len) S(T, catalog_block, catalog_block) A(T, uuid, uuid)     \
    A(T, catalog, catalog) A(T, reserved, reserved)

#define CATALOG_BLOCK_FIELDS(S, A, T) HEADER_FIELDS(S, A, T, h.) S(T, len, len) A(T, bytes, bytes)

#define SM_PAGE_FIELDS(S, A, T)                                                             \
    HEADER_FIELDS(S, A, T, h.) S(T, nr_nonzero, nr_nonzero) S(T, level, level)              \
    S(T, padding, padding) A(T, entries, entries)

#define REC_NODE_FIELDS(S, A, T)                                                            \
    HEADER_FIELDS(S, A, T, h.) S(T, nr_entries, nr_entries) S(T, used, used)                \
    S(T, level, level) S(T, padding, padding) A(T, entries, entries)

#define REC_LEAF_ENTRY_FIELDS(S, A, T)                                                      \
    S(T, key_len, key_len) S(T, flags, flags) S(T, reserved, reserved)                     \
    S(T, value_len, value_len)

#define REC_INTERNAL_ENTRY_FIELDS(S, A, T)                                                  \
    S(T, child, child) S(T, key_len, key_len) S(T, reserved, reserved)

#define REC_VALUE_BLOCK_FIELDS(S, A, T)                                                     \
    HEADER_FIELDS(S, A, T, h.) S(T, next, next) S(T, index, index) S(T, len, len)           \
    S(T, padding, padding) A(T, bytes, bytes)

/* X(record, its fields) for every record. */
#define RECORDS(X)                                                                          \
    X(block_header, BLOCK_HEADER_FIELDS)                                                    \
    X(superblock, SUPERBLOCK_FIELDS)                                                        \
    X(node_header, NODE_HEADER_FIELDS)                                                      \
    X(dev_detail, DEV_DETAIL_FIELDS)                                                        \
    X(catalog_block, CATALOG_BLOCK_FIELDS)                                                  \
    X(sm_page, SM_PAGE_FIELDS)                                                              \
    X(rec_node, REC_NODE_FIELDS)                                                            \
    X(rec_leaf_entry, REC_LEAF_ENTRY_FIELDS)                                                \
    X(rec_internal_entry, REC_INTERNAL_ENTRY_FIELDS)                                        \
    X(rec_value_block, REC_VALUE_BLOCK_FIELDS)

#define MEMBER_SIZE(T, member) sizeof(((struct cb_##T *)0)->member)

/* The compile-time check: the fields' sizes add up to the record's. */
#define SIZE_OF(T, member, name) +MEMBER_SIZE(T, member)
#define CHECK_RECORD(rec, fields)                                                           \
    _Static_assert(0 fields(SIZE_OF, SIZE_OF, rec) == sizeof(struct cb_##rec),            \
                   #rec ": a field is missing from the list, or the struct has padding");
RECORDS(CHECK_RECORD)

/* The tables. */
#define RECORD_ROW(rec, fields) {#rec, sizeof(struct cb_##rec)},
static const cb_format_record records[] = {RECORDS(RECORD_ROW)};

#define SCALAR_ROW(T, member, name)                                                         \
    {#T, #name, offsetof(struct cb_##T, member), MEMBER_SIZE(T, member), MEMBER_SIZE(T, member)},
#define ARRAY_ROW(T, member, name)                                                          \
    {#T, #name, offsetof(struct cb_##T, member), MEMBER_SIZE(T, member), MEMBER_SIZE(T, member[0])},
#define FIELD_ROWS(rec, fields) fields(SCALAR_ROW, ARRAY_ROW, rec)
static const cb_format_field fields[] = {RECORDS(FIELD_ROWS)};

#define CONSTANT(name) {#name, (uint64_t)(name)},
static const cb_format_constant constants[] = {
    CONSTANT(CB_META_BLOCK_SIZE) CONSTANT(CB_MAGIC) CONSTANT(CB_FORMAT_VERSION)
    CONSTANT(CB_INCOMPAT_SUPPORTED) CONSTANT(CB_RO_COMPAT_SUPPORTED) CONSTANT(CB_COMPAT_SUPPORTED)
    CONSTANT(CB_POOL_CONFIG_MAX) CONSTANT(CB_POOL_DIR_MODE) CONSTANT(CB_POOL_FILE_MODE)
    CONSTANT(CB_SB_NEEDS_CHECK)
    CONSTANT(CB_BT_SUPERBLOCK) CONSTANT(CB_BT_INTERNAL) CONSTANT(CB_BT_MAP_LEAF)
    CONSTANT(CB_BT_DEV_LEAF) CONSTANT(CB_BT_SM_INDEX) CONSTANT(CB_BT_SM_REFS) CONSTANT(CB_BT_CATALOG)
    CONSTANT(CB_NODE_SPACE) CONSTANT(CB_NODE_KEY_SIZE) CONSTANT(CB_DEV_READ_ONLY) CONSTANT(CB_DEV_DELETING)
    CONSTANT(CB_CATALOG_INLINE) CONSTANT(CB_CATALOG_MAX) CONSTANT(CB_SM_ENTRIES)
    CONSTANT(CB_MAX_BLOCKS) CONSTANT(CB_MAX_DEV_ID) CONSTANT(CB_MAX_TREE_DEPTH)
    CONSTANT(CB_RO_COMPAT_RECORDS) CONSTANT(CB_BT_REC_INTERNAL) CONSTANT(CB_BT_REC_LEAF)
    CONSTANT(CB_BT_REC_VALUE) CONSTANT(CB_RECORD_KEY_MAX) CONSTANT(CB_RECORD_VALUE_MAX)
    CONSTANT(CB_REC_IN_BLOCKS) CONSTANT(CB_REC_NODE_SPACE) CONSTANT(CB_REC_ENTRY_MAX)
    CONSTANT(CB_REC_VALUE_BYTES)
};

#define COUNT(table) (uint32_t)(sizeof table / sizeof table[0])

const cb_format_record *cb_format_records(uint32_t *count)
{
    *count = COUNT(records);
    return records;
}

const cb_format_field *cb_format_fields(uint32_t *count)
{
    *count = COUNT(fields);
    return fields;
}

const cb_format_constant *cb_format_constants(uint32_t *count)
{
    *count = COUNT(constants);
    return constants;
}

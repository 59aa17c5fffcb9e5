/*
 * libFuzzer harness for the metadata decoder: superblock, b-tree nodes,
 * space-map pages, device details and catalogs, the records store's nodes
 * and value blocks, as read by open, check, repair, reads, writes, diffs,
 * snapshots, deletes, and record lookups, listings, puts and deletes.
 *
 * The input is a list of patches to a real pool's metadata (made once at
 * start-up: devices, a snapshot, a few hundred mappings, small nodes so the
 * trees have several levels).  By default each patched block gets its
 * checksum recomputed, so that the fuzzer gets past the checksums into the
 * decoding itself; the first input byte can turn that off.  Every call must
 * return an error or succeed: never crash, hang or read out of bounds.
 *
 * Input: byte 0 = flags (bit 0: keep the checksums as they are; bit 1: also
 * open the pool writable and change it), then records of
 * [u16 block][u16 offset][u8 length][length bytes].
 */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz_common.h"

enum { POOL_BLOCK = 4096 };

static uint8_t *template;
static size_t template_len;
static char pool_dir[300];
static uint8_t *on_file; /* what the fuzzed pool's metadata file holds now */

static void make_template(void)
{
    char dir[300];
    snprintf(dir, sizeof dir, "%s/template", fuzz_scratch());
    /* node_capacity 8: a hundred mappings make trees three levels deep. */
    fuzz_must(cb_pool_create(dir, 2u << 20, POOL_BLOCK, 1u << 20, 8, NULL), "create");
    cb_pool *p;
    fuzz_must(cb_pool_open(dir, 0, &p), "open");
    uint32_t a, b, s;
    fuzz_must(cb_dev_create(p, 1u << 20, NULL, "name=a", 6, &a), "device a");
    static uint8_t buf[POOL_BLOCK];
    for (uint32_t i = 0; i < 256; i += 3) {
        memset(buf, (int)i, sizeof buf);
        fuzz_must((int)cb_dev_write(p, a, buf, sizeof buf, (uint64_t)i * POOL_BLOCK), "write");
    }
    fuzz_must(cb_dev_snapshot(p, a, 1, NULL, "name=s", 6, &s), "snapshot");
    for (uint32_t i = 0; i < 256; i += 11)
        fuzz_must((int)cb_dev_write(p, a, buf, 100, (uint64_t)i * POOL_BLOCK + 50), "overwrite");
    static char big_catalog[3000];
    memset(big_catalog, 'c', sizeof big_catalog); /* lives in a catalog block */
    fuzz_must(cb_dev_create(p, 64u << 10, NULL, big_catalog, sizeof big_catalog, &b), "device b");
    fuzz_must((int)cb_dev_write(p, b, buf, sizeof buf, 0), "write b");
    /* Records: enough for three levels of nodes of 8 entries, values inline
     * and in chains of value blocks, put in one atomic section. */
    static uint8_t value[8192];
    fuzz_must(cb_pool_txn_begin(p), "section");
    for (uint32_t i = 0; i < 120; i++) {
        char key[64];
        int klen = snprintf(key, sizeof key, "ns/%u/key %u", i % 7, i);
        uint32_t vlen = i % 10 == 0 ? 5000 + i * 10 : i % 40;
        memset(value, (int)i, sizeof value);
        fuzz_must(cb_rec_put(p, key, (uint32_t)klen, value, vlen), "record");
    }
    fuzz_must(cb_pool_txn_end(p, CB_TXN_COMMIT), "section end");
    fuzz_must(cb_pool_close(p), "close");

    char path[320];
    snprintf(path, sizeof path, "%s/metadata", dir);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        fuzz_die(path);
    template_len = (size_t)st.st_size;
    template = malloc(template_len);
    on_file = calloc(1, template_len); /* the fuzzed file starts empty */
    if (!template || !on_file || pread(fd, template, template_len, 0) != (ssize_t)template_len)
        fuzz_die(path);
    close(fd);

    /* The fuzzed pool shares the template's data file. */
    snprintf(pool_dir, sizeof pool_dir, "%s/pool", fuzz_scratch());
    mkdir(pool_dir, 0755);
    char from[320], to[320];
    snprintf(from, sizeof from, "%s/data", dir);
    snprintf(to, sizeof to, "%s/data", pool_dir);
    if (link(from, to) != 0)
        fuzz_die(to);
}

/* Bring the metadata file to image, writing only the blocks that differ. */
static void write_metadata(const uint8_t *image, size_t len)
{
    char path[320];
    snprintf(path, sizeof path, "%s/metadata", pool_dir);
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd < 0 || ftruncate(fd, (off_t)len) != 0)
        fuzz_die(path);
    for (size_t at = 0; at < len; at += CB_META_BLOCK_SIZE) {
        if (memcmp(on_file + at, image + at, CB_META_BLOCK_SIZE) == 0)
            continue;
        if (pwrite(fd, image + at, CB_META_BLOCK_SIZE, (off_t)at) != CB_META_BLOCK_SIZE)
            fuzz_die(path);
        memcpy(on_file + at, image + at, CB_META_BLOCK_SIZE);
    }
    close(fd);
}

/* After a writable open changed the file. */
static void reread_metadata(void)
{
    char path[320];
    snprintf(path, sizeof path, "%s/metadata", pool_dir);
    int fd = open(path, O_RDONLY);
    memset(on_file, 0, template_len);
    if (fd < 0 || pread(fd, on_file, template_len, 0) < 0)
        fuzz_die(path);
    close(fd);
}

/* Lookups, listings and counts of the records store. */
static void exercise_records(cb_pool *p)
{
    static const char *keys[] = {"ns/0/key 0", "ns/3/key 10", "ns/6/key 118", "absent"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        uint8_t *value = NULL;
        uint32_t len;
        if (cb_rec_get(p, keys[i], (uint32_t)strlen(keys[i]), &value, &len) == 1)
            cb_free(value);
    }
    static const char *prefixes[] = {"", "ns/", "ns/4/", "zz"};
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
        uint32_t plen = (uint32_t)strlen(prefixes[i]);
        uint8_t *out = NULL;
        uint64_t out_len;
        if (cb_rec_list(p, prefixes[i], plen, "ns/2", 4, 1000, 1u << 20, 1, &out, &out_len) >= 0)
            cb_free(out);
        cb_rec_count(p, prefixes[i], plen);
    }
}

/* Everything a reader of the pool does. */
static void exercise_read_only(cb_pool *p)
{
    cb_stats st;
    cb_pool_stats(p, &st);
    uint32_t ids[64];
    int n = cb_pool_list(p, ids, 64);
    static uint8_t buf[64 << 10];
    for (int i = 0; i < n && i < 64; i++) {
        cb_devinfo info;
        if (cb_dev_info(p, ids[i], &info) < 0)
            continue;
        cb_dev_catalog(p, ids[i], buf, sizeof buf);
        uint64_t len = info.size < sizeof buf ? info.size : sizeof buf;
        cb_dev_read(p, ids[i], buf, len, 0);
        if (info.size > len)
            cb_dev_read(p, ids[i], buf, len, info.size - len);
        uint64_t ex, sh;
        cb_dev_usage(p, ids[i], &ex, &sh);
        cb_range *ranges = NULL;
        uint64_t count = 0;
        if (cb_dev_block_status(p, ids[i], 0, info.size, &ranges, &count) == 0)
            cb_free(ranges);
        uint32_t *keys = NULL, *values = NULL;
        uint8_t *shared = NULL;
        if (cb_dev_mappings(p, ids[i], &keys, &values, &shared, &count) == 0) {
            cb_free(keys);
            cb_free(values);
            cb_free(shared);
        }
        if (i > 0 && cb_pool_diff(p, ids[0], ids[i], 1, &ranges, &count) == 0)
            cb_free(ranges);
    }
    exercise_records(p);
    cb_check_summary sum;
    cb_check_record *records = NULL;
    uint64_t nr_records;
    cb_pool_check(p, &sum, &records, &nr_records);
    cb_free(records);
}

static void exercise_writable(cb_pool *p)
{
    uint32_t ids[64];
    int n = cb_pool_list(p, ids, 64);
    static uint8_t buf[8192];
    memset(buf, 0x5a, sizeof buf);
    for (int i = 0; i < n && i < 64; i++) {
        cb_devinfo info;
        if (cb_dev_info(p, ids[i], &info) < 0 || info.size < sizeof buf)
            continue;
        cb_dev_write(p, ids[i], buf, sizeof buf, info.size / 2 & ~4095ull);
        cb_dev_write(p, ids[i], buf, 100, 10);
        cb_dev_discard(p, ids[i], 0, 4096);
        uint32_t snap;
        if (cb_dev_snapshot(p, ids[i], 0, NULL, NULL, 0, &snap) == 0)
            cb_dev_delete(p, snap);
    }
    if (n > 1)
        cb_dev_delete(p, ids[n - 1]);
    /* Changes of the records store, in a section and out of one. */
    static uint8_t big[9000];
    memset(big, 0x33, sizeof big);
    if (cb_pool_txn_begin(p) == 0) {
        cb_rec_put(p, "ns/3/key 10", 11, big, sizeof big);
        cb_rec_put(p, "ns/9/new", 8, big, 10);
        cb_rec_delete(p, "ns/0/key 0", 10);
        cb_pool_txn_end(p, CB_TXN_COMMIT);
    }
    cb_rec_delete(p, "ns/6/key 118", 12);
    cb_rec_put(p, "ns/1/key 1", 10, big, 3000);
    cb_pool_commit(p);
    cb_check_summary sum;
    cb_check_record *records = NULL;
    uint64_t nr_records;
    cb_pool_repair(p, &sum, &records, &nr_records);
    cb_free(records);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!template)
        make_template();
    if (size < 1)
        return -1;
    uint8_t flags = data[0];
    uint8_t *image = malloc(template_len);
    memcpy(image, template, template_len);
    size_t nblocks = template_len / CB_META_BLOCK_SIZE;
    uint8_t *touched = calloc(nblocks, 1);
    for (size_t at = 1; at + 5 <= size;) {
        size_t blk = (size_t)(data[at] | data[at + 1] << 8) % nblocks;
        size_t off = (size_t)(data[at + 2] | data[at + 3] << 8) % CB_META_BLOCK_SIZE;
        size_t len = data[at + 4];
        at += 5;
        if (len > size - at)
            len = size - at;
        if (len > CB_META_BLOCK_SIZE - off)
            len = CB_META_BLOCK_SIZE - off;
        memcpy(image + blk * CB_META_BLOCK_SIZE + off, data + at, len);
        touched[blk] = 1;
        at += len;
    }
    if (!(flags & 1)) {
        for (size_t b = 0; b < nblocks; b++) {
            if (!touched[b])
                continue;
            struct cb_block_header *h = (void *)(image + b * CB_META_BLOCK_SIZE);
            h->csum = cb_block_csum(h, h->type);
        }
    }
    write_metadata(image, template_len);
    free(touched);
    free(image);

    cb_pool *p;
    if (cb_pool_open(pool_dir, 1, &p) == 0) {
        exercise_read_only(p);
        cb_pool_close(p);
    }
    if ((flags & 2) && cb_pool_open(pool_dir, 0, &p) == 0) {
        exercise_writable(p);
        cb_pool_close(p);
        reread_metadata();
    }
    return 0;
}

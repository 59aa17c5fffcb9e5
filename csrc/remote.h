/*
 * Pools on Ceph RADOS (csrc/remote.c): the pool's data and metadata files
 * kept as RADOS objects, reached through librados' C API from the I/O seam
 * (io.c).  The local files stay as the engine's in-memory cache: the mmap
 * reads them, every write goes to them and to RADOS (asynchronously, many in
 * flight), an fsync waits until every write RADOS was sent has been
 * acknowledged, and reads fill them from the objects on first use (an open
 * fetches the superblock alone).
 *
 * Objects, in a RADOS namespace named after the pool, in the Ceph pool:
 *   superblock          metadata bytes 0..8191 (the two superblock slots);
 *                       xattrs epoch, data_size, metadata_size; the lock
 *   data.%016x          data bytes [i * 1 MiB, (i + 1) * 1 MiB)
 *   metadata.%016x      metadata bytes likewise (the superblock's excepted)
 *
 * This file is also a cffi cdef (csrc/build_ffi.py reads it after api.h),
 * so it holds plain declarations only.  Calls return 0 or a negative errno,
 * with cb_last_error() naming the problem.  Built without librados,
 * cb_remote_available() is 0 and every other call fails with -ENOTSUP.
 */

typedef struct cb_remote cb_remote;

int cb_remote_available(void);
/* Connect to the cluster (conf: a ceph.conf path, or NULL for Ceph's own
 * search: $CEPH_CONF, /etc/ceph/ceph.conf; $CEPH_ARGS as Ceph's tools take
 * it, e.g. --id, --keyring) and open ceph_pool, namespace name.  Connecting
 * and monitor calls give up after timeout seconds. */
int cb_remote_connect(const char *conf, const char *ceph_pool, const char *name, double timeout,
                      cb_remote **out);
/* Make the pool's superblock object; -EEXIST if a pool of that name is there. */
int cb_remote_create(cb_remote *r);
/* Take the pool's exclusive lock (cookie names this writer), -EBUSY naming
 * the holder if another has it; then raise the epoch that every superblock
 * write compares, so a writer whose lock was broken can commit no more. */
int cb_remote_lock(cb_remote *r, const char *cookie, const char *description);
/* Make dir/data and dir/metadata (made or emptied: sparse, of the pool's
 * sizes) the pool's cache, holding the superblock; the rest is read from
 * the objects as the engine needs it. */
int cb_remote_fetch(cb_remote *r, const char *dir);
/* Fetch all of the metadata into the cache, for callers that read the cache
 * file itself (repair's preview copies it). */
int cb_remote_cache_metadata(cb_remote *r);
/* Remove every object of the pool (the lock must be ours, or nobody's). */
int cb_remote_destroy(cb_remote *r);
/* Unlock if locked, disconnect, free.  Close the pool first. */
int cb_remote_close(cb_remote *r);
/* For tests and benchmarks, kind 0-3: requests sent (reads, writes,
 * removes, reads of data objects); kind 4: bytes read into the cache;
 * kind 5: writes of data objects; kind 6: bytes of data the cache holds
 * now; kind 7: bytes of data dropped from it so far. */
uint64_t cb_remote_requests(cb_remote *r, int kind);
/* The most bytes of data this host's cache keeps (0: no bound; remote.c,
 * "the bound"): set before cb_remote_fetch. */
int cb_remote_set_cache_limit(cb_remote *r, uint64_t bytes);

int cb_pool_create_remote(const char *dir, cb_remote *r, uint64_t data_size, uint32_t block_size,
                          uint64_t meta_size, uint32_t node_capacity, const uint8_t *uuid16);
int cb_pool_open_remote(const char *dir, cb_remote *r, int read_only, cb_pool **out);

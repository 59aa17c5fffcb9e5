/*
 * The NBD wire format (NetworkBlockDevice/nbd doc/proto.md), transmission
 * phase.  Every field is big-endian on the wire.  The handshake is done in
 * Python (cowblock/nbd/handshake.py), which has its own copy of the option
 * constants; this header has what the C transmission loop needs.
 */
#ifndef COWBLOCK_NBD_PROTOCOL_H
#define COWBLOCK_NBD_PROTOCOL_H

#include <stdint.h>

#define NBD_REQUEST_MAGIC 0x25609513u        /* request header */
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u   /* simple reply header */
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

struct nbd_request {
    uint32_t magic;    /* NBD_REQUEST_MAGIC */
    uint16_t flags;    /* NBD_CMD_FLAG_* */
    uint16_t type;     /* NBD_CMD_* */
    uint64_t cookie;   /* echoed in the reply */
    uint64_t offset;   /* bytes */
    uint32_t length;   /* bytes; WRITE's payload follows */
} __attribute__((packed));

struct nbd_simple_reply {
    uint32_t magic;    /* NBD_SIMPLE_REPLY_MAGIC */
    uint32_t error;    /* NBD_E* */
    uint64_t cookie;
} __attribute__((packed));

struct nbd_structured_reply {
    uint32_t magic;    /* NBD_STRUCTURED_REPLY_MAGIC */
    uint16_t flags;    /* NBD_REPLY_FLAG_DONE on the last chunk */
    uint16_t type;     /* NBD_REPLY_TYPE_* */
    uint64_t cookie;
    uint32_t length;   /* payload bytes that follow */
} __attribute__((packed));

enum {
    NBD_CMD_READ = 0, NBD_CMD_WRITE = 1, NBD_CMD_DISC = 2, NBD_CMD_FLUSH = 3,
    NBD_CMD_TRIM = 4, NBD_CMD_CACHE = 5, NBD_CMD_WRITE_ZEROES = 6, NBD_CMD_BLOCK_STATUS = 7,
};

#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

#define NBD_REPLY_FLAG_DONE (1u << 0)
enum {
    NBD_REPLY_TYPE_NONE = 0, NBD_REPLY_TYPE_OFFSET_DATA = 1, NBD_REPLY_TYPE_OFFSET_HOLE = 2,
    NBD_REPLY_TYPE_BLOCK_STATUS = 5, NBD_REPLY_TYPE_ERROR = 32769,
};

/* Errors on the wire (Linux values, whatever the host). */
enum {
    NBD_EPERM = 1, NBD_EIO = 5, NBD_ENOMEM = 12, NBD_EINVAL = 22, NBD_ENOSPC = 28,
    NBD_EOVERFLOW = 75, NBD_ENOTSUP = 95, NBD_ESHUTDOWN = 108,
};

/* base:allocation */
#define NBD_STATE_HOLE (1u << 0)
#define NBD_STATE_ZERO (1u << 1)
/* cowblock:shared (our own context): the extent is shared with another
 * device, so overwriting it needs a new block and can fail with ENOSPC. */
#define CB_STATE_SHARED (1u << 0)

#define NBD_MAX_PAYLOAD (32u << 20)

#endif

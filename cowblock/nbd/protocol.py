"""NBD handshake constants (doc/proto.md); all fields big-endian."""
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9       # option reply

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST = 1, 2, 3
OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 5, 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# transmission flags
HAS_FLAGS = 1 << 0
READ_ONLY = 1 << 1
SEND_FLUSH = 1 << 2
SEND_FUA = 1 << 3
SEND_TRIM = 1 << 5
SEND_WRITE_ZEROES = 1 << 6
SEND_DF = 1 << 7
CAN_MULTI_CONN = 1 << 8
SEND_CACHE = 1 << 10
SEND_FAST_ZERO = 1 << 11

MIN_BLOCK = 1                          # the engine takes any offset and length (INFO_BLOCK_SIZE)
MAX_PAYLOAD = 32 << 20
MAX_OPTION_LENGTH = 64 << 10           # longer option data is refused, not buffered
MAX_OPTIONS = 65536                    # options in one handshake (nbdinfo --list sends one
                                       # INFO per export, so this is not small)
HANDSHAKE_SECONDS = 300                # the whole handshake, however busy the client is

CONTEXT_ALLOCATION = "base:allocation"
CONTEXT_SHARED = "cowblock:shared"
CONTEXT_IDS = {CONTEXT_ALLOCATION: 1, CONTEXT_SHARED: 2}

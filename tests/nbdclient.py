"""A deliberately small NBD client for protocol tests: it can do everything
right, and everything wrong, on purpose."""
import socket
import struct

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x0003E889045565A9
REQ_MAGIC, SIMPLE_MAGIC, STRUCT_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO = 1, 2, 3, 5, 6
OPT_GO, OPT_STRUCTURED, OPT_SET_META = 7, 8, 10
REP_ACK, ERR_UNSUP, ERR_INVALID, ERR_TLS_REQD = 1, (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 5
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 7
CMD_WRITE_ZEROES = 6
FLAG_FUA, FLAG_NO_HOLE = 1, 2


class Client:
    def __init__(self, path):
        """path: a Unix socket, or (host, port)."""
        self.s = socket.socket(socket.AF_UNIX if isinstance(path, str) else socket.AF_INET,
                               socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)
        magic, opt, self.hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        self.cookie = 0

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        return buf

    def option(self, opt, data=b"", magic=IHAVEOPT, length=None):
        self.s.sendall(struct.pack(">QII", magic, opt, len(data) if length is None else length)
                       + data)

    def option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def replies_until_ack(self):
        out = []
        while True:
            opt, rtype, data = self.option_reply()
            out.append((rtype, data))
            if rtype == 1 or rtype & (1 << 31):
                return out

    def go(self, name, structured=True, contexts=("base:allocation",)):
        if structured:
            self.option(OPT_STRUCTURED)
            assert self.replies_until_ack()[-1][0] == 1
            if contexts:
                q = b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
                n = name.encode()
                self.option(OPT_SET_META, struct.pack(">I", len(n)) + n
                            + struct.pack(">I", len(contexts)) + q)
                self.contexts = self.replies_until_ack()
        n = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        replies = self.replies_until_ack()
        self.structured = structured
        if replies[-1][0] != 1:
            return replies
        info = [d for t, d in replies if t == 3 and d[:2] == b"\0\0"][0]
        self.size, self.tflags = struct.unpack(">QH", info[2:12])
        return replies

    def starttls(self, context, server_hostname="localhost"):
        """NBD_OPT_STARTTLS; on its ACK, TLS (an ssl.SSLContext) from here on.
        Returns the reply type."""
        self.option(OPT_STARTTLS)
        rtype = self.option_reply()[1]
        if rtype == REP_ACK:
            self.s = context.wrap_socket(self.s, server_hostname=server_hostname)
        return rtype

    def request(self, cmd, offset, length, data=b"", flags=0, magic=REQ_MAGIC):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, self.cookie, offset, length)
                       + data)
        return self.cookie

    def reply(self):
        """(cookie, error, data) for a whole reply; structured chunks joined."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            return cookie, error, None
        assert magic == STRUCT_MAGIC, hex(magic)
        chunks, error = [], 0
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length)
            if rtype & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
            chunks.append((rtype, payload))
            if flags & 1:
                return cookie, error, chunks
            assert struct.unpack(">I", self.recv(4))[0] == STRUCT_MAGIC

    def read(self, offset, length):
        self.request(CMD_READ, offset, length)
        cookie, error, chunks = self.reply()
        if error:
            return error
        if chunks is None:
            return self.recv(length)
        buf = bytearray(length)
        for rtype, p in chunks:
            off = struct.unpack(">Q", p[:8])[0] - offset if rtype in (1, 2) else None
            if rtype == 1:
                buf[off:off + len(p) - 8] = p[8:]
        return bytes(buf)

    def call(self, cmd, offset=0, length=0, data=b"", flags=0):
        """One request and its reply (nothing else in flight): the error, or
        0; a READ returns its data instead of 0."""
        if cmd == CMD_READ:
            return self.read(offset, length)
        cookie = self.request(cmd, offset, length, data, flags)
        got, error, _ = self.reply()
        assert got == cookie, (got, cookie)
        return error

    def close(self):
        self.s.close()

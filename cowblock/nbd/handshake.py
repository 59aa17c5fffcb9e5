"""The NBD fixed-newstyle handshake, server side (doc/proto.md).

negotiate() runs the option haggling on a connected socket and returns a
Session when the client enters transmission (NBD_OPT_GO or EXPORT_NAME),
or None when it aborts.  A protocol violation raises HandshakeError and the
caller drops the connection; an unknown option gets ERR_UNSUP and the
haggling goes on, as the spec requires.

TLS (a listener's tls.TLSConfig): after the ACK of NBD_OPT_STARTTLS every
byte goes through the TLS channel, and what was negotiated before it
(structured replies, meta contexts) is forgotten, as the spec requires.
When the listener requires TLS, every option before it but ABORT gets
ERR_TLS_REQD and EXPORT_NAME, which cannot be refused, drops the client.
"""
import struct
import time
from dataclasses import dataclass, field

from . import protocol as P
from .tls import TLSError


class HandshakeError(Exception):
    """The client broke the protocol; drop the connection."""


@dataclass
class Export:
    name: str
    dev_id: int
    size: int
    read_only: bool
    block_size: int


@dataclass
class Session:
    export: Export
    structured: bool
    contexts: dict = field(default_factory=dict)   # context name -> id
    read_only: bool = False
    tls: object = None       # the tls.TLSChannel all traffic goes through, or None
    release: object = None   # what catalog.claim gave: called when the connection ends


def _recv(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the client closed the connection")
        buf += chunk
    return bytes(buf)


def _reply(sock, opt, rtype, data=b""):
    sock.sendall(struct.pack(">QIII", P.REPLY_MAGIC, opt, rtype, len(data)) + data)


def _error(sock, opt, rtype, message):
    _reply(sock, opt, rtype, message.encode()[:4096])


def transmission_flags(export, structured):
    flags = (P.HAS_FLAGS | P.SEND_FLUSH | P.SEND_FUA | P.SEND_TRIM | P.SEND_WRITE_ZEROES
             | P.SEND_FAST_ZERO | P.SEND_CACHE | P.CAN_MULTI_CONN)
    if structured:
        flags |= P.SEND_DF
    if export.read_only:
        flags |= P.READ_ONLY
    return flags


def _parse_name_and_list(data, item_size, count_size):
    """name length u32, name, count, items: what INFO/GO and META_CONTEXT carry."""
    if len(data) < 4:
        raise ValueError("too short")
    (nlen,) = struct.unpack_from(">I", data)
    if 4 + nlen + count_size > len(data):
        raise ValueError("name runs past the option")
    name = data[4:4 + nlen].decode("utf-8")
    pos = 4 + nlen
    (count,) = struct.unpack_from(">H" if count_size == 2 else ">I", data, pos)
    pos += count_size
    return name, count, pos


def _parse_info(data):
    name, n, pos = _parse_name_and_list(data, 2, 2)
    if len(data) != pos + 2 * n:
        raise ValueError("information request count does not match the length")
    return name, list(struct.unpack_from(f">{n}H", data, pos))


def _parse_meta(data):
    name, n, pos = _parse_name_and_list(data, 0, 4)
    queries = []
    for _ in range(n):
        if pos + 4 > len(data):
            raise ValueError("query runs past the option")
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + qlen > len(data):
            raise ValueError("query runs past the option")
        queries.append(data[pos:pos + qlen].decode("utf-8"))
        pos += qlen
    if pos != len(data):
        raise ValueError("trailing bytes after the queries")
    return name, queries


def _match_contexts(queries):
    if not queries:
        return dict(P.CONTEXT_IDS)
    out = {}
    for q in queries:
        for name, cid in P.CONTEXT_IDS.items():
            namespace = name.split(":")[0] + ":"
            if q == name or q == namespace:
                out[name] = cid
    return out


class _Connection:
    """The socket, until STARTTLS replaces it with its TLS channel."""

    def __init__(self, sock):
        self.io, self.tls = sock, None

    def close_tls(self):
        if self.tls:
            self.tls.close()


def _send_info(sock, opt, export, structured, infos):
    """The replies to INFO or GO: what the client asked to know, then ACK."""
    flags = transmission_flags(export, structured)
    _reply(sock, opt, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, export.size, flags))
    preferred = min(export.block_size, P.MAX_PAYLOAD)
    _reply(sock, opt, P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, P.MIN_BLOCK,
                                              preferred, P.MAX_PAYLOAD))
    if P.INFO_NAME in infos:
        _reply(sock, opt, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + export.name.encode())
    if P.INFO_DESCRIPTION in infos:
        _reply(sock, opt, P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION)
               + f"cowblock thin device {export.name}".encode())
    _reply(sock, opt, P.REP_ACK)


def negotiate(sock, catalog, tls=None):
    """catalog.resolve(name) -> Export (raises LookupError with a message);
    catalog.names() -> exported names; catalog.claim(export) -> a release
    callable, or raises PermissionError with a message when the export may
    not be used now (a device mounted elsewhere); tls: the listener's TLSConfig, or
    None for no TLS.  A client gets P.MAX_OPTIONS options and
    P.HANDSHAKE_SECONDS in all: a busy one cannot hold a connection slot
    forever any more than a silent one (the socket's own timeout) can.  The
    returned Session owns the TLS channel, if any (close it before the
    socket); on any other outcome it is closed here."""
    conn = _Connection(sock)
    try:
        session = _negotiate(conn, catalog, tls)
    except BaseException:
        conn.close_tls()
        raise
    if session is None:
        conn.close_tls()
    return session


def _starttls(conn, opt, data, tls):
    """NBD_OPT_STARTTLS: the reply, then the TLS handshake; True once TLS is up."""
    if tls is None or not tls.offered:
        _error(conn.io, opt, P.REP_ERR_UNSUP, "this listener has no TLS")
    elif conn.tls:
        _error(conn.io, opt, P.REP_ERR_INVALID, "TLS is already in use")
    elif data:
        _error(conn.io, opt, P.REP_ERR_INVALID, "STARTTLS takes no data")
    else:
        _reply(conn.io, opt, P.REP_ACK)
        try:
            conn.tls = conn.io = tls.accept(conn.io, conn.io.gettimeout())
        except TLSError as e:  # too late for an error reply: the ACK is out
            raise HandshakeError(e.strerror) from None
        return True
    return False


def _negotiate(conn, catalog, tls):
    deadline = time.monotonic() + P.HANDSHAKE_SECONDS
    per_read = conn.io.gettimeout()
    conn.io.sendall(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.CLIENT_FLAGS))
    (cflags,) = struct.unpack(">I", _recv(conn.io, 4))
    if cflags & ~P.CLIENT_FLAGS:
        raise HandshakeError(f"unknown client flags {cflags:#x}")
    tls_required = tls is not None and tls.required
    if tls_required and not cflags & P.FLAG_FIXED_NEWSTYLE:
        raise HandshakeError("TLS is required, and a client without fixed newstyle cannot ask "
                             "for it")
    if not cflags & P.FLAG_FIXED_NEWSTYLE:
        tls = None                             # the spec: NOTLS for such a client
    no_zeroes = bool(cflags & P.FLAG_NO_ZEROES)
    structured, contexts = False, {}
    for options in range(P.MAX_OPTIONS + 1):
        sock = conn.io
        left = deadline - time.monotonic()
        if options == P.MAX_OPTIONS or left <= 0:
            raise HandshakeError(f"the handshake went on for {options} options and "
                                 f"{P.HANDSHAKE_SECONDS - left:.0f} s, more than the "
                                 f"{P.MAX_OPTIONS} and {P.HANDSHAKE_SECONDS} s allowed")
        sock.settimeout(left if per_read is None else min(per_read, left))
        magic, opt, length = struct.unpack(">QII", _recv(sock, 16))
        if magic != P.IHAVEOPT:
            raise HandshakeError(f"bad option magic {magic:#x}")
        if length > P.MAX_OPTION_LENGTH:
            _error(sock, opt, P.REP_ERR_TOO_BIG, f"option data of {length} bytes is too long")
            raise HandshakeError(f"option {opt} announced {length} bytes")
        data = _recv(sock, length)
        if opt == P.OPT_STARTTLS:
            if _starttls(conn, opt, data, tls):
                structured, contexts = False, {}   # nothing from before TLS survives it
            continue
        if tls_required and not conn.tls and opt != P.OPT_ABORT:
            if opt == P.OPT_EXPORT_NAME:   # it has no error reply
                raise HandshakeError("EXPORT_NAME before STARTTLS on a listener that requires TLS")
            _error(sock, opt, P.REP_ERR_TLS_REQD, "this server requires TLS: send STARTTLS first")
            continue
        if opt == P.OPT_EXPORT_NAME:
            try:
                export = catalog.resolve(data.decode("utf-8", "replace"))
                release = catalog.claim(export)
            except (LookupError, PermissionError) as e:  # no error reply exists for this option
                raise HandshakeError(str(e)) from None
            flags = transmission_flags(export, False)
            try:
                sock.sendall(struct.pack(">QH", export.size, flags)
                             + (b"" if no_zeroes else bytes(124)))
            except BaseException:
                release()
                raise
            return Session(export, False, {}, export.read_only, conn.tls, release)
        if opt == P.OPT_ABORT:
            _reply(sock, opt, P.REP_ACK)
            return None
        if opt == P.OPT_LIST:
            if data:
                _error(sock, opt, P.REP_ERR_INVALID, "LIST takes no data")
                continue
            for name in catalog.names():
                raw = name.encode()
                _reply(sock, opt, P.REP_SERVER, struct.pack(">I", len(raw)) + raw)
            _reply(sock, opt, P.REP_ACK)
        elif opt in (P.OPT_INFO, P.OPT_GO):
            try:
                name, infos = _parse_info(data)
            except (ValueError, UnicodeDecodeError, struct.error) as e:
                _error(sock, opt, P.REP_ERR_INVALID, f"malformed INFO/GO: {e}")
                continue
            try:
                export = catalog.resolve(name)
            except LookupError as e:
                _error(sock, opt, P.REP_ERR_UNKNOWN, str(e))
                continue
            release = None
            if opt == P.OPT_GO:
                try:
                    release = catalog.claim(export)
                except PermissionError as e:
                    _error(sock, opt, P.REP_ERR_POLICY, str(e))
                    continue
            try:
                _send_info(sock, opt, export, structured, infos)
            except BaseException:
                if release:
                    release()
                raise
            if opt == P.OPT_GO:
                return Session(export, structured, contexts if structured else {}, export.read_only,
                               conn.tls, release)
        elif opt == P.OPT_STRUCTURED_REPLY:
            if data:
                _error(sock, opt, P.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                continue
            structured = True
            _reply(sock, opt, P.REP_ACK)
        elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            if opt == P.OPT_SET_META_CONTEXT and not structured:
                _error(sock, opt, P.REP_ERR_INVALID, "negotiate structured replies first")
                continue
            try:
                _, queries = _parse_meta(data)
            except (ValueError, UnicodeDecodeError, struct.error) as e:
                _error(sock, opt, P.REP_ERR_INVALID, f"malformed meta context option: {e}")
                continue
            matched = _match_contexts(queries)
            if opt == P.OPT_SET_META_CONTEXT:
                matched = matched if queries else {}  # SET with no query selects none
                contexts = matched
            for name, cid in matched.items():
                _reply(sock, opt, P.REP_META_CONTEXT, struct.pack(">I", cid) + name.encode())
            _reply(sock, opt, P.REP_ACK)
        else:
            _error(sock, opt, P.REP_ERR_UNSUP, f"option {opt} is not supported")

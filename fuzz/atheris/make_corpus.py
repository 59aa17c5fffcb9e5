#!/usr/bin/env python3
"""Writes the seed corpora (corpus/handshake/, corpus/control/): valid
handshakes and valid control requests, so the fuzzers start from inputs
that get deep.  The files are committed; rerun this after changing it."""
import base64
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

IHAVEOPT = 0x49484156454F5054
FIXED, NO_ZEROES = 1, 2
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED = 1, 2, 3, 5, 6, 7, 8
LIST_META, SET_META = 9, 10


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def name_and_infos(name, infos=()):
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta(name, queries):
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def client(variant, flags, *options):
    return bytes([variant]) + struct.pack(">I", flags) + b"".join(options)


HANDSHAKES = {
    "go_disk": client(0, FIXED | NO_ZEROES, opt(GO, name_and_infos("disk", (1, 2, 3)))),
    "structured_meta_go": client(0, FIXED | NO_ZEROES, opt(STRUCTURED),
                                 opt(SET_META, meta("disk", ["base:allocation",
                                                             "cowblock:shared"])),
                                 opt(GO, name_and_infos("disk"))),
    "list_info_abort": client(0, FIXED, opt(LIST), opt(INFO, name_and_infos("snap", (1, 2))),
                              opt(ABORT)),
    "export_name": client(0, FIXED, opt(EXPORT_NAME, b"disk")),
    "export_name_no_zeroes": client(2, FIXED | NO_ZEROES, opt(EXPORT_NAME, b"snap")),
    "default_export": client(1, FIXED | NO_ZEROES, opt(GO, name_and_infos(""))),
    "list_meta_unknown": client(0, FIXED, opt(LIST_META, meta("disk", ["base:"])), opt(42, b"xy"),
                                opt(STARTTLS), opt(SET_META, meta("disk", [])),
                                opt(STRUCTURED), opt(LIST_META, meta("disk", ["cowblock:"])),
                                opt(INFO, name_and_infos("a.b:c@d-e_f+9")), opt(ABORT)),
    "read_only_go": client(2, FIXED | NO_ZEROES, opt(STRUCTURED),
                           opt(SET_META, meta("snap", ["base:allocation"])),
                           opt(GO, name_and_infos("snap", (3,)))),
    "errors": client(0, FIXED, opt(LIST, b"x"), opt(STRUCTURED, b"x"),
                     opt(GO, b"\x00\x00\x00\x09disk"), opt(INFO, name_and_infos("nope")),
                     opt(GO, name_and_infos("disk"))),
    "too_big": client(0, FIXED, struct.pack(">QII", IHAVEOPT, GO, 1 << 20)),
}


VERSION = 2   # cowblock.control.protocol.VERSION


def frame(call, *args, **kwargs):
    body = json.dumps({"v": VERSION, "call": call, "args": list(args), "kwargs": kwargs},
                      separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def b64(data):
    return {"$bytes": base64.b64encode(data).decode()}


CONTROL = {
    "list_stats": frame("list") + frame("stats") + frame("get_config") + frame("contains", "disk"),
    "info_usage": frame("info", "disk") + frame("usage", "snap") + frame("diff", "disk", "snap",
                                                                         same=True),
    "create_snapshot_delete": frame("create_thin", "new", 1 << 20, labels={"$dict": [["k", "v"]]})
    + frame("snapshot", "new", "new2", True) + frame("delete", "new2") + frame("delete", "new"),
    "io": frame("device.pwrite", "disk", b64(b"hello fuzz"), 4097)
    + frame("device.pread", "disk", 10, 4097) + frame("device.block_status", "disk", 0, 1 << 20)
    + frame("device.discard", "disk", 0, 65536)
    + frame("device.write_zeroes", "disk", 0, 4096, may_unmap=False)
    + frame("device.flush", "disk") + frame("device.size", "disk")
    + frame("device.read_only", "snap"),
    "busy": frame("delete", "busy") + frame("rename", "busy", "x")
    + frame("device.resize", "busy", 1 << 21) + frame("device.resize", "busy", 4096),
    "rename_labels_ro": frame("rename", "disk", "disk2") + frame("rename", "disk2", "disk")
    + frame("set_labels", "disk", {"$dict": [["a", "b"]]}) + frame("set_read_only", "disk", False)
    + frame("update", "disk", labels={"c": "d"}) + frame("update", "busy", read_only=True),
    "functions": frame("health") + frame("pool_report") + frame("list_images")
    + frame("list_containers") + frame("device_length", "disk") + frame("info", "disk", usage=True)
    + frame("list", usage=True) + frame("pending_removals"),
    "old_version": struct.pack(">I", 16) + b'{"call":"list"}',
    "rollback_mappings": frame("snapshot", "disk", "s1") + frame("rollback", "disk", "s1")
    + frame("mappings", "disk") + frame("create_thin", "e", 65536)
    + frame("add_mappings", "e", [[0, 1]]) + frame("delete", "e") + frame("delete", "s1"),
    "pool": frame("commit") + frame("check") + frame("trim") + frame("resize", 32 << 20)
    + frame("set_config", {"health": {"low_water_data": 20}}) + frame("set_config", {}),
    "malformed": struct.pack(">I", 5) + b"[1,2]" + frame("nope") + frame("_h")
    + frame("device.__class__", "disk") + struct.pack(">I", 3) + b"{x}",
    "too_long": struct.pack(">I", 1 << 30),
}


def main():
    for name, items in (("handshake", HANDSHAKES), ("control", CONTROL)):
        d = os.path.join(HERE, "corpus", name)
        os.makedirs(d, exist_ok=True)
        for key, data in items.items():
            with open(os.path.join(d, key), "wb") as f:
                f.write(data)
    print("wrote", len(HANDSHAKES), "handshakes and", len(CONTROL), "control inputs")


if __name__ == "__main__":
    main()

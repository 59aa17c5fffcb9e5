"""The Snapshots gRPC service over cowblock.containerd.store, on a Unix
socket: what containerd reaches through `[proxy_plugins.NAME] type =
"snapshot"`.

Errors become the gRPC codes containerd's proxy turns back into its own
(errdefs): NotFound, AlreadyExists, FailedPrecondition, InvalidArgument;
anything else is Unknown with cowblock's message.
"""
import contextlib
import os
from concurrent import futures

import grpc as _grpc

from .. import errors
from . import api, store

LIST_BATCH = 100     # snapshots in one List reply of the stream
WORKERS = 8
_CODES = [(store.NotFound, _grpc.StatusCode.NOT_FOUND),
          (store.AlreadyExists, _grpc.StatusCode.ALREADY_EXISTS),
          (store.FailedPrecondition, _grpc.StatusCode.FAILED_PRECONDITION),
          (errors.InvalidArgumentError, _grpc.StatusCode.INVALID_ARGUMENT),
          (errors.NoSpaceError, _grpc.StatusCode.RESOURCE_EXHAUSTED),
          (errors.BusyError, _grpc.StatusCode.FAILED_PRECONDITION)]
# Answers containerd expects in its normal flow (the unpacker probes with
# Prepare, the GC repeats Removes): the rest go to the daemon's log as well.
_ROUTINE = (_grpc.StatusCode.NOT_FOUND, _grpc.StatusCode.ALREADY_EXISTS)
_KINDS = {store.VIEW: api.pb.VIEW, store.ACTIVE: api.pb.ACTIVE, store.COMMITTED: api.pb.COMMITTED}


def _code(exc):
    return next((code for cls, code in _CODES if isinstance(exc, cls)), _grpc.StatusCode.UNKNOWN)


def _info(info):
    out = api.pb.Info(name=info["name"], parent=info["parent"], kind=_KINDS[info["kind"]],
                      labels=info["labels"])
    out.created_at.FromNanoseconds(int(info["created"] * 1e9))
    out.updated_at.FromNanoseconds(int(info["updated"] * 1e9))
    return out


def _mounts(mounts):
    return [api.pb.Mount(**m) for m in mounts]


class Servicer(api.grpc.SnapshotsServicer):
    def __init__(self, snapshots, log):
        self.s = snapshots
        self.log = log

    @contextlib.contextmanager
    def _answer(self, context, what):
        try:
            yield
        except errors.CowblockError as e:
            code = _code(e)
            if code not in _ROUTINE:
                self.log(f"snapshotter: {what}: {e}")
            context.abort(code, str(e))

    def Prepare(self, request, context):
        with self._answer(context, f"prepare {request.key!r}"):
            return api.pb.PrepareSnapshotResponse(mounts=_mounts(self.s.prepare(
                request.key, request.parent, dict(request.labels))))

    def View(self, request, context):
        with self._answer(context, f"view {request.key!r}"):
            return api.pb.ViewSnapshotResponse(mounts=_mounts(self.s.prepare(
                request.key, request.parent, dict(request.labels), kind=store.VIEW)))

    def Mounts(self, request, context):
        with self._answer(context, f"mounts {request.key!r}"):
            return api.pb.MountsResponse(mounts=_mounts(self.s.mounts(request.key)))

    def Commit(self, request, context):
        with self._answer(context, f"commit {request.key!r}"):
            self.s.commit(request.name, request.key, dict(request.labels))
            return api.empty()

    def Remove(self, request, context):
        with self._answer(context, f"remove {request.key!r}"):
            self.s.remove(request.key)
            return api.empty()

    def Stat(self, request, context):
        with self._answer(context, f"stat {request.key!r}"):
            return api.pb.StatSnapshotResponse(info=_info(self.s.stat(request.key)))

    def Update(self, request, context):
        with self._answer(context, f"update {request.info.name!r}"):
            info = self.s.update(request.info.name, dict(request.info.labels),
                                 list(request.update_mask.paths))
            return api.pb.UpdateSnapshotResponse(info=_info(info))

    def List(self, request, context):
        with self._answer(context, "list"):
            infos = self.s.list(list(request.filters))
        for at in range(0, len(infos), LIST_BATCH):
            yield api.pb.ListSnapshotsResponse(info=[_info(i) for i in
                                                     infos[at:at + LIST_BATCH]])

    def Usage(self, request, context):
        with self._answer(context, f"usage {request.key!r}"):
            return api.pb.UsageResponse(size=self.s.usage(request.key))

    def Cleanup(self, request, context):
        with self._answer(context, "cleanup"):
            for name in self.s.cleanup():
                self.log(f"snapshotter: cleanup removed {name}, a device no snapshot named")
            return api.empty()


class SnapshotterServer:
    """The service on a Unix socket (its path at most 107 bytes)."""

    def __init__(self, snapshots, socket_path, id=0, log=lambda msg: None):
        self.snapshots = snapshots
        self.socket_path = os.path.abspath(socket_path)
        self.id = id
        self.log = log
        self._server = None

    def start(self):
        path = self.socket_path
        if len(os.fsencode(path)) > 107:
            raise errors.InvalidArgumentError(f"socket path {path} is longer than 107 bytes")
        if os.path.exists(path):
            _refuse_live_socket(path)
            os.unlink(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        server = _grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS,
                                                         thread_name_prefix="cowblock-ctrd"))
        api.grpc.add_SnapshotsServicer_to_server(Servicer(self.snapshots, self.log), server)
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise errors.HostFileError(f"cannot listen on {path}")
        server.start()
        os.chmod(path, 0o600)    # who may connect may remove every snapshot: root (containerd)
        self._server = server
        return self

    def describe(self):
        """The daemon's attachment record (daemon status)."""
        return {"id": self.id, "kind": "snapshotter", "address": self.socket_path,
                "default_size": self.snapshots.default_size,
                "snapshots": self.snapshots.count()}

    def stop(self, grace=5.0):
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self.snapshots.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


def _refuse_live_socket(path):
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        return      # a dead one: taken over
    finally:
        s.close()
    raise errors.BusyError(f"something listens on {path} already")

"""The messages and service stubs of snapshots.proto, generated from it at
import time by grpc_tools (nothing generated is kept in the tree).

    from cowblock.containerd import api
    api.pb.PrepareSnapshotRequest(key="default/1/web", parent="")
    api.grpc.SnapshotsServicer, api.grpc.SnapshotsStub, api.grpc.add_SnapshotsServicer_to_server
"""
import os
import sys

from .. import errors

PROTO = "cowblock/containerd/snapshots.proto"
SERVICE = "containerd.services.snapshots.v1.Snapshots"


def _load():
    try:
        import grpc
        import grpc_tools  # noqa: F401  (protos_and_services needs it)
    except ImportError as e:
        raise errors.MissingExtraError(
            f"the containerd snapshotter needs gRPC ({e.name} is missing): "
            "pip install 'cowblock[containerd]'") from None
    # protos_and_services finds the .proto through sys.path: the directory
    # holding the cowblock package must be on it (it is, unless cowblock was
    # imported from a zip or by path tricks).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.append(root)
    return grpc.protos_and_services(PROTO)


pb, grpc = _load()


def empty():
    from google.protobuf import empty_pb2
    return empty_pb2.Empty()

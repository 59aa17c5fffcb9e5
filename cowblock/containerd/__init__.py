"""cowblock as containerd's snapshotter: the Snapshots gRPC service
(cowblock.containerd.service) over snapshots kept as devices and records
(cowblock.containerd.store), run inside the pool's daemon (`cowblock
snapshotter`).  Needs the extra `cowblock[containerd]` (grpcio, grpcio-tools,
protobuf)."""

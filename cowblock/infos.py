"""What the pool reports: plain data, as it crosses the daemon's control
socket (control.protocol decodes these without importing the engine)."""
import datetime
from dataclasses import dataclass, field
from typing import NamedTuple, Optional


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    id: int
    uuid: str
    size: int
    mapped_blocks: int
    block_size: int
    read_only: bool
    origin: "str | None"
    created: datetime.datetime
    transaction_id: int
    labels: dict = field(default_factory=dict)
    creation_time: int = 0   # the pool's snapshot counter ("time", as dm-thin) at creation
    snap_time: int = 0       # ... when it was last snapshotted
    exclusive_blocks: "int | None" = None   # with usage=True: blocks only it maps
    shared_blocks: "int | None" = None      # ... and blocks it shares with another device

    @property
    def mapped_bytes(self):
        return self.mapped_blocks * self.block_size


@dataclass(frozen=True)
class Usage:
    """Blocks a device maps, split like thin_ls: exclusive to it, or shared."""
    exclusive_blocks: int
    shared_blocks: int
    block_size: int

    @property
    def mapped_blocks(self):
        return self.exclusive_blocks + self.shared_blocks

    @property
    def exclusive_bytes(self):
        return self.exclusive_blocks * self.block_size

    @property
    def shared_bytes(self):
        return self.shared_blocks * self.block_size


@dataclass(frozen=True)
class PoolStats:
    block_size: int
    data_blocks: int
    data_used: int
    data_free: int
    metadata_used_bytes: int
    metadata_capacity_bytes: int
    metadata_reserve_bytes: int
    transaction_id: int
    devices: int
    needs_check: bool
    read_only: bool
    uuid: str
    node_capacity: int
    time: int = 0            # snapshots taken so far: dm-thin's pool "time"


@dataclass(frozen=True)
class DiffRange:
    """A run of virtual blocks: thin_delta's left_only/right_only/different/same."""
    kind: str
    begin: int
    length: int


class CheckRecord(NamedTuple):
    """One problem a check found, or one thing a repair did (cb_check_record).
    A tuple, so that it crosses the daemon's control socket as a list."""
    kind: str                       # "error", "leak" or "repaired"
    message: str
    block: Optional[int] = None     # the block it concerns ...
    space: Optional[str] = None     # ... counted in "metadata" or "data"
    device: Optional[int] = None    # the id of the device it concerns
    expected: Optional[int] = None  # what the references (or the structure) call for
    found: Optional[int] = None     # what is stored
    before_repair: bool = False     # found by the check a repair ran first

    def __str__(self):
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class CheckReport:
    """What pool.check() found: counts, and records (CheckRecord) of the
    problems; errors, leaks and repaired are the same records as lines."""
    ok: bool
    error_count: int
    leak_count: int
    nodes_checked: int
    blocks_checked: int
    records: list = field(default_factory=list)         # the problems this check found
    repair_records: list = field(default_factory=list)  # what a repair found first, and did
    warnings: list = field(default_factory=list)        # not errors: e.g. pool files others can read

    def __post_init__(self):  # records arrive from the control socket as plain lists
        for name in ("records", "repair_records"):
            object.__setattr__(self, name, [r if isinstance(r, CheckRecord) else CheckRecord(*r)
                                            for r in getattr(self, name)])

    @property
    def errors(self):
        return [str(r) for r in self.records if r.kind == "error"]

    @property
    def leaks(self):
        return [str(r) for r in self.records if r.kind == "leak"]

    @property
    def repaired(self):
        return [str(r) for r in self.repair_records]

    def __str__(self):
        head = "clean" if self.ok else f"{self.error_count} errors, {self.leak_count} leaks"
        warnings = [f"warning: {w}" for w in self.warnings]
        if self.repaired:
            head += " after the repair"
            return "\n".join([f"pool check: {head}"] + self.errors + self.leaks + warnings
                             + ["repair:"] + [f"  {line}" for line in self.repaired])
        return "\n".join([f"pool check: {head}"] + self.errors + self.leaks + warnings)

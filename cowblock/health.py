"""Pool health: low-water marks, the minimum free space, over-provisioning,
and the hook that can extend a pool (as dmeventd's autoextend does).

Settings live in the pool's configuration (Pool.config), so every tool that
opens the pool sees the same ones:
  low_water_data, low_water_metadata   warn (and run the hook) when free space
                                       falls under this percentage (default 10)
  min_free_space                       refuse new devices under this
                                       percentage of free data (default 5,
                                       Docker's dm.min_free_space)
  hook                                 a shell command run once when free
                                       space falls under a low-water mark
                                       (cowblock.lowwater); it gets
                                       COWBLOCK_POOL, COWBLOCK_DATA_FREE_PCT
                                       and COWBLOCK_METADATA_FREE_PCT
  hook_timeout                         seconds a write that finds the pool
                                       full waits for the hook (default 60)

It also warns when the pool's files are open to other users: a pool is made
owner-only (directory 0700, data and metadata 0600) and should stay so.
"""
import os
import stat
from dataclasses import dataclass, field

from .errors import InvalidArgumentError, NoSpaceError

DEFAULTS = {"low_water_data": 10, "low_water_metadata": 10, "min_free_space": 5, "hook": None,
            "hook_timeout": 60}
# A write from a CLI command through the pool's daemon waits for the hook
# inside one control call, which must be answered within the call timeout
# (cowblock.control.client.CALL_TIMEOUT, 300 s): the hook timeout stays under.
MAX_HOOK_TIMEOUT = 240


def settings(pool):
    config = pool.config
    stored = config.get("health") if isinstance(config, dict) else None
    if not isinstance(stored, dict):
        return dict(DEFAULTS)
    try:
        validate(stored)
    except InvalidArgumentError:  # written by something else: keep the defaults
        return dict(DEFAULTS)
    return {**DEFAULTS, **stored}


def validate(changes):
    """Refuse unknown settings and values out of range (percentages 0-100,
    hook a command string or None, hook_timeout seconds)."""
    for key, value in changes.items():
        if key not in DEFAULTS:
            raise InvalidArgumentError(f"unknown health setting {key!r}; known: {sorted(DEFAULTS)}")
        if key == "hook":
            if value is not None and not isinstance(value, str):
                raise InvalidArgumentError(f"hook {value!r} is not a command string or None")
        elif key == "hook_timeout":
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not 0 < value <= MAX_HOOK_TIMEOUT):
                raise InvalidArgumentError(f"hook timeout {value!r} is not a number of seconds "
                                           f"over 0, up to {MAX_HOOK_TIMEOUT}")
        elif (not isinstance(value, (int, float)) or isinstance(value, bool)
              or not 0 <= value <= 100):
            raise InvalidArgumentError(f"{key} {value!r} is not a percentage from 0 to 100")


def configure(pool, **changes):
    """Change health settings (see validate)."""
    validate(changes)
    stored = pool.config.get("health")
    pool.update_config("health", {**(stored if isinstance(stored, dict) else {}), **changes})


@dataclass
class Health:
    data_free_pct: float
    metadata_free_pct: float
    provisioned_bytes: int
    data_bytes: int
    low_water_data: float
    low_water_metadata: float
    min_free_space: float
    warnings: list = field(default_factory=list)
    hook: "str | None" = None

    @property
    def below_low_water(self):
        return below_low_water(self.data_free_pct, self.metadata_free_pct, {
            "low_water_data": self.low_water_data, "low_water_metadata": self.low_water_metadata})

    @property
    def overprovisioned(self):
        return self.provisioned_bytes > self.data_bytes


def free_pct(stats):
    """(data, metadata) free space in percent, from pool.stats()."""
    usable_meta = stats.metadata_capacity_bytes - stats.metadata_reserve_bytes
    return (100.0 * stats.data_free / stats.data_blocks,
            100.0 * max(0, usable_meta - stats.metadata_used_bytes) / max(usable_meta, 1))


def below_low_water(data_free, meta_free, cfg):
    return data_free < cfg["low_water_data"] or meta_free < cfg["low_water_metadata"]


def pool_health(pool):
    s, cfg = pool.stats(), settings(pool)
    data_free, meta_free = free_pct(s)
    provisioned = sum(d.size for d in pool.list())
    h = Health(data_free, meta_free, provisioned, s.data_blocks * s.block_size,
               cfg["low_water_data"], cfg["low_water_metadata"], cfg["min_free_space"],
               hook=cfg["hook"])
    if data_free < h.low_water_data:
        h.warnings.append(f"pool data space is low: {data_free:.1f}% free, under the low-water "
                          f"mark of {h.low_water_data}%; grow it with `cowblock pool resize`")
    if meta_free < h.low_water_metadata:
        h.warnings.append(f"pool metadata space is low: {meta_free:.1f}% free, under the "
                          f"low-water mark of {h.low_water_metadata}%; grow it with "
                          f"`cowblock pool resize --metadata SIZE`")
    h.warnings.extend(permission_warnings(pool.path))
    return h


def report(pool):
    """Everything `cowblock pool info` shows: sizes, space, health settings."""
    s, h, cfg = pool.stats(), pool_health(pool), settings(pool)
    return {"path": pool.path, "uuid": s.uuid, "block_size": s.block_size,
            "data_size": s.data_blocks * s.block_size, "data_used": s.data_used * s.block_size,
            "data_free": s.data_free * s.block_size, "data_free_pct": round(h.data_free_pct, 2),
            "metadata_capacity": s.metadata_capacity_bytes, "metadata_used": s.metadata_used_bytes,
            "metadata_free_pct": round(h.metadata_free_pct, 2),
            "metadata_reserve": s.metadata_reserve_bytes, "transaction_id": s.transaction_id,
            "devices": s.devices, "provisioned": h.provisioned_bytes,
            "overprovisioned": h.overprovisioned, "low_water_data": h.low_water_data,
            "low_water_metadata": h.low_water_metadata, "min_free_space": h.min_free_space,
            "hook": cfg["hook"], "hook_timeout": cfg["hook_timeout"],
            "below_low_water": h.below_low_water,
            "needs_check": s.needs_check, "read_only": _read_only(pool, s),
            "warnings": h.warnings}


def _read_only(pool, stats):
    """Whether the pool is read-only: turned so by an error, or on files
    this user cannot write; not merely opened read-only to be looked at."""
    if stats.read_only and not pool.read_only:
        return True
    return not os.access(os.path.join(pool.path, "metadata"), os.W_OK)


# The permission bits a pool directory is made without (CB_POOL_DIR_MODE is
# owner-only): group and others.
def _owner_only():
    from .format import CONSTANTS   # imported here: the CLI imports health at every start
    return 0o777 & ~CONSTANTS["CB_POOL_DIR_MODE"]


def _exposed(pool_dir):
    """(path, mode, what) of the pool directory and files that others can reach."""
    paths = [(pool_dir, "pool directory")] + [
        (os.path.join(pool_dir, name), "pool file") for name in ("data", "metadata")]
    exposed = []
    for path, what in paths:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if mode & _owner_only():
            exposed.append((path, mode, what))
    return exposed


def permission_warnings(pool_dir):
    """A sentence for each pool path that other local users can read or enter."""
    return [f"{what} {path} is mode {mode:04o}: other local users can read the devices' "
            f"blocks; make it owner-only with `cowblock pool check --repair` (or chmod go-rwx)"
            for path, mode, what in _exposed(pool_dir)]


def tighten_permissions(pool_dir):
    """Take group and other permissions off the pool directory and files;
    returns a sentence for each one changed."""
    done = []
    for path, mode, what in _exposed(pool_dir):
        os.chmod(path, mode & ~_owner_only())
        done.append(f"{what} {path}: mode {mode:04o} set to {mode & ~_owner_only():04o} (owner only)")
    return done


def check_room_for_device(pool):
    """Refuse a new device when free data space is under min_free_space."""
    s, limit = pool.stats(), settings(pool)["min_free_space"]
    free = 100.0 * s.data_free / s.data_blocks
    if free < limit:
        raise NoSpaceError(
            f"pool has {free:.1f}% free data space, under its min_free_space of {limit}%: new "
            f"devices are refused until it is grown (cowblock pool resize) or space is freed")

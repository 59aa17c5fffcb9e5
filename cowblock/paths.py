"""Where the embedded default pool lives, and how it is made on first use."""
import os

DEFAULT_DATA_SIZE = 64 << 30     # sparse: costs nothing until written
DEFAULT_BLOCK_SIZE = 64 << 10


def default_pool_path():
    """$COWBLOCK_POOL, else $XDG_DATA_HOME/cowblock/pool (~/.local/share/...)."""
    if os.environ.get("COWBLOCK_POOL"):
        return os.environ["COWBLOCK_POOL"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                              "share")
    return os.path.join(base, "cowblock", "pool")


def open_or_create(path, *, read_only=False, timeout=0.0, commit_interval=1.0):
    """Open the pool at path, creating it (DEFAULT_DATA_SIZE, sparse) if absent."""
    from .pool import Pool
    if not os.path.isfile(os.path.join(path, "metadata")):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Pool.create(path, DEFAULT_DATA_SIZE, DEFAULT_BLOCK_SIZE).close()
    return Pool.open(path, read_only=read_only, timeout=timeout, commit_interval=commit_interval)

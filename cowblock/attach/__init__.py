"""Making a device usable as a file and a filesystem on this host.

  fuse       device files served in-process over FUSE, straight from the
             engine (no socket, no second process): the fast attach path
  blockdev   loop devices, filesystems (blkid, mkfs, mount, fsfreeze): the
             steps every mount takes, each with what undoes it
  nbdfuse    an NBD export as a file, through nbdfuse (a second process): the
             fallback attach path, and how peers' NBD exports are mounted
"""
from .fuse import (AttachError, FuseAttach, FuseOptions, abort_connection, available,
                   clean_stale)

__all__ = ["AttachError", "FuseAttach", "FuseOptions", "abort_connection", "available",
           "clean_stale"]

"""Making a device usable as a file and a filesystem on this host.

  blockdev   loop devices, filesystems (blkid, mkfs, mount, fsfreeze): the
             steps every mount takes, each with what undoes it
  nbdfuse    an NBD export as a file, through nbdfuse (a second process): the
             fallback attach path, and how peers' NBD exports are mounted
"""

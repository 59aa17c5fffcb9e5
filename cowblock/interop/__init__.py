"""Interchange with other systems' formats (dm-thin's thin_dump XML)."""

"""The NBD server: handshake in Python (handshake.py), transmission in C
(csrc/nbd/transmit.c), connections and lifecycle in server.py."""

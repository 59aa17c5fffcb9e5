"""The pool daemon's control protocol: one call table (calls), its wire
format (protocol), the daemon's dispatch (server) and the client's proxy
(client)."""

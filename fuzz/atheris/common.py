"""What the atheris harnesses share: the import path, a scratch directory,
libFuzzer's arguments, and a reader for the client side of a socketpair.

Not a harness itself; see README.md beside it.
"""
import atexit
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:  # fuzz this tree, whatever is installed
    sys.path.insert(0, REPO)

MAX_INPUT = 64 << 10   # bytes of one input that reach the socket (more fits no buffer)


def _own_dir(prefix, base):
    """A new directory named after this process, after removing those that
    earlier runs left: libFuzzer ends the process with exit(), which runs
    no Python atexit handler, so a harness cannot clean up after itself."""
    base = base or tempfile.gettempdir()
    for entry in os.listdir(base):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
            except OSError:
                pass
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)
    atexit.register(shutil.rmtree, path, True)   # when Python does exit normally
    return path


def scratch_dir(prefix):
    """A directory for the harness's pool: under $COWBLOCK_FUZZ_TMPDIR when
    set, else in memory (/dev/shm) when it is there."""
    base = os.environ.get("COWBLOCK_FUZZ_TMPDIR") or (
        "/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    return _own_dir(prefix, base)


def libfuzzer_argv(argv, name):
    """argv for atheris.Setup: the committed seed corpus is always read (as a
    last corpus directory, so new inputs are not written into it), the
    dictionary is used unless -dict= is given, and without a corpus
    directory of the caller's a temporary one takes the new inputs."""
    flags = [a for a in argv[1:] if a.startswith("-")]
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    seeds = os.path.join(HERE, "corpus", name)
    if not dirs:
        dirs = [_own_dir(f"cowblock-fuzz-{name}-corpus-", os.environ.get("COWBLOCK_FUZZ_TMPDIR"))]
    if os.path.isdir(seeds) and os.path.abspath(seeds) not in map(os.path.abspath, dirs):
        dirs.append(seeds)
    dictionary = os.path.join(HERE, f"{name}.dict")
    if os.path.exists(dictionary) and not any(f.startswith("-dict=") for f in flags):
        flags.append(f"-dict={dictionary}")
    return [argv[0]] + flags + dirs


class Drain:
    """Reads the client end of each connection on one long-lived thread until
    the server closes it, so that a server's replies never fill the socket
    buffer and block it (a thread per input would cost more than the input)."""

    def __init__(self):
        self._todo = queue.Queue()
        self._done = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="fuzz-drain").start()

    def _run(self):
        while True:
            sock = self._todo.get()
            out = bytearray()
            try:
                while True:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    out += chunk
            except OSError:
                pass
            self._done.put(bytes(out))

    def start(self, sock):
        self._todo.put(sock)

    def result(self, timeout):
        """Everything the server sent, once it closed its end."""
        return self._done.get(timeout=timeout)


def connection(payload):
    """A socketpair whose client side has sent payload and shut its writing
    half: the server reads the input, then EOF."""
    srv, cli = socket.socketpair()
    cli.sendall(payload)          # fits the buffer: inputs are cut to MAX_INPUT
    cli.shutdown(socket.SHUT_WR)
    return srv, cli

"""A warm stage server: stage commands start from a process that has already
imported torch, MLflow and the rest, instead of paying for the imports again.

Why: ``dvc repro`` runs every stage as a fresh ``latentlab ...`` process. On a
2-core machine each one spent about 2.7 s starting (torch's import alone is
1.2 s) and 2.3 s importing and opening MLflow before doing any work; over the
default pipeline's 71 stages that was a third of the run
(bench/orchestration_overhead.py). The server pays the imports once; each
stage is then a ``fork`` of it.

How (Linux only; anything unusual falls back to the ordinary cold start):

* The ``latentlab`` command (:mod:`latentlab.launch`) calls :func:`run` for
  the stage sub-commands. :func:`run` connects to the server's Unix socket,
  named by a fingerprint of the interpreter, ``sys.path``, the installed
  packages, latentlab's source files and the environment variables that
  libraries read at import time (thread counts, CUDA, ...). A change to any of
  them names another socket, so a server never runs stale code.
* No server yet: the command starts one in the background and waits for it.
  The server first imports the core that every stage needs (what the command
  would have imported cold), takes the command, then imports the rest between
  commands. A server exits after ``LATENTLAB_WARM_IDLE_S`` seconds (default
  300) without work, or on ``latentlab warm stop``.
* Per command the server forks a worker. The worker takes over the command's
  stdin, stdout and stderr (passed over the socket), its working directory,
  environment, umask and arguments, runs the ``latentlab`` CLI and sends back
  its exit status, which the command acknowledges and exits with. The command relays the
  signals it receives (Ctrl-C, SIGTERM) to the worker; if the worker dies of
  one, the command dies of it too; if the command itself dies (SIGKILL), the
  server kills the worker.
* The server imports, but never runs, anything: no torch threads, no CUDA
  context and no database connection exist before the fork.

``LATENTLAB_WARM=0`` turns it off. It is also off under ``torchrun`` (``RANK``
set), whose agent watches its worker processes directly, and, unless
``LATENTLAB_WARM=1``, on machines with an NVIDIA GPU, where forked workers
using CUDA have not been tested yet.

Importing this module imports only the standard library: the command's own
start stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

ENABLE_ENV = "LATENTLAB_WARM"
DIR_ENV = "LATENTLAB_WARM_DIR"
IDLE_ENV = "LATENTLAB_WARM_IDLE_S"
DEFAULT_IDLE_S = 300.0
# How long a command waits for a server it started to open its socket (it takes
# a fraction of a second); past that the command runs cold.
_START_WAIT_S = 10.0

# The stage sub-commands that a warm server runs; everything else starts cold.
STAGE_COMMANDS = frozenset(
    {
        "ingest",
        "validate",
        "corrupt",
        "train",
        "evaluate",
        "compare",
        "anomaly",
        "sparsity",
        "classifier",
        "generate",
        "collapse",
        "report",
    }
)

# Environment variables read at import time by the preloaded libraries (thread
# pools, CUDA, matplotlib's backend, numba's cache, the interpreter itself):
# a server started under other values would behave differently, so they are
# part of its fingerprint. Every other variable is simply handed to the worker.
_IMPORT_TIME_ENV_PREFIXES = (
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "GOMP_",
    "CUDA_",
    "NVIDIA_",
    "TORCH",
    "PYTORCH_",
    "PYTHON",
    "LD_",
    "MPL",
    "NUMBA_",
    "HOME",
    "XDG_",
    "MLFLOW_",
    "GX_",
    "GE_",
)
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


# ----------------------------------------------------------------------------------------------
# Where servers live and what names them


def _nvidia_gpu_present() -> bool:
    # Checked without touching CUDA (which must stay uninitialised before a fork).
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidiactl")


def enabled(argv: list[str], environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether ``latentlab argv`` should go through a warm server.

    ``LATENTLAB_WARM`` unset: on for the stage commands on Linux machines without
    an NVIDIA GPU (forked workers and CUDA are not yet tested together there);
    ``1`` forces it on, ``0`` turns it off.
    """
    setting = environ.get(ENABLE_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    return (
        bool(argv)
        and argv[0] in STAGE_COMMANDS
        and not any(a in ("--help", "-h") for a in argv)
        and "RANK" not in environ
        and sys.platform == "linux"
        and hasattr(socket, "send_fds")
        and hasattr(os, "fork")
        and (setting in ("1", "true", "yes", "on") or not _nvidia_gpu_present())
    )


def server_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """The folder of the servers' sockets, locks and logs (private to this user)."""
    if environ.get(DIR_ENV):
        return Path(environ[DIR_ENV])
    base = environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"latentlab-warm-{os.getuid()}"


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def fingerprint_parts(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[tuple[object, ...]]:
    """What names a server: the interpreter, its search path (and each entry's mtime: pip
    install/uninstall adds or removes entries of site-packages), latentlab's source files
    (mtime and size), and the environment variables libraries read at import."""
    # sys.path[0] is the invoking script's folder (or the working folder under
    # `python -m`) unless Python runs with -P, as the server does: leave it out.
    search_path = sys.path if sys.flags.safe_path else sys.path[1:]
    parts: list[tuple[object, ...]] = [(sys.executable, sys.version, tuple(search_path))]
    for entry in search_path:
        try:
            parts.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            parts.append((entry, None))
    package = _package_dir()
    for path in sorted(package.rglob("*.py")):
        st = path.stat()
        parts.append((str(path.relative_to(package)), st.st_mtime_ns, st.st_size))
    parts.append(tuple(sorted((k, v) for k, v in environ.items() if k.startswith(_IMPORT_TIME_ENV_PREFIXES))))
    return parts


def fingerprint(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Names the server that may run this process's commands: equal only if the code it would run is equal."""
    digest = hashlib.sha256()
    for part in fingerprint_parts(environ):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:20]


def _paths(key: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[Path, Path, Path]:
    folder = server_dir(environ)
    return folder / f"{key}.sock", folder / f"{key}.lock", folder / f"{key}.log"


# ----------------------------------------------------------------------------------------------
# Framing: a 4-byte length, then JSON


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    payload = json.dumps(message).encode()
    sock.sendall(struct.pack("!I", len(payload)) + payload)


def _recv_exactly(sock: socket.socket, n: int, head: bytes = b"") -> bytes | None:
    data = head
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _recv(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the peer has closed the connection."""
    header = _recv_exactly(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack("!I", header)
    payload = _recv_exactly(sock, length)
    return None if payload is None else json.loads(payload)


# ----------------------------------------------------------------------------------------------
# The client: the `latentlab` command


def run(argv: list[str]) -> int | None:
    """Run ``latentlab argv`` in a warm server; its exit status, or None to run cold here."""
    key = fingerprint()
    socket_path, lock_path, log_path = _paths(key)
    sock = _connect(socket_path)
    if sock is None:
        if not _start_server(key, socket_path, lock_path, log_path):
            return None
        # The server binds its socket as soon as it runs, and takes this command once
        # its core imports are done: the imports this command would have paid cold.
        deadline = time.monotonic() + _START_WAIT_S
        while sock is None and time.monotonic() < deadline:
            time.sleep(0.02)
            sock = _connect(socket_path)
        if sock is None:
            return None
    with sock:
        try:
            return _relay(sock, argv)
        except _ServerGone:
            return None


class _ServerGone(Exception):
    """The server closed the connection before taking the request (it was stopping)."""


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _standard_fds() -> list[int]:
    """The open ones of stdin, stdout and stderr (a closed one stays closed for the worker)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            pass
    return fds


def _relay(sock: socket.socket, argv: list[str]) -> int:
    fds = _standard_fds()
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps(
        {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask, "fds": fds}
    ).encode()
    framed = struct.pack("!I", len(request)) + request

    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        # Sent at once; the server relays it once the worker exists, so none is lost.
        received.append(signum)
        with contextlib.suppress(OSError):
            _send(sock, {"signal": signum})

    previous = {s: signal.signal(s, forward) for s in _FORWARDED_SIGNALS}
    try:
        try:
            sent = socket.send_fds(sock, [framed], fds)
            if sent < len(framed):
                sock.sendall(framed[sent:])
        except OSError as exc:
            raise _ServerGone from exc
        reply = _recv_or_gone(sock)
        if reply is None:
            if received:
                # The server was stopping and never ran the command: the signal is for us.
                for s, handler in previous.items():
                    signal.signal(s, handler)
                os.kill(os.getpid(), received[0])
            raise _ServerGone
        while True:
            if reply is None:
                # Worker and server both gone without a word: nothing can say how the command ended.
                print("latentlab: the warm server went away during the command", file=sys.stderr)
                return 1
            if "exit" in reply:
                # Say it arrived: the server must not take our leaving next for a death
                # and kill the worker, which sent this just before its own exit.
                with contextlib.suppress(OSError):
                    _send(sock, {"done": True})
                return int(reply["exit"])
            if "signal" in reply:
                # Die of the same signal, as the command would have run cold.
                signum = int(reply["signal"])
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return 128 + signum
            reply = _recv_or_gone(sock)  # {"pid": ...} came first: the worker runs
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _recv_or_gone(sock: socket.socket) -> dict[str, Any] | None:
    try:
        return _recv(sock)
    except ConnectionResetError:
        return None


def _start_server(key: str, socket_path: Path, lock_path: Path, log_path: Path) -> bool:
    """Start a server in the background unless one is starting (it holds the lock); False if none can run."""
    import fcntl
    import subprocess

    folder = socket_path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_uid != os.getuid():
            return False  # someone else's folder: never run their server's code
        with open(lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # a server is starting: wait for its socket
            fcntl.flock(lock, fcntl.LOCK_UN)
        with open(log_path, "w") as log:
            subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "latentlab.warm_server",
                    "--key",
                    key,
                    "--socket",
                    str(socket_path),
                    "--lock",
                    str(lock_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
    except OSError:
        return False  # no warm server: every command starts cold, as before
    return True


# ----------------------------------------------------------------------------------------------
# Management: `latentlab warm status` and `latentlab warm stop`


def _ask_each(message: dict[str, Any], environ: dict[str, str] | os._Environ[str]) -> list[dict[str, Any]]:
    """Send ``message`` to every server answering in :func:`server_dir`; their replies."""
    replies = []
    folder = server_dir(environ)
    for path in sorted(folder.glob("*.sock")) if folder.is_dir() else []:
        sock = _connect(path)
        if sock is None:
            continue
        with sock:
            try:
                _send(sock, message)
                reply = _recv(sock)
            except OSError:
                reply = None
        if reply:
            replies.append(reply)
    return replies


def servers(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[dict[str, Any]]:
    """The servers answering in :func:`server_dir`: their pid, socket and number of running commands."""
    return _ask_each({"status": True}, environ)


def stop_all(environ: dict[str, str] | os._Environ[str] = os.environ, timeout: float = 30.0) -> tuple[int, int]:
    """Ask every server to exit once its running commands end, and wait for them.

    Returns (servers asked, servers still running after ``timeout`` seconds).
    """
    asked = [int(reply["pid"]) for reply in _ask_each({"stop": True}, environ) if "pid" in reply]
    running = list(asked)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [pid for pid in running if _alive(pid)]
    return len(asked), len(running)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True

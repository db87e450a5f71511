"""The warm stage server that :mod:`latentlab.warm` starts and talks to.

    python -m latentlab.warm_server --key KEY --socket PATH --lock PATH [--idle-seconds S]

It imports what the stage commands import, then answers on a Unix socket:
per command it forks a supervisor, which forks the worker that runs the
command (see :mod:`latentlab.warm` for the whole design). The server is
single-threaded: it starts no Python thread, so a fork copies no lock that
another thread holds. (Native thread pools, such as OpenBLAS's, register
their own fork handlers, as for ``multiprocessing``'s fork start method.)
"""

from __future__ import annotations

import argparse
import ast
import atexit
import fcntl
import importlib
import io
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from latentlab import warm

# Never preloaded: Prefect and Dask start event loops and threads when used,
# and no stage command needs them; the rest are this server and its client.
_SKIPPED_PREFIXES = ("prefect", "prefect_dask", "distributed", "dask", "asyncio", "concurrent")
_SKIPPED_LATENTLAB = frozenset(
    {
        "latentlab.orchestration",
        "latentlab.deploy",
        "latentlab.sweep",
        "latentlab.warm",
        "latentlab.warm_server",
        "latentlab.launch",
        "latentlab.__main__",
    }
)
# Imported by MLflow only when a run opens (its SQLite store): worth having warm too.
_EXTRA = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}", flush=True)


def modules_to_preload(package: Path | None = None) -> list[str]:
    """Every module latentlab's stage code imports anywhere (function bodies included), then latentlab's own.

    Read from the source rather than listed by hand, so that a new import in a
    stage is preloaded without anyone remembering to add it here.
    """
    package = package or Path(warm.__file__).resolve().parent
    third_party: set[str] = set()
    own: list[str] = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name in _SKIPPED_LATENTLAB:
            continue
        own.append(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                third_party.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                third_party.add(node.module)
    third_party = {
        m
        for m in third_party
        if not m.startswith("latentlab") and m.split(".")[0] not in _SKIPPED_PREFIXES and m != "__future__"
    }
    return sorted(third_party) + list(_EXTRA) + own


def preload() -> None:
    """Import everything the stage commands import; a module that fails to import is only logged.

    The root logger is put back as it was: an import that configures logging
    (mlflow.pytorch's dependencies call ``logging.basicConfig(level=ERROR)``)
    would otherwise win over the command's own ``basicConfig``, which in a cold
    process runs first.
    """
    import logging

    root_handlers, root_level = list(logging.root.handlers), logging.root.level
    started = time.perf_counter()
    failed = []
    for name in modules_to_preload():
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional library missing: the stage imports it (and fails) itself
            failed.append(f"{name} ({type(exc).__name__}: {exc})")
    logging.root.handlers[:] = root_handlers
    logging.root.setLevel(root_level)
    _log(f"preloaded in {time.perf_counter() - started:.1f} s" + (f"; not loaded: {', '.join(failed)}" if failed else ""))


# ----------------------------------------------------------------------------------------------


def serve(key: str, socket_path: Path, lock_path: Path, idle_seconds: float) -> int:
    lock = open(lock_path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log("another server holds the lock: exiting")
        return 0
    os.chdir("/")  # pin no user folder
    start_environ = dict(os.environ)
    if warm.fingerprint(start_environ) != key:
        _log("started with another interpreter, path or environment than its key says: exiting")
        return 0
    preload()
    if warm.fingerprint(start_environ) != key:
        _log("the code changed while loading: exiting")
        return 0
    # Variables the imports set (e.g. KMP_INIT_AT_FORK): a cold command would set them too.
    set_by_imports = {k: v for k, v in os.environ.items() if start_environ.get(k) != v}
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    bound_inode = socket_path.stat().st_ino
    _log(f"serving on {socket_path} (idle limit {idle_seconds:.0f} s)")

    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    supervisors: set[int] = set()
    last_activity = time.monotonic()
    try:
        while True:
            for pid in list(supervisors):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    supervisors.discard(pid)
                    last_activity = time.monotonic()
            if not stopping and not _still_ours(socket_path, bound_inode):
                _log("the socket was removed or replaced: stopping")
                stopping = True
            if not supervisors and (stopping or time.monotonic() - last_activity > idle_seconds):
                break
            if stopping:
                time.sleep(0.1)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], 1.0)
            except InterruptedError:
                continue
            if not ready:
                continue
            conn, _ = listener.accept()
            last_activity = time.monotonic()
            stopping |= _answer(conn, listener, lock, supervisors, set_by_imports)
    finally:
        if _still_ours(socket_path, bound_inode):
            socket_path.unlink(missing_ok=True)
        listener.close()
        _log("stopped")
    return 0


def _still_ours(path: Path, inode: int) -> bool:
    try:
        return path.stat().st_ino == inode
    except OSError:
        return False


def _answer(
    conn: socket.socket,
    listener: socket.socket,
    lock: io.TextIOBase,
    supervisors: set[int],
    set_by_imports: dict[str, str],
) -> bool:
    """Handle one connection; True if it asked the server to stop."""
    try:
        conn.settimeout(10.0)  # a request arrives right after connecting
        request, fds = _receive_request(conn)
        conn.settimeout(None)
    except (OSError, ValueError) as exc:
        _log(f"bad request: {exc}")
        conn.close()
        return False
    if "status" in request or "stop" in request:
        with conn:
            try:
                warm._send(conn, {"pid": os.getpid(), "socket": str(listener.getsockname()), "supervising": len(supervisors)})
            except OSError:
                pass
        for fd in fds:
            os.close(fd)
        return "stop" in request
    pid = os.fork()
    if pid == 0:
        listener.close()
        lock.close()
        request["env"] = {**set_by_imports, **request["env"]}
        _supervise(conn, request, fds)
    supervisors.add(pid)
    conn.close()
    for fd in fds:
        os.close(fd)
    return False


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < 4:
        more = conn.recv(4 - len(data))
        if not more:
            raise ValueError("connection closed before the request")
        data += more
    (length,) = struct.unpack("!I", data[:4])
    body = warm._recv_exactly(conn, 4 + length, data)
    if body is None:
        raise ValueError("connection closed inside the request")
    return __import__("json").loads(body[4:]), list(fds)


def _supervise(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the supervisor: fork the worker, relay signals to it, report how it ended."""
    worker = None
    try:
        # The worker inherits these until it sets its own: a signal relayed that
        # early must still act (a KeyboardInterrupt, a termination), not vanish.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        worker = os.fork()
        if worker == 0:
            conn.close()
            _work(request, fds)
        for fd in fds:
            os.close(fd)
        started = time.monotonic()
        try:
            warm._send(conn, {"pid": worker})
        except OSError:
            return  # the command is gone already (killed): so goes its worker, below
        outcome = _relay_until_exit(conn, worker)
        worker = None  # exited and reaped
        command = " ".join(["latentlab", *map(str, request["argv"])])
        _log(f"{command} (in {request['cwd']}): {outcome} after {time.monotonic() - started:.1f} s")
    except BaseException:
        traceback.print_exc()
    finally:
        if worker:
            # Never leave a worker without its command: it would hold the command's
            # stdout open and run on unobserved.
            try:
                os.kill(worker, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)


def _relay_until_exit(conn: socket.socket, pid: int) -> str:
    """Relay signals until the worker exits; returns how it ended, in words."""
    watched: list[Any] = [conn]
    try:
        exited = os.pidfd_open(pid)  # readable once the worker has exited
        timeout = None
    except (AttributeError, OSError):
        exited, timeout = None, 0.05
    if exited is not None:
        watched.append(exited)
    while True:
        ready, _, _ = select.select(watched, [], [], timeout)
        done, status = os.waitpid(pid, os.WNOHANG) if (exited is None or exited in ready) else (0, 0)
        if done:
            if os.WIFSIGNALED(status):
                message = {"signal": os.WTERMSIG(status)}
            else:
                message = {"exit": os.waitstatus_to_exitcode(status)}
            try:
                warm._send(conn, message)
            except OSError:
                pass
            return f"killed by signal {message['signal']}" if "signal" in message else f"exit {message['exit']}"
        if conn in ready:
            try:
                message = warm._recv(conn)
            except OSError:
                message = None
            if message is None:
                # The command died (SIGKILL, or its terminal went away): so does its worker.
                os.kill(pid, signal.SIGKILL)
                watched.remove(conn)
            elif "signal" in message:
                os.kill(pid, int(message["signal"]))


def _work(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the worker: become the command's process, run the CLI, exit with its status."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        _take_standard_streams(request["fds"], fds)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(int(request["umask"]))
        _reseed()
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["latentlab", *argv]
        from latentlab.cli import app

        app(args=argv, prog_name="latentlab")
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt:
        # Uncaught, it ends a cold interpreter by SIGINT itself: do the same.
        traceback.print_exc()
        _flush_and_run_exit_functions()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _flush_and_run_exit_functions()
        os._exit(code)


def _flush_and_run_exit_functions() -> None:
    """What interpreter shutdown would do: the atexit functions (MLflow ends its runs, logging flushes), then flush."""
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _exit_status(code: object) -> int:
    """``sys.exit(code)`` as the interpreter turns it into a status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _take_standard_streams(wanted: list[int], received: list[int]) -> None:
    """Put the command's stdin, stdout and stderr on fds 0-2 and rebuild sys.std* over them."""
    by_target = dict(zip(wanted, received))
    for target in (0, 1, 2):
        source = by_target.get(target)
        if source is None:
            source = os.open(os.devnull, os.O_RDWR)
            by_target[target] = source
        os.dup2(source, target)
    for source in set(by_target.values()):
        if source > 2:
            os.close(source)
    encoding = sys.__stdout__.encoding if sys.__stdout__ else "utf-8"
    errors = sys.__stdout__.errors if sys.__stdout__ else "strict"
    # As the interpreter sets them up: stdout line-buffered on a terminal only, stderr always.
    sys.stdin = sys.__stdin__ = open(0, "r", encoding=encoding, errors=errors, closefd=False)
    sys.stdout = sys.__stdout__ = open(
        1, "w", encoding=encoding, errors=errors, buffering=-1, closefd=False
    )
    if os.isatty(1):
        sys.stdout.reconfigure(line_buffering=True)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding=encoding, errors="backslashreplace", closefd=False)
    sys.stderr.reconfigure(line_buffering=True)


def _reseed() -> None:
    """Fresh entropy where a new interpreter would have drawn it; the forks would otherwise share it."""
    import random
    import tempfile

    random.seed()
    tempfile.tempdir = None  # follow the command's TMPDIR
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True)
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--lock", required=True, type=Path)
    parser.add_argument(
        "--idle-seconds", type=float, default=float(os.environ.get(warm.IDLE_ENV, warm.DEFAULT_IDLE_S))
    )
    args = parser.parse_args(argv)
    return serve(args.key, args.socket, args.lock, args.idle_seconds)


if __name__ == "__main__":
    sys.exit(main())

"""The warm stage server that :mod:`latentlab.warm` starts and talks to.

    python -P -m latentlab.warm_server --key KEY --socket PATH --lock PATH [--idle-seconds S]

It binds its socket at once and imports in two steps: first the core every
stage needs (latentlab's modules with what they import at the top, and MLflow's
store), then, between commands, the libraries that single stages import inside
their functions (scikit-learn, Great Expectations, UMAP, ...). Per command it
forks one worker that becomes the command's process (see :mod:`latentlab.warm`).

The server is single-threaded: it starts no Python thread, and it forks only
between imports, so a fork copies no half-done import and no lock that another
thread holds. (Native thread pools such as OpenBLAS's register their own fork
handlers, as for ``multiprocessing``'s fork start method.) It never runs a
model, opens a database or touches CUDA; it refuses to go on if an import
initialised CUDA, which a forked child could not use.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import fcntl
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
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
# Imported only on rare paths (torchvision only downloads a dataset, 1.8 s to import):
# a command that needs one imports it itself.
_RARELY_USED = frozenset({"torchvision.datasets"})
# Every stage opens an MLflow run on a SQLite store: part of the core.
_CORE_EXTRA = ("mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store")
# Imported inside the libraries, so the scan of latentlab's imports cannot see them: every
# training stage paid for them. mlflow.pytorch.save_model imports mlflow.pyfunc at the first
# logged model (0.5 s in a worker, counted as MLflow time); torch's first optimizer step
# imports torch._dynamo (about 1 s).
_IMPORTED_BY_LIBRARIES = ("mlflow.pyfunc", "torch._dynamo")
_SIGNALS_HELD_AROUND_FORK = {signal.SIGINT, signal.SIGTERM}


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# What to import


def modules_to_preload(package: Path | None = None) -> tuple[list[str], list[str]]:
    """(core, rest): latentlab's stage modules plus MLflow's store, then every library
    latentlab's code imports inside functions.

    Read from the source rather than listed by hand, so that a new import in a
    stage is preloaded without anyone remembering to add it here.
    """
    package = package or Path(warm.__file__).resolve().parent
    imported: set[str] = set()
    own: list[str] = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name in _SKIPPED_LATENTLAB:
            continue
        own.append(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
    rest = sorted(
        m
        for m in imported
        if not m.startswith("latentlab")
        and m.split(".")[0] not in _SKIPPED_PREFIXES
        and m not in _RARELY_USED
        and m != "__future__"
    )
    core = [*_CORE_EXTRA, *own]
    return core, [m for m in [*rest, *_IMPORTED_BY_LIBRARIES] if m not in core]


def _mlflow_package_map() -> None:
    # mlflow.pytorch.log_model maps imported modules to installed packages; the map is
    # built once per process from every installed distribution's metadata (1.2 s here)
    # and depends only on what is installed, which the server's fingerprint covers.
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()


# Work that every command would otherwise repeat, that depends only on what the
# fingerprint covers, and that leaves no thread, file or connection behind.
WARM_UPS: tuple[tuple[str, Callable[[], None]], ...] = (("MLflow's map of installed packages", _mlflow_package_map),)


def _load(name: str, step: Callable[[], object], failed: list[str]) -> None:
    """Run one import or warm-up; keep the root logger as it was (see below); log failures only.

    An import that configures logging (mlflow.pytorch's dependencies call
    ``logging.basicConfig(level=ERROR)``) would otherwise win over the command's
    own ``basicConfig``, which in a cold process runs first.
    """
    handlers, level = list(logging.root.handlers), logging.root.level
    try:
        step()
    except Exception as exc:  # an optional library missing: the stage imports it (and fails) itself
        failed.append(f"{name} ({type(exc).__name__}: {exc})")
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


# ----------------------------------------------------------------------------------------------
# The server


@dataclass
class _Job:
    """One command being run: its connection, its worker and how to see the worker exit."""

    conn: socket.socket | None
    pid: int
    exited: int | None  # a pidfd, readable once the worker has exited (None: poll)
    command: str
    cwd: str
    started: float = field(default_factory=time.monotonic)


class _Server:
    def __init__(self, listener: socket.socket, lock: Any, start_environ: dict[str, str]) -> None:
        self.listener = listener
        self.lock = lock
        self.start_environ = start_environ
        self.jobs: list[_Job] = []
        self.stopping = False
        self.last_activity = time.monotonic()

    # -- events

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for connections, messages and exits, and handle them."""
        watched: list[Any] = [] if self.stopping else [self.listener]
        for job in self.jobs:
            if job.conn is not None:
                watched.append(job.conn)
            if job.exited is not None:
                watched.append(job.exited)
        if any(job.exited is None for job in self.jobs):
            timeout = min(timeout, 0.05)
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            return
        if self.listener in ready:
            self._accept()
        for job in list(self.jobs):
            if job.conn is not None and job.conn in ready:
                self._message(job)
            if job.exited is None or job.exited in ready:
                self._reap(job)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        self.last_activity = time.monotonic()
        try:
            conn.settimeout(10.0)  # a request arrives right after connecting
            request, fds = _receive_request(conn)
            conn.settimeout(None)
        except (OSError, ValueError) as exc:
            _log(f"bad request: {exc}")
            conn.close()
            return
        if "status" in request or "stop" in request:
            with conn, contextlib.suppress(OSError):
                warm._send(
                    conn,
                    {"pid": os.getpid(), "socket": str(self.listener.getsockname()), "running": len(self.jobs)},
                )
            for fd in fds:
                os.close(fd)
            self.stopping |= "stop" in request
            return
        self._start(conn, request, fds)

    def _start(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        # Variables the imports so far set (e.g. KMP_INIT_AT_FORK): a cold command would set them too.
        set_by_imports = {k: v for k, v in os.environ.items() if self.start_environ.get(k) != v}
        request["env"] = {**set_by_imports, **request["env"]}
        # Hold SIGINT/SIGTERM until the worker has its own handlers: one relayed
        # that early must act there, not run the server's handler in the worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS_HELD_AROUND_FORK)
        # Everything the server holds goes to the collector's permanent generation: a
        # worker's collections then never walk (and write to) the preloaded objects.
        # Otherwise its first full collection touched every page of the server's heap,
        # copying each one (copy-on-write): 0.5 s in a training stage with torch._dynamo
        # loaded. As the gc module's documentation advises for a server that forks.
        gc.freeze()
        try:
            pid = os.fork()
            if pid == 0:
                self._become_worker(conn, request, fds)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS_HELD_AROUND_FORK)
        for fd in fds:
            os.close(fd)
        try:
            exited: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            exited = None
        self.jobs.append(
            _Job(conn, pid, exited, " ".join(["latentlab", *map(str, request["argv"])]), str(request["cwd"]))
        )

    def _become_worker(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
        try:
            self.listener.close()
            self.lock.close()
            for job in self.jobs:
                if job.conn is not None:
                    job.conn.close()
                if job.exited is not None:
                    os.close(job.exited)
            gc.enable()  # collections on, as in a cold process (the server runs without)
        finally:
            _work(request, fds, conn)

    def _message(self, job: _Job) -> None:
        try:
            message = warm._recv(job.conn)
        except (OSError, ValueError):
            message = None
        if message is None:
            self._drop_command(job)
        elif "done" in message:
            # The command has its worker's exit status and leaves; the worker is
            # exiting (it sent that status last) and is reaped as it goes.
            self._release_command(job)
        elif "signal" in message:
            _kill(job.pid, int(message["signal"]))

    def _drop_command(self, job: _Job) -> None:
        """The command died (SIGKILL, or its terminal went away): so does its worker.

        A worker left running would keep the command's stdout open and go on unobserved.
        """
        _kill(job.pid, signal.SIGKILL)
        self._release_command(job)

    def _release_command(self, job: _Job) -> None:
        if job.conn is not None:
            job.conn.close()
            job.conn = None

    def _reap(self, job: _Job) -> None:
        done, status = os.waitpid(job.pid, os.WNOHANG)
        if not done:
            return
        if os.WIFSIGNALED(status):
            message: dict[str, int] = {"signal": os.WTERMSIG(status)}
            outcome = f"killed by signal {message['signal']}"
        else:
            message = {"exit": os.waitstatus_to_exitcode(status)}
            outcome = f"exit {message['exit']}"
        if job.conn is not None:
            with contextlib.suppress(OSError):
                warm._send(job.conn, message)
            job.conn.close()
        if job.exited is not None:
            os.close(job.exited)
        self.jobs.remove(job)
        self.last_activity = time.monotonic()
        _log(f"{job.command} (in {job.cwd}): {outcome} after {time.monotonic() - job.started:.1f} s")

    def close(self, socket_path: Path, inode: int) -> None:
        if _still_ours(socket_path, inode):
            socket_path.unlink(missing_ok=True)
        self.listener.close()


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _still_ours(path: Path, inode: int) -> bool:
    try:
        return path.stat().st_ino == inode
    except OSError:
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
    return json.loads(body[4:]), list(fds)


def serve(key: str, socket_path: Path, lock_path: Path, idle_seconds: float) -> int:
    lock = open(lock_path, "a+")  # noqa: SIM115 - held (and so locked) for the server's whole life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log("another server holds the lock: exiting")
        return 0
    os.chdir("/")  # pin no user folder
    # No collections in the server (they would leave freed holes across the pages the
    # workers share); it allocates little besides its imports, and exits when idle.
    gc.disable()
    start_environ = dict(os.environ)
    start_parts = warm.fingerprint_parts(start_environ)
    if warm.fingerprint(start_environ) != key:
        _log("started with another interpreter, path or environment than its key says: exiting")
        return 0
    # Bound at once: the first command connects and waits in the backlog while the core loads.
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    inode = socket_path.stat().st_ino
    server = _Server(listener, lock, start_environ)

    def request_stop(_signum: int, _frame: object) -> None:
        server.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    core, rest = modules_to_preload()
    failed: list[str] = []
    started = time.perf_counter()
    for name in core:
        _load(name, lambda name=name: importlib.import_module(name), failed)
    core_seconds = time.perf_counter() - started
    _log(f"core loaded in {core_seconds:.1f} s; serving on {socket_path} (idle limit {idle_seconds:.0f} s)")
    steps = [(name, lambda name=name: importlib.import_module(name)) for name in rest] + list(WARM_UPS)
    try:
        while True:
            if steps:
                server.poll(0)  # commands first; the imports go on between them
                name, step = steps.pop(0)
                _load(name, step, failed)
                if not steps:
                    _log(
                        f"the rest loaded in {time.perf_counter() - started - core_seconds:.1f} s"
                        + (f"; not loaded: {', '.join(failed)}" if failed else "")
                    )
                    changed = [part for part in warm.fingerprint_parts(start_environ) if part not in set(start_parts)]
                    if changed:
                        _log(f"the code changed while loading ({changed[0]!r}): stopping")
                        server.stopping = True
                if _cuda_initialised():
                    _log("an import initialised CUDA, which a forked worker cannot use: stopping")
                    server.stopping, steps = True, []
                continue
            if not server.stopping and not _still_ours(socket_path, inode):
                _log("the socket was removed or replaced: stopping")
                server.stopping = True
            if server.stopping and _still_ours(socket_path, inode):
                # A new command must not wait in the backlog while running ones finish:
                # without the socket it starts (or finds) another server.
                socket_path.unlink(missing_ok=True)
            if not server.jobs and (server.stopping or time.monotonic() - server.last_activity > idle_seconds):
                break
            server.poll(1.0)
    finally:
        server.close(socket_path, inode)
        _log("stopped")
    return 0


# ----------------------------------------------------------------------------------------------
# The worker


def _work(request: dict[str, Any], fds: list[int], conn: socket.socket) -> NoReturn:
    """In the worker: become the command's process, run the CLI, exit with its status.

    The worker itself tells the command its pid and, when it ends normally, its
    status: the server may be busy with an import just then. (If it dies of a
    signal, the server reports that once it has reaped it.)
    """
    code = 1
    try:
        warm._send(conn, {"pid": os.getpid()})
    except OSError:
        os._exit(1)  # the command is gone already
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS_HELD_AROUND_FORK)
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
        with contextlib.suppress(OSError):
            warm._send(conn, {"exit": code})
        os._exit(code)


def _flush_and_run_exit_functions() -> None:
    """What interpreter shutdown would do: the atexit functions (MLflow ends its runs, logging flushes), then flush."""
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


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
    by_target = dict(zip(wanted, received, strict=False))  # the kernel passes every fd sent, or none
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
    # Open for the worker's whole life, as the interpreter's own streams are.
    sys.stdin = sys.__stdin__ = open(0, encoding=encoding, errors=errors, closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", encoding=encoding, errors=errors, closefd=False)  # noqa: SIM115
    if os.isatty(1):
        sys.stdout.reconfigure(line_buffering=True)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding=encoding, errors="backslashreplace", closefd=False)  # noqa: SIM115
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
    parser.add_argument("--idle-seconds", type=float, default=float(os.environ.get(warm.IDLE_ENV, warm.DEFAULT_IDLE_S)))
    args = parser.parse_args(argv)
    return serve(args.key, args.socket, args.lock, args.idle_seconds)


if __name__ == "__main__":
    sys.exit(main())

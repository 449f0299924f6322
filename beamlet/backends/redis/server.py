"""RedisServer: a private ``redis-server`` for a head node (or a test).

It listens on one address (127.0.0.1 unless told otherwise) with a random
password, keeps its data in an append-only file (fsynced every second) in a
0700 directory it creates for itself, and is stopped by pid: `stop` ends
exactly the process it started, and nothing else. The password is written to
a 0600 config file in that directory, never on a command line.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref

from ... import exceptions as exc

EXECUTABLE = "redis-server"
INSTALL_HINT = ("install it (Debian/Ubuntu: apt-get install redis-server; Fedora: dnf install "
                "redis; macOS: brew install redis) or give a running Redis's address")
_LOG = "redis.log"
_CONFIG = "redis.conf"
_PORT_ATTEMPTS = 5  # fresh ports tried when a free one was taken before Redis bound it


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _quote(text: str) -> str:
    """A string as redis.conf reads it back unchanged."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _end(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM `proc`, SIGKILL it if it has not exited after `timeout` seconds; reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class RedisServer:
    """A ``redis-server`` process of our own.

    ``RedisServer().start()`` (or ``with RedisServer() as server:``) runs one on
    `host` and `port` (a free one if None) and returns once it answers PING;
    `url` is what `RedisControlStore` opens. `stop` ends it and, unless told
    otherwise, removes its directory; `start` after ``stop(remove_dir=False)``,
    or `restart`, runs it again on the same port, password and data. If the
    owner forgets `stop`, the server is stopped at interpreter exit (the data
    directory then stays).
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", *,
                 executable: str | None = None, parent_dir: str | None = None,
                 start_timeout: float = 10.0, stop_timeout: float = 10.0):
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 0 < port < 65536):
            raise ValueError(f"a Redis port is a whole number from 1 to 65535, got {port!r}")
        self.host = host
        self.port = port
        self._port_given = port is not None
        self.executable = executable or EXECUTABLE
        self.parent_dir = parent_dir
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.password = secrets.token_hex(32)
        self.dir: str | None = None
        self._proc: subprocess.Popen | None = None
        self._finalizer = None

    # -- what clients need ----------------------------------------------------------
    @property
    def _client_host(self) -> str:
        """The host clients of this machine connect to (loopback for a wildcard)."""
        return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def address(self) -> str:
        """``host:port`` that clients connect to."""
        host = self._client_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@host:port/0``: holds the password; keep it private."""
        return f"redis://:{self.password}@{self.address}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life -----------------------------------------------------------------------
    def start(self) -> "RedisServer":
        """Start the server and wait until it answers PING (BackendError, with the
        end of its log, if it exits or does not answer within `start_timeout`)."""
        if self.running():
            raise RuntimeError(f"this Redis server (pid {self.pid}) is already running")
        path = shutil.which(self.executable)
        if path is None:
            raise exc.BackendError(f"{self.executable} was not found on PATH: {INSTALL_HINT}")
        fresh = self.dir is None
        if fresh:
            self.dir = tempfile.mkdtemp(prefix="beamlet-redis-", dir=self.parent_dir)  # 0700
        try:
            for attempt in range(1 if self._port_given else _PORT_ATTEMPTS):
                if not self._port_given:
                    self.port = _free_port(self.host)
                try:
                    self._launch(path)
                    break
                except exc.BackendError as err:
                    taken = "Address already in use" in str(err)
                    if self._port_given or not taken or attempt == _PORT_ATTEMPTS - 1:
                        raise
        except BaseException:
            if fresh:  # nothing of value in it yet
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
            raise
        self._port_given = True  # a server keeps its address across stop() and start()
        return self

    def _write_config(self) -> str:
        path = os.path.join(self.dir, _CONFIG)
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            "protected-mode yes",
            f"requirepass {_quote(self.password)}",
            f"dir {_quote(self.dir)}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',  # the AOF is the data; no RDB snapshots besides
            "daemonize no",
            'logfile ""',  # stdout, which goes to the log file
            "always-show-logo no",
        ]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _launch(self, path: str) -> None:
        config = self._write_config()
        log_fd = os.open(os.path.join(self.dir, _LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o600)
        try:
            # Its own session: a Ctrl-C meant for the owner does not kill it under
            # the owner's feet; the owner stops it.
            self._proc = subprocess.Popen([path, config], stdin=subprocess.DEVNULL,
                                          stdout=log_fd, stderr=log_fd, close_fds=True,
                                          start_new_session=True, cwd=self.dir)
        finally:
            os.close(log_fd)
        self._finalizer = weakref.finalize(self, _end, self._proc, self.stop_timeout)
        try:
            self._wait_ready()
        except BaseException:
            self._end_process()
            raise

    def _wait_ready(self) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries inside redis-py: between two attempts, this loop looks at the process.
        client = redis.Redis(host=self._client_host, port=self.port,
                             password=self.password, socket_timeout=0.5,
                             socket_connect_timeout=0.5, protocol=2, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + self.start_timeout
        last = None
        try:
            while True:
                if self._proc.poll() is not None:
                    raise exc.BackendError(
                        f"redis-server on {self.address} exited with status "
                        f"{self._proc.returncode} before answering; its log ends:\n"
                        f"{self.log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
                    last = err  # not listening yet, or loading its data
                if time.monotonic() > deadline:
                    raise exc.BackendError(
                        f"redis-server on {self.address} did not answer PING within "
                        f"{self.start_timeout:g} s ({last}); its log ends:\n{self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            with open(os.path.join(self.dir, _LOG), errors="replace") as f:
                text = f.read()[-16384:]
        except (OSError, TypeError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]).replace(self.password, "***")

    def _end_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _end(self._proc, self.stop_timeout)

    def stop(self, remove_dir: bool = True) -> None:
        """End the server (SIGTERM, then SIGKILL after `stop_timeout`; reaped) and,
        if `remove_dir`, remove its directory and the data in it. Idempotent."""
        self._end_process()
        if remove_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def restart(self, kill: bool = False) -> None:
        """Stop the server and start it again with the same port, password and
        data. `kill` ends it with SIGKILL, as a crash would (the last second of
        writes may be lost); otherwise it shuts down cleanly, saving everything."""
        if kill and self.running():
            self._proc.kill()
        self.stop(remove_dir=False)
        self.start()

    def __enter__(self) -> "RedisServer":
        return self.start() if not self.running() else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        return f"RedisServer({self.address}, {state})"

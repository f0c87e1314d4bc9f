#!/usr/bin/env python3
"""SMTP server of the course mail system: accepts mail and appends it to per-user mailboxes.

    python mailserver_smtp.py 2525 [--host ADDR] [--domain NAME] [--root DIR] ...

One thread serves each connection.  A message is written whole, under a lock
shared with the POP3 server, and fsync'd before the client hears 250.
"""

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

USERINFO_NAME = "userinfo.txt"
MAILBOX_NAME = "my_mailbox"
DELIVERY_LOCK_NAME = ".my_mailbox.lock"     # held while a mailbox file is written
LOGIN_PATTERN = re.compile(r"[A-Za-z0-9._-]+\Z")

DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_TIMEOUT = 300
DEFAULT_MAX_CONNECTIONS = 100
MAX_COMMAND_LINE = 512       # RFC 5321 4.5.3.1.4, CRLF included
MAX_TEXT_LINE = 1000         # RFC 5321 4.5.3.1.6, CRLF included
MAX_PATH = 256               # RFC 5321 4.5.3.1.3
MAX_RECIPIENTS = 100         # RFC 5321 4.5.3.1.8
MAX_BAD_COMMANDS = 10        # in a row, then 421 and close
SHUTDOWN_GRACE = 30          # seconds deliveries in flight get to finish
RECV_SIZE = 65536

log = logging.getLogger("smtp")


def parse_args(argv=None):
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="SMTP server: delivers mail into ROOT/<user>/my_mailbox.")
    parser.add_argument("port", type=int, metavar="PORT", help="TCP port to listen on (0: any free port)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default: all IPv4 interfaces; '::' or '::1' for IPv6)")
    parser.add_argument("--domain", default=socket.gethostname(),
                        help="name the server gives itself in replies (default: this host's name)")
    parser.add_argument("--root", default=".", help="mail root holding userinfo.txt and user folders (default: .)")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                        help="largest message accepted, in bytes (default: 10 MiB)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds an idle client may wait before 421 (default: 300)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="connections served at once; one more gets 421 (default: 100)")
    parser.add_argument("--verbose", action="store_true", help="print every command and reply")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("PORT must be between 0 and 65535")
    if args.max_size < 1 or args.max_connections < 1 or args.timeout <= 0:
        parser.error("--max-size, --max-connections and --timeout must be positive")
    return args


# --------------------------------------------------------------------------
# The mail root: users, locks, mailboxes
# --------------------------------------------------------------------------

def is_valid_login(name):
    """True for a plain login name that can never point outside its own folder."""
    return bool(LOGIN_PATTERN.match(name)) and name not in (".", "..")


class UserTable:
    """The users of a mail root, read from userinfo.txt again whenever the file changes."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, USERINFO_NAME)
        self._guard = threading.Lock()
        self._stamp = None
        self._passwords = {}   # login -> password bytes
        self._folded = {}      # login.lower() -> login

    def _refresh(self):
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        with self._guard:
            if stamp == self._stamp:
                return
            passwords = self._load() if stamp else {}
            if stamp is None:
                log.warning("%s is missing: no users", self.path)
            self._passwords = passwords
            self._folded = {}
            for login in passwords:
                self._folded.setdefault(login.lower(), login)
            self._stamp = stamp

    def _load(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            return {}
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        passwords = {}
        for number, line in enumerate(data.split(b"\n"), 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            fields = line.split(None, 1)
            login = fields[0].decode("ascii", "replace")
            if len(fields) != 2 or not is_valid_login(login):
                log.warning("%s line %d is not 'LOGIN PASSWORD' with a plain login; skipped",
                            USERINFO_NAME, number)
            elif login in passwords:
                log.warning("%s line %d repeats user %r; skipped", USERINFO_NAME, number, login)
            else:
                passwords[login] = fields[1]
        return passwords

    def canonical(self, name):
        """The login a name refers to (matched without regard to case), if it is a user."""
        self._refresh()
        login = name if name in self._passwords else self._folded.get(name.lower())
        if login and os.path.isdir(os.path.join(self.root, login)):
            return login
        return None

    def password(self, login):
        """The password (bytes) of an existing user, or None."""
        if self.canonical(login) != login:
            return None
        return self._passwords.get(login)

    def mailbox_path(self, login):
        return os.path.join(self.root, login, MAILBOX_NAME)


class FileLock:
    """An exclusive lock on a lock file, held across threads and across processes.

    fcntl/msvcrt locks belong to a process (or a file handle), so each lock
    file also gets one threading.Lock per process; the kernel drops the file
    lock when its holder dies, so a killed server never leaves a stale lock.
    """

    _registry = {}
    _registry_guard = threading.Lock()

    def __new__(cls, path):
        path = os.path.abspath(path)
        with cls._registry_guard:
            lock = cls._registry.get(path)
            if lock is None:
                lock = super().__new__(cls)
                lock.path = path
                lock._thread_lock = threading.Lock()
                lock._fd = None
                cls._registry[path] = lock
            return lock

    def acquire(self, blocking=True):
        """Take the lock; with blocking=False return False at once if someone holds it."""
        if not self._thread_lock.acquire(blocking):
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            self._thread_lock.release()
            raise
        try:
            if not _lock_fd(fd, blocking):
                os.close(fd)
                self._thread_lock.release()
                return False
        except BaseException:
            os.close(fd)
            self._thread_lock.release()
            raise
        self._fd = fd
        return True

    def release(self):
        fd, self._fd = self._fd, None
        try:
            _unlock_fd(fd)
        finally:
            os.close(fd)
            self._thread_lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _lock_fd(fd, blocking):
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not blocking:
                return False
            time.sleep(0.01)


def _unlock_fd(fd):
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def delivery_lock(mailbox_path):
    """The lock every writer of a mailbox file (SMTP append, POP3 rewrite) holds."""
    return FileLock(os.path.join(os.path.dirname(mailbox_path), DELIVERY_LOCK_NAME))

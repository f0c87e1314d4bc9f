"""Shared test helpers: temporary mail roots, real server processes, raw clients."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMTP_SCRIPT = os.path.join(REPO, "mailserver_smtp.py")
POP_SCRIPT = os.path.join(REPO, "pop_server.py")
CLIENT_SCRIPT = os.path.join(REPO, "mail_client.py")

DEFAULT_USERS = {"alice": "wonderland", "bob": "builder"}
DEADLINE = 10.0  # seconds any single wait in a test may take before it fails
LISTENING = re.compile(r"listening on (\S+) port (\d+)")


def wait_for(predicate, timeout=DEADLINE, interval=0.005):
    """Poll predicate until it returns a true value; return it, or raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s: %r" % (timeout, predicate))
        time.sleep(interval)


def make_mail_root(users=None, extra_lines=""):
    """Create a temporary mail root with userinfo.txt and one folder per user."""
    users = DEFAULT_USERS if users is None else users
    root = tempfile.mkdtemp(prefix="mailroot-")
    with open(os.path.join(root, "userinfo.txt"), "w") as f:
        for login, password in users.items():
            f.write("%s %s\n" % (login, password))
        f.write(extra_lines)
    for login in users:
        os.mkdir(os.path.join(root, login))
    return root


def remove_mail_root(root):
    shutil.rmtree(root, ignore_errors=True)


def remove_mailboxes(root, logins=tuple(DEFAULT_USERS)):
    """Delete the users' my_mailbox files, so a test starts with empty mailboxes."""
    for login in logins:
        try:
            os.remove(mailbox_path(root, login))
        except FileNotFoundError:
            pass


def mailbox_path(root, login):
    return os.path.join(root, login, "my_mailbox")


def read_mailbox(root, login):
    """The raw bytes of a user's my_mailbox (b"" when the file is absent)."""
    try:
        with open(mailbox_path(root, login), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


class ServerProcess:
    """One of our servers running as a real subprocess on a free loopback port."""

    def __init__(self, script, root, *args, host="127.0.0.1"):
        self.root = root
        self.host = host
        self.lines = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, script, "0", "--host", host, "--root", root] + list(args),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=root)
        threading.Thread(target=self._collect, daemon=True).start()
        match = self.wait_for_output(LISTENING)
        self.port = int(match.group(2))

    def _collect(self):
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append(None)  # end of output
            self._changed.notify_all()

    def output(self):
        with self._changed:
            return "".join(line for line in self.lines if line)

    def wait_for_output(self, pattern, timeout=DEADLINE):
        """Wait until a line of the server's output matches pattern; return the match."""
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        raise AssertionError("server exited before printing %r:\n%s"
                                             % (pattern.pattern, self.output()))
                    found = pattern.search(line)
                    if found:
                        return found
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("server never printed %r:\n%s"
                                         % (pattern.pattern, self.output()))
                self._changed.wait(remaining)

    def connect(self, timeout=DEADLINE):
        return LineClient(self.host, self.port, timeout)

    def alive(self):
        return self.proc.poll() is None

    def terminate(self, timeout=DEADLINE):
        """Send SIGTERM (or the platform's equivalent) and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if hasattr(signal, "SIGTERM") else signal.CTRL_C_EVENT)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)

    def close(self):
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc.stdout.close()


class BothServersTestCase(unittest.TestCase):
    """Starts the real SMTP and POP3 servers in one fresh mail root for the whole class."""

    @classmethod
    def setUpClass(cls):
        cls.root = make_mail_root()
        cls.servers = []
        try:
            for script in (SMTP_SCRIPT, POP_SCRIPT):
                cls.servers.append(ServerProcess(script, cls.root))
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for server in cls.servers:
            server.close()
        remove_mail_root(cls.root)


class LineClient:
    """A raw TCP client that sends bytes and reads CRLF lines, for protocol tests."""

    def __init__(self, host, port, timeout=DEADLINE):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def line(self):
        """Read one line (without its line end) as text; b'' means the server closed."""
        raw = self.file.readline()
        if not raw:
            raise EOFError("server closed the connection")
        return raw.rstrip(b"\r\n").decode("utf-8", "replace")

    def reply(self):
        """Read a whole SMTP reply (all its continuation lines); return (code, [lines])."""
        lines = [self.line()]
        while lines[-1][3:4] == "-":
            lines.append(self.line())
        return int(lines[-1][:3]), lines

    def cmd(self, text):
        """Send one SMTP command line with CRLF and return its reply (code, lines)."""
        self.send(text + "\r\n")
        return self.reply()

    def closed(self):
        """True when the server has closed its side (reads return EOF)."""
        try:
            return self.file.read(1) == b""
        except OSError:
            return True

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

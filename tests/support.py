"""Shared test helpers: mail roots, real servers, raw SMTP/POP3 clients, scripted servers, the client runner."""

import base64
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:   # the scripts' reply constants are imported, whatever the current directory
    sys.path.insert(0, REPO)

import mail_client  # noqa: E402
import mailserver_smtp  # noqa: E402

SMTP_SCRIPT = os.path.join(REPO, "mailserver_smtp.py")
POP_SCRIPT = os.path.join(REPO, "pop_server.py")
CLIENT_SCRIPT = os.path.join(REPO, "mail_client.py")

DEFAULT_USERS = {"alice": "wonderland", "bob": "builder"}
ALICE = "alice\n%s\n" % DEFAULT_USERS["alice"]    # the client's start-up Username/Password answers
BOB = "bob\n%s\n" % DEFAULT_USERS["bob"]
DEADLINE = 10.0  # seconds any single wait in a test may take before it fails
LISTENING = re.compile(r"listening on (\S+) port (\d+)")

TLS_CERT = os.path.join(REPO, "tests", "tls", "test-only-cert.pem")
TLS_KEY = os.path.join(REPO, "tests", "tls", "test-only-key.pem")
TLS_ARGS = ("--tls-cert", TLS_CERT, "--tls-key", TLS_KEY)


def peak_rss_mb(pid):
    """The peak resident memory of a process in MB (Linux /proc's VmHWM), or nan where unknown."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid):
    """The CPU time (user + system) a process has used so far, from /proc (nan where unknown)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def expect(condition, message):
    """Raise AssertionError with message unless condition holds (a bare assert vanishes under -O)."""
    if not condition:
        raise AssertionError(message)


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


def has_ipv6_loopback():
    """True when this machine can listen on ::1."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# Decorates a test that needs ::1; probed once, when the test files are loaded.
skip_unless_ipv6 = unittest.skipUnless(has_ipv6_loopback(), "no IPv6 loopback here")


def client_tls_context():
    """A client TLS context that trusts exactly the test certificate in tests/tls."""
    return ssl.create_default_context(cafile=TLS_CERT)


# --------------------------------------------------------------------------
# Mail roots
# --------------------------------------------------------------------------

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
    """Delete a mail root made by make_mail_root, whatever is left in it."""
    shutil.rmtree(root, ignore_errors=True)


def remove_mailboxes(root, logins=tuple(DEFAULT_USERS)):
    """Delete the users' my_mailbox files, so a test starts with empty mailboxes."""
    for login in logins:
        try:
            os.remove(mailbox_path(root, login))
        except FileNotFoundError:
            pass


def remove_file(path):
    """Remove a file if it is there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def mailbox_path(root, login):
    """Where a user's my_mailbox lives in a mail root."""
    return os.path.join(root, login, "my_mailbox")


def read_mailbox(root, login):
    """The raw bytes of a user's my_mailbox (b"" when the file is absent)."""
    try:
        with open(mailbox_path(root, login), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def stored_messages(root, login):
    """The messages of a user's my_mailbox, each its stored bytes without the final '.' line.

    Fails the test if the file ends in a torn message.
    """
    data = read_mailbox(root, login)
    messages, start = [], 0
    while start < len(data):
        end, _ = mailserver_smtp.message_end(data, start)
        expect(end > 0, "the mailbox ends torn: %r" % data[start:][-40:])
        messages.append(data[start:end - 2])
        start = end
    return messages


# --------------------------------------------------------------------------
# The real servers as subprocesses
# --------------------------------------------------------------------------

# ServerProcess always starts in the root and passes --root, so it cannot tell whether a server
# honours the start directory or --root; StartedServer leaves both to the test.
class StartedServer:
    """One of our servers as a real subprocess on a free port, started where and how the test chooses."""

    def __init__(self, script, cwd, *args, env=None, host="127.0.0.1"):
        self.root = cwd
        self.host = host
        self.lines = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, script, "0", "--host", host] + list(args),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=cwd, env=env)
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
        """Everything the server has printed so far."""
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

    def connect(self, timeout=DEADLINE, source=None):
        """A new raw connection to the server (its greeting not yet read), from address source if given."""
        return LineClient(self.host, self.port, timeout, source)

    def alive(self):
        """True while the server process runs."""
        return self.proc.poll() is None

    def terminate(self, timeout=DEADLINE):
        """Send SIGTERM (or the platform's equivalent) and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if hasattr(signal, "SIGTERM") else signal.CTRL_C_EVENT)
        return self.proc.wait(timeout)

    def kill(self):
        """Kill the server at once (SIGKILL: no clean-up of its own) and wait for it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)

    def close(self):
        """Stop the server, by force if it does not stop by itself."""
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc.stdout.close()


FAULTS = """\
# Injected by the tests: the next os.fsync of a my_mailbox fails once FAULT_FSYNC names a file that exists.
import errno, os
_fsync, _flag = os.fsync, os.environ.get("FAULT_FSYNC")
def fsync(fd):
    _estale(fd)
    if _flag and os.path.exists(_flag):
        try:
            target = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            target = ""
        if target.endswith("/my_mailbox"):
            os.remove(_flag)
            raise OSError(errno.EIO, "injected fsync failure")
    return _fsync(fd)
os.fsync = fsync
# ... what a file system shared by several machines (GlusterFS with its caches on) can
# do, armed by writing a fault into the file FAULT_SHARED_FS names:
#   "append BYTES": the next os.stat of a my_mailbox by path first appends BYTES to it
#                   (another machine's append that a stale cache hid from the copy);
#   "grow N":       while armed, os.stat of a my_mailbox by path says N bytes more;
#   "inode":        while armed, os.stat of a my_mailbox by path names another file (a rename seen late);
#   "estale":       the next write or fsync of a my_mailbox or .my_mailbox.new fails with ESTALE.
_stat, _shared = os.stat, os.environ.get("FAULT_SHARED_FS")
def _armed():
    try:
        with open(_shared, "rb") as f:
            return f.read().split(b" ", 1)
    except (OSError, TypeError):       # not armed, or FAULT_SHARED_FS not set
        return [b""]
def stat(path, *args, **kwargs):
    fault = _armed() if isinstance(path, str) and path.endswith("/my_mailbox") else [b""]
    if fault[0] == b"append":
        os.remove(_shared)
        with open(path, "ab") as f:
            f.write(fault[1])
    result = _stat(path, *args, **kwargs)
    if fault[0] in (b"grow", b"inode"):
        fields = list(result)
        fields[6 if fault[0] == b"grow" else 1] += int(fault[1]) if fault[0] == b"grow" else 1
        result = os.stat_result(fields)
    return result
os.stat = stat
def _estale(fd):
    if _armed()[0] == b"estale":
        target = os.readlink("/proc/self/fd/%d" % fd)
        if target.endswith(("/my_mailbox", "/.my_mailbox.new")):
            os.remove(_shared)
            raise OSError(errno.ESTALE, "injected stale file handle")
# ... and the process kills itself (SIGKILL, as kill -9) at the FAULT_KILL_WRITE'th write to a my_mailbox.
import signal
_write, _writev = os.write, getattr(os, "writev", None)
_kill_at, _writes = int(os.environ.get("FAULT_KILL_WRITE", "0")), [0]
def _count_write(fd):
    _estale(fd)
    if _kill_at and os.readlink("/proc/self/fd/%d" % fd).endswith("/my_mailbox"):
        _writes[0] += 1
        if _writes[0] == _kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
def write(fd, data):
    _count_write(fd)
    return _write(fd, data)
def writev(fd, buffers):
    _count_write(fd)
    return _writev(fd, buffers)
os.write = write
if _writev is not None:
    os.writev = writev
"""


def hooked_env(folder, hooks, variable, flag_name):
    """An environment whose server imports hooks at start, armed by folder/flag_name: (env, flag path).

    The hooks are a sitecustomize module in folder, which Python imports at
    start from the PYTHONPATH, so the scripts carry no test code (and one
    folder holds one set of hooks); variable names the flag to them.
    """
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(hooks)
    flag = os.path.join(folder, flag_name)
    return dict(os.environ, PYTHONPATH=folder, **{variable: flag}), flag


def killed_at_write_env(folder, count):
    """An environment for a server that kills itself with SIGKILL at its count'th write to a mailbox."""
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(FAULTS)
    return dict(os.environ, PYTHONPATH=folder, FAULT_KILL_WRITE=str(count))


def failing_fsync_env(folder):
    """An environment for a server whose next fsync of a mailbox fails once folder/fail-fsync exists.

    Returns (env, flag path).
    """
    return hooked_env(folder, FAULTS, "FAULT_FSYNC", "fail-fsync")


UNLOCK_FAULT = """\
# Injected by the tests: the next unlock of the lock file whose name FAULT_UNLOCK (a file) holds fails once, with EIO.
import errno, fcntl, os
_flock, _flag = fcntl.flock, os.environ.get("FAULT_UNLOCK")
def flock(fd, operation):
    if operation == fcntl.LOCK_UN and _flag:
        try:
            with open(_flag) as f:
                name = f.read()
            target = os.readlink("/proc/self/fd/%d" % fd)
        except (OSError, TypeError):
            name = target = ""
        if name and os.path.basename(target) == name:
            os.remove(_flag)
            raise OSError(errno.EIO, "injected unlock failure")     # still locked, as after a real EIO
    return _flock(fd, operation)
fcntl.flock = flock
"""


def failing_unlock_env(folder):
    """An environment for a server whose next unlock of a lock file fails (EIO) once folder/fail-unlock names it.

    Returns (env, flag path); writing a lock file's name (".my_mailbox.lock")
    into the flag arms the fault.
    """
    return hooked_env(folder, UNLOCK_FAULT, "FAULT_UNLOCK", "fail-unlock")


def shared_fs_env(folder):
    """An environment for a server that meets the faults of a shared file system once folder/shared-fs names one.

    Returns (env, flag path); write one of the faults FAULTS lists for
    FAULT_SHARED_FS into the flag to arm it.
    """
    return hooked_env(folder, FAULTS, "FAULT_SHARED_FS", "shared-fs")


class ServerProcess(StartedServer):
    """One of our servers running as a real subprocess in root (with --root root) on a free loopback port."""

    def __init__(self, script, root, *args, host="127.0.0.1", env=None):
        super().__init__(script, root, "--root", root, *args, env=env, host=host)


class OneServerTestCase(unittest.TestCase):
    """Starts one real server (script with server_args) in a fresh mail root of users for the whole class."""

    script = SMTP_SCRIPT
    server_args = ()
    server_env = None   # None: the tests' own environment
    users = None        # None: DEFAULT_USERS

    @classmethod
    def setUpClass(cls):
        cls.root = make_mail_root(cls.users)
        try:
            cls.server = ServerProcess(cls.script, cls.root, *cls.server_args, env=cls.server_env)
        except BaseException:
            remove_mail_root(cls.root)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        remove_mail_root(cls.root)


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


def reported_lines(server):
    """The userinfo.txt line numbers a server has reported as malformed, in order."""
    return [int(n) for n in re.findall(r"userinfo\.txt line (\d+) ", server.output())]


# --------------------------------------------------------------------------
# Raw clients
# --------------------------------------------------------------------------

class LineClient:
    """A raw TCP client that sends bytes and reads CRLF lines: the raw SMTP client, and PopClient's reader."""

    def __init__(self, host, port, timeout=DEADLINE, source=None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if source:
            # Closed with RST, so that no port of the extra address lingers in TIME_WAIT.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.file = self.sock.makefile("rb")

    def send(self, data):
        """Send text (as UTF-8) or bytes, exactly as given."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def raw_line(self):
        """Read one line as bytes, line end included; EOFError when the server has closed."""
        raw = self.file.readline()
        if not raw:
            raise EOFError("server closed the connection")
        return raw

    def line(self):
        """Read one line (without its line end) as text; EOFError when the server has closed."""
        return self.raw_line().rstrip(b"\r\n").decode("utf-8", "replace")

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

    def cmd_expecting(self, text, code):
        """Send one SMTP command; return its reply, or raise AssertionError unless its code is code."""
        reply = self.cmd(text)
        expect(reply[0] == code, "%s got %r, not %d" % (text, reply[1], code))
        return reply

    def wrap_tls(self, context=None, strict_eof=False):
        """Do the TLS handshake (after STARTTLS or STLS, or at once for implicit TLS); read and write through it.

        strict_eof: a close without a TLS close_notify raises ssl.SSLEOFError on reading, not EOF.
        """
        context = context or client_tls_context()
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost",
                                        suppress_ragged_eofs=not strict_eof)
        self.file = self.sock.makefile("rb")

    def closed(self):
        """True when the server has closed its side (reads return EOF)."""
        try:
            return self.file.read(1) == b""
        except OSError:
            return True

    def close(self):
        """Close the connection (quietly, also when it is already broken)."""
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def smtp_session(server, helo="client.test", timeout=DEADLINE, ehlo=False):
    """A raw SMTP client past the 220 greeting and, unless helo is None, a 250 HELO (or EHLO)."""
    client = server.connect(timeout)
    try:
        code, lines = client.reply()
        expect(code == 220, "greeting %r, not 220" % lines)
        if helo is not None:
            client.cmd_expecting(("EHLO " if ehlo else "HELO ") + helo, 250)
    except BaseException:
        client.close()
        raise
    return client


def send_message(client, body, sender="carol@example.org", recipients=("alice@example.org",)):
    """MAIL, RCPT to each recipient, DATA, body (CRLF lines, already dot-stuffed); return the reply to '.'."""
    client.cmd_expecting("MAIL FROM:<%s>" % sender, 250)
    for rcpt in recipients:
        client.cmd_expecting("RCPT TO:<%s>" % rcpt, 250)
    client.cmd_expecting("DATA", 354)
    client.send(body + b".\r\n")
    return client.reply()


def deliver(server, body, sender="carol@example.org", recipients=("alice@example.org",)):
    """One whole raw SMTP session that delivers body; return the code of the reply to the final '.'."""
    with smtp_session(server) as client:
        code = send_message(client, body, sender, recipients)[0]
        client.cmd("QUIT")
        return code


def rcpt_code(server, address):
    """The reply code RCPT TO:<address> gets in a fresh transaction."""
    with smtp_session(server) as client:
        client.cmd_expecting("MAIL FROM:<sender@example.org>", 250)
        return client.cmd("RCPT TO:<%s>" % address)[0]


def data_code_after(server, address):
    """The reply code DATA gets after RCPT TO:<address>, whatever RCPT got (354 only if address was taken)."""
    with smtp_session(server) as client:
        client.cmd_expecting("MAIL FROM:<sender@example.org>", 250)
        client.cmd("RCPT TO:<%s>" % address)
        return client.cmd("DATA")[0]


class PopClient:
    """A raw POP3 client reading exact bytes, for protocol tests; logs in at once when given a user."""

    def __init__(self, server, user=None, password=None, timeout=DEADLINE):
        self.client = server.connect(timeout)
        try:
            self.greeting = self.line()
            if user is not None:
                self.login(user, password)
        except BaseException:
            self.close()
            raise

    def login(self, user, password):
        """USER and PASS; raise AssertionError unless both get +OK."""
        reply = self.cmd("USER " + user)
        expect(reply.startswith("+OK"), "USER %s got %r" % (user, reply))
        reply = self.cmd("PASS " + password)
        expect(reply.startswith("+OK"), "PASS for %s got %r" % (user, reply))

    def send(self, data):
        """Send text or bytes exactly as given (no line end is added)."""
        self.client.send(data)

    def raw_line(self):
        """One line as bytes, CRLF included."""
        return self.client.raw_line()

    def line(self):
        """One line as text, without its line end."""
        return self.client.line()

    def cmd(self, text):
        """Send a command (text gets CRLF; bytes are sent as they are) and return the first reply line."""
        self.send(text if isinstance(text, bytes) else text + "\r\n")
        return self.line()

    def body(self):
        """The raw lines of a multi-line reply, up to and including '.\\r\\n', joined."""
        lines = []
        while True:
            lines.append(self.raw_line())
            if lines[-1] == b".\r\n":
                return b"".join(lines)

    def multi(self, text):
        """Send a command with a multi-line answer; return (first line, body bytes or None after -ERR)."""
        first = self.cmd(text)
        return first, (self.body() if first.startswith("+OK") else None)

    def closed(self):
        """True when the server has closed its side."""
        return self.client.closed()

    def close(self):
        """Close the connection."""
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pop_login(server, user, password):
    """A PopClient past a +OK greeting and USER; return it and the reply to PASS."""
    client = PopClient(server)
    try:
        expect(client.greeting.startswith("+OK"), "greeting %r" % client.greeting)
        client.cmd("USER " + user)
        return client, client.cmd("PASS " + password)
    except BaseException:
        client.close()
        raise


def pop_can_login(server, user, password):
    """True when user and password open a POP3 session (which is then ended with QUIT)."""
    client, reply = pop_login(server, user, password)
    with client:
        if reply.startswith("+OK"):
            client.cmd("QUIT")
            return True
        return False


# --------------------------------------------------------------------------
# mail_client.py as a subprocess
# --------------------------------------------------------------------------

SENT = mail_client.SENT_OK
CLIENT_TIMEOUT = DEADLINE / 2
LISTED_DATE = r"\d{4}-\d{2}-\d{2} : \d{2} : \d{2}"   # the date column of the client's listing

# alice's mailbox for the management tests, in the stored format (contract section 1):
# message 1 has the body lines "." and "..", stored byte-stuffed as ".." and "...".
ALICE_MAILBOX = (
    "From: bob@example.org\n"
    "To: alice@example.org\n"
    "Subject: Lunch on Friday\n"
    "Received: 2026-11-27 : 12 : 30\n"
    "Shall we meet at noon?\n"
    "..\n"
    "...\n"
    ".\n"
    "From: carol@example.com\n"
    "To: alice@example.org\n"
    "Subject: Exam results\n"
    "Received: 2026-11-28 : 09 : 05\n"
    "The results are ONLINE.\n"
    "Best, Carol\n"
    ".\n")


class Result:
    """What a finished client run printed."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.lines = stdout.splitlines()


def client_command(smtp_port, pop_port, host="127.0.0.1", *extra):
    """The command line of the client; a server that hangs shows up as the client's own error."""
    return [sys.executable, CLIENT_SCRIPT, host,
            "--smtp-port", str(smtp_port), "--pop-port", str(pop_port),
            "--timeout", str(CLIENT_TIMEOUT)] + list(extra)


def run_client(stdin, smtp_port, pop_port, host="127.0.0.1", *extra, cwd=REPO):
    """Run mail_client.py (in folder cwd) with stdin as its whole input; return a Result."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run(
        client_command(smtp_port, pop_port, host, *extra),
        input=stdin.encode("utf-8"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=DEADLINE, env=env, cwd=cwd)
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace").replace("\r\n", "\n"),
                  proc.stderr.decode("utf-8", "replace"))


def closed_port():
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mail(sender="alice@example.org", to="bob@example.org", subject="Lunch", body=("Hi Bob",)):
    """The menu choice and typed lines of one mail, final '.' included."""
    return "a\n" + "\n".join(["From: " + sender, "To: " + to, "Subject: " + subject]
                             + list(body) + ["."]) + "\n"


class ClientTestCase(unittest.TestCase):
    """Assertions about a finished client run."""

    def assertClean(self, result):
        """The client ended by itself with exit code 0 and printed nothing on stderr."""
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stderr, "", result.stdout)

    def assertNoError(self, result):
        """The client printed no error."""
        self.assertNotIn("Error", result.stdout)


# --------------------------------------------------------------------------
# Scripted servers, for what the real ones cannot show
# --------------------------------------------------------------------------

class FakeServer:
    """A scripted server on a loopback port (a free one unless given) that records every line it receives."""

    def __init__(self, host="127.0.0.1", port=0):
        self.listener = socket.socket()
        if port:
            # Reuse lets a fixed port come back past TIME_WAIT left by an earlier run; a port
            # another program listens on still cannot be bound.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError:
            self.listener.close()
            raise
        self.listener.listen(5)
        self.host, self.port = host, self.listener.getsockname()[1]
        self.received = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            conn, _ = self.listener.accept()
            if self.stopping:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(DEADLINE)
        rfile = conn.makefile("rb")
        try:
            self.session(conn, rfile)
        except OSError:
            pass
        finally:
            rfile.close()
            conn.close()

    def readline(self, rfile):
        """The next line from the client, recorded; None at EOF."""
        raw = rfile.readline()
        if not raw:
            return None
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        self.received.append(line)
        return line

    @staticmethod
    def send(conn, *lines):
        """Send each line with CRLF."""
        conn.sendall("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def session(self, conn, rfile):
        """Hang up at once: a server that vanishes."""

    def close(self):
        """Stop accepting (a connection of our own wakes the accept loop) and free the port."""
        self.stopping = True
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            pass
        self.thread.join(DEADLINE)
        self.listener.close()


SMTP_COMMAND = re.compile(r"(MAIL_FROM:|RCPT_TO:|MAIL FROM:|RCPT TO:|\S*)", re.IGNORECASE)


def command_word(line):
    """A line's SMTP command in upper case; MAIL_FROM:, RCPT_TO:, MAIL FROM:, RCPT TO: are one word each."""
    return SMTP_COMMAND.match(line).group(1).upper()


class FakeSMTPServer(FakeServer):
    """Speaks the contract's SMTP dialogue (section 2), recording every line; REPLIES: what each command gets."""

    # Keys in lower case are events, not commands (command words are upper case).
    REPLIES = {
        "greeting": ("220 fake.test Service ready",),
        "HELO": ("250 OK Hello",),
        "EHLO": ("250 OK Hello",),
        "MAIL_FROM:": ("250 Sender ok",),
        "MAIL FROM:": ("250 Sender ok",),
        "RCPT_TO:": ("250 Recipient ok",),
        "RCPT TO:": ("250 Recipient ok",),
        "DATA": ('354 Enter mail, end with "." on a line by itself',),
        "end of data": ("250 OK Message accepted for delivery",),
        "QUIT": ("221 fake.test closing connection",),
        "unknown": ("500 Unknown command",),
    }

    def session(self, conn, rfile):
        """Greet, then answer each command from REPLIES, taking DATA up to its '.', until QUIT or EOF."""
        self.send(conn, *self.REPLIES["greeting"])
        while True:
            line = self.readline(rfile)
            if line is None:
                return
            word = command_word(line)
            reply = self.REPLIES.get(word, self.REPLIES["unknown"])
            self.send(conn, *reply)
            if word == "DATA" and reply[-1].startswith("354"):
                while self.readline(rfile) not in (".", None):
                    pass
                self.send(conn, *self.REPLIES["end of data"])
            elif word == "QUIT":
                return


class StandardSMTPServer(FakeSMTPServer):
    """Speaks only RFC 5321: answers 500 to MAIL_FROM:, like Postfix or aiosmtpd."""

    REPLIES = {
        "greeting": ("220 fake.example ESMTP",),
        "EHLO": ("250-fake.example", "250-8BITMIME", "250 SIZE 100000"),
        "HELO": ("250 fake.example",),
        "MAIL FROM:": ("250 2.1.0 Ok",),
        "RCPT TO:": ("250 2.1.0 Ok",),
        "DATA": ("354 End data with <CR><LF>.<CR><LF>",),
        "end of data": ("250 2.0.0 Ok: queued",),
        "QUIT": ("221 2.0.0 Bye",),
        "unknown": ("500 5.5.2 Error: command not recognized",),
    }


class NoTopPOP3Server(FakeServer):
    """A minimal RFC 1939 server without the optional TOP command."""

    GREETING = "+OK fake POP3 ready"
    GOODBYE = "+OK fake POP3 says bye"

    def __init__(self, messages, host="127.0.0.1", port=0):
        self.messages = messages  # lists of lines, not byte-stuffed
        super().__init__(host, port)

    def session(self, conn, rfile):
        """Greet, then answer USER, PASS, STAT, LIST, RETR, DELE, RSET, NOOP and QUIT (the rest -ERR)."""
        self.send(conn, self.GREETING)
        sizes = [sum(len(line) + 2 for line in m) for m in self.messages]
        while True:
            line = self.readline(rfile)
            if line is None:
                return
            words = line.split()
            verb = words[0].upper() if words else ""
            if verb in ("USER", "PASS", "NOOP", "RSET", "DELE"):
                self.send(conn, "+OK")
            elif verb == "STAT":
                self.send(conn, "+OK %d %d" % (len(sizes), sum(sizes)))
            elif verb == "LIST":
                self.send(conn, "+OK", *["%d %d" % (i + 1, s) for i, s in enumerate(sizes)] + ["."])
            elif verb == "RETR":
                lines = self.messages[int(words[1]) - 1]
                stuffed = ["." + l if l.startswith(".") else l for l in lines]
                self.send(conn, "+OK message follows", *stuffed + ["."])
            elif verb == "QUIT":
                self.send(conn, self.GOODBYE)
                return
            else:
                self.send(conn, "-ERR unknown command")


# --------------------------------------------------------------------------
# Mail for other domains (test_queue.py): a scripted remote SMTP server, queue files, faults
# --------------------------------------------------------------------------

class RemoteSMTPServer(FakeServer):
    """A scripted ESMTP server on loopback standing in for another domain's MX or a smarthost.

    Each reply can be set: greeting (None: say nothing, a server that hangs),
    rcpt (address -> reply, else "250 2.1.5 Ok"), data (the replies to the
    end of data, one per message, the last one repeated; "hang": no reply
    until release is set).  tls offers
    STARTTLS with the test certificate; login ("user", "password") offers
    AUTH PLAIN and checks it.  What each accepted message was is in
    messages: dicts of sender, recipients, data (the bytes between DATA and
    its '.', still dot-stuffed), mail (the MAIL command line), tls (bool).
    trickle (seconds): the greeting goes one byte at a time, this far apart
    (a tarpit); data_delay (seconds): each end-of-data reply waits so long.
    sessions counts the connections, most_at_once the most open together.
    """

    def __init__(self, host="127.0.0.1", port=0, tls=False, login=None, extensions=("8BITMIME", "SMTPUTF8")):
        self.greeting = "220 remote.test ESMTP"
        self.rcpt = {}
        self.data = ["250 2.0.0 Ok: queued"]
        self.tls = tls
        self.login = login
        self.extensions = list(extensions)
        self.messages = []
        self.sessions = 0
        self.active = self.most_at_once = 0
        self.counting = threading.Lock()
        self.trickle = None
        self.data_delay = 0.0
        self.peers = []                   # the address each session came from
        self.hung = threading.Event()     # a "hang" reply to the end of data has been reached
        self.release = threading.Event()  # ends that hang (the connection is closed unanswered)
        super().__init__(host, port)

    def keywords(self, secure):
        """What EHLO advertises now."""
        words = ["SIZE 10485760"] + self.extensions
        if self.tls and not secure:
            words.append("STARTTLS")
        if self.login:
            words.append("AUTH PLAIN")
        return words

    def session(self, conn, rfile):
        """Count the session, and run it."""
        with self.counting:
            self.sessions += 1
            self.active += 1
            self.most_at_once = max(self.most_at_once, self.active)
            self.peers.append(conn.getpeername()[0])
        try:
            self.converse(conn, rfile)
        finally:
            with self.counting:
                self.active -= 1

    def converse(self, conn, rfile):
        """Greet (or hang, or trickle), then answer EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, RSET, QUIT."""
        if self.host != "127.0.0.1":      # an extra loopback address: closed with RST, no TIME_WAIT
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if self.greeting is None:
            while self.readline(rfile) is not None:
                pass
            return
        if self.trickle is not None:      # a tarpit: each byte keeps the client's wait alive
            for byte in (self.greeting + "\r\n").encode():
                conn.sendall(bytes([byte]))   # fails once the client has given up: the session ends
                time.sleep(self.trickle)      # the pace of the tarpit, not a wait for anything
        else:
            self.send(conn, self.greeting)
        state = {"secure": False, "sender": None, "recipients": [], "mail": ""}
        try:
            self.dialogue(conn, rfile, state)
        finally:
            if state["secure"]:           # FakeServer closes the plain socket, not its TLS wrapper
                state["secure"].close()

    def dialogue(self, conn, rfile, state):
        """Answer commands until QUIT or EOF."""
        while True:
            line = self.readline(rfile)
            if line is None:
                return
            verb = line.split(" ")[0].upper()
            if verb == "STARTTLS" and self.tls:
                self.send(conn, "220 2.0.0 go ahead")
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(TLS_CERT, TLS_KEY)
                conn = context.wrap_socket(conn, server_side=True)
                rfile = conn.makefile("rb")
                state["secure"] = conn
            elif verb == "DATA":
                self.receive_data(conn, rfile, state)
            elif verb == "QUIT":
                self.send(conn, "221 2.0.0 Bye")
                return
            else:
                self.send(conn, *self.answer(verb, line, state))

    def answer(self, verb, line, state):
        """The reply lines to a command other than STARTTLS, DATA and QUIT."""
        if verb == "EHLO":
            words = ["remote.test"] + self.keywords(state["secure"])
            return ["250-" + w for w in words[:-1]] + ["250 " + words[-1]]
        if verb == "AUTH":
            expected = "\0%s\0%s" % self.login if self.login else None
            given = base64.b64decode(line.split()[-1]).decode() if len(line.split()) == 3 else ""
            return ["235 2.7.0 Ok" if given == expected else "535 5.7.8 bad login"]
        if verb == "MAIL":
            state.update(sender=line[10:].partition(">")[0].lstrip("<"), recipients=[], mail=line)
            return ["250 2.1.0 Ok"]
        if verb == "RCPT":
            address = line[8:].partition(">")[0].lstrip("<")
            reply = self.rcpt.get(address, "250 2.1.5 Ok")
            if reply.startswith("250"):
                state["recipients"].append(address)
            return [reply]
        if verb in ("RSET", "NOOP", "HELO"):
            return ["250 2.0.0 Ok"]
        return ["502 5.5.1 not here"]

    def receive_data(self, conn, rfile, state):
        """Take a message after DATA; record it when the scripted reply accepts it."""
        if not state["recipients"]:
            return self.send(conn, "554 5.5.1 no valid recipients")
        self.send(conn, "354 go ahead")
        lines = []
        while True:
            raw = rfile.readline()
            if raw in (b".\r\n", b""):
                break
            lines.append(raw)
        reply = self.data.pop(0) if len(self.data) > 1 else self.data[0]
        time.sleep(self.data_delay)       # a slow server: how sessions at once are counted
        if reply == "hang":               # the message is in, the reply never comes
            self.hung.set()
            self.release.wait(DEADLINE)
            return
        if reply.startswith("250"):
            self.messages.append({"sender": state["sender"], "recipients": state["recipients"],
                                  "data": b"".join(lines), "mail": state["mail"], "tls": bool(state["secure"])})
        self.send(conn, reply)


def run_queue_command(root, *args):
    """Run mailserver_smtp.py --queue / --flush (...) on a root; return (exit code, stdout and stderr)."""
    proc = subprocess.run([sys.executable, SMTP_SCRIPT] + list(args) + ["--root", root],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=DEADLINE)
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def run_queue_listing(root):
    """What --queue prints for a root (it must succeed)."""
    code, listing = run_queue_command(root, "--queue")
    expect(code == 0, "--queue failed: %s" % listing)
    return listing


def queue_folder(root):
    """Where a mail root's outbound queue lives."""
    return os.path.join(root, ".queue")


def queue_files(root, suffix=""):
    """The names in a root's queue folder that are queue files (suffix "") or end with suffix."""
    try:
        names = os.listdir(queue_folder(root))
    except FileNotFoundError:
        return []
    if suffix:
        return sorted(name for name in names if name.endswith(suffix))
    return sorted(name for name in names if re.match(r"[0-9A-F]{21}\Z", name))


QUEUE_FAULTS = """\
# Injected by the tests: renaming a file into ROOT/.queue fails once FAULT_QUEUE names a file that exists.
import errno, os
_replace, _flag = os.replace, os.environ.get("FAULT_QUEUE")
def replace(src, dst, *args, **kwargs):
    if _flag and os.path.exists(_flag) and "/.queue/" in str(dst):
        os.remove(_flag)
        raise OSError(errno.EIO, "injected rename failure")
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
"""


def failing_queue_env(folder):
    """An environment for a server whose next rename into its queue fails once folder/fail-queue exists.

    Returns (env, flag path).
    """
    return hooked_env(folder, QUEUE_FAULTS, "FAULT_QUEUE", "fail-queue")


# The DNS responder for the MX tests.  Written apart from the resolver in
# mailserver_smtp.py, on purpose: a misreading of RFC 1035 shared by both would
# otherwise go unseen.

DNS_TEST_TYPES = {"A": 1, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}   # RFC 1035 3.2.2, RFC 3596 2.1
DNS_TEST_TXT_STRING = 255       # RFC 1035 3.3: octets of one character-string
DNS_TEST_RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}
DNS_TEST_UDP_LIMIT = 512        # RFC 1035 4.2.1: a longer answer goes out truncated (TC=1)
DNS_TEST_QR_AA_RA = 0x8580      # RFC 1035 4.1.1: response, authoritative, recursion available
DNS_TEST_TC = 0x0200
DNS_TEST_RD = 0x0100
DNS_TEST_POINTER_TO_QUESTION = b"\xc0\x0c"   # RFC 1035 4.1.4: the question's name, right after the header
DNS_TEST_BIND_TRIES = 20        # ports tried for a UDP port whose TCP twin is free too
DNS_TEST_TCP_TIMEOUT = 10.0     # seconds a TCP client of the responder may idle


def dns_test_name(name):
    """A zone name as the responder compares it: lower case, without the trailing dot."""
    return name.lower().rstrip(".")


def dns_test_encode_name(name):
    """A name in wire form (RFC 1035 3.1); "" and "." are the root."""
    name = dns_test_name(name)
    labels = name.split(".") if name else []
    return b"".join(bytes((len(label),)) + label.encode("ascii") for label in labels) + b"\0"


def dns_test_read_question(query):
    """(id, flags, name, type number, question bytes) of a query; None if it is not a plain one."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack_from("!HHH", query)
    offset, labels = 12, []
    while offset < len(query) and query[offset] and query[offset] < 64:
        labels.append(query[offset + 1:offset + 1 + query[offset]].decode("ascii", "replace").lower())
        offset += 1 + query[offset]
    if qdcount != 1 or offset + 5 > len(query) or query[offset]:
        return None
    qtype = struct.unpack_from("!H", query, offset + 1)[0]
    return qid, flags, ".".join(labels), qtype, query[12:offset + 5]


def dns_test_type_name(qtype):
    """The zone's name of a type number ("MX"), or the number as text for a type the zone cannot hold."""
    return next((name for name, number in DNS_TEST_TYPES.items() if number == qtype), str(qtype))


def dns_test_rdata(rtype, value):
    """The wire data of one record given as the zone holds it."""
    if rtype == "A":
        return socket.inet_pton(socket.AF_INET, value)
    if rtype == "AAAA":
        return socket.inet_pton(socket.AF_INET6, value)
    if rtype == "MX":
        return struct.pack("!H", value[0]) + dns_test_encode_name(value[1])
    if rtype == "TXT":
        return dns_test_txt_rdata(value)
    return dns_test_encode_name(value)   # CNAME, PTR


def dns_test_txt_rdata(value):
    """A TXT record's data (RFC 1035 3.3.14): a tuple of strings as they are, one long text cut every 255 octets."""
    if isinstance(value, (str, bytes)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        value = [data[i:i + DNS_TEST_TXT_STRING] for i in range(0, len(data), DNS_TEST_TXT_STRING)] or [b""]
    strings = [part.encode("utf-8") if isinstance(part, str) else part for part in value]
    return b"".join(bytes((len(part),)) + part for part in strings)


class DNSResponder:
    """A threaded DNS server on a loopback port (UDP, and TCP on the same port) answering from a zone dict.

    zone maps (name, type) to a list of records (MX as (preference,
    exchange), A, AAAA, CNAME and PTR as strings, TXT as one text, cut into
    255-octet strings, or a tuple of its strings) or to an rcode name such as
    "SERVFAIL", "NXDOMAIN", "REFUSED"; type "*" stands for every type.  A
    name in no key gets NXDOMAIN, a known name without the type an empty
    NOERROR, and CNAMEs are followed as a recursive server does.

    Behaviour per name, in sets (and a dict) that a test may change at any time:
    truncate: TC=1 over UDP, the answer only over TCP;  drop: never answered;
    wrong_id: a false NXDOMAIN with another id first;  spoof: a false NXDOMAIN
    with the right id from another port first;  unchased: its CNAME is not
    followed in the answer;  raw[name]: a function from the query's bytes to
    the reply's bytes, for malformed replies.
    """

    def __init__(self, zone, host="127.0.0.1", truncate=(), drop=(), wrong_id=(), spoof=(), unchased=()):
        self.zone = {(dns_test_name(name), rtype): value for (name, rtype), value in zone.items()}
        self.truncate, self.drop, self.wrong_id = set(truncate), set(drop), set(wrong_id)
        self.spoof, self.unchased, self.raw = set(spoof), set(unchased), {}
        self.ttl = 300           # the TTL of every answer record
        self.negative_ttl = None # when set, an answer without records carries an SOA with this TTL (RFC 2308 3)
        self.queries = []        # (name, type) of every question, UDP and TCP, in arrival order
        self.tcp_queries = []    # those that came over TCP
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.udp, self.tcp = self._bind(host)
        self.address = self.udp.getsockname()[:2]
        self.stopping = False
        self.threads = [threading.Thread(target=loop, daemon=True) for loop in (self._serve_udp, self._accept)]
        for thread in self.threads:
            thread.start()

    def _bind(self, host):
        """A UDP socket on a free port and a TCP listener on the same port number."""
        for _ in range(DNS_TEST_BIND_TRIES):
            udp = socket.socket(self.family, socket.SOCK_DGRAM)
            udp.bind((host, 0))
            tcp = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                tcp.bind((host, udp.getsockname()[1]))
            except OSError:   # that TCP port is taken: try another UDP one
                udp.close()
                tcp.close()
                continue
            tcp.listen(5)
            return udp, tcp
        raise OSError("no port free for both UDP and TCP")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Stop both loops (a datagram and a connection of our own wake them) and free the port."""
        self.stopping = True
        with socket.socket(self.family, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", self.address)
        try:
            socket.create_connection(self.address, timeout=1).close()
        except OSError:
            pass
        for thread in self.threads:
            thread.join(DNS_TEST_TCP_TIMEOUT)
        self.udp.close()
        self.tcp.close()

    def lookup(self, name, rtype):
        """(rcode name, [(owner, type, value)]) for a question, as a recursive server would answer it."""
        answers, owner = [], name
        for _ in range(16):   # a CNAME loop in a test zone ends as SERVFAIL, as in real servers
            value = self.zone.get((owner, rtype), self.zone.get((owner, "*")))
            if isinstance(value, str):
                return value, answers
            if value is not None:
                return "NOERROR", answers + [(owner, rtype, record) for record in value]
            cname = self.zone.get((owner, "CNAME"))
            if not cname or rtype == "CNAME":
                known = any(key[0] == owner for key in self.zone)
                return ("NOERROR" if known else "NXDOMAIN"), answers
            answers.append((owner, "CNAME", cname[0]))
            if owner in self.unchased:
                return "NOERROR", answers
            owner = dns_test_name(cname[0])
        return "SERVFAIL", answers

    def reply(self, question, limit=None):
        """The reply's bytes to a parsed question; over UDP (limit given) a long one is cut to TC=1."""
        qid, flags, name, qtype, question_bytes = question
        rcode, answers = self.lookup(name, dns_test_type_name(qtype))
        body = b"".join(self._record(name, owner, kind, value) for owner, kind, value in answers)
        header = DNS_TEST_QR_AA_RA | (flags & DNS_TEST_RD) | DNS_TEST_RCODES[rcode]
        soa = b""
        if self.negative_ttl is not None and rcode in ("NOERROR", "NXDOMAIN") and not any(
                kind == dns_test_type_name(qtype) for _, kind, _ in answers):
            soa = self._soa(name)
        message = (struct.pack("!HHHHHH", qid, header, 1, len(answers), 1 if soa else 0, 0)
                   + question_bytes + body + soa)
        if limit is not None and (len(message) > limit or name in self.truncate):
            message = struct.pack("!HHHHHH", qid, header | DNS_TEST_TC, 1, 0, 0, 0) + question_bytes
        return message

    def _record(self, qname, owner, rtype, value):
        """One answer record; an owner equal to the question's name is a pointer to it."""
        data = dns_test_rdata(rtype, value)
        owner_bytes = DNS_TEST_POINTER_TO_QUESTION if owner == qname else dns_test_encode_name(owner)
        return owner_bytes + struct.pack("!HHIH", DNS_TEST_TYPES[rtype], 1, self.ttl, len(data)) + data

    def _soa(self, name):
        """An SOA record for the authority section of a negative answer: TTL and MINIMUM negative_ttl."""
        zone = dns_test_encode_name(".".join(name.split(".")[-2:]))
        data = zone + dns_test_encode_name("hostmaster." + name) + struct.pack(
            "!IIIII", 1, 3600, 600, 86400, self.negative_ttl)
        return zone + struct.pack("!HHIH", 6, 1, self.negative_ttl, len(data)) + data

    def _answer(self, query, tcp):
        """The reply to a query's bytes, recorded; None when it gets none (unreadable, or dropped)."""
        question = dns_test_read_question(query)
        if question is None:
            return None
        name, rtype = question[2], dns_test_type_name(question[3])
        self.queries.append((name, rtype))
        if tcp:
            self.tcp_queries.append((name, rtype))
        if name in self.drop:
            return None
        if name in self.raw:
            return self.raw[name](query)
        return self.reply(question, None if tcp else DNS_TEST_UDP_LIMIT)

    def _false_answer(self, query, qid):
        """An NXDOMAIN for the query with the id qid: what a resolver must not believe."""
        flags = DNS_TEST_QR_AA_RA | DNS_TEST_RCODES["NXDOMAIN"]
        return struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 0) + dns_test_read_question(query)[4]

    def _serve_udp(self):
        """Answer each datagram, sending the false answers first for the names that get them."""
        while True:
            query, client = self.udp.recvfrom(65535)
            if self.stopping:
                return
            reply = self._answer(query, tcp=False)
            if reply is None:
                continue
            qid, _, name, _, _ = dns_test_read_question(query)
            if name in self.wrong_id:
                self.udp.sendto(self._false_answer(query, qid ^ 0x5A5A), client)
            if name in self.spoof:
                with socket.socket(self.family, socket.SOCK_DGRAM) as other:
                    other.bind((self.address[0], 0))
                    other.sendto(self._false_answer(query, qid), client)
            self.udp.sendto(reply, client)

    def _accept(self):
        """Take TCP connections, one thread each, until closed."""
        while True:
            conn, _ = self.tcp.accept()
            if self.stopping:
                conn.close()
                return
            threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()

    def _serve_tcp(self, conn):
        """Answer length-prefixed queries (RFC 1035 4.2.2) until the client closes."""
        conn.settimeout(DNS_TEST_TCP_TIMEOUT)
        with conn, conn.makefile("rb") as rfile:
            try:
                while True:
                    prefix = rfile.read(2)
                    query = rfile.read(struct.unpack("!H", prefix)[0]) if len(prefix) == 2 else b""
                    if not query:
                        return
                    reply = self._answer(query, tcp=True)
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                pass

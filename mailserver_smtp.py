#!/usr/bin/env python3
"""SMTP server of the course mail system: accepts mail and appends it to per-user mailboxes.

    python mailserver_smtp.py 2525 [--host ADDR] [--domain NAME] [--root DIR] ...

One thread serves each connection.  A message is written whole, under a lock
shared with the POP3 server, and fsync'd before the client hears 250.  The
mail-root part (users, locks) is also what pop_server.py uses, by importing it.
"""

import argparse
import logging
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import _thread

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
HEADER_NAME = re.compile(rb"[!-9;-~]+\Z")   # RFC 5322 2.2: printable ASCII but ':'
LF_DATA_END = re.compile(rb"\r?\n\.\r?\n")  # a lone '.' line, in a session typed with bare LF

DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_TIMEOUT = 300
DEFAULT_MAX_CONNECTIONS = 100
MAX_COMMAND_LINE = 512       # RFC 5321 4.5.3.1.4, CRLF included
MAX_TEXT_LINE = 1000         # RFC 5321 4.5.3.1.6, CRLF included
MAX_PATH = 256               # RFC 5321 4.5.3.1.3
MAX_RECIPIENTS = 100         # RFC 5321 4.5.3.1.8
MAX_BAD_COMMANDS = 10        # in a row, then 421 and close
MESSAGE_TOO_LARGE = "552 Message exceeds fixed maximum message size"
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
    parser.add_argument("--tls-cert", metavar="FILE", help="certificate (PEM) for STARTTLS")
    parser.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for STARTTLS")
    parser.add_argument("--require-tls", action="store_true",
                        help="refuse mail until the client has used STARTTLS")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("PORT must be between 0 and 65535")
    if args.max_size < 1 or args.max_connections < 1 or args.timeout <= 0:
        parser.error("--max-size, --max-connections and --timeout must be positive")
    args.tls = tls_context(parser, args.tls_cert, args.tls_key, args.require_tls)
    return args


def tls_context(parser, cert, key, required):
    """The server's TLS context from --tls-cert/--tls-key (None without them)."""
    if not cert and not key:
        if required:
            parser.error("--require-tls needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        parser.error("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        parser.error("cannot load the TLS certificate or key: %s" % exc)
    return context


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
            fields = line.split(None, 1)      # the password is the rest: it may hold spaces
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
        """Where a user's mailbox file is."""
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
            if self._fd is None:    # opened once, then kept: two system calls fewer per use
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            if _lock_fd(self._fd, blocking):
                return True
        except BaseException:
            self._thread_lock.release()
            raise
        self._thread_lock.release()
        return False

    def release(self):
        """Give the lock up."""
        try:
            _unlock_fd(self._fd)
        finally:
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


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_mailbox(path):
    """Open a mailbox for appending, creating it (durably) when it is absent."""
    flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        fd = os.open(path, flags | os.O_CREAT, 0o600)
        fsync_directory(os.path.dirname(path))
        return fd


def fsync_directory(path):
    """Make a new or renamed directory entry durable (where a directory can be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class MailboxFile:
    """One user's my_mailbox as this process appends to it, with fsyncs shared between appends.

    An fsync flushes every write made to the file before it started, so
    deliveries that finish writing while another one's fsync is pending
    need only one more fsync between them, not one each (group commit).
    """

    _registry = {}
    _registry_guard = threading.Lock()

    @classmethod
    def at(cls, path):
        """The one MailboxFile of this process for path."""
        with cls._registry_guard:
            box = cls._registry.get(path)
            if box is None:
                box = cls._registry[path] = cls(path)
            return box

    def __init__(self, path):
        self.path = path
        self.lock = delivery_lock(path)
        # Where the file ended after our last append, as (inode, size): a file
        # still ending there ends in a whole message, so its tail need not be read.
        self.clean_end = None
        self.appended = 0              # appends written so far
        self.synced = 0                # appends known to be on disk
        self._sync_guard = threading.Lock()

    def append(self, message):
        """Write message at the end (the caller holds self.lock); return (fd, ticket, old size)."""
        fd = _open_mailbox(self.path)
        st = None
        try:
            st = os.fstat(fd)
            seal = b""
            if st.st_size and self.clean_end != (st.st_ino, st.st_size):
                seal = _torn_tail_seal(fd, st.st_size)
            _write_all(fd, seal + message)
        except BaseException:
            self.clean_end = None
            if st is not None:
                _cut_back(fd, st.st_size)
            os.close(fd)
            raise
        self.clean_end = (st.st_ino, st.st_size + len(seal) + len(message))
        self.appended += 1
        return fd, self.appended, st.st_size

    def sync(self, fd, ticket):
        """Return once the append numbered ticket (written through fd) is on disk.

        A POP3 rewrite that replaced the file meanwhile has copied and
        fsync'd every earlier append, so fsyncing fd's file is enough.
        """
        with self._sync_guard:
            if self.synced >= ticket:
                return
            covered = self.appended
            os.fsync(fd)
            self.synced = max(self.synced, covered)


def _cut_back(fd, size):
    """Undo a failed append: nothing partial may stay in a mailbox."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        log.exception("could not undo a partial delivery")


def _torn_tail_seal(fd, size):
    """What to write first so a new message never glues onto a torn last message.

    A power cut during an earlier append can leave a message without its
    final '.' line; closing it keeps its bytes and keeps the next one apart.
    """
    os.lseek(fd, max(0, size - 3), os.SEEK_SET)
    tail = os.read(fd, 3)
    if tail == b"\n.\n" or (size == 2 and tail == b".\n"):
        return b""
    return (b"" if tail.endswith(b"\n") else b"\n") + b".\n"


def deliver(message, mailbox_paths):
    """Append one stored-form message to every mailbox; return once it is on disk in all.

    The mailboxes are locked together (in a fixed order, so two deliveries
    cannot deadlock) while the message is written, so that on a write error
    each can be cut back to its old size: a message is in all or in none.
    """
    boxes = [MailboxFile.at(path) for path in sorted(set(mailbox_paths))]
    written = []
    for box in boxes:
        box.lock.acquire()
    try:
        for box in boxes:
            written.append((box,) + box.append(message))
    except BaseException:
        for box, fd, _, old_size in written:
            box.clean_end = None
            _cut_back(fd, old_size)
            os.close(fd)
        raise
    finally:
        for box in reversed(boxes):
            box.lock.release()
    try:
        for box, fd, ticket, _ in written:
            box.sync(fd, ticket)
    finally:
        for _, fd, _, _ in written:
            os.close(fd)


# --------------------------------------------------------------------------
# Message parsing: from SMTP DATA to the stored form
# --------------------------------------------------------------------------

def stored_body(data, strict):
    """Turn the DATA bytes (without their terminator) into mailbox lines ending in \\n.

    The mailbox keeps SMTP's dot-stuffing, so well-formed lines are stored as
    they came.  In a CRLF session a bare LF is not a line end on the wire,
    but it is one in the file: each piece it starts is unstuffed/stuffed on
    its own so that no piece can ever read as a lone "." terminator.
    Returns (stored bytes, longest wire line length).
    """
    if not data:
        return b"", 0
    if not strict:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]
        return b"\n".join(lines) + b"\n", max(map(len, lines))
    lines = data.split(b"\r\n")
    longest = max(map(len, lines))
    if data.count(b"\n") == len(lines) - 1:   # no bare LF: the wire form is the stored form
        return data.replace(b"\r\n", b"\n") + b"\n", longest
    pieces = []
    for line in lines:
        if line.startswith(b"."):
            line = line[1:]
        for piece in line.split(b"\n"):
            pieces.append(b"." + piece if piece.startswith(b".") else piece)
    return b"\n".join(pieces) + b"\n", longest


def message_size(body):
    """The RFC 1870 size of a stored body: CRLF line ends counted, stuffing dots not."""
    stuffed = body.count(b"\n.") + body.startswith(b".")
    return len(body) + body.count(b"\n") - stuffed


def stored_message(body, sender, recipients, received):
    """Add the headers the mailbox format asks for to a stored body; end it with '.'.

    Missing From/To come from the envelope; Received goes right after
    Subject, or, with no Subject, an empty Subject and then Received close
    the header block.
    """
    present = set()
    subject_line_end = subject_end = None   # after the Subject line; after its folded lines too
    pos = 0
    while pos < len(body):
        end = body.find(b"\n", pos) + 1
        line = body[pos:end - 1]
        if line[:1] in (b" ", b"\t") and pos:        # a folded continuation line
            if subject_end == pos:
                subject_end = end
        else:
            name, colon, _ = line.partition(b":")
            if not colon or not HEADER_NAME.match(name):
                break
            name = name.lower()
            if name == b"subject" and name not in present:
                subject_line_end = subject_end = end
            present.add(name)
        pos = end
    # Folding belongs to RFC 5322 headers, which a blank line ends.  In the
    # course format the body follows Subject at once, and an indented first
    # body line must stay in the body.
    if body[pos:pos + 1] != b"\n":
        subject_end = subject_line_end
    head = b""
    if b"from" not in present:
        head += b"From: " + sender + b"\n"
    if b"to" not in present:
        head += b"To: " + b", ".join(recipients) + b"\n"
    received = b"Received: " + received + b"\n"
    if pos == len(body):                   # the mailbox format wants one body line at least
        body += b"\n"
    if subject_end is None:
        return b"".join((head, body[:pos], b"Subject: \n", received, body[pos:], b".\n"))
    return b"".join((head, body[:subject_end], received, body[subject_end:], b".\n"))


def received_stamp():
    """The Received: value for now, local time, as the mailbox format writes it."""
    return time.strftime("%Y-%m-%d : %H : %M").encode("ascii")


def parse_path(text):
    """Split '<addr> PARAMS' into (addr, [params]); None when it is not a valid path."""
    text = text.strip()
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return None
        address, rest = text[1:end], text[end + 1:]
    else:
        address, _, rest = text.partition(" ")
    if address.startswith("@") and ":" in address:    # obsolete source route: ignore it
        address = address.split(":", 1)[1]
    if len(address) > MAX_PATH or any(c in address for c in ' <>"\\,;') or \
            any(ord(c) < 33 or ord(c) == 127 for c in address):
        return None
    local, at, domain = address.rpartition("@")
    if at and not (local and domain):
        return None
    return address, rest.split()


# --------------------------------------------------------------------------
# The SMTP session
# --------------------------------------------------------------------------

class ConnectionClosed(Exception):
    """The client closed its side of the connection."""


class LineTooLong(Exception):
    """A command line went past the limit; it has been read and thrown away."""


class LineReader:
    """Buffered reading of command lines and DATA blocks from a socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self):
        """Read what the client has sent so far into the buffer."""
        chunk = self.sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionClosed()
        self.buffer += chunk

    def readline(self, limit):
        """Return (line without its end, True if it ended in CRLF); raise LineTooLong past limit."""
        scanned = 0
        while True:
            end = self.buffer.find(b"\n", scanned)
            if end >= 0:
                break
            if len(self.buffer) >= limit:      # throw the line away as it comes in
                del self.buffer[:]
                scanned = 0
                limit = -1
            else:
                scanned = len(self.buffer)
            self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        if limit < 0 or end + 1 > limit:
            raise LineTooLong()
        if line.endswith(b"\r"):
            return line[:-1], True
        return line, False

    def read_data(self, strict, max_size):
        """Read a DATA block up to its lone '.' line; return its bytes, or None past max_size bytes.

        In a CRLF (strict) session only <CRLF>.<CRLF> ends the data, so a body
        holding "\\n.\\n" or "\\r.\\n" cannot end the message early and smuggle
        what follows in as a second message.  A session typed with bare LF
        ends at any line holding only '.'.  Oversized data is read and
        thrown away, keeping only the last few bytes to spot the end.
        """
        buffer = self.buffer
        # The DATA command's own line end, put back so that a '.' on the very
        # first line is found like any other end of data.
        buffer[:0] = b"\r\n"
        scanned = 0
        dropped = False
        while True:
            if strict:
                end = buffer.find(b"\r\n.\r\n", scanned)
                if end >= 0:
                    skip = 5
                    break
            else:
                found = LF_DATA_END.search(buffer, scanned)
                if found:
                    end, skip = found.start(), len(found.group())
                    break
            if len(buffer) > max_size + 5:
                del buffer[:-4]
                dropped = True
            scanned = max(0, len(buffer) - 4)
            self._fill()
        data = None if dropped or end - 2 > max_size else bytes(buffer[2:end])
        del buffer[:end + skip]
        return data

    def has_buffered(self):
        return bool(self.buffer)


class SMTPSession:
    """One client's SMTP conversation: its state and one smtp_VERB method per command."""

    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.reader = LineReader(sock)
        self.pending = []            # replies not yet sent: one write for a pipelined batch
        self.verbose = server.verbose
        self.open = True
        self.bad_commands = 0
        self.crlf = True             # did the last command line end in CRLF?
        self.client_name = None      # from HELO/EHLO
        self.tls_active = False
        self.delivered = 0
        self._reset()

    def _reset(self):
        """Forget the transaction in progress (sender and recipients)."""
        self.sender = None
        self.recipients = []         # addresses as given, in order
        self.logins = []             # their mailbox owners, without repeats

    # -- input and output

    def reply(self, *lines):
        """Queue a reply (several lines for a multi-line one); flush() sends the queue."""
        if self.verbose:
            for line in lines:
                log.info("%s S: %s", self.peer, line)
        code = lines[-1]
        if code[1] == "0" and code[0] == "5":   # 500-504: syntax and sequence errors
            self.bad_commands += 1
        elif code[0] in "23":
            self.bad_commands = 0
        self.pending.extend(lines)

    def flush(self):
        """Send the queued replies in one write."""
        if self.pending:
            data = "\r\n".join(self.pending) + "\r\n"
            del self.pending[:]
            self.sock.sendall(data.encode("utf-8", "surrogateescape"))

    def run(self):
        """Serve the connection until QUIT, an error or a timeout."""
        domain = self.server.domain
        try:
            self.reply("220 %s Service ready" % domain)
            while self.open:
                if not self.reader.has_buffered():
                    self.flush()
                try:
                    line, self.crlf = self.reader.readline(MAX_COMMAND_LINE)
                except LineTooLong:
                    self.reply("500 Line too long")
                else:
                    self.dispatch(line.decode("utf-8", "surrogateescape"))
                if self.bad_commands >= MAX_BAD_COMMANDS and self.open:
                    self.reply("421 %s Too many errors, closing connection" % domain)
                    self.open = False
            self.flush()
        except IDLE_TIMEOUT_ERRORS:
            self.reply("421 %s Timeout, closing connection" % domain)
            self._flush_quietly()
        except (ConnectionClosed, OSError):
            pass

    def _flush_quietly(self):
        try:
            self.flush()
        except OSError:
            pass

    def dispatch(self, line):
        """Run one command line through the smtp_ method its verb names."""
        if self.verbose:
            log.info("%s C: %s", self.peer, line)
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        # MAIL_FROM: and RCPT_TO: are the course assignment's spelling of MAIL FROM: and RCPT TO:
        if verb[:5] in ("MAIL_", "RCPT_"):
            verb, argument = verb[:4], line[5:]
        handler = None
        if verb.isalpha() and verb.isascii():
            handler = getattr(self, "smtp_" + verb, None)
        if handler is None:
            self.reply("500 Command not recognized")
        else:
            handler(argument.strip())

    # -- the commands

    def smtp_HELO(self, argument):
        """Greet the client; a new greeting also ends any transaction."""
        if not argument:
            return self.reply("501 Syntax: HELO hostname")
        self._reset()
        self.client_name = argument
        self.reply("250 OK Hello %s" % argument)

    def smtp_EHLO(self, argument):
        """Greet the client and list the service extensions (RFC 5321 4.1.1.1)."""
        if not argument:
            return self.reply("501 Syntax: EHLO hostname")
        self._reset()
        self.client_name = argument
        keywords = ["SIZE %d" % self.server.max_size, "8BITMIME", "PIPELINING"]
        if self.server.tls and not self.tls_active:
            keywords.append("STARTTLS")
        keywords.append("HELP")
        self.reply("250-%s Hello %s" % (self.server.domain, argument),
                   *["250-" + k for k in keywords[:-1]], "250 " + keywords[-1])

    def smtp_MAIL(self, argument):
        """Start a transaction with the sender (MAIL FROM: or MAIL_FROM:)."""
        if self.client_name is None:
            return self.reply("503 Send HELO or EHLO first")
        if self.sender is not None:
            return self.reply("503 Sender already given")
        if self.server.require_tls and not self.tls_active:
            return self.reply("530 Must issue a STARTTLS command first")
        if self.server.stopping:
            self.open = False
            return self.reply("421 %s Shutting down, try again later" % self.server.domain)
        path = self._path_after(argument, "FROM:")
        if path is None:
            return self.reply("501 Syntax: MAIL FROM:<address>")
        address, parameters = path
        for parameter in parameters:
            keyword, _, value = parameter.upper().partition("=")
            if keyword == "SIZE" and value.isdigit():
                if int(value) > self.server.max_size:
                    return self.reply(MESSAGE_TOO_LARGE)
            elif not (keyword == "BODY" and value in ("7BIT", "8BITMIME")):
                return self.reply("555 MAIL FROM parameter %s not recognized" % parameter)
        self.sender = address
        self.reply("250 <%s>... Sender ok" % address)

    def smtp_RCPT(self, argument):
        """Add a recipient: a user of this mail root (RCPT TO: or RCPT_TO:)."""
        if self.sender is None:
            return self.reply("503 Need MAIL before RCPT")
        path = self._path_after(argument, "TO:")
        if path is None or not path[0]:
            return self.reply("501 Syntax: RCPT TO:<address>")
        address, parameters = path
        if parameters:
            return self.reply("555 RCPT TO parameters not recognized")
        local = address.rpartition("@")[0] or address
        login = self.server.users.canonical(local) if is_valid_login(local) else None
        if login is None:
            return self.reply("550 No such user")
        if len(self.recipients) >= MAX_RECIPIENTS:
            return self.reply("452 Too many recipients")
        self.recipients.append(address)
        if login not in self.logins:
            self.logins.append(login)
        self.reply("250 %s... Recipient ok" % local)

    def smtp_DATA(self, argument):
        """Receive the message and deliver it to every recipient."""
        if argument:
            return self.reply("501 Syntax: DATA")
        if self.sender is None:
            return self.reply("503 Need MAIL command")
        if not self.recipients:
            return self.reply("503 Need RCPT (recipient)")
        server = self.server
        with server.in_flight:         # from the 354 on, a shutdown waits for this message
            self.reply('354 Enter mail, end with "." on a line by itself')
            self.flush()
            # Dot-stuffing can make the wire form up to 4/3 of the message size;
            # past that the message is surely too large and is not kept in memory.
            data = self.reader.read_data(self.crlf, server.max_size * 4 // 3 + 5)
            if data is None:
                self.reply(MESSAGE_TOO_LARGE)
            else:
                self._accept(data)
        self._reset()

    def _accept(self, data):
        """Store a received message for every recipient, then say 250 (or why not)."""
        body, longest = stored_body(data, self.crlf)
        if longest > MAX_TEXT_LINE - 2:
            return self.reply("500 Line too long")
        if message_size(body) > self.server.max_size:
            return self.reply(MESSAGE_TOO_LARGE)
        encode = lambda text: text.encode("utf-8", "surrogateescape")
        message = stored_message(body, encode(self.sender), [encode(r) for r in self.recipients],
                                 received_stamp())
        try:
            deliver(message, [self.server.users.mailbox_path(login) for login in self.logins])
        except OSError as exc:
            log.error("delivery from %s to %s failed: %s", self.peer, ", ".join(self.logins), exc)
            return self.reply("451 Requested action aborted: local error in processing")
        self.delivered += 1
        log.info("delivered %d bytes from <%s> to %s", len(message), self.sender, ", ".join(self.logins))
        self.reply("250 OK Message accepted for delivery")

    def smtp_STARTTLS(self, argument):
        """Turn the connection into a TLS one (RFC 3207); the client greets again."""
        if argument:
            return self.reply("501 Syntax: STARTTLS")
        if self.server.tls is None:
            return self.reply("502 Command not implemented")
        if self.tls_active:
            return self.reply("503 TLS already active")
        self.reply("220 Ready to start TLS")
        self.flush()
        # Whatever the client sent behind STARTTLS came before the handshake:
        # it must never be executed as if it had been sent encrypted.
        del self.reader.buffer[:]
        self.sock.settimeout(self.server.timeout)
        try:
            self.sock = self.server.tls.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("%s TLS handshake failed: %s", self.peer, exc)
            self.open = False
            return
        self.reader.sock = self.sock
        self.tls_active = True
        self.client_name = None        # RFC 3207 4.2: the client starts again with EHLO
        self._reset()

    def smtp_RSET(self, argument):
        """Drop the transaction in progress."""
        if argument:
            return self.reply("501 Syntax: RSET")
        self._reset()
        self.reply("250 OK")

    def smtp_NOOP(self, argument):
        """Do nothing, successfully."""
        self.reply("250 OK")

    def smtp_VRFY(self, argument):
        """Tell whether a name is a user of this server."""
        path = parse_path(argument) if argument else None
        if not path or not path[0]:
            return self.reply("501 Syntax: VRFY <address>")
        local = path[0].rpartition("@")[0] or path[0]
        login = self.server.users.canonical(local) if is_valid_login(local) else None
        if login is None:
            return self.reply("550 No such user")
        self.reply("250 %s <%s@%s>" % (login, login, self.server.domain))

    def smtp_HELP(self, argument):
        """List the commands."""
        tls = " STARTTLS" if self.server.tls else ""
        self.reply("214-Commands: HELO EHLO%s MAIL RCPT DATA RSET NOOP VRFY HELP QUIT" % tls,
                   "214 MAIL_FROM: and RCPT_TO: work as MAIL FROM: and RCPT TO:")

    def smtp_EXPN(self, argument):
        """Known but not offered: mailing lists, relaying turns, logins."""
        self.reply("502 Command not implemented")

    smtp_TURN = smtp_AUTH = smtp_EXPN

    def smtp_QUIT(self, argument):
        """Say goodbye and end the session."""
        self.reply("221 %s closing connection" % self.server.domain)
        self.open = False

    @staticmethod
    def _path_after(argument, keyword):
        """Parse 'FROM:<addr> params' / 'TO:<addr>' (any case); None if malformed."""
        if argument[:len(keyword)].upper() != keyword:
            return None
        return parse_path(argument[len(keyword):])


# --------------------------------------------------------------------------
# The server loop
# --------------------------------------------------------------------------

class InFlight:
    """Counts deliveries under way, so a shutdown can wait for them to finish."""

    def __init__(self):
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self):
        with self._idle:
            self._count += 1

    def __exit__(self, *exc):
        with self._idle:
            self._count -= 1
            if not self._count:
                self._idle.notify_all()

    def wait(self, timeout):
        """Wait until nothing is in flight; return False if timeout passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._count, timeout)


def set_idle_timeout(sock, seconds):
    """Make a blocking read or write on sock fail once the peer has been silent for seconds.

    Python's own socket timeout polls before every recv and send; the
    kernel's SO_RCVTIMEO/SO_SNDTIMEO cost nothing until they fire (as
    BlockingIOError).  Where they are missing, fall back to settimeout.
    """
    if os.name == "posix" and hasattr(socket, "SO_RCVTIMEO"):
        whole = int(seconds)
        value = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    else:
        sock.settimeout(seconds)


IDLE_TIMEOUT_ERRORS = (socket.timeout, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def create_listener(host, port):
    """A listening TCP socket on host (IPv4 or IPv6) and port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    listener = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":        # quick restarts; on Windows this would allow port theft
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    return listener


class SMTPServer:
    """Accepts connections and serves each one in its own thread."""

    def __init__(self, args):
        self.users = UserTable(args.root)
        self.domain = args.domain
        self.max_size = args.max_size
        self.timeout = args.timeout
        self.max_connections = args.max_connections
        self.verbose = args.verbose
        self.tls = args.tls
        self.require_tls = args.require_tls
        self.listener = create_listener(args.host, args.port)
        self.address = self.listener.getsockname()
        self.stopping = False
        self.in_flight = InFlight()
        self._count_guard = threading.Lock()
        self.connections = 0

    def serve_forever(self):
        log.info("listening on %s port %d", self.address[0], self.address[1])
        self.users.canonical("")     # read userinfo.txt now, so its problems show at start
        while True:
            try:
                sock, peer = self.listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)      # e.g. out of file descriptors: let sessions end first
                continue
            with self._count_guard:
                full = self.connections >= self.max_connections
                if not full:
                    self.connections += 1
            if full:
                self._refuse(sock)
            else:
                # A bare thread: threading.Thread.start() would also wait for the
                # new thread to run before accepting the next client.
                _thread.start_new_thread(self._serve, (sock, peer))

    def _refuse(self, sock):
        log.warning("refused a connection: %d already open", self.max_connections)
        try:
            sock.setblocking(False)
            sock.send(b"421 %s Too many connections, try again later\r\n" % self.domain.encode())
        except OSError:
            pass
        sock.close()

    def _serve(self, sock, peer):
        leave_signals_to_main_thread()
        peer = "%s:%d" % peer[:2]
        session = None
        try:
            set_idle_timeout(sock, self.timeout)
            session = SMTPSession(self, sock, peer)
            session.run()
        except Exception:
            log.exception("session with %s failed", peer)
        finally:
            (session.sock if session else sock).close()    # after STARTTLS, the TLS socket
            with self._count_guard:
                self.connections -= 1
            log.info("connection from %s closed, %d message(s) delivered",
                     peer, session.delivered if session else 0)

    def shutdown(self, signals):
        """Stop accepting; give deliveries in flight time to finish (until a second signal)."""
        self.stopping = True
        self.listener.close()
        log.info("shutting down")
        wait_until_idle(self.in_flight.wait, signals)


def wait_until_idle(wait, signals):
    """Call wait(seconds) until it returns True, the grace time ends or a second signal comes."""
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while not wait(0.1):
        if signals.hurried or time.monotonic() > deadline:
            # Work cut short here was never acknowledged, and nothing is half stored.
            log.warning("stopping before the work in progress has finished")
            return


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

class LineWriteHandler(logging.Handler):
    """Logs each record with a single write() to a file descriptor, taking no lock.

    logging's StreamHandler holds a lock around write and flush, and under
    load session threads queue on it.  One write() of a line is atomic on
    pipes and terminals and never overlaps another on files, so no lock is
    needed to keep lines whole.
    """

    def __init__(self, fd=2, tag="smtp"):
        super().__init__()
        self.fd = fd
        self.setFormatter(logging.Formatter("%(asctime)s " + tag + " %(levelname)s %(message)s"))

    def handle(self, record):
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record):
        try:
            line = self.format(record) + "\n"
            os.write(self.fd, line.encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


def configure_logging(tag):
    """INFO and above to stderr, one line per record."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False  # unused, costly
    logging.basicConfig(level=logging.INFO, handlers=[LineWriteHandler(sys.stderr.fileno(), tag)])


def run_on_one_cpu():
    """Keep this process's threads on one CPU (call before starting any thread).

    Only one thread runs Python at a time (the GIL).  When session threads
    sit on different CPUs, every hand-over of the GIL is a cross-CPU wake-up,
    which costs far more than a switch on one CPU: measured here, one CPU
    serves about twice the messages per second at 10 and 50 clients.
    """
    if not hasattr(os, "sched_setaffinity"):       # not on Windows or macOS
        return
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except OSError:
        pass


class Shutdown(BaseException):
    """Raised in the main thread by the first Ctrl-C or SIGTERM.

    A BaseException, like KeyboardInterrupt, so that no 'except Exception'
    on the way (in logging, say) can swallow it.
    """


class ShutdownSignals:
    """Ctrl-C and SIGTERM: the first stops the server loop, a second cuts the shutdown short."""

    def __init__(self):
        self.received = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.received += 1
        if self.received == 1:
            raise Shutdown()

    @property
    def hurried(self):
        return self.received > 1


def leave_signals_to_main_thread():
    """Block Ctrl-C and SIGTERM in the calling (session) thread.

    Python runs signal handlers in the main thread only; a signal the kernel
    delivers to a session thread would wait, unseen, until the main thread
    next wakes up by itself.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def serve_until_signalled(server):
    """Run server.serve_forever() until Ctrl-C or SIGTERM, then server.shutdown(signals)."""
    signals = ShutdownSignals()
    try:
        server.serve_forever()
    except Shutdown:
        pass
    server.shutdown(signals)


def main(argv=None):
    args = parse_args(argv)
    # Small thread stacks fit many more in glibc's cache of freed stacks, so a
    # thread per connection does not map and unmap 8 MiB each time.
    threading.stack_size(512 * 1024)
    run_on_one_cpu()
    configure_logging("smtp")
    try:
        server = SMTPServer(args)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", args.host, args.port, exc)
        return 1
    serve_until_signalled(server)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""SMTP server of the course mail system: accepts mail and appends it to per-user mailboxes.

    python mailserver_smtp.py 2525 [--host ADDR] [--domain NAME] [--root DIR] ...

One thread serves each connection.  A message is written whole, under a lock
shared with the POP3 server, and fsync'd before the client hears 250.

pop_server.py is built on this file: it imports the shared mail root (users,
mailbox files, the lock protocol, the mailbox format), the session skeleton
and the server loop skeleton, each headed "shared with pop_server.py" below.
"""

import argparse
import base64
import binascii
import contextlib
import email.utils
import errno
import getpass
import hashlib
import hmac
import io
import ipaddress
import itertools
import logging
import os
import re
import signal
import socket
import ssl
import stat
import struct
import sys
import tempfile
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

DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_TIMEOUT = 300        # RFC 5321 4.5.3.2.7 asks for at least 5 minutes
DEFAULT_MAX_CONNECTIONS = 100
MAX_COMMAND_LINE = 512       # RFC 5321 4.5.3.1.4, CRLF included
MAX_TEXT_LINE = 1000         # RFC 5321 4.5.3.1.6, CRLF included
MAX_PATH = 256               # RFC 5321 4.5.3.1.3
MAX_RECIPIENTS = 100         # RFC 5321 4.5.3.1.8
MAX_BAD_COMMANDS = 10        # in a row, then 421 and close
MIN_DATA_RATE = 500          # bytes/s a slow DATA sender must keep up (Postfix's smtpd_min_data_rate)
SPOOL_THRESHOLD = 256 * 1024 # bytes of a message kept in memory; a larger one goes to ROOT/.spool
COPY_CHUNK = 1 << 20         # bytes copied from a spool file at a time

LF_DATA_END = re.compile(rb"(\r?\n)\.\r?\n")  # a lone '.' line, in a session typed with bare LF
ENHANCED_CODE = re.compile(r"^(\d{3}[ -])[245]\.\d{1,3}\.\d{1,3} ")   # RFC 3463, after the reply code
_ATOM = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\ud7ff\ue000-\U0010ffff-]+"   # RFC 5321 4.1.2, RFC 6531
_LABEL = "[A-Za-z0-9\u0080-\ud7ff\ue000-\U0010ffff-]+"
# A path's address: a Dot-string, then "@" and a domain name or [address literal] (RFC 5321 4.1.2).
ADDRESS = re.compile(r"%s(?:\.%s)*(?:@(?:%s(?:\.%s)*|\[[!-Z^-~]+\]))?\Z" % (_ATOM, _ATOM, _LABEL, _LABEL))


class Replies:
    """What the SMTP server answers, with the RFC 3463 enhanced status code of each.

    RFC 2034 4: every 2xx, 4xx and 5xx reply carries its code, except the
    greeting and the replies to HELO and EHLO; 3xx replies carry none.  A
    session that did not begin with EHLO gets PLAIN_REPLIES, the same texts
    without codes: the words of the course dialogue (CONTRACT.md section 2).
    """

    GREETING = "220 %s Service ready"
    HELLO = "250 OK Hello %s"
    EHLO = "250-%s Hello %s"
    SENDER_OK = "250 2.1.0 <%s>... Sender ok"
    RECIPIENT_OK = "250 2.1.5 %s... Recipient ok"
    START_DATA = '354 Enter mail, end with "." on a line by itself'
    ACCEPTED = "250 2.0.0 OK Message accepted for delivery"
    OK = "250 2.0.0 OK"
    USER = "250 2.1.5 %s <%s@%s>"
    HELP = ("214-2.0.0 Commands: HELO EHLO%s AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
            "214 2.0.0 MAIL_FROM: and RCPT_TO: work as MAIL FROM: and RCPT TO:")
    READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
    GOODBYE = "221 2.0.0 %s closing connection"
    SHUTTING_DOWN = "421 4.3.2 %s Shutting down, try again later"
    TIMEOUT = "421 4.4.2 %s Timeout, closing connection"
    TOO_MANY_ERRORS = "421 4.7.0 %s Too many errors, closing connection"
    LOCAL_ERROR = "451 4.3.0 Requested action aborted: local error in processing"
    TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
    UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
    LINE_TOO_LONG = "500 5.5.2 Line too long"
    SYNTAX = "501 5.5.4 Syntax: %s"
    NOT_IMPLEMENTED = "502 5.5.1 Command not implemented"
    HELO_FIRST = "503 5.5.1 Send HELO or EHLO first"
    SENDER_GIVEN = "503 5.5.1 Sender already given"
    MAIL_FIRST = "503 5.5.1 Need MAIL before RCPT"
    NO_SENDER = "503 5.5.1 Need MAIL command"
    NO_RECIPIENT = "503 5.5.1 Need RCPT (recipient)"
    TLS_ACTIVE = "503 5.5.1 TLS already active"
    CHUNK_OK = "250 2.0.0 %d octets received"
    DATA_AFTER_BDAT = "503 5.5.1 DATA after BDAT in one transaction"
    BDAT_FAILED = "503 5.5.1 Send RSET: this message has failed"
    MAILBOX_FULL = "452 4.2.2 Mailbox full"
    STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
    NO_SUCH_USER = "550 5.1.1 No such user"
    OVER_QUOTA = "552 5.2.2 Message larger than the mailbox may hold"
    MESSAGE_TOO_LARGE = "552 5.3.4 Message exceeds fixed maximum message size"
    NEEDS_SMTPUTF8 = "553 5.6.7 Address is not ASCII: SMTPUTF8 needed"
    MAIL_PARAMETER = "555 5.5.4 MAIL FROM parameter %s not recognized"
    RCPT_PARAMETERS = "555 5.5.4 RCPT TO parameters not recognized"
    # SMTP AUTH (RFC 4954 4 and 6) and submission (RFC 6409)
    AUTH_OK = "235 2.7.0 Authentication successful"
    AUTH_REQUIRED = "530 5.7.0 Authentication required"
    AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
    AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
    AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"
    AUTH_MALFORMED = "501 5.5.2 Cannot decode the response (base64 expected)"
    AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
    AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
    AUTH_MECHANISM = "504 5.5.4 Unrecognized authentication mechanism"
    EHLO_FIRST = "503 5.5.1 Send EHLO first"
    AUTHENTICATED = "503 5.5.1 Already authenticated"
    AUTH_IN_TRANSACTION = "503 5.5.1 AUTH is not allowed during a mail transaction"
    TOO_MANY_FAILURES = "421 4.7.0 %s Too many failed authentications, closing connection"
    NOT_YOURS = "553 5.7.1 Sender <%s> is not an address of %s"
    RELAYING_DENIED = "550 5.7.1 relaying denied"


POSTMASTER = "postmaster"    # RFC 5321 4.5.1: always accepted, in any case
SMTP_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")   # RFC 4616, the LOGIN draft, RFC 2195
SMTP_SASL_REPLIES = {        # why an AUTH exchange failed -> the reply (only after EHLO, so with codes)
    "cancelled": Replies.AUTH_CANCELLED,
    "malformed": Replies.AUTH_MALFORMED,
    "too long": Replies.AUTH_LINE_TOO_LONG,
    "invalid": Replies.AUTH_INVALID,
}

# Both servers (the skeleton below reads these too).
RECV_SIZE = 65536            # bytes asked of the socket at a time
SEND_THRESHOLD = 256 * 1024  # queued replies are sent once they reach this size
ACCEPT_RETRY_DELAY = 0.05    # seconds to wait after accept() fails, e.g. out of descriptors
REFUSAL_LOG_INTERVAL = 60    # seconds: a client refused again and again is logged once in this time
IPV6_CLIENT_PREFIX = 64      # an IPv6 client is its /64: one site's prefix, as RFC 6177 hands them out
SHUTDOWN_GRACE = 30          # seconds the work in flight gets to finish after Ctrl-C/SIGTERM
THREAD_STACK_SIZE = 512 * 1024   # bytes (see use_small_thread_stacks)
MAX_SASL_LINE = 12288        # RFC 4954 4: a SASL response line, CRLF included
AUTH_DELAY_FROM = 3          # failed authentication number from which replies are slowed down
AUTH_DELAY_STEP = 0.2        # seconds added per further failure
MAX_AUTH_FAILURES = 5        # then the connection is closed
CLOSE_NOTIFY_WAIT = 2.0      # seconds a TLS close waits for the client's close_notify (RFC 8446 6.1)
CERT_CHECK_INTERVAL = 2.0    # seconds between looks at --tls-cert/--tls-key for a renewed pair
# HAProxy's PROXY protocol (its proxy-protocol.txt), read only from --proxy-from addresses
PROXY_V1_PREFIX = b"PROXY "  # 2.1: a v1 header is a text line starting so
PROXY_V1_MAX = 107           # 2.1: the longest v1 line, CRLF included
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"   # 2.2: the first 12 bytes of a v2 header
PROXY_V2_FIXED = 16          # 2.2: signature, version and command, family and transport, length
PROXY_V2_LOCAL = 0x20        # 2.2: version 2, LOCAL: the balancer's own connection (a health check)
PROXY_V2_PROXY = 0x21        # 2.2: version 2, PROXY: a relayed client
PROXY_V2_TCP = {0x11: (socket.AF_INET, 4), 0x21: (socket.AF_INET6, 16)}   # 2.2: TCP over IPv4/IPv6
PROXY_FIRST_READ = 6         # bytes read before the version is known: no header is shorter than 15
# OpenSSL 3's SSL_OP_IGNORE_UNEXPECTED_EOF, which Python names from 3.10 on
IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF",
                                0x80 if ssl.OPENSSL_VERSION_INFO >= (3,) else 0)
MASKED_COMMANDS = {"AUTH": 1, "PASS": 0, "APOP": 1}   # verb -> words shown before the secret
HEX_DIGEST = re.compile(r"[0-9a-fA-F]{32}\Z")          # an MD5 digest (RFC 1939 7, RFC 2195)
PBKDF2_ITERATIONS = 600000   # OWASP's 2023 figure for PBKDF2-HMAC-SHA256
SCRYPT_COST = (("n", 2 ** 14), ("r", 8), ("p", 5))   # OWASP's scrypt setting that needs 16 MiB
SCRYPT_MAXMEM = 64 * 1024 * 1024
SALT_SIZE = 16               # bytes
HASH_SIZE = 32               # bytes

log = logging.getLogger("smtp")


def parse_args(argv=None):
    """Read the command line."""
    parser = server_arguments("SMTP server: delivers mail into ROOT/<user>/my_mailbox.",
                              DEFAULT_TIMEOUT, "seconds an idle client may wait before 421",
                              "STARTTLS", "refuse mail and AUTH until the client has used STARTTLS")
    parser.epilog = ("python3 mailserver_smtp.py --hash-password [--scheme scrypt] reads a password "
                     "(not echoed) and prints a hashed password field for userinfo.txt.")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                        help="largest message accepted, in bytes (default: 10 MiB)")
    parser.add_argument("--quota", type=int, metavar="BYTES",
                        help="the most a mailbox may hold on disk (default: no limit)")
    parser.add_argument("--require-auth", action="store_true",
                        help="submission: refuse MAIL (530) until the client has logged in with AUTH")
    parser.add_argument("--local-domains", metavar="A,B", type=domain_list,
                        help="the only domains mail is taken for; others get 550 (default: every domain)")
    parser.add_argument("--postmaster", metavar="USER",
                        help="the user who gets the mail for postmaster (default: the first user)")
    args = parser.parse_args(argv)
    if args.max_size < 1 or args.quota is not None and args.quota < 1:
        parser.error("--max-size and --quota must be positive")
    if args.postmaster is not None and not is_valid_login(args.postmaster):
        parser.error("--postmaster must be a login name")
    return check_server_arguments(parser, args)


def domain_list(text):
    """The set of domains in a comma-separated --local-domains, in lower case."""
    domains = {name.strip().lower() for name in text.split(",")}
    if "" in domains:
        raise argparse.ArgumentTypeError("a comma-separated list of domain names, none empty")
    return frozenset(domains)


def without_codes(replies):
    """The replies class with every enhanced status code taken out ("250 2.1.0 ok" becomes "250 ok")."""
    def plain(text):
        if isinstance(text, tuple):
            return tuple(plain(line) for line in text)
        return ENHANCED_CODE.sub(lambda m: m.group(1), text)
    return type("PlainReplies", (), {name: plain(text) for name, text in vars(replies).items()
                                     if name.isupper()})


PLAIN_REPLIES = without_codes(Replies)


# ==========================================================================
# The shared mail root: users, mailbox files, the lock protocol, the format
# (shared with pop_server.py)
# ==========================================================================
#
# Files.  ROOT/userinfo.txt lists the users; ROOT/<login>/my_mailbox is the
# mailbox of a user.  Beside each mailbox the servers keep hidden files:
#
#   .my_mailbox.lock       the delivery lock (below)
#   .my_mailbox.pop.lock   the session lock (below)
#   .my_mailbox.index      POP3's unique ids and index cache; only POP3 writes
#                          it, holding the session lock
#   .my_mailbox.new        a POP3 rewrite, until it is renamed over my_mailbox
#   .my_mailbox.torn       what crashed appends left: bytes of messages never
#                          acknowledged, set aside (appended, never served)
#
# and ROOT/.spool holds SMTP's large messages while they arrive.  The
# servers open every one of these files without following a symlink and
# use it only if it is a regular file, so a link planted in a user's folder
# cannot make them write or read anywhere else (a user's folder may itself
# be a symlink: that is the admin's choice).
#
# The lock protocol.  Each mailbox has two locks.  Both are kernel locks
# (flock, or msvcrt on Windows) on a lock file of their own, which every
# holder opens for itself: so they exclude other threads as well as other
# processes, and the kernel drops them when their holder dies, so a server
# killed with kill -9 never leaves one behind.
#
#   The delivery lock is held by whoever writes my_mailbox, for the whole
#   write: SMTP from the first byte of an append to its fsync, POP3 for a
#   QUIT rewrite from copying the file to renaming the copy over it.  POP3
#   also takes it for a moment at login, to read the file's size.  It
#   guarantees that two appends never interleave, that a rewrite never loses
#   an append, and that a size read under it never ends inside an append.
#
#   The session lock is held by a POP3 session from its login to its end,
#   and taken without waiting (a second session of that user gets -ERR
#   [IN-USE]).  It guarantees one session per maildrop: the messages a session
#   numbered at login stay where they were, as only appends happen meanwhile.
#
#   Order: a POP3 session takes its session lock, then (briefly) the delivery
#   lock, never the other way round.  SMTP takes only delivery locks, several
#   of them (one message for several users) in sorted order of their paths.
#   So no two holders can wait for each other: there is no deadlock.
#
#   What locks cannot do, fsync and the format do: an append is fsync'd
#   before the client hears 250 (so it survives a power cut), and an append
#   cut short by a crash leaves a torn last message, which readers skip and
#   the next holder of the delivery lock (an append, a POP3 login) first
#   sets aside in .my_mailbox.torn.
#
# The mailbox format.  Messages follow each other; each ends with a line
# holding only ".".  Lines end with "\n".  A line that starts with "." is
# stored with one more "." (SMTP's dot-stuffing), so "\n.\n" occurs only where
# a message ends.  The three functions after the locks are the only place
# that knows where a message ends, its size on the wire and where its header
# block ends; SMTP, POP3 and the tests all use them.

USERINFO_NAME = "userinfo.txt"
MAILBOX_NAME = "my_mailbox"
DELIVERY_LOCK_NAME = ".my_mailbox.lock"
SESSION_LOCK_NAME = ".my_mailbox.pop.lock"
INDEX_NAME = ".my_mailbox.index"
NEW_INDEX_NAME = ".my_mailbox.index.new"
NEW_MAILBOX_NAME = ".my_mailbox.new"
TORN_NAME = ".my_mailbox.torn"
SPOOL_NAME = ".spool"

O_BINARY = getattr(os, "O_BINARY", 0)       # Windows: no newline translation in mailboxes
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)   # POSIX: a symlink is refused, not followed
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)   # a FIFO planted as a mailbox must not hang the open
READ_BACK = 65536                           # bytes read at a time when looking back for a message end
LOGIN_PATTERN = re.compile(r"[A-Za-z0-9._-]+\Z")
HEADER_LINE = re.compile(rb"[!-9;-~]+:")     # RFC 5322 2.2: a field name, then ':'


def is_valid_login(name):
    """True for a plain login name that can never point outside its own folder."""
    return bool(LOGIN_PATTERN.match(name)) and name not in (".", "..")


# Passwords.  A password field in userinfo.txt is the password itself, or a
# salted slow hash as --hash-password prints it, "{SCHEME}cost$salt$hash"
# with salt and hash in base64: {PBKDF2-SHA256}i=600000$...$... or
# {SCRYPT}n=16384,r=8,p=5$...$...  A hash is computed anew at every login;
# nothing is cached.  CRAM-MD5 and APOP need the password itself, so a user
# whose field is a hash logs in only by the methods that send the password
# (USER/PASS, AUTH PLAIN, AUTH LOGIN).

def _pbkdf2_sha256(password, salt, cost, size):
    return hashlib.pbkdf2_hmac("sha256", password, salt, cost["i"], size)


def _scrypt(password, salt, cost, size):
    return hashlib.scrypt(password, salt=salt, n=cost["n"], r=cost["r"], p=cost["p"],
                          maxmem=SCRYPT_MAXMEM, dklen=size)


PASSWORD_SCHEMES = {         # scheme -> (its default cost, the hash function)
    "PBKDF2-SHA256": ((("i", PBKDF2_ITERATIONS),), _pbkdf2_sha256),
    "SCRYPT": (SCRYPT_COST, _scrypt),
}
HASHED_FIELD = re.compile(rb"\{(PBKDF2-SHA256|SCRYPT)\}(.*)\Z", re.IGNORECASE | re.DOTALL)
NO_PASSWORD = b"\0no password"      # what an unknown user's login attempt is checked against


class HashedPassword:
    """A password field "{SCHEME}cost$salt$hash": what a password must hash to."""

    def __init__(self, scheme, text):
        """Parse the part after {SCHEME}; ValueError if it is malformed."""
        cost, salt, digest = text.split(b"$")
        self.scheme = scheme
        self.cost = {}
        for item in cost.decode("ascii").split(","):
            name, _, value = item.partition("=")
            self.cost[name] = int(value)
        if sorted(self.cost) != sorted(name for name, _ in PASSWORD_SCHEMES[scheme][0]) \
                or not all(1 <= value <= 10 ** 9 for value in self.cost.values()):
            raise ValueError("wrong cost parameters")
        self.salt = base64.b64decode(salt, validate=True)
        self.digest = base64.b64decode(digest, validate=True)
        if len(self.digest) < 16 or scheme == "SCRYPT" and not hasattr(hashlib, "scrypt"):
            raise ValueError("hash too short, or no scrypt in this Python")

    def matches(self, password):
        """Whether password (bytes) hashes to this field."""
        try:
            computed = PASSWORD_SCHEMES[self.scheme][1](password, self.salt, self.cost, len(self.digest))
        except (ValueError, MemoryError) as exc:     # e.g. a cost that needs more than SCRYPT_MAXMEM
            log.warning("cannot check a %s password: %s", self.scheme, exc)
            return False
        return hmac.compare_digest(computed, self.digest)


def parse_password(field):
    """A userinfo.txt password field as UserTable keeps it: bytes, or a HashedPassword (ValueError)."""
    hashed = HASHED_FIELD.match(field)
    if hashed is None:
        return field
    return HashedPassword(hashed.group(1).decode("ascii").upper(), hashed.group(2))


def hash_password(password, scheme="PBKDF2-SHA256"):
    """The userinfo.txt field for a password (bytes): a new salt and the scheme's default cost."""
    cost, function = PASSWORD_SCHEMES[scheme]
    salt = os.urandom(SALT_SIZE)
    digest = function(password, salt, dict(cost), HASH_SIZE)
    return "{%s}%s$%s$%s" % (scheme, ",".join("%s=%d" % item for item in cost),
                             base64.b64encode(salt).decode("ascii"),
                             base64.b64encode(digest).decode("ascii"))


def password_matches(stored, password):
    """Whether password (bytes) is the one a stored field (bytes or HashedPassword) holds."""
    if isinstance(stored, HashedPassword):
        return stored.matches(password)
    return hmac.compare_digest(password, stored)


class UserTable:
    """The users of a mail root, read from userinfo.txt again whenever the file changes."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, USERINFO_NAME)
        self._guard = threading.Lock()
        self._stamp = None
        self._passwords = {}   # login -> password bytes or HashedPassword, in file order
        self._folded = {}      # login.lower() -> login
        self._decoy = NO_PASSWORD   # checked for unknown users: a hash, if the file has one

    def refresh(self):
        """Read userinfo.txt again if it has changed since it was last read."""
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
            self._decoy = next((p for p in passwords.values() if isinstance(p, HashedPassword)),
                               NO_PASSWORD)
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
                try:
                    passwords[login] = parse_password(fields[1])
                except ValueError:
                    log.warning("%s line %d: the password of %r is a malformed {SCHEME} hash; skipped",
                                USERINFO_NAME, number, login)
        return passwords

    def canonical(self, name):
        """The login a name refers to (matched without regard to case), if it is a user."""
        if not is_valid_login(name):
            return None
        self.refresh()
        login = name if name in self._passwords else self._folded.get(name.lower())
        if login and os.path.isdir(os.path.join(self.root, login)):
            return login
        return None

    def logins(self):
        """Every user (a line in userinfo.txt and a folder), in the file's order."""
        self.refresh()
        return [login for login in self._passwords if os.path.isdir(os.path.join(self.root, login))]

    def authenticate(self, name, password):
        """The login of name if password (bytes) is its password, else None.

        An unknown name is checked against a decoy of the same cost, so that
        timing does not tell users and strangers apart.
        """
        login = self.canonical(name)
        stored = self._passwords.get(login) if login else None
        matches = password_matches(self._decoy if stored is None else stored, password)
        return login if stored is not None and matches else None

    def authenticate_digest(self, name, digest, expected_for):
        """The login of name if digest is expected_for(its password), else None (CRAM-MD5, APOP).

        A hashed password cannot give the digest, so such a user fails here
        as with a wrong password.
        """
        login = self.canonical(name)
        stored = self._passwords.get(login) if login else None
        clear = stored if isinstance(stored, bytes) else NO_PASSWORD
        matches = hmac.compare_digest(expected_for(clear), digest)
        return login if isinstance(stored, bytes) and matches else None

    def mailbox_path(self, login):
        """Where a user's mailbox file is."""
        return os.path.join(self.root, login, MAILBOX_NAME)


class FileLock:
    """An exclusive kernel lock on a lock file: one holder among all threads and processes."""

    def __init__(self, path):
        self.path = path
        self._fd = None

    def acquire(self, blocking=True):
        """Take the lock; with blocking=False return False at once if someone holds it."""
        fd, _ = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        try:
            locked = _lock_fd(fd, blocking)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self):
        """Give the lock up."""
        fd, self._fd = self._fd, None
        try:
            _unlock_fd(fd)
        finally:
            os.close(fd)

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


def open_regular(path, flags, mode=0o600):
    """Open a file of the mail root for os-level I/O: (fd, its os.stat_result).

    OSError if the path is a symlink or not a regular file.
    """
    fd = os.open(path, flags | O_NOFOLLOW | O_NONBLOCK | O_BINARY, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def remove_file(path):
    """Remove a file if it is there (never a folder, never what a symlink points to)."""
    try:
        os.remove(path)
    except OSError:
        pass


def delivery_lock(mailbox_path):
    """The lock every writer of a mailbox file holds while it writes (see the lock protocol)."""
    return FileLock(os.path.join(os.path.dirname(mailbox_path), DELIVERY_LOCK_NAME))


def session_lock(mailbox_path):
    """The lock a POP3 session holds from login to its end (see the lock protocol)."""
    return FileLock(os.path.join(os.path.dirname(mailbox_path), SESSION_LOCK_NAME))


def message_end(data, start):
    """Where the stored message whose lines begin at data[start] ends, and how many lines it stuffed.

    The lines that begin with '.' are the only ones the format treats
    specially: the one holding only '.' ends the message, every other one
    carries a stuffing dot.  Returns (end, stuffed): end is just after the
    '.' line, or -1 while data holds no such line; stuffed counts the lines
    with a stuffing dot before it.
    """
    stuffed = 0
    dot = start if data.startswith(b".", start) else _next_dot_line(data, start)
    while dot >= 0:
        if dot + 1 >= len(data):             # the '.' is the last byte so far
            return -1, stuffed
        if data[dot + 1] == 10:              # '\n': the line holds only '.'
            return dot + 2, stuffed
        stuffed += 1
        dot = _next_dot_line(data, dot)
    return -1, stuffed


def _next_dot_line(data, pos):
    """Where the first line after the one holding data[pos] that begins with '.' starts, or -1."""
    found = data.find(b"\n.", pos)
    return found + 1 if found >= 0 else -1


def wire_size(data, start=0, end=None, stuffed=None):
    """The size on the wire of the stored lines data[start:end] (RFC 1870 SIZE, RFC 1939 octets).

    Each line end counts as CRLF; a stuffing dot does not count.  stuffed,
    when the caller knows it (from message_end), saves counting them again.
    """
    end = len(data) if end is None else end
    if stuffed is None:
        stuffed = data.count(b"\n.", start, end) + data.startswith(b".", start, end)
    return end - start + data.count(b"\n", start, end) - stuffed


def header_block(lines):
    """How many of a message's first lines form its header block, and whether a blank line ends it.

    lines: the message's lines (bytes), each with or without its line end.
    A header line is "Name: value"; a line starting with a blank continues
    the header above it.  Folding belongs to RFC 5322 messages, whose header
    block a blank line ends: there the whole run of header and continuation
    lines is the header block.  In the course format the body follows the
    headers at once, so an indented line is the first body line: the header
    block is the run of "Name:" lines before it.
    """
    count, before_folding = 0, None
    for line in lines:
        if line[:1] in (b" ", b"\t") and count:
            if before_folding is None:
                before_folding = count
        elif not HEADER_LINE.match(line):
            if line.rstrip(b"\r\n") == b"":
                return count, True
            break
        count += 1
    return (count if before_folding is None else before_folding), False


def whole_messages_end(fd, size):
    """Where the last whole message of a mailbox file of size bytes ends (0 if it holds none).

    A message ends with "\\n.\\n", which occurs nowhere else, so the file is
    read backwards until one shows (almost always in its last 3 bytes).
    """
    later = b""
    pos = size
    while pos > 0:
        start = max(0, pos - (3 if pos == size else READ_BACK))
        os.lseek(fd, start, os.SEEK_SET)
        chunk = os.read(fd, pos - start)
        found = (chunk + later[:2]).rfind(b"\n.\n")
        if found >= 0:
            return start + found + 3
        later, pos = chunk, start
    return 2 if later.startswith(b".\n") else 0     # an empty first message


def write_all(fd, data):
    """Write all of data to fd (os.write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def set_torn_tail_aside(fd, path, size):
    """Move what follows the last whole message of a mailbox of size bytes to its .torn file; return the new size.

    The caller holds the delivery lock, so no append is under way: bytes
    after the last '.' line belong to an append a crash cut short, which no
    client was told had worked.  They are kept in .my_mailbox.torn (added
    to its end) and logged, and never served as a message.
    """
    end = whole_messages_end(fd, size)
    if end == size:
        return size
    torn_path = os.path.join(os.path.dirname(path), TORN_NAME)
    torn, _ = open_regular(torn_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.lseek(fd, end, os.SEEK_SET)
        while True:
            chunk = os.read(fd, READ_BACK)
            if not chunk:
                break
            write_all(torn, chunk)
        os.fsync(torn)
    finally:
        os.close(torn)
    os.ftruncate(fd, end)
    os.fsync(fd)
    log.warning("%s ended in %d bytes of a message cut short; they are now at the end of %s",
                path, size - end, torn_path)
    return end


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


# --------------------------------------------------------------------------
# Parsing: from SMTP DATA to the stored form
# --------------------------------------------------------------------------

def stored_lines(run, strict):
    """Turn whole lines of DATA, as they came on the wire, into mailbox lines ending in \\n.

    run ends with a line end.  The mailbox keeps SMTP's dot-stuffing, so
    well-formed lines are stored as they came, less their CR.  In a CRLF
    (strict) session a bare LF is not a line end on the wire, but it is one
    in the file: each piece it starts is unstuffed/stuffed on its own so
    that no piece can ever read as a lone "." line.
    Returns (stored bytes, length of the longest wire line without its end).
    """
    if not strict:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in run.split(b"\n")[:-1]]
        return b"\n".join(lines) + b"\n", max(map(len, lines))
    stored = run.replace(b"\r\n", b"\n")
    wire_lines = run.split(b"\r\n")
    longest = max(map(len, wire_lines))
    if stored.count(b"\n") == len(run) - len(stored):   # no bare LF: each \n was a CRLF
        return stored, longest
    pieces = []
    for line in wire_lines[:-1]:
        if line.startswith(b"."):
            line = line[1:]
        for piece in line.split(b"\n"):
            pieces.append(b"." + piece if piece.startswith(b".") else piece)
    return b"\n".join(pieces) + b"\n", longest


def stored_layout(lines, size, sender, recipients, received):
    """The stored message as pieces: bytes to add, and (start, end) ranges of the stored body.

    lines() gives the stored body's lines from the first (only the header
    block is read); size is the body's length.  Missing From/To come from
    the envelope; Received goes right after Subject (and its folded lines),
    or, with no Subject, an empty Subject and then Received close the header
    block.  A body with no line gets an empty one, and '.' ends the message.
    """
    count, _ = header_block(lines())
    present = set()
    pos = 0                  # where the header block ends
    subject_end = None       # after the Subject line and its folded lines
    for line in itertools.islice(lines(), count):
        if line[:1] in (b" ", b"\t"):
            if subject_end == pos:
                subject_end += len(line)
        else:
            name = line.partition(b":")[0].lower()
            if name == b"subject" and name not in present:
                subject_end = pos + len(line)
            present.add(name)
        pos += len(line)
    head = b""
    if b"from" not in present:
        head += b"From: " + sender + b"\n"
    if b"to" not in present:
        head += b"To: " + b", ".join(recipients) + b"\n"
    received = b"Received: " + received + b"\n"
    end = b"\n.\n" if pos == size else b".\n"     # the format wants one body line at least
    if subject_end is None:
        return [head, (0, pos), b"Subject: \n" + received, (pos, size), end]
    return [head, (0, subject_end), received, (subject_end, size), end]


def stored_message(body, sender, recipients, received):
    """The whole stored form of a stored body held in memory (see stored_layout)."""
    return laid_out(body, stored_layout(lambda: io.BytesIO(body), len(body), sender, recipients, received))


def laid_out(body, layout):
    """The message a stored_layout describes, for a body held in memory (bytes)."""
    return b"".join([body[p[0]:p[1]] if isinstance(p, tuple) else p for p in layout])


def received_stamp():
    """The Received: value for now, local time, as the mailbox format writes it."""
    return time.strftime("%Y-%m-%d : %H : %M").encode("ascii")


def parse_path(text):
    """Split '<addr> PARAMS' into (addr, [params]); None when addr is no RFC 5321 path.

    The local part must be a Dot-string (4.1.2): atoms joined by single
    dots, so no address can be '..' or start with a dot.  UTF-8 is taken
    in both parts (RFC 6531); bytes that are not UTF-8 are not.
    """
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
    if len(address) > MAX_PATH:
        return None
    if address and not ADDRESS.match(address):
        return None
    return address, rest.split()


def local_part(address):
    """The part of an address before its last '@' (all of it when it has none)."""
    return address.rpartition("@")[0] if "@" in address else address


def printable(text):
    """Text from a message fit to go into a reply line: printable characters only, not too many."""
    return "".join(c for c in text[:MAX_PATH] if c.isprintable())


def foreign_sender(lines, login):
    """The first From: or Sender: address of a message that is not login's own, else None.

    lines: the message's lines as stored (bytes), its header block first, as
    header_block() finds it.  An address is login's own when its local part
    is login, in any case, whatever the display name.  A From: or Sender:
    that holds no address at all is not login's own either ('' is returned).
    """
    lines, scanned = itertools.tee(lines)
    count, _ = header_block(scanned)
    fields = []
    for line in itertools.islice(lines, count):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line                 # a folded line continues its field
        else:
            fields.append(line)
    for field in fields:
        name, _, value = field.partition(b":")
        if name.lower() in (b"from", b"sender"):
            text = " ".join(value.decode("utf-8", "replace").split())
            addresses = [address for _, address in email.utils.getaddresses([text]) if address]
            for address in addresses or [""]:
                if local_part(address).lower() != login.lower():
                    return address
    return None


# --------------------------------------------------------------------------
# Delivery: appending a message to the recipients' mailboxes
# --------------------------------------------------------------------------

def prepare_spool(root):
    """The path of ROOT/.spool, emptied of what a crash may have left there."""
    path = os.path.join(root, SPOOL_NAME)
    try:
        names = os.listdir(path) if stat.S_ISDIR(os.lstat(path).st_mode) else []
    except OSError:
        names = []
    for name in names:     # only a crash on a system without unnamed files leaves any
        remove_file(os.path.join(path, name))
    return path


def spool_file(folder):
    """A new unnamed file in the spool folder (made private on first use; never through a symlink)."""
    os.makedirs(folder, 0o700, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(folder).st_mode):
        raise OSError(errno.ENOTDIR, "not a folder (a symlink?)", folder)
    return tempfile.TemporaryFile(dir=folder)


class Spool:
    """A message's stored body while it arrives: in memory while small, then in a file in ROOT/.spool.

    The file has no name (it is removed as soon as it is made, or made
    without one), so nothing of it outlives the process, even a kill -9.
    """

    def __init__(self, folder):
        self.folder = folder
        self.parts = []              # the body, while it is in memory
        self.file = None
        self.size = 0                # bytes stored
        self.wire_size = 0           # their RFC 1870 size

    def write(self, stored):
        """Add stored lines (ending with \\n) to the body."""
        self.size += len(stored)
        self.wire_size += wire_size(stored)
        if self.file is not None:
            self.file.write(stored)
            return
        self.parts.append(stored)
        if self.size > SPOOL_THRESHOLD:
            self.file = spool_file(self.folder)
            self.file.write(b"".join(self.parts))
            self.parts = None

    def body(self):
        """The body, while it is in memory."""
        if len(self.parts) > 1:
            self.parts = [b"".join(self.parts)]
        return self.parts[0] if self.parts else b""

    def lines(self):
        """An iterator over the body's lines, from the first."""
        if self.file is None:
            return io.BytesIO(self.body())
        self.file.seek(0)
        return self.file

    def message(self, layout):
        """The stored message laid out by stored_layout: bytes, or a SpooledMessage when large."""
        if self.file is None:
            return laid_out(self.body(), layout)
        self.file.flush()
        return SpooledMessage(self.file, layout)

    def close(self):
        """Forget the body (a spool file vanishes)."""
        if self.file is not None:
            self.file.close()
        self.file, self.parts = None, []


class SpooledMessage:
    """A stored message too large for memory: bytes to add and ranges of a spool file, in order."""

    def __init__(self, file, layout):
        self.file = file
        self.layout = layout

    def __len__(self):
        return sum(p[1] - p[0] if isinstance(p, tuple) else len(p) for p in self.layout)

    def write_to(self, fd):
        """Write the message to fd, a chunk at a time."""
        for piece in self.layout:
            if not isinstance(piece, tuple):
                write_all(fd, piece)
                continue
            start, end = piece
            while start < end:
                self.file.seek(start)
                chunk = self.file.read(min(COPY_CHUNK, end - start))
                if not chunk:
                    raise OSError("the spool file shrank")
                write_all(fd, chunk)
                start += len(chunk)


class MailboxFull(Exception):
    """A message would make a mailbox hold more than its quota; it was stored for nobody."""


def deliver(message, mailbox_paths, quota=None):
    """Append one stored message to every mailbox; return once it is on disk in all of them.

    Holding the delivery locks of all the mailboxes (in sorted order, as the
    lock protocol asks), append the message to each and fsync each; on any
    error cut every one back to its old size, so a message is in all of the
    mailboxes or in none.  A mailbox it would take past quota bytes stops
    it before anything is written (MailboxFull).  A message for one mailbox
    takes the same steps in a GroupCommit (see Speed-ups), which shares them
    with its neighbours.
    """
    paths = sorted(set(mailbox_paths))
    if len(paths) == 1:
        return GROUP_COMMIT.deliver(paths[0], message, quota)
    with contextlib.ExitStack() as held:     # whatever was taken is given back, on any error too
        opened = []                          # (fd, size before the append)
        for path in paths:
            held.enter_context(delivery_lock(path))
            fd, st = open_mailbox(path)
            held.callback(os.close, fd)
            opened.append((fd, set_torn_tail_aside(fd, path, st.st_size)))
            if quota is not None and opened[-1][1] + len(message) > quota:
                raise MailboxFull(path)
        try:
            for fd, _ in opened:
                append_message(fd, message)
            for fd, _ in opened:
                os.fsync(fd)
        except BaseException:
            for fd, size in opened:
                cut_back(fd, size)
            raise


def open_mailbox(path):
    """Open a mailbox for appending, creating it (durably) when it is absent: (fd, os.stat_result)."""
    flags = os.O_RDWR | os.O_APPEND
    try:
        return open_regular(path, flags)
    except FileNotFoundError:
        opened = open_regular(path, flags | os.O_CREAT)
        fsync_directory(os.path.dirname(path))
        return opened


def append_message(fd, message):
    """Write a message (bytes, or a SpooledMessage) at the end of a mailbox whose lock is held."""
    if isinstance(message, bytes):
        write_all(fd, message)
    else:
        message.write_to(fd)


def cut_back(fd, size):
    """Undo a failed append, so that nothing unacknowledged stays in a mailbox; False if that failed."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        return True
    except OSError as exc:
        log.critical("could not cut a mailbox back to %d bytes (it has %s) after a failed delivery: %s",
                     size, _size_of(fd), exc)
        return False


def _size_of(fd):
    try:
        return os.fstat(fd).st_size
    except OSError:
        return "an unknown size"


# --------------------------------------------------------------------------
# The protocol session
# --------------------------------------------------------------------------
# Shared with pop_server.py: the wire (lines in, replies out) and the session skeleton.

class ConnectionClosed(Exception):
    """The client closed its side of the connection."""


class LineTooLong(Exception):
    """A line went past the limit; it has been read and thrown away."""


class SessionEnd(Exception):
    """Ends a session; its text says why, for the log."""


class SASLError(Exception):
    """A SASL exchange that cannot go on; its text says why: "cancelled", "malformed", "too long"."""


def decode_sasl(text):
    """The bytes of a SASL response (RFC 4954 4, RFC 5034 4): base64, "=" for none, "*" cancels."""
    text = text.strip()
    if text == "*":
        raise SASLError("cancelled")
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("malformed")


def plain_credentials(data):
    """The (login name, password) of a PLAIN response (RFC 4616); (None, b"") if it is malformed.

    Logging in as one user to act as another (an authzid of its own) is not offered.
    """
    parts = data.split(b"\0")
    if len(parts) != 3:
        return None, b""
    authzid, authcid, password = parts
    try:
        name, acting_as = authcid.decode("utf-8"), authzid.decode("utf-8")
    except UnicodeDecodeError:
        return None, b""
    if acting_as and acting_as.lower() != name.lower():
        return None, b""
    return name, password


def name_and_digest(text):
    """Split "name digest" (a CRAM-MD5 response, APOP's argument) into (name, digest), or None."""
    name, _, digest = text.strip().rpartition(" ")
    if not name or not HEX_DIGEST.match(digest):
        return None
    return name, digest.lower()


def fresh_timestamp(domain):
    """A new "<number.random@domain>": a CRAM-MD5 challenge (RFC 2195), the APOP timestamp (RFC 1939 7)."""
    return "<%d.%s@%s>" % (os.getpid(), os.urandom(8).hex(), domain)


def shown_name(name):
    """A login name as given by a client, fit for a log line (quoted, control characters escaped, cut)."""
    return repr(name[:64]) if name else "-"


# What a read or write past the idle timeout raises: socket.timeout for a
# Python timeout, BlockingIOError for SO_RCVTIMEO (see Speed-ups), and ssl's
# errors for the same inside TLS.
IDLE_TIMEOUT_ERRORS = (socket.timeout, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Wire:
    """One client's connection as a session sees it: command lines in, replies out.

    One recv() is never taken to be one line: what arrives is gathered in a
    buffer and cut into lines.  Replies are queued and sent in one write
    when the client is owed them: before the wire waits for more input
    (so the replies to pipelined commands go out together, and never wait
    behind a half-sent line: RFC 2920 3.2), or when the queue grows large.
    """

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout        # seconds a read may wait for the client
        self.waiting = timeout        # seconds the socket is set to wait now
        self.buffer = bytearray()     # received, not read yet
        self.pending = []             # queued to send (bytes)
        self.pending_size = 0

    def send(self, data):
        """Queue bytes for the client."""
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= SEND_THRESHOLD:
            self.flush()

    def flush(self):
        """Send what is queued, in one write."""
        if self.pending:
            data = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            self.sock.sendall(data)

    def fill(self, deadline=None):
        """Send what is queued, then wait for more bytes from the client; return how many came.

        deadline (a time.monotonic() value) cuts the wait short: past it,
        socket.timeout is raised as for a client silent too long.
        """
        self.flush()
        wait = self.timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            # A deadline further off than half the timeout leaves the wait as
            # it is: changing it costs two system calls, and it is checked again
            # after the read.
            if left < self.timeout / 2:
                wait = left
        if wait != self.waiting:
            set_idle_timeout(self.sock, wait)
            self.waiting = wait
        chunk = self.sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionClosed()
        self.buffer += chunk
        return len(chunk)

    def readline(self, limit):
        """Return (line without its end, True if it ended in CRLF); raise LineTooLong past limit.

        limit counts the line end too.  A longer line is thrown away as it
        comes in, so it never sits in memory whole.  A line must be complete
        within the timeout of its first byte, so it cannot be trickled in.
        """
        scanned, deadline = 0, None
        while True:
            end = self.buffer.find(b"\n", scanned)
            if end >= 0:
                break
            if len(self.buffer) >= limit:
                del self.buffer[:]
                scanned = 0
                limit = -1
            else:
                scanned = len(self.buffer)
            if deadline is None and (scanned or limit < 0):
                deadline = time.monotonic() + self.timeout
            self.fill(deadline)
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        if limit < 0 or end + 1 > limit:
            raise LineTooLong()
        if line.endswith(b"\r"):
            return line[:-1], True
        return line, False

    def start_tls(self, context):
        """Send what is queued, then run a server-side TLS handshake (raises ssl.SSLError, OSError).

        What the client sent behind the command came before the handshake:
        it is dropped, never read as if it had come encrypted.
        """
        self.flush()
        del self.buffer[:]
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.waiting = self.timeout

    def close(self, notify_wait=0.0):
        """Send what is queued (if the client still listens), end TLS with a close_notify, and close."""
        try:
            self.flush()
            if isinstance(self.sock, ssl.SSLSocket):
                self.end_tls(notify_wait)
        except (OSError, ValueError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def end_tls(self, wait):
        """Send a TLS close_notify, then wait up to wait seconds for the client's (RFC 8446 6.1).

        Without it the client cannot tell our close from a connection cut
        by an attacker ("unexpected eof").
        """
        self.sock.settimeout(wait)
        self.sock = self.sock.unwrap()

    def wake(self):
        """Make the read the session waits in end as if the client had closed (at shutdown)."""
        # socket.socket's own shutdown: SSLSocket's would drop the TLS state the goodbye needs.
        socket.socket.shutdown(self.sock, socket.SHUT_RD)


class Session:
    """One client's connection: reads command lines and runs the do_VERB method each names.

    The skeleton of both servers' sessions: a protocol subclass gives the
    commands (do_VERB methods) and says what to send at the start, for a
    line that is too long, and at a timeout.  Replies are queued by reply()
    and sent when the client waits for them.
    """

    MAX_LINE = MAX_COMMAND_LINE       # the longest command line, its line end included
    SASL_CONTINUE = ""                # what starts a SASL challenge line: "334 " (SMTP), "+ " (POP3)
    SASL_REPLIES = {}                 # why a SASL exchange failed -> the reply

    def __init__(self, server, sock, address):
        self.server = server
        self.address = address        # the client's (host, port): the socket's peer, or a PROXY header's
        self.peer = peer_text(address)
        self.verbose = server.verbose
        self.wire = Wire(sock, server.timeout)
        self.last_reply = ""          # the last line queued
        self.tls_active = False
        self.crlf = True              # did the last command line end in CRLF?
        self.auth_failures = 0

    def reply(self, *lines):
        """Queue a reply of one or more lines (text); it is sent before the session next waits."""
        if self.verbose:
            for line in lines:
                log.info("%s S: %s", self.peer, line)
        self.last_reply = lines[-1]
        # Replies are small, so they simply wait in the queue for the next flush.
        self.wire.pending.append(("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape"))

    def log_command(self, verb, text):
        """Log a command line (--verbose), with the password, SASL data or digest it carries masked."""
        shown = MASKED_COMMANDS.get(verb)
        if shown is not None:
            words = text.split(" ", shown + 1)
            if len(words) > shown + 1:
                text = " ".join(words[:shown + 1]) + " ****"
        log.info("%s C: %s", self.peer, text)

    # -- the session from start to end

    def run(self):
        """Serve the connection until the session ends; then close it and log one line about it."""
        reason = "closed by the client"
        self.server.open_sessions.add(self)
        try:
            if self.server.stopping:          # came in while the server was stopping
                raise ConnectionClosed()
            if self.server.implicit_tls:
                self.start_tls()              # RFC 8314: TLS from the first byte
            self.start()
            while True:
                try:
                    line, self.crlf = self.wire.readline(self.MAX_LINE)
                except LineTooLong:
                    self.line_too_long()
                else:
                    self.handle(line)
        except SessionEnd as end:
            reason = str(end)
        except IDLE_TIMEOUT_ERRORS:
            reason = "timed out"
            self.timed_out()
        except (ConnectionClosed, OSError):
            if self.server.stopping:          # woken by the shutdown (see Server.end_sessions)
                reason = "server shutting down"
                self.shutting_down()
        except Exception:
            reason = "failed"
            log.exception("session with %s failed", self.peer)
        finally:
            self.finish(reason)

    def finish(self, reason):
        """Give back what the session holds, close the connection, log one line."""
        try:
            self.release()
            self.wire.close(min(CLOSE_NOTIFY_WAIT, self.server.timeout))
            log.info("%s", self.summary(reason))
        finally:
            self.server.open_sessions.discard(self)

    def start_tls(self):
        """Turn the connection into a TLS one (STARTTLS, STLS), after the go-ahead reply is queued.

        Then the protocol forgets what was said before (RFC 3207 4.2, RFC 2595 4).
        """
        try:
            self.wire.start_tls(self.server.tls.context())
        except (ssl.SSLError, OSError) as exc:
            log.info("%s TLS handshake failed: %s", self.peer, exc)
            raise SessionEnd("TLS handshake failed")
        self.tls_active = True
        self.forget()

    # -- authentication, the same for every method of both protocols

    def login_result(self, mechanism, name, login, failure):
        """Log one authentication (who, how, the outcome); answer a failure; return login (None: failed).

        A failure, by any method, is answered more slowly from the 3rd on,
        AUTH_DELAY_STEP more each time, and the 5th ends the session.
        """
        log.info("%s: authentication %s: login %s, mechanism %s", self.peer,
                 "failed" if login is None else "succeeded", login or shown_name(name), mechanism)
        if login is not None:
            return login
        self.auth_failures += 1
        if self.auth_failures >= AUTH_DELAY_FROM:
            time.sleep(AUTH_DELAY_STEP * (self.auth_failures - AUTH_DELAY_FROM + 1))
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self.too_many_failures(failure)
            raise SessionEnd("too many failed logins")
        self.reply(failure)
        return None

    def sasl(self, mechanism, initial):
        """Run one SASL exchange (the AUTH command); return the login it proves, or None after a failure.

        mechanism: PLAIN, LOGIN or CRAM-MD5; initial: the initial response
        from the command line, or None.
        """
        name, login, why = None, None, "invalid"
        try:
            name, login = getattr(self, "sasl_" + mechanism.replace("-", "_"))(initial)
        except SASLError as exc:
            why = str(exc)
        return self.login_result(mechanism, name, login, self.SASL_REPLIES[why])

    def sasl_response(self, initial, challenge=b""):
        """The client's next SASL response, decoded: initial if given, else its answer to challenge."""
        if initial is None:
            self.reply(self.SASL_CONTINUE + base64.b64encode(challenge).decode("ascii"))
            try:
                line, _ = self.wire.readline(MAX_SASL_LINE)
            except LineTooLong:
                raise SASLError("too long")
            if self.verbose:
                log.info("%s C: ****", self.peer)      # SASL data is never logged
            initial = line.decode("ascii", "replace")
        return decode_sasl(initial)

    def sasl_PLAIN(self, initial):
        """RFC 4616: the login name and the password, in one response."""
        name, password = plain_credentials(self.sasl_response(initial))
        return name, (self.server.users.authenticate(name, password) if name else None)

    def sasl_LOGIN(self, initial):
        """The LOGIN mechanism: the login name, then the password, each asked for in turn."""
        name = self.sasl_response(initial, b"Username:").decode("utf-8", "replace")
        password = self.sasl_response(None, b"Password:")
        return name, self.server.users.authenticate(name, password)

    def sasl_CRAM_MD5(self, initial):
        """RFC 2195: the client proves it knows the password by an HMAC-MD5 of a new challenge."""
        if initial is not None:
            raise SASLError("malformed")             # the server speaks first
        challenge = fresh_timestamp(self.server.domain).encode("utf-8")
        answer = name_and_digest(self.sasl_response(None, challenge).decode("utf-8", "replace"))
        if answer is None:
            return None, None
        return answer[0], self.server.users.authenticate_digest(
            answer[0], answer[1], lambda password: hmac.new(password, challenge, hashlib.md5).hexdigest())

    # -- what each protocol says

    def start(self):
        """Queue the greeting."""
        raise NotImplementedError

    def handle(self, line):
        """Serve one command line (bytes, without its line end)."""
        raise NotImplementedError

    def line_too_long(self):
        """Answer a command line that was too long."""
        raise NotImplementedError

    def timed_out(self):
        """Say goodbye to a client that was silent too long (if the protocol does)."""

    def shutting_down(self):
        """Say goodbye to a client whose session the server's shutdown ends (if the protocol does)."""

    def too_many_failures(self, reply):
        """Answer the failed authentication that ends the session."""
        self.reply(reply)

    def forget(self):
        """Forget the dialogue so far: TLS has just begun."""

    def release(self):
        """Give back what the session holds (it is ending)."""

    def summary(self, reason):
        """The log line about the ended session."""
        return "%s: %s" % (self.peer, reason)


# -- The SMTP session

def read_data(wire, strict, spool, max_size, timeout):
    """Read a DATA block up to its lone '.' line into spool, stored; None, or the Replies name of why not.

    In a CRLF (strict) session only <CRLF>.<CRLF> ends the data, so a body
    holding "\\n.\\n" or "\\r.\\n" cannot end the message early and smuggle
    what follows in as a second message.  A session typed with bare LF
    ends at any line holding only '.'.  Each whole line goes to the spool
    as soon as it is in, so memory holds only a chunk and one line; once
    the message is too large or a line too long, the rest is read and
    thrown away to find the end.  A client that trickles gets its
    `timeout` as a budget, refilled by a second for every MIN_DATA_RATE
    bytes it sends (as Postfix's smtpd_min_data_rate does).
    """
    buffer = wire.buffer
    # The DATA command's own line end, put back so that a '.' on the very
    # first line is found like any other end of data.
    buffer[:0] = b"\r\n"
    start, refused = 2, None          # start: the first line not stored yet
    budget, since = timeout, time.monotonic()    # the time the client has left, from when
    line_end = b"\r\n" if strict else b"\n"
    while True:
        dot, after = data_end(buffer, start - 2, strict)
        if dot >= 0:
            if refused is None and dot > start:        # the last line, before the '.' line
                refused = _store(spool, _taken(buffer, start, dot), strict, max_size)
            del buffer[:after]
            return refused
        whole = buffer.rfind(line_end, start) + len(line_end)
        if refused is None and whole > start:
            refused = _store(spool, _taken(buffer, start, whole), strict, max_size)
            start = whole
        if refused is None and len(buffer) - start > MAX_TEXT_LINE:
            refused = "LINE_TOO_LONG"
        if refused is not None:
            start = len(buffer) - 2                    # keep what could begin the '.' line
        del buffer[:start - 2]
        start = 2
        budget, since = fill_within(wire, budget, since, timeout)


def _taken(buffer, start, end):
    """buffer[start:end] as bytes: its lines then are bytes too, cheaper objects than bytearrays."""
    with memoryview(buffer) as view:
        return bytes(view[start:end])


def fill_within(wire, budget, since, timeout):
    """Wait for more of a message, charging the wait to the client's budget; (budget left, now)."""
    received = wire.fill(since + budget)
    now = time.monotonic()
    return min(timeout, budget - (now - since) + received / MIN_DATA_RATE), now


def read_octets(wire, count, timeout):
    """The next count octets from the client (a BDAT chunk), in pieces, within DATA's time budget."""
    budget, since = timeout, time.monotonic()
    while count:
        if not wire.buffer:
            budget, since = fill_within(wire, budget, since, timeout)
        piece = bytes(wire.buffer[:count])
        del wire.buffer[:len(piece)]
        count -= len(piece)
        yield piece


class ChunkedMessage:
    """A message arriving in BDAT chunks (RFC 3030), stored as it comes, exactly as DATA is.

    The chunks carry the message as it is, without dot-stuffing; their lines
    are stuffed as DATA's wire form would be, then stored by the same code,
    so the mailbox cannot tell the two apart.
    """

    def __init__(self, spool, max_size):
        self.spool = spool
        self.max_size = max_size
        self.partial = b""           # a line begun in one piece and not ended yet
        self.refused = None          # the Replies name of why the message is refused
        self.failed = False          # a chunk was refused: only RSET goes on

    def read(self, wire, count, timeout):
        """Take the next count octets from the client: stored, or thrown away once refused."""
        for piece in read_octets(wire, count, timeout):
            if self.refused is None:
                self._add(piece)

    def _add(self, piece):
        data = self.partial + piece
        whole = data.rfind(b"\r\n") + 2
        if whole > 1:
            run = data[:whole].replace(b"\r\n.", b"\r\n..")
            self.refused = _store(self.spool, b"." + run if run.startswith(b".") else run,
                                  True, self.max_size)
            data = data[whole:]
        self.partial = data
        if self.refused is None and len(self.partial) > MAX_TEXT_LINE:
            self.refused = "LINE_TOO_LONG"

    def finish(self):
        """The last chunk is in: end a last line that has no line end; None, or why refused."""
        if self.refused is None and self.partial:
            self._add(b"\r\n")
        return self.refused


def data_end(buffer, start, strict):
    """Where the '.' line that ends DATA begins in buffer (searched from start), and what follows it.

    Returns (dot, after), the offsets of the '.' and of the byte after its
    line; (-1, -1) if the '.' line is not there yet.
    """
    if strict:
        end = buffer.find(b"\r\n.\r\n", max(start, 0))
        return (end + 2, end + 5) if end >= 0 else (-1, -1)
    found = LF_DATA_END.search(buffer, max(start, 0))
    return (found.end(1), found.end()) if found else (-1, -1)


def _store(spool, run, strict, max_size):
    """Add whole wire lines to the spool in their stored form; None, or the Replies name of why not."""
    stored, longest = stored_lines(run, strict)
    if longest > MAX_TEXT_LINE - 2:
        return "LINE_TOO_LONG"
    try:
        spool.write(stored)
    except OSError as exc:
        log.error("cannot spool a message in %s: %s", spool.folder, exc)
        return "LOCAL_ERROR"
    if spool.wire_size > max_size:
        return "MESSAGE_TOO_LARGE"
    return None


class SMTPSession(Session):
    """One client's SMTP conversation: its state and one do_VERB method per command."""

    SASL_CONTINUE = "334 "
    SASL_REPLIES = SMTP_SASL_REPLIES

    def __init__(self, server, sock, address):
        super().__init__(server, sock, address)
        self.domain = server.domain
        self.replies = PLAIN_REPLIES    # Replies, with enhanced codes, once the client says EHLO
        self.bad_commands = 0        # syntax and sequence errors in a row
        self.client_name = None      # from HELO/EHLO
        self.login = None            # the user AUTH proved the client is
        self.delivered = 0
        self.chunked = None          # the message BDAT chunks are building (RFC 3030)
        self._reset()

    def _reset(self):
        """Forget the transaction in progress (sender and recipients)."""
        self.sender = None
        self.utf8 = False            # MAIL FROM had SMTPUTF8 (RFC 6531)
        self.declared_size = 0       # MAIL FROM's SIZE= (RFC 1870)
        self.recipients = []         # addresses as given, in order
        self.logins = []             # their mailbox owners, without repeats
        if self.chunked is not None:
            self.chunked.spool.close()
            self.chunked = None

    def start(self):
        self.reply(self.replies.GREETING % self.domain)

    def line_too_long(self):
        self.reply(self.replies.LINE_TOO_LONG)
        self.count_bad_command()

    def timed_out(self):
        self.reply(self.replies.TIMEOUT % self.domain)

    def shutting_down(self):
        self.reply(self.replies.SHUTTING_DOWN % self.domain)

    def too_many_failures(self, reply):
        self.reply(reply, self.replies.TOO_MANY_FAILURES % self.domain)

    def forget(self):
        self.client_name = None      # RFC 3207 4.2: the client starts again with EHLO and AUTH
        self.replies = PLAIN_REPLIES
        self.login = None
        self._reset()

    def release(self):
        self._reset()                # a message half sent in BDAT chunks goes

    def summary(self, reason):
        return "connection from %s closed, %d message(s) delivered" % (self.peer, self.delivered)

    def handle(self, line):
        """Run one command line through the do_ method its verb names; count the bad ones."""
        text = line.decode("utf-8", "surrogateescape")
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if self.verbose:
            self.log_command(verb, text)
        # MAIL_FROM: and RCPT_TO: are the course assignment's spelling of MAIL FROM: and RCPT TO:
        if verb[:5] in ("MAIL_", "RCPT_"):
            verb, argument = verb[:4], text[5:]
        handler = getattr(self, "do_" + verb, None) if verb.isalpha() and verb.isascii() else None
        if handler is None:
            self.reply(self.replies.UNKNOWN_COMMAND)
        else:
            handler(argument.strip())
        if self.bad_commands or self.last_reply[0] == "5":
            self.count_bad_command()

    def count_bad_command(self):
        """Count a syntax or sequence error (500-504) in a row; too many end the session."""
        code = self.last_reply[:3]
        if "500" <= code <= "504":
            self.bad_commands += 1
            if self.bad_commands >= MAX_BAD_COMMANDS:
                self.reply(self.replies.TOO_MANY_ERRORS % self.domain)
                raise SessionEnd("too many errors")
        elif code[0] in "23":
            self.bad_commands = 0

    # -- the commands

    def do_HELO(self, argument):
        """Greet the client; a new greeting also ends any transaction."""
        if not argument.isprintable() or not argument:    # bytes that are no UTF-8 show as unprintable
            return self.reply(self.replies.SYNTAX % "HELO hostname")
        self._reset()
        self.client_name, self.replies = argument, PLAIN_REPLIES
        self.reply(self.replies.HELLO % argument)

    def do_EHLO(self, argument):
        """Greet the client and list the service extensions (RFC 5321 4.1.1.1)."""
        if not argument.isprintable() or not argument:    # bytes that are no UTF-8 show as unprintable
            return self.reply(self.replies.SYNTAX % "EHLO hostname")
        self._reset()
        self.client_name, self.replies = argument, Replies
        keywords = ["SIZE %d" % self.server.max_size, "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES",
                    "SMTPUTF8", "CHUNKING"]
        if self.tls_active or not self.server.require_tls:
            keywords.append("AUTH " + " ".join(SMTP_MECHANISMS))
        if self.server.tls and not self.tls_active:
            keywords.append("STARTTLS")
        keywords.append("HELP")
        self.reply(self.replies.EHLO % (self.domain, argument),
                   *["250-" + k for k in keywords[:-1]], "250 " + keywords[-1])

    def do_MAIL(self, argument):
        """Start a transaction with the sender (MAIL FROM: or MAIL_FROM:)."""
        if self.client_name is None:
            return self.reply(self.replies.HELO_FIRST)
        if self.sender is not None:
            return self.reply(self.replies.SENDER_GIVEN)
        if self.server.require_tls and not self.tls_active:
            return self.reply(self.replies.STARTTLS_FIRST)
        if self.server.require_auth and self.login is None:
            return self.reply(self.replies.AUTH_REQUIRED)
        if self.server.stopping:
            self.shutting_down()
            raise SessionEnd("server shutting down")
        path = self._path_after(argument, "FROM:")
        if path is None:
            return self.reply(self.replies.SYNTAX % "MAIL FROM:<address>")
        address, parameters = path
        if self.login is not None and local_part(address).lower() != self.login.lower():
            return self.reply(self.replies.NOT_YOURS % (address, self.login))
        utf8, size = False, 0
        for parameter in parameters:
            keyword, _, value = parameter.upper().partition("=")
            if keyword == "SIZE" and value.isdigit():
                size = int(value)
            elif keyword == "SMTPUTF8" and not value:
                utf8 = True
            elif not (keyword == "BODY" and value in ("7BIT", "8BITMIME")):
                return self.reply(self.replies.MAIL_PARAMETER % parameter)
        if size > self.server.max_size:
            return self.reply(self.replies.MESSAGE_TOO_LARGE)
        if not (utf8 or address.isascii()):
            return self.reply(self.replies.NEEDS_SMTPUTF8)
        self.sender, self.utf8, self.declared_size = address, utf8, size
        self.reply(self.replies.SENDER_OK % address)

    def do_RCPT(self, argument):
        """Add a recipient: a user of this mail root (RCPT TO: or RCPT_TO:)."""
        if self.sender is None:
            return self.reply(self.replies.MAIL_FIRST)
        path = self._path_after(argument, "TO:")
        if path is None or not path[0]:
            return self.reply(self.replies.SYNTAX % "RCPT TO:<address>")
        address, parameters = path
        if parameters:
            return self.reply(self.replies.RCPT_PARAMETERS)
        if not (self.utf8 or address.isascii()):
            return self.reply(self.replies.NEEDS_SMTPUTF8)
        local = local_part(address)
        domains = self.server.local_domains
        if domains is not None and "@" in address and address.rpartition("@")[2].lower() not in domains:
            return self.reply(self.replies.RELAYING_DENIED)
        if local.lower() == POSTMASTER:
            login = self.server.postmaster()
        else:
            login = self.server.users.canonical(local)
        if login is None:
            return self.reply(self.replies.NO_SUCH_USER)
        if len(self.recipients) >= MAX_RECIPIENTS:
            return self.reply(self.replies.TOO_MANY_RECIPIENTS)
        full = self.server.quota is not None and self._over_quota(login)
        if full:
            return self.reply(full)
        self.recipients.append(address)
        if login not in self.logins:
            self.logins.append(login)
        self.reply(self.replies.RECIPIENT_OK % local)

    def _over_quota(self, login):
        """The reply for a recipient whose mailbox (under --quota) cannot take the declared message, or None."""
        quota = self.server.quota
        if self.declared_size > quota:
            return self.replies.OVER_QUOTA
        try:
            held = os.stat(self.server.users.mailbox_path(login)).st_size
        except OSError:
            held = 0
        return self.replies.MAILBOX_FULL if held >= quota or held + self.declared_size > quota else None

    def do_DATA(self, argument):
        """Receive the message and deliver it to every recipient."""
        if argument:
            return self.reply(self.replies.SYNTAX % "DATA")
        if self.sender is None:
            return self.reply(self.replies.NO_SENDER)
        if not self.recipients:
            return self.reply(self.replies.NO_RECIPIENT)
        if self.chunked is not None:
            return self.reply(self.replies.DATA_AFTER_BDAT)
        with self.server.in_flight:     # from the 354 on, a shutdown waits for this message
            self.reply(self.replies.START_DATA)
            spool = Spool(self.server.spool_folder)
            try:
                refused = read_data(self.wire, self.crlf, spool, self.server.max_size, self.server.timeout)
                self.reply(getattr(self.replies, refused) if refused else self._accept(spool))
            finally:
                spool.close()
        self._reset()

    def do_BDAT(self, argument):
        """Take a chunk of exactly n octets of the message (RFC 3030); BDAT n LAST delivers it."""
        words = argument.split()
        if not words or not words[0].isdigit():
            return self.reply(self.replies.SYNTAX % "BDAT size [LAST]")
        count, last = int(words[0]), len(words) == 2 and words[1].upper() == "LAST"
        if len(words) > 1 and not last:
            refusal = self.replies.SYNTAX % "BDAT size [LAST]"
        elif self.sender is None:
            refusal = self.replies.NO_SENDER
        elif not self.recipients:
            refusal = self.replies.NO_RECIPIENT
        elif self.chunked is not None and self.chunked.failed:
            refusal = self.replies.BDAT_FAILED
        else:
            return self._chunk(count, last)
        # The client sends the octets whatever the reply: read them, to stay in step.
        for _ in read_octets(self.wire, count, self.server.timeout):
            pass
        self.reply(refusal)

    def _chunk(self, count, last):
        """Store a chunk; with the last one, deliver the message."""
        if self.chunked is None:
            self.chunked = ChunkedMessage(Spool(self.server.spool_folder), self.server.max_size)
        chunked = self.chunked
        chunked.read(self.wire, count, self.server.timeout)
        if not last:
            if chunked.refused is None:
                return self.reply(self.replies.CHUNK_OK % count)
            chunked.failed = True            # RFC 3030 4: the client is to send RSET next
            return self.reply(getattr(self.replies, chunked.refused))
        with self.server.in_flight:          # from the last chunk on, a shutdown waits for it
            refused = chunked.finish()
            self.reply(getattr(self.replies, refused) if refused else self._accept(chunked.spool))
        self._reset()

    def _accept(self, spool):
        """Store a received message for every recipient; return the reply (250, or why not)."""
        foreign = foreign_sender(spool.lines(), self.login) if self.login else None
        if foreign is not None:
            return self.replies.NOT_YOURS % (printable(foreign), self.login)
        layout = stored_layout(spool.lines, spool.size, self.sender.encode("utf-8", "surrogateescape"),
                               [r.encode("utf-8", "surrogateescape") for r in self.recipients],
                               received_stamp())
        message = spool.message(layout)
        quota = self.server.quota
        if quota is not None and len(message) > quota:
            # No deletion could ever make room: a permanent refusal (RFC 3463 5.2.2), not a retry.
            log.info("not delivered from <%s>: %d bytes, more than the quota", self.sender, len(message))
            return self.replies.OVER_QUOTA
        try:
            deliver(message, [self.server.users.mailbox_path(login) for login in self.logins],
                    self.server.quota)
        except MailboxFull as full:
            log.info("not delivered from <%s>: %s is full", self.sender, full)
            return self.replies.MAILBOX_FULL
        except OSError as exc:
            log.error("delivery from %s to %s failed: %s", self.peer, ", ".join(self.logins), exc)
            return self.replies.LOCAL_ERROR
        self.delivered += 1
        log.info("delivered %d bytes from <%s> to %s", len(message), self.sender, ", ".join(self.logins))
        return self.replies.ACCEPTED

    def do_AUTH(self, argument):
        """Log the client in with SASL (RFC 4954): PLAIN, LOGIN or CRAM-MD5."""
        mechanism, _, initial = argument.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if self.replies is not Replies:             # AUTH is an extension: EHLO first (RFC 4954 4)
            return self.reply(self.replies.EHLO_FIRST)
        if self.login is not None:
            return self.reply(self.replies.AUTHENTICATED)
        if self.sender is not None:
            return self.reply(self.replies.AUTH_IN_TRANSACTION)
        if not mechanism or " " in initial:
            return self.reply(self.replies.AUTH_SYNTAX)
        if self.server.require_tls and not self.tls_active:
            return self.reply(self.replies.AUTH_NEEDS_TLS)
        if mechanism not in SMTP_MECHANISMS:
            return self.reply(self.replies.AUTH_MECHANISM)
        self.login = self.sasl(mechanism, initial or None)
        if self.login is not None:
            self.reply(self.replies.AUTH_OK)

    def do_STARTTLS(self, argument):
        """Turn the connection into a TLS one (RFC 3207); the client greets again."""
        if argument:
            return self.reply(self.replies.SYNTAX % "STARTTLS")
        if self.server.tls is None:
            return self.reply(self.replies.NOT_IMPLEMENTED)
        if self.tls_active:
            return self.reply(self.replies.TLS_ACTIVE)
        self.reply(self.replies.READY_FOR_TLS)
        self.start_tls()

    def do_RSET(self, argument):
        """Drop the transaction in progress."""
        if argument:
            return self.reply(self.replies.SYNTAX % "RSET")
        self._reset()
        self.reply(self.replies.OK)

    def do_NOOP(self, argument):
        """Do nothing, successfully."""
        self.reply(self.replies.OK)

    def do_VRFY(self, argument):
        """Tell whether a name is a user of this server."""
        path = parse_path(argument) if argument else None
        if not path or not path[0]:
            return self.reply(self.replies.SYNTAX % "VRFY <address>")
        login = self.server.users.canonical(local_part(path[0]))
        if login is None:
            return self.reply(self.replies.NO_SUCH_USER)
        self.reply(self.replies.USER % (login, login, self.domain))

    def do_HELP(self, argument):
        """List the commands."""
        first, last = self.replies.HELP
        self.reply(first % (" STARTTLS" if self.server.tls and not self.tls_active else ""), last)

    def do_EXPN(self, argument):
        """Known but not offered: mailing lists, relaying turns, logins."""
        self.reply(self.replies.NOT_IMPLEMENTED)

    do_TURN = do_EXPN

    def do_QUIT(self, argument):
        """Say goodbye and end the session."""
        self.reply(self.replies.GOODBYE % self.domain)
        raise SessionEnd("quit")

    @staticmethod
    def _path_after(argument, keyword):
        """Parse 'FROM:<addr> params' / 'TO:<addr>' (any case); None if malformed."""
        if argument[:len(keyword)].upper() != keyword:
            return None
        return parse_path(argument[len(keyword):])


# --------------------------------------------------------------------------
# The PROXY protocol: the client's address from a load balancer
# --------------------------------------------------------------------------
# Shared with pop_server.py.  Behind a TCP load balancer (HAProxy) every
# connection comes from the balancer; with HAProxy's PROXY protocol it
# first sends a header naming the client, as a text line (version 1) or in
# binary (version 2).  Read only from --proxy-from addresses, in the
# session's thread, before the greeting and before any TLS.

class ProxyHeaderError(Exception):
    """A PROXY header that is malformed, or none where one was due."""


def read_proxy_header(sock, own, timeout):
    """Read a PROXY header from sock within timeout seconds; return the client's (host, port).

    own is the connection's own peer (the balancer), which a LOCAL or
    UNKNOWN header keeps.  Exactly the header's bytes are read, never one
    of the protocol after it, so a TLS handshake or the first command
    behind it is left whole.  Raises ProxyHeaderError (malformed, or no
    header), ConnectionClosed (cut short) or socket.timeout (too slow).
    """
    deadline = time.monotonic() + timeout
    try:
        start = recv_exactly(sock, PROXY_FIRST_READ, deadline)
        if start == PROXY_V1_PREFIX:
            address = parse_proxy_v1(start + recv_line(sock, PROXY_V1_MAX - len(start), deadline))
        elif start == PROXY_V2_SIGNATURE[:len(start)]:
            head = start + recv_exactly(sock, PROXY_V2_FIXED - len(start), deadline)
            address = parse_proxy_v2(head, recv_exactly(sock, proxy_v2_length(head), deadline))
        else:
            raise ProxyHeaderError("no PROXY header")
    finally:
        sock.settimeout(None)        # the session sets its own timeout
    return address or own


def recv_exactly(sock, count, deadline):
    """Read exactly count bytes from sock by deadline (a time.monotonic() value)."""
    data = b""
    while len(data) < count:
        data += _recv_by(sock, deadline, count - len(data))
    return data


def recv_line(sock, limit, deadline):
    """Read a line, its LF included, of at most limit bytes from sock by deadline; not a byte more.

    What has come is looked at first (MSG_PEEK), and only the line's own
    bytes are taken from the socket.
    """
    data = b""
    while len(data) < limit:
        seen = _recv_by(sock, deadline, limit - len(data), socket.MSG_PEEK)
        end = seen.find(b"\n")
        data += sock.recv(end + 1 if end >= 0 else len(seen))   # all there: peeked
        if end >= 0:
            return data
    raise ProxyHeaderError("v1 header longer than %d bytes" % PROXY_V1_MAX)


def _recv_by(sock, deadline, size, flags=0):
    """One recv of up to size bytes, waiting no later than deadline; ConnectionClosed at EOF."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("PROXY header too slow")
    sock.settimeout(left)
    data = sock.recv(size, flags)
    if not data:
        raise ConnectionClosed()
    return data


def parse_proxy_v1(line):
    """The client's (host, port) in a v1 header line (CRLF included); None for UNKNOWN."""
    if not line.endswith(b"\r\n"):
        raise ProxyHeaderError("v1 header without CRLF")
    words = line[:-2].split(b" ")
    if words[1:2] == [b"UNKNOWN"]:
        return None                  # 2.1: the rest of the line is to be ignored
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed v1 header")
    version = 4 if words[1] == b"TCP4" else 6
    try:
        source, destination = (ipaddress.ip_address(w.decode("ascii")) for w in words[2:4])
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("bad address in v1 header")
    ports = words[4:6]
    if source.version != version or destination.version != version or not all(
            p.isdigit() and len(p) <= 5 and int(p) <= 65535 for p in ports):
        raise ProxyHeaderError("bad address or port in v1 header")
    return str(source), int(ports[0])


def proxy_v2_length(head):
    """How many bytes follow the fixed 16 of a v2 header, once its signature and command are checked."""
    if head[:12] != PROXY_V2_SIGNATURE:
        raise ProxyHeaderError("bad v2 signature")
    if head[12] not in (PROXY_V2_LOCAL, PROXY_V2_PROXY):
        raise ProxyHeaderError("unknown v2 version or command 0x%02x" % head[12])
    return struct.unpack("!H", head[14:16])[0]


def parse_proxy_v2(head, body):
    """The client's (host, port) in a checked v2 header (its fixed 16 bytes, then the rest); None for LOCAL.

    A relayed connection of another kind than TCP (UNSPEC, UNIX) keeps the
    balancer's address, as 2.2 allows.  What follows the addresses (TLVs)
    is read and ignored.
    """
    if head[12] == PROXY_V2_LOCAL or head[13] not in PROXY_V2_TCP:
        return None
    family, size = PROXY_V2_TCP[head[13]]
    if len(body) < 2 * size + 4:
        raise ProxyHeaderError("v2 header too short for its addresses")
    port, = struct.unpack("!H", body[2 * size:2 * size + 2])
    return socket.inet_ntop(family, body[:size]), port


def network_list(text):
    """The networks of a comma-separated --proxy-from (addresses or CIDRs)."""
    try:
        return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def in_networks(host, networks):
    """Whether a peer's host (as accept() gives it) is in one of networks."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:      # an IPv4 client of a dual-stack listener
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


# --------------------------------------------------------------------------
# The server loop
# --------------------------------------------------------------------------
# Shared with pop_server.py: the options both servers take, the accept loop,
# and running a server until Ctrl-C or SIGTERM.

def server_arguments(description, default_timeout, timeout_help, tls_command, require_tls_help):
    """A command-line parser with the options both servers take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("port", type=int, metavar="PORT", help="TCP port to listen on (0: any free port)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default: all IPv4 interfaces; '::' or '::1' for IPv6)")
    parser.add_argument("--root", default=".", help="mail root holding userinfo.txt and user folders (default: .)")
    parser.add_argument("--domain", default=socket.gethostname(),
                        help="name the server gives itself in replies (default: this host's name)")
    parser.add_argument("--timeout", type=float, default=default_timeout,
                        help="%s (default: %g)" % (timeout_help, default_timeout))
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="connections served at once; one more is refused (default: %d)"
                        % DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--max-per-client", type=int, metavar="N",
                        help="connections at once from one client address (IPv6: one /64); "
                        "one more is refused (default: half of --max-connections)")
    parser.add_argument("--verbose", action="store_true",
                        help="log every command and reply (passwords masked)")
    parser.add_argument("--tls-cert", metavar="FILE", help="certificate (PEM) for %s" % tls_command)
    parser.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for %s" % tls_command)
    parser.add_argument("--require-tls", action="store_true", help=require_tls_help)
    parser.add_argument("--implicit-tls", action="store_true",
                        help="TLS from the first byte instead of %s (RFC 8314; SMTP usually on "
                             "port 465, POP3 on 995); needs --tls-cert and --tls-key" % tls_command)
    parser.add_argument("--proxy-from", metavar="CIDRS", type=network_list, default=[],
                        help="load balancers (comma-separated addresses or networks) whose connections "
                             "start with a PROXY protocol v1 or v2 header naming the client")
    return parser


def check_server_arguments(parser, args):
    """Check the options both servers take, load the TLS certificate; return args."""
    if not 0 <= args.port <= 65535:
        parser.error("PORT must be between 0 and 65535")
    if args.max_per_client is None:
        args.max_per_client = max(1, args.max_connections // 2)
    if args.max_connections < 1 or args.max_per_client < 1 or args.timeout <= 0:
        parser.error("--max-connections, --max-per-client and --timeout must be positive")
    if not os.path.isdir(args.root):
        parser.error("--root %s is not a directory" % args.root)
    args.tls = tls_context(parser, args.tls_cert, args.tls_key, args.require_tls or args.implicit_tls)
    return args


def tls_context(parser, cert, key, required):
    """The server's TLS certificate from --tls-cert/--tls-key, a ServerCertificate (None without them)."""
    if not cert and not key:
        if required:
            parser.error("--require-tls and --implicit-tls need --tls-cert and --tls-key")
        return None
    if not (cert and key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        return ServerCertificate(cert, key)
    except (OSError, ssl.SSLError) as exc:
        parser.error("cannot load the TLS certificate or key: %s" % exc)


def load_tls_context(cert, key):
    """A new server TLS context with the pair in the files cert and key (raises OSError, ssl.SSLError)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # A client's close without close_notify then ends the reading like any
    # EOF, instead of OpenSSL 3 failing the connection with an alert: the
    # session can still say goodbye and send its own close_notify.  No EOF
    # is ever taken as a command, so a truncation attack gains nothing.
    context.options |= IGNORE_UNEXPECTED_EOF
    context.load_cert_chain(cert, key)
    return context


class ServerCertificate:
    """The server's TLS context, renewed when the certificate or key file changes on disk.

    An ACME client replaces the pair every 60-90 days; a restart would drop
    every open session.  So when a connection needs TLS, the files are
    looked at (at most every CERT_CHECK_INTERVAL seconds, or at the next
    one after SIGHUP) and a changed pair is loaded into a new context:
    sessions already in TLS keep the old one.  A new pair that does not
    load (unreadable, a key that does not match, a file half written) is
    logged once per change, and the old context stays.
    """

    def __init__(self, cert, key):
        self.cert, self.key = cert, key
        self._stamp = self._files_stamp()      # taken before the load: a change during it is seen next time
        self._context = load_tls_context(cert, key)
        self._broken = None                    # the stamp of a new pair that failed to load
        self._next_check = time.monotonic() + CERT_CHECK_INTERVAL
        self._guard = threading.Lock()

    def context(self):
        """The TLS context for a new connection: the newest pair that loaded."""
        now = time.monotonic()
        # One session looks at the files; the others meanwhile take the context as it is.
        if now >= self._next_check and self._guard.acquire(blocking=False):
            try:
                self._next_check = now + CERT_CHECK_INTERVAL
                self._reload_if_changed()
            finally:
                self._guard.release()
        return self._context

    def check_soon(self):
        """Look at the files at the next connection that needs TLS (SIGHUP: a renewal's deploy hook)."""
        self._next_check = 0.0

    def _reload_if_changed(self):
        """Load the pair into a new context if the files changed since the last load or failure."""
        stamp = self._files_stamp()
        if stamp in (self._stamp, self._broken):
            return
        try:
            context = load_tls_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            self._broken = stamp
            log.error("new TLS certificate or key not loaded, keeping the old pair: %s", exc)
            return
        self._context, self._stamp, self._broken = context, stamp, None
        log.info("TLS certificate %s reloaded", self.cert)

    def _files_stamp(self):
        """What a replaced or rewritten file changes: each file's (mtime, size, inode), None if missing."""
        stamp = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(path)
            except OSError:
                stamp.append(None)
            else:
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamp)


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


def peer_text(address):
    """A client's address as the log shows it: 192.0.2.1:5000, [2001:db8::1]:5000."""
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def client_key(host):
    """The client a per-client limit counts: its IPv4 address, or the /64 of its IPv6 one."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if ip.ipv4_mapped:                 # an IPv4 client of a dual-stack listener
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network((ip, IPV6_CLIENT_PREFIX), strict=False))


class Slots:
    """Who may connect now: at most `total` connections, at most `per_client` from one client.

    take() answers True (a slot is taken), False (the client has its share)
    or None (the server is full).  A connection whose client is not known
    yet (a balancer's, before its PROXY header) takes a slot for client
    None, counted in the total only, and claim()s the client's share later.
    """

    def __init__(self, total, per_client):
        self.total = total
        self.per_client = per_client
        self.open = 0
        self.by_client = {}          # client -> its open connections
        self._logged = {}            # client -> when its last refusal was logged
        self._guard = threading.Lock()

    def take(self, client):
        """Take a slot for a new connection of client: True, or False when client has all its own."""
        with self._guard:
            if self.open >= self.total:
                return None
            mine = self.by_client.get(client, 0)
            if mine >= self.per_client:
                return False
            self.open += 1
            if client is not None:
                self.by_client[client] = mine + 1
        return True

    def claim(self, client):
        """Count a slot taken for client None as client's: True, or False when client has all its own."""
        with self._guard:
            mine = self.by_client.get(client, 0)
            if mine >= self.per_client:
                return False
            self.by_client[client] = mine + 1
        return True

    def give_back(self, client):
        """A connection of client (None: not known yet) has ended."""
        with self._guard:
            self.open -= 1
            if client is None:
                return
            left = self.by_client[client] - 1
            if left:
                self.by_client[client] = left
            else:
                del self.by_client[client]

    def worth_logging(self, client):
        """Whether to log a refusal of client: once per REFUSAL_LOG_INTERVAL, not at each try."""
        now = time.monotonic()
        with self._guard:
            if now - self._logged.get(client, -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
                return False
            if len(self._logged) > 4 * self.total:          # forget clients gone quiet
                self._logged = {c: t for c, t in self._logged.items()
                                if now - t < REFUSAL_LOG_INTERVAL}
            self._logged[client] = now
            return True


class InFlight:
    """Counts the work under way that a shutdown waits for (a delivery, a mailbox rewrite)."""

    def __init__(self):
        self._count = 0
        self._guard = threading.Lock()

    def __enter__(self):
        with self._guard:
            self._count += 1

    def __exit__(self, *exc):
        with self._guard:
            self._count -= 1

    def wait(self, timeout):
        """Wait until nothing is in flight; return False if timeout passed first."""
        deadline = time.monotonic() + timeout
        while self._count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)      # only at shutdown: not worth a condition on every message
        return True


class Server:
    """Accepts connections and serves each in a thread of its own, with a session_class session.

    Knows nothing of the protocol: that is all in the session.
    """

    session_class = None     # each server's protocol
    BUSY = ""                # the reply to a client over the connection limit
    BUSY_CLIENT = ""         # the reply to a client over its own limit

    def __init__(self, args):
        self.users = UserTable(args.root)
        self.domain = args.domain
        self.timeout = args.timeout
        self.verbose = args.verbose
        self.tls = args.tls
        self.require_tls = args.require_tls
        self.implicit_tls = args.implicit_tls
        self.proxy_from = args.proxy_from      # the load balancers that send PROXY headers
        self.open_sessions = set()   # each session is in it while it runs (set.add is atomic)
        self.stopping = False        # True once a shutdown has begun
        self.slots = Slots(args.max_connections, args.max_per_client)
        self.in_flight = InFlight()
        self.listener = create_listener(args.host, args.port)
        self.address = self.listener.getsockname()

    def serve_forever(self):
        """Accept connections until shutdown() closes the listener."""
        log.info("listening on %s port %d", self.address[0], self.address[1])
        self.users.refresh()         # read userinfo.txt now, so its problems show at start
        while True:
            try:
                sock, address = self.listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                log.warning("accept failed: %s", exc)
                time.sleep(ACCEPT_RETRY_DELAY)    # e.g. out of descriptors: let sessions end first
                continue
            self.start_session(sock, address)

    def start_session(self, sock, address):
        """Serve a new connection in a thread of its own, or refuse it when there is no slot for it.

        A balancer's connection is counted in the total only: its client is
        known, and counted, once the session's thread has read the PROXY header.
        """
        from_balancer = self.proxy_from and in_networks(address[0], self.proxy_from)
        peer, client = peer_text(address), None if from_balancer else client_key(address[0])
        taken = self.slots.take(client)
        if taken is None:
            return self.refuse(sock, peer, client, self.BUSY, "%d connections open" % self.slots.total)
        if not taken:
            return self.refuse(sock, peer, client, self.BUSY_CLIENT,
                               "%d connections open from %s" % (self.slots.per_client, client))
        try:
            start_thread(self.serve, sock, address, client)
        except RuntimeError as exc:               # the system cannot make more threads
            self.slots.give_back(client)
            self.refuse(sock, peer, client, self.BUSY, str(exc))

    def refuse(self, sock, peer, client, reply, reason):
        """Send a client the reply that there is no room for it now, and hang up (never waiting for it)."""
        if self.slots.worth_logging(client):
            log.warning("%s: refused, %s", peer, reason)
        try:
            sock.setblocking(False)
            sock.send(reply.encode("ascii") + b"\r\n")
        except OSError:
            pass
        sock.close()

    def serve(self, sock, address, client):
        """Run one session (in its own thread); client None: a balancer's, whose PROXY header comes first."""
        leave_signals_to_main_thread()
        try:
            if client is None:
                address, client = self.proxied_client(sock, address)
                if client is None:
                    return
            set_idle_timeout(sock, self.timeout)
            self.session_class(self, sock, address).run()
        except Exception:
            log.exception("session with %s failed", peer_text(address))
            sock.close()
        finally:
            self.slots.give_back(client)

    def proxied_client(self, sock, address):
        """Read a balancer's PROXY header and claim a slot for the client it names: (address, client).

        The client is None when the connection is closed unanswered (no
        valid header within --timeout) or refused (the client has all its
        connections open).
        """
        try:
            address = read_proxy_header(sock, address, self.timeout)
        except (ProxyHeaderError, ConnectionClosed, OSError) as exc:
            why = ("cut short" if isinstance(exc, ConnectionClosed) else
                   "timed out" if isinstance(exc, socket.timeout) else str(exc) or type(exc).__name__)
            log.warning("%s: closed, no valid PROXY header: %s", peer_text(address), why)
            sock.close()
            return address, None
        client = client_key(address[0])
        if not self.slots.claim(client):
            self.refuse(sock, peer_text(address), client, self.BUSY_CLIENT,
                        "%d connections open from %s" % (self.slots.per_client, client))
            return address, None
        return address, client

    def shutdown(self, signals):
        """Stop accepting; give the work in flight time to finish (until a second signal)."""
        self.stopping = True         # work that checks it after entering in_flight does not start
        self.listener.close()
        log.info("shutting down")
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while not self.in_flight.wait(0.1):
            if signals.hurried or time.monotonic() > deadline:
                # What is cut short here was never acknowledged, and nothing is half stored.
                log.warning("stopping before the work in progress has finished")
                return
        self.end_sessions(min(CLOSE_NOTIFY_WAIT + 1, max(0.0, deadline - time.monotonic())))

    def end_sessions(self, timeout):
        """Wake every session still open so it says goodbye and closes itself; wait up to timeout seconds.

        Without it they would be cut off by the exit: no SMTP 421, no TLS close_notify.
        """
        for session in list(self.open_sessions):
            try:
                session.wire.wake()
            except OSError:       # closed meanwhile
                pass
        deadline = time.monotonic() + timeout
        while self.open_sessions and time.monotonic() < deadline:
            time.sleep(0.02)      # a few sessions saying goodbye: nothing to wake us for


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
    """Block Ctrl-C, SIGTERM and SIGHUP in the calling (session) thread.

    Python runs signal handlers in the main thread only; a signal the kernel
    delivers to a session thread would wait, unseen, until the main thread
    next wakes up by itself.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def run_server(server_class, args, name):
    """Run a server until Ctrl-C or SIGTERM; return the exit code."""
    use_small_thread_stacks()
    run_on_one_cpu()
    configure_logging(name)
    try:
        server = server_class(args)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", args.host, args.port, exc)
        return 1
    signals = ShutdownSignals()
    if args.tls is not None and hasattr(signal, "SIGHUP"):
        # Only flags the files to be looked at: the handler runs in the main thread, between
        # two steps of the accept loop, where loading and logging could meet a held lock.
        signal.signal(signal.SIGHUP, lambda signum, frame: args.tls.check_soon())
    try:
        server.serve_forever()
    except Shutdown:
        pass
    server.shutdown(signals)
    log.info("stopped")
    return 0


# -- The SMTP server

class SMTPServer(Server):
    """The SMTP server: its sessions are SMTPSessions."""

    session_class = SMTPSession

    def __init__(self, args):
        super().__init__(args)
        self.max_size = args.max_size
        self.quota = args.quota
        self.require_auth = args.require_auth
        self.local_domains = args.local_domains
        self.postmaster_name = args.postmaster
        self.BUSY = "421 %s Too many connections, try again later" % self.domain
        self.BUSY_CLIENT = "421 4.7.0 %s Too many connections from your address" % self.domain
        self.spool_folder = prepare_spool(self.users.root)

    def postmaster(self):
        """The login that mail for postmaster goes to: --postmaster, else the first user."""
        if self.postmaster_name is not None:
            return self.users.canonical(self.postmaster_name)
        users = self.users.logins()
        return users[0] if users else None


# --------------------------------------------------------------------------
# Speed-ups
# --------------------------------------------------------------------------
# Each piece here makes the servers faster without changing what they do;
# the code above reads as if they were not there.  Measured with
# tests/bench_smtp.py and tests/bench_pop.py on 2 CPUs.

class GroupCommit:
    """Deliveries to one mailbox that overlap share its lock and one fsync.

    Each message joins its mailbox's queue, then waits for the mailbox's
    writer lock.  Whoever gets that lock and finds its message not yet
    written appends every message queued so far, under the delivery lock,
    and fsyncs once (cutting the file back if that fails, as deliver()
    does); the others find theirs written and return.  Under load, one
    fsync then serves many messages (measured: +50% at 10 and 50 clients
    of one mailbox).
    """

    def __init__(self):
        self._guard = threading.Lock()
        self._mailboxes = {}         # path -> _QueuedMailbox

    def deliver(self, path, message, quota):
        """Append message to the mailbox at path (unless that passes quota); return once it is on disk."""
        box = self._mailboxes.get(path)
        if box is None:
            with self._guard:
                box = self._mailboxes.setdefault(path, _QueuedMailbox(path))
        box.deliver(message, quota)


class _QueuedMailbox:
    """One mailbox as the deliveries of this process share it: a queue and a writer lock.

    It remembers where the file ended after its own last append: a file
    that still ends there ends in a whole message, so its tail need not be
    read (three system calls fewer for every batch).
    """

    def __init__(self, path):
        self.path = path
        self.lock = delivery_lock(path)
        self.clean_end = None        # (inode, size) after our last append
        self.writer = threading.Lock()
        self._guard = threading.Lock()
        self._queue = []             # [message, outcome] pairs not taken by a writer yet

    def deliver(self, message, quota):
        mine = [message, quota, _PENDING]
        with self._guard:
            self._queue.append(mine)
        with self.writer:
            if mine[2] is _PENDING:
                with self._guard:
                    batch, self._queue = self._queue, []
                try:
                    errors = self._write(batch)
                except BaseException as exc:
                    errors = [exc] * len(batch)
                    raise
                finally:
                    for entry, error in zip(batch, errors):
                        entry[2] = error
        if mine[2] is not None:
            raise mine[2]

    def _write(self, batch):
        """Append the batch's messages under the delivery lock, fsync once; each one's error or None."""
        with self.lock:
            return self._append(batch)

    def _append(self, batch):
        """Append the batch's messages to the mailbox (its lock held), fsync once; each one's error or None."""
        errors = [None] * len(batch)
        fd, st = open_mailbox(self.path)
        try:
            size = st.st_size
            if (st.st_ino, size) != self.clean_end:
                size = set_torn_tail_aside(fd, self.path, size)
            start, self.clean_end = size, None
            for index, (message, quota, _) in enumerate(batch):
                if quota is not None and size + len(message) > quota:
                    errors[index] = MailboxFull(self.path)
                    continue
                try:
                    append_message(fd, message)
                    size += len(message)
                except OSError as exc:
                    errors[index] = exc
                    if not cut_back(fd, size):     # the rest would follow the debris: drop them too
                        return [error or exc for error in errors[:index]] + [exc] * (len(batch) - index)
            try:
                os.fsync(fd)
            except OSError as exc:
                cut_back(fd, start)
                return [error or exc for error in errors]
            self.clean_end = (st.st_ino, size)
        finally:
            os.close(fd)
        return errors


_PENDING = object()          # the outcome of a queued message nobody has written yet
GROUP_COMMIT = GroupCommit()


def start_thread(function, *args):
    """Run function(*args) in a new thread.

    A bare thread: threading.Thread.start() also waits until the new thread
    runs, which would hold up the accept loop at every connection.
    """
    _thread.start_new_thread(function, args)


def set_idle_timeout(sock, seconds):
    """Make a blocking read or write on sock fail once the peer has been silent for seconds.

    Python's own socket timeout polls before every recv and send; the
    kernel's SO_RCVTIMEO/SO_SNDTIMEO cost nothing until they fire (as
    BlockingIOError).  Where they are missing, fall back to settimeout.
    """
    if os.name == "posix" and hasattr(socket, "SO_RCVTIMEO") and not isinstance(sock, ssl.SSLSocket):
        whole = int(seconds)
        value = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    else:
        sock.settimeout(seconds)


def use_small_thread_stacks():
    """Give the threads started from now on small stacks (call before starting any).

    Small stacks fit many more in glibc's cache of freed stacks, so a thread
    per connection does not map and unmap 8 MiB each time.
    """
    threading.stack_size(THREAD_STACK_SIZE)


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


class LineWriteHandler(logging.Handler):
    """Logs each record with a single write() to a file descriptor, taking no lock.

    logging's StreamHandler holds a lock around write and flush, and under
    load session threads queue on it.  One write() of a line is atomic on
    pipes and terminals and never overlaps another on files, so no lock is
    needed to keep lines whole.  The line is the one logging.Formatter
    would make of "%(asctime)s NAME %(levelname)s %(message)s", made
    directly: the date and time are formatted once a second, not per line
    (a third of what a record cost, measured).
    """

    def __init__(self, fd, name):
        super().__init__()
        self.fd = fd
        self.tag = name
        self.formatter = logging.Formatter()    # for tracebacks only
        self._clock = (None, "")                # (second, its date and time as text)

    def handle(self, record):
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record):
        try:
            os.write(self.fd, self.line(record).encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)

    def line(self, record):
        """The record as one line of text (with its traceback, if any, on the lines after)."""
        second, stamp = self._clock
        if int(record.created) != second:
            second = int(record.created)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._clock = (second, stamp)       # one assignment: threads see the old pair or the new
        text = "%s,%03d %s %s %s\n" % (stamp, record.msecs, self.tag, record.levelname, record.getMessage())
        if record.exc_info:
            text += self.formatter.formatException(record.exc_info) + "\n"
        return text


def configure_logging(name):
    """INFO and above to stderr, one line per record, tagged with the server's name."""
    # Which thread, process and source line made a record: unused here, and costly to find.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    logging.basicConfig(level=logging.INFO, handlers=[LineWriteHandler(sys.stderr.fileno(), name)])


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main(argv=None):
    """Run the SMTP server until Ctrl-C or SIGTERM (or, with --hash-password, hash a password)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--hash-password" in argv:
        return hash_password_main(argv)
    return run_server(SMTPServer, parse_args(argv), "smtp")


def hash_password_main(argv):
    """Read a password (not echoed on a terminal) and print it hashed, as a userinfo.txt field."""
    parser = argparse.ArgumentParser(prog="mailserver_smtp.py --hash-password",
                                     description="Print a hashed password field for userinfo.txt: "
                                                 "LOGIN<space>FIELD.")
    parser.add_argument("--hash-password", action="store_true", required=True)
    parser.add_argument("--scheme", type=str.upper, choices=sorted(PASSWORD_SCHEMES),
                        default="PBKDF2-SHA256", help="the hash (default: PBKDF2-SHA256)")
    args = parser.parse_args(argv)
    if args.scheme == "SCRYPT" and not hasattr(hashlib, "scrypt"):
        parser.error("this Python has no scrypt (it needs OpenSSL 1.1 or newer)")
    try:
        password = read_new_password()
    except (EOFError, KeyboardInterrupt, ValueError) as exc:
        print("no password hashed: %s" % (str(exc) or "no input"), file=sys.stderr)
        return 1
    print(hash_password(password, args.scheme))
    return 0


def read_new_password():
    """The password to hash (bytes): typed twice on a terminal, else the first line of input."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise ValueError("the two passwords differ")
        password = password.encode("utf-8")
    else:
        password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    if not password or password != password.strip():
        raise ValueError("a password must be given, without spaces at its ends")
    return password


if __name__ == "__main__":
    sys.exit(main())

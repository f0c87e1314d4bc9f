#!/usr/bin/env python3
"""SMTP server of the course mail system: accepts mail and appends it to per-user mailboxes.

    python mailserver_smtp.py 2525 [--host ADDR] [--domain NAME] [--root DIR] ...

One thread serves each connection.  A message is written whole, under a lock
shared with the POP3 server, and fsync'd before the client hears 250.

The file has five parts:
  Part 1, "shared with pop_server.py": the mail root (users and aliases, mailbox files,
    the lock protocol, the mailbox format), the session skeleton, the
    PROXY protocol and the server skeleton.  pop_server.py imports this part and nothing else.
  Part 2, "the SMTP server", in the order a message travels: its replies,
    the session and its commands, reading DATA and BDAT, the stored form,
    the spool, delivery into the mailboxes; for other domains the outbound
    queue, DNS, delivery to other servers, bounces and delay notices; then
    the server (where each recipient's route is found: users, aliases, the
    catch-all, the queue) and main().
  Part 3, "message authentication: DKIM": keys, RSA, Ed25519,
    canonicalization, signing and verifying, behind a narrow interface.
  Part 4, "checks on mail that comes in": SPF, DKIM verification and DMARC
    of mail from outside, and the Authentication-Results each copy gets.
  Part 5, "forwarding that SPF accepts": the Sender Rewriting Scheme for
    the mail aliases send to other domains, and its way back.
"""

# Part 1's modules: what both servers are made of (users and passwords, files
# and locks, sockets, TLS, threads, the PROXY protocol, logging).
import argparse
import base64
import binascii
import configparser
import contextlib
import errno
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import selectors
import signal
import socket
import ssl
import stat
import struct
import threading
import _thread
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# Part 2's modules: what only the SMTP server needs (the stored form, the
# queue, DNS, delivery to other servers, bounces, its own command line).
import collections
import email.errors
import email.header
import email.utils
import getpass
import io
import heapq
import itertools
import random
import secrets
import smtplib
import sys
import tempfile
import urllib.parse          # Part 4: SPF's URL-escaped macros (RFC 7208 7.3)


# ##########################################################################
#
#   PART 1: SHARED WITH pop_server.py
#
#   What both servers are made of.  pop_server.py imports from this part
#   only; nothing here knows SMTP.
#
# ##########################################################################

# --------------------------------------------------------------------------
# Constants of both servers
# --------------------------------------------------------------------------

DEFAULT_MAX_CONNECTIONS = 100
MAX_COMMAND_LINE = 512       # RFC 5321 4.5.3.1.4, CRLF included
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
# A listener's mode -> (TLS from the first byte, TLS before AUTH and mail, AUTH before mail): CONTRACT.md 8
LISTEN_MODES = {
    "smtp": (False, False, False),        # the MX port (RFC 5321): STARTTLS offered with a certificate
    "submission": (False, True, True),    # RFC 6409 4.1 and RFC 3207: STARTTLS, AUTH, then mail
    "smtps": (True, True, True),          # RFC 8314 3.3: implicit TLS, AUTH, then mail
    "pop3": (False, False, False),        # RFC 1939, STLS (RFC 2595) offered with a certificate
    "pop3s": (True, True, False),         # RFC 8314 3.3: implicit TLS
}
LISTEN_SPEC = re.compile(r"(?:(\[[^\]/]+\]|[^:\[\]/]+):)?(\d{1,5})(?:/(\w+))?\Z")   # [ADDR:]PORT[/MODE]
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

log = logging.getLogger("mail")     # both servers log through it; each line names the server


# --------------------------------------------------------------------------
# Users and passwords
# --------------------------------------------------------------------------

USERINFO_NAME = "userinfo.txt"
LOGIN_PATTERN = re.compile(r"[A-Za-z0-9._-]+\Z")


def file_stamp(path):
    """What a replaced or rewritten file changes: its (mtime, size, inode); None while it is absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


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

    NEVER_READ = ()              # the stamp before the first read: no file's, not even a missing one's

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, USERINFO_NAME)
        self._guard = threading.Lock()
        self._stamp = self.NEVER_READ
        self._passwords = {}   # login -> password bytes or HashedPassword, in file order
        self._folded = {}      # login.lower() -> login
        self._decoy = NO_PASSWORD   # checked for unknown users: a hash, if the file has one

    def refresh(self):
        """Read userinfo.txt again if it has changed since it was last read (and say what is amiss)."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return
        with self._guard:
            if stamp == self._stamp:
                return
            passwords = self._load() if stamp else {}
            if stamp is None:
                log.warning("%s is missing: no users, so every recipient gets 550 and every login fails",
                            self.path)
            self._report_folders(passwords)
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

    def _report_folders(self, passwords):
        """Log each listed user without a folder, and each folder with a mailbox but no line: silent 550s else."""
        for login in passwords:
            if not os.path.isdir(os.path.join(self.root, login)):
                log.warning("%s lists user %r, but %s has no folder %r: mail for it gets 550 until it is made",
                            USERINFO_NAME, login, self.root, login)
        try:
            names = sorted(os.listdir(self.root))
        except OSError as exc:
            log.warning("cannot list the mail root %s: %s", self.root, exc)
            return
        for name in names:
            if (name not in passwords and is_valid_login(name) and not name.startswith(".")
                    and os.path.isfile(os.path.join(self.root, name, MAILBOX_NAME))):
                log.warning("folder %r holds a mailbox, but %s has no line for it: it is no user",
                            name, USERINFO_NAME)

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


# Aliases.  ROOT/aliases.txt (optional) gives names that are no users:
# "name: target, target ...", a target being a login, another alias or an
# address in another domain; "@domain: target ..." is a local domain's
# catch-all, for names that are neither users nor aliases.  Names compare
# in any case.  The table only holds the lines; what a name leads to is
# worked out by the SMTP server at each RCPT (SMTPServer.local_route), as
# the users, the domains and the postmaster are its to know.

ALIASES_NAME = "aliases.txt"
ALIAS_NAME = re.compile(r"[A-Za-z0-9._-]+\Z|@[A-Za-z0-9.-]+\Z")     # a name, or @domain for a catch-all
# a target: a login or alias, or an address (its domain a name or an RFC 5321 4.1.3 address literal)
ALIAS_TARGET = re.compile(r"[A-Za-z0-9._-]+\Z|[A-Za-z0-9!#$%&'*+/=?^_`{}~.-]+@(?:[A-Za-z0-9.-]+|\[[!-Z^-~]+\])\Z")
ALIAS_SEPARATORS = re.compile(r"[,\s]+")


class AliasTable:
    """The aliases of a mail root, read from aliases.txt again whenever the file changes."""

    NEVER_READ = UserTable.NEVER_READ

    def __init__(self, root, users):
        self.path = os.path.join(os.path.abspath(root), ALIASES_NAME)
        self.users = users           # a user's own name is never an alias
        self._guard = threading.Lock()
        self._stamp = self.NEVER_READ
        self._targets = {}           # name (lower case), or "@domain" -> tuple of targets
        self._usable = True          # False while the file is there but cannot be read: lookups fail
        self._reported = set()       # what lookups have complained of since the last read

    def refresh(self):
        """Read aliases.txt again if it has changed since it was last read (and say what is amiss)."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return
        with self._guard:
            if stamp != self._stamp:
                self._targets, self._usable = self._load() if stamp else ({}, True)
                self._reported = set()
                self._stamp = stamp

    def targets(self, name):
        """The targets of an alias (or of '@domain'), None when it is none; OSError if the file is unusable."""
        if not self._usable:
            raise OSError(errno.EIO, "%s cannot be read" % ALIASES_NAME, self.path)
        return self._targets.get(name.lower())

    def report_once(self, what, *args):
        """Log a problem a lookup found, once until the file changes."""
        if what % args not in self._reported:
            self._reported.add(what % args)
            log.warning(what, *args)

    def _load(self):
        try:
            fd, _ = open_regular(self.path, os.O_RDONLY)    # as a mailbox: no symlink, no FIFO
            with open(fd, "rb") as f:
                data = f.read()
        except OSError as exc:
            log.warning("cannot read %s (%s): mail for aliases gets 451 until it is fixed", self.path, exc)
            return {}, False
        table = {}
        for number, line in enumerate(data.split(b"\n"), 1):
            entry = self._parse(number, line.strip(), table)
            if entry is not None:
                table[entry[0]] = entry[1]
        return table, True

    def _parse(self, number, line, table):
        """(name, targets) of one line, None for a comment or a line that is reported and skipped."""
        if not line or line.startswith(b"#"):
            return None
        name, colon, rest = line.decode("utf-8", "replace").partition(":")
        name, targets = name.strip().lower(), [t for t in ALIAS_SEPARATORS.split(rest) if t]
        if not colon or not ALIAS_NAME.match(name) or name.strip("@.") != name.lstrip("@") or not targets:
            why = "is not 'name: target, target ...'"
        elif not all(ALIAS_TARGET.match(t) for t in targets):
            why = "has a target that is no login or address (pipes and files are not delivered to)"
        elif name in table:
            why = "repeats %r" % name
        elif self.users.canonical(name) is not None:
            why = "names user %r, whose mail is its own" % name
        else:
            unique = {}
            for target in targets:      # one of each, in the file's order
                unique.setdefault(target.lower(), target)
            return name, tuple(unique.values())
        log.warning("%s line %d %s; skipped", ALIASES_NAME, number, why)
        return None


# --------------------------------------------------------------------------
# Files and the lock protocol
# --------------------------------------------------------------------------
#
# Files.  ROOT/userinfo.txt lists the users; ROOT/<login>/my_mailbox is the
# mailbox of a user.  Beside each mailbox the servers keep hidden files:
#
#   .my_mailbox.lock       the delivery lock (below)
#   .my_mailbox.pop.lock   the session lock (below)
#   .my_mailbox.index      POP3's unique ids and index cache; only POP3 writes
#                          it, holding the session lock
#   .my_mailbox.new        a POP3 rewrite, until it is renamed over my_mailbox
#   .my_mailbox.torn       bytes of messages never acknowledged, set aside
#                          (appended, never served): what a crash left
#
# ROOT/.run holds a lock file each running server holds for its life: its
# CPU claim, and an SMTP server's relay settings (see the queue);
# and ROOT/.spool holds SMTP's large messages while they arrive (files with
# no name, gone with the process) and the commit record of each delivery to
# several mailboxes while it is under way (below).  The servers open every
# one of these files without following a symlink and use it only if it is
# a regular file, so a link planted in a user's folder cannot make them
# write or read anywhere else (a user's folder may itself be a symlink:
# that is the admin's choice).
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
#   lock, never the other way round.  SMTP takes no session lock, and takes
#   delivery locks, several of them (one message for several users), in
#   sorted order of their paths.  A holder of delivery locks may take other
#   kernel locks too, but never waits for one: the lock on a commit record
#   (below) is its own record's, taken when the file is made, and a look at
#   another's (held_by_nobody) is a try; SMTP's locks on queue files are
#   its own new files', and a runner's on a queued message is a try.  So no
#   two holders can wait for each other: there is no deadlock.
#
#   What locks cannot do, fsync and records do.  An append is fsync'd before
#   the client hears 250, so it survives a power cut.  A crash can still cut
#   a delivery short, and a client told nothing must find nothing stored:
#
#   - A message for several mailboxes is all or none.  Before its first
#     byte is written, a commit record in ROOT/.spool names each mailbox
#     and its size; it is fsync'd, and emptied (fsync'd again) only once
#     the message is on disk in all of them, just before the 250.  A
#     record that still names a mailbox when its delivery no longer holds
#     the locks belongs to a delivery that died.
#   - So whoever takes a delivery lock first makes the mailbox whole
#     (make_whole): the bytes a dead delivery added after the size its
#     record names, and a torn last message (an append cut short), are
#     moved to .my_mailbox.torn, and the record forgets that mailbox.
#     Every holder does this: an SMTP append, a POP3 login, a POP3 rewrite.

MAILBOX_NAME = "my_mailbox"
DELIVERY_LOCK_NAME = ".my_mailbox.lock"
SESSION_LOCK_NAME = ".my_mailbox.pop.lock"
INDEX_NAME = ".my_mailbox.index"
NEW_INDEX_NAME = ".my_mailbox.index.new"
NEW_MAILBOX_NAME = ".my_mailbox.new"
TORN_NAME = ".my_mailbox.torn"
SPOOL_NAME = ".spool"
RUN_NAME = ".run"            # what the running servers hold for their lives: CPU claims, relay settings

O_BINARY = getattr(os, "O_BINARY", 0)       # Windows: no newline translation in mailboxes
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)   # POSIX: a symlink is refused, not followed
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)   # a FIFO planted as a mailbox must not hang the open
READ_BACK = 65536                           # bytes read at a time when looking back for a message end
COMMIT_SUFFIX = ".commit"                   # a delivery to several mailboxes, until it is done


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
        """Give the lock up (at most once; a second call does nothing).

        It cannot fail: closing the file drops a kernel lock whatever the
        unlock said, so an error there is only logged.  What the lock
        guarded is done by now, and must not be reported as failed.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _unlock_fd(fd)
        except OSError as exc:
            log.warning("unlocking %s failed (closing it releases the lock): %s", self.path, exc)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    def unlink(self):
        """Remove the lock file while holding it: a waiter then locks a file nobody else will use."""
        remove_file(self.path)

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


def private_folder(root, name):
    """The path of the folder ROOT/name, made (mode 0700) if absent; OSError if it is no folder (a symlink)."""
    path = os.path.join(root, name)
    os.makedirs(path, 0o700, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise OSError(errno.ENOTDIR, "not a folder (a symlink?)", path)
    return path


def remove_file(path):
    """Remove a file if it is there (never a folder, never what a symlink points to)."""
    try:
        os.remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def held_by_nobody(path):
    """Whether no living process holds a kernel lock on the file at path (then, inside the with, we do).

    For files each locked by their writer for its life: what a dead writer
    left may go, what a live one is writing may not.
    """
    try:
        fd, _ = open_regular(path, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            free = _lock_fd(fd, False)
        except OSError:
            free = False
        yield free
    finally:
        os.close(fd)


def delivery_lock(mailbox_path):
    """The lock every writer of a mailbox file holds while it writes (see the lock protocol)."""
    return FileLock(os.path.join(os.path.dirname(mailbox_path), DELIVERY_LOCK_NAME))


def session_lock(mailbox_path):
    """The lock a POP3 session holds from login to its end (see the lock protocol)."""
    return FileLock(os.path.join(os.path.dirname(mailbox_path), SESSION_LOCK_NAME))


def write_all(fd, data):
    """Write all of data to fd (os.write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_directory(path, strict=False):
    """Make a new, renamed or removed directory entry durable (where a directory can be opened).

    strict: a failed fsync raises (the caller's commit depends on it).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return                    # Windows: a folder cannot be opened, nor needs to be
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def make_whole(fd, path, size, known_whole=False):
    """Make a mailbox end in acknowledged, whole messages; return its size.

    The caller has just taken the mailbox's delivery lock (see the lock
    protocol): what a dead delivery added, and a torn last message, go to
    .my_mailbox.torn.  known_whole: the caller knows the file ended in a
    whole message at this size (after its own last append), so its tail
    need not be read again.
    """
    size = undo_dead_deliveries(fd, path, size)
    end = size if known_whole else whole_messages_end(fd, size)
    if end < size:
        set_aside(fd, path, end, size, "a message cut short")
    return end


def set_aside(fd, path, start, size, what):
    """Move bytes start..size of a mailbox (its delivery lock held) to the end of its .torn file."""
    torn_path = os.path.join(os.path.dirname(path), TORN_NAME)
    torn, _ = open_regular(torn_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.lseek(fd, start, os.SEEK_SET)
        copied = start
        while copied < size:
            chunk = os.read(fd, min(READ_BACK, size - copied))
            if not chunk:
                break
            write_all(torn, chunk)
            copied += len(chunk)
        os.fsync(torn)
    finally:
        os.close(torn)
    os.ftruncate(fd, start)
    os.fsync(fd)
    log.warning("%s ended in %d bytes of %s; they are now at the end of %s",
                path, size - start, what, torn_path)


# Commit records.  A delivery to several mailboxes writes, before its first
# byte, a record in ROOT/.spool/*.commit: one line "SIZE LOGIN" per mailbox,
# its size before the delivery, then "end".  The record is emptied (or
# removed) when the delivery is done.  An empty record, or one cut short
# before its "end", names no delivery: nothing was appended under it.

COMMIT_END = "end"


@functools.lru_cache(maxsize=1024)      # asked at every delivery; paths are few
def commit_folder(mailbox_path):
    """Where the commit records of the mail root of a mailbox are: ROOT/.spool."""
    return os.path.join(os.path.dirname(os.path.dirname(mailbox_path)), SPOOL_NAME)


def commit_record_text(sizes):
    """A commit record's bytes for {login: size before the delivery}."""
    return ("".join("%d %s\n" % (size, login) for login, size in sizes.items()) + COMMIT_END + "\n").encode("ascii")


def undo_dead_deliveries(fd, path, size):
    """Set aside what dead deliveries appended to a mailbox whose delivery lock is now held; return its size.

    A record that names this mailbox is a dead delivery's: a live one
    would still hold the lock.  Records of other mailboxes are left alone,
    and so are empty ones (seen by their size, without reading them).
    """
    try:
        records = [entry.path for entry in os.scandir(commit_folder(path))
                   if entry.name.endswith(COMMIT_SUFFIX) and entry.stat(follow_symlinks=False).st_size]
    except OSError:
        return size
    login = os.path.basename(os.path.dirname(path))
    for record in records:
        # Records never gain a mailbox whose lock we hold: one read without the record's lock tells.
        if login in read_commit_record(record):
            size = undo_dead_delivery(fd, path, size, record, login)
    return size


def undo_dead_delivery(fd, path, size, record, login):
    """Undo one dead delivery's append to this mailbox, if its record names it; return the mailbox's size."""
    # Holders of the other mailboxes may be undoing the same record: one at a time.
    with FileLock(record + ".lock") as lock:
        sizes = read_commit_record(record)
        if login not in sizes:
            return size
        before = sizes.pop(login)
        if before < size:
            set_aside(fd, path, before, size, "a delivery that died before every mailbox had it")
        if sizes:
            rewrite_commit_record(record, sizes)
        else:
            remove_file(record)
            lock.unlink()
    return min(before, size)


def read_commit_record(record):
    """A commit record as {login: size}; {} once it is gone, empty, or cut short before its end."""
    try:
        fd, _ = open_regular(record, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        lines = f.read().decode("ascii", "replace").split("\n")
    if COMMIT_END not in lines:
        return {}
    sizes = {}
    for line in lines[:lines.index(COMMIT_END)]:
        size, _, login = line.partition(" ")
        if size.isdigit() and is_valid_login(login):
            sizes[login] = int(size)
    return sizes


def rewrite_commit_record(record, sizes):
    """Replace a commit record by one naming fewer mailboxes (durably: the next holder must not undo twice)."""
    temp = record[:-len(COMMIT_SUFFIX)] + ".new"
    fd, _ = open_regular(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, commit_record_text(sizes))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, record)
    fsync_directory(os.path.dirname(record), strict=True)


# --------------------------------------------------------------------------
# The mailbox format
# --------------------------------------------------------------------------
#
# The mailbox format.  Messages follow each other; each ends with a line
# holding only ".".  Lines end with "\n".  A line that starts with "." is
# stored with one more "." (SMTP's dot-stuffing), so "\n.\n" occurs only
# where a message ends.  That one rule, "a message ends at the first line
# holding only '.'", is message_end(); whole_messages_end() applies it
# backwards from the end of a file.  The readers of a mailbox (SMTP's torn
# tail check, POP3's index, the tests) find message ends through these two;
# only POP3's check of its cached index, for speed, takes a known message's
# end from the cache and looks at its last line alone ('.').  wire_size()
# and header_block() say what a message's size on the wire is and where
# its header block ends.

HEADER_LINE = re.compile(rb"[!-9;-~]+:")     # RFC 5322 2.2: a field name, then ':'


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


# --------------------------------------------------------------------------
# The wire and the session: lines in, replies out, one do_VERB per command
# --------------------------------------------------------------------------

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



# What a read or write past the idle timeout raises: socket.timeout, and
# ssl's errors for the same inside TLS.
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
            set_wait(self.sock, wait)
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

    def tls_version(self):
        """The TLS version of the connection ("TLSv1.3"), or None while it is in clear."""
        return self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else None

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

    def __init__(self, server, sock, address, listener):
        self.server = server
        self.listener = listener      # the one it came in on: its mode says what TLS and AUTH it needs
        self.address = address        # the client's (host, port): the socket's peer, or a PROXY header's
        self.peer = peer_text(address)
        self.verbose = server.verbose
        self.wire = Wire(sock, server.timeout)
        self.tls_active = False
        self.crlf = True              # did the last command line end in CRLF?
        self.auth_failures = 0

    def reply(self, *lines):
        """Queue a reply of one or more lines (text); it is sent before the session next waits."""
        if self.verbose:
            for line in lines:
                log.info("%s S: %s", self.peer, line)
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
            if self.listener.implicit_tls:
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

    def password_refused(self):
        """Whether a password may not cross the connection now: not in clear to a server with a certificate.

        As Dovecot's disable_plaintext_auth: a server that could offer TLS
        takes no password before it, except from the machine itself (a
        loopback client, or one a PROXY header says is loopback), where no
        network can see it.  --require-tls allows no exception.  Digest
        methods (CRAM-MD5, APOP) send no password and are never refused.
        """
        if self.tls_active or self.server.tls is None:
            return False
        ip = peer_ip(self.address[0])
        return self.listener.require_tls or ip is None or not ip.is_loopback

    def login_result(self, mechanism, name, login, failure):
        """Log one authentication (who, how, the outcome); answer a failure; return login (None: failed).

        A failure, by any method, is answered more slowly from the 3rd on,
        AUTH_DELAY_STEP more each time, and the 5th ends the session.
        """
        # One fixed form for fail2ban (README), the client's address last: no name a client
        # chooses can put another address after it.
        log.info("%s: authentication %s for login %s, mechanism %s, from %s", self.peer,
                 "failed" if login is None else "succeeded", login or shown_name(name), mechanism,
                 self.address[0])
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
    """The networks of a comma-separated --proxy-from or --relay-networks (addresses or CIDRs; '': none)."""
    try:
        return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def in_networks(host, networks):
    """Whether a peer's host (as accept() gives it) is in one of networks."""
    ip = peer_ip(host)
    return ip is not None and any(ip in network for network in networks)


# --------------------------------------------------------------------------
# The server: options, the accept loop, a thread per connection, shutdown
# --------------------------------------------------------------------------

def server_arguments(description, default_timeout, timeout_help, tls_command, require_tls_help, modes):
    """A command-line parser with the options both servers take; modes: the listener modes, default first."""
    parser = argparse.ArgumentParser(description=description)
    parser.set_defaults(modes=modes)
    parser.add_argument("port", type=int, metavar="PORT", nargs="?",
                        help="TCP port of the first listener, mode %s (0: any free port)" % modes[0])
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default: all IPv4 interfaces; '::' or '::1' for IPv6)")
    parser.add_argument("--site", metavar="FILE",
                        help="site file (INI): [mail] for both servers, [smtp], [pop3]; keys are the long "
                        "option names; the command line wins")
    parser.set_defaults(site_listen=None)
    parser.add_argument("--listen", metavar="[ADDR:]PORT[/MODE]", action="append", type=listen_spec,
                        help="one more listener (repeatable; ADDR default --host, IPv6 as [::1]); MODE: %s "
                        "(default %s)" % (", ".join(modes), modes[0]))
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
    parser.add_argument("--cpu", type=int, metavar="N",
                        help="the CPU to run on (default: one no other server of ours runs on)")
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
    args.listeners = listener_specs(parser, args)
    if args.max_per_client is None:
        args.max_per_client = max(1, args.max_connections // 2)
    if args.max_connections < 1 or args.max_per_client < 1 or args.timeout <= 0:
        parser.error("--max-connections, --max-per-client and --timeout must be positive")
    if not os.path.isdir(args.root):
        parser.error("--root %s is not a directory" % args.root)
    needs_tls = args.require_tls or args.implicit_tls or any(LISTEN_MODES[m][0] or LISTEN_MODES[m][1]
                                                            for _, _, m in args.listeners)
    args.tls = tls_context(parser, args.tls_cert, args.tls_key, needs_tls)
    return args


def listen_spec(text):
    """(host or None, port, mode or None) of a --listen [ADDR:]PORT[/MODE]; IPv6 is [ADDR]."""
    found = LISTEN_SPEC.match(text)
    if not found or int(found.group(2)) > 65535:
        raise argparse.ArgumentTypeError("%r is not [ADDR:]PORT[/MODE] (IPv6: [::1]:25/smtp)" % text)
    host, port, mode = found.groups()
    return host and host.strip("[]"), int(port), mode and mode.lower()


def listener_specs(parser, args):
    """The (host, port, mode) of each listener: the positional PORT first, then each --listen."""
    specs = [] if args.port is None else [(args.host, args.port, None)]
    listen = args.listen if args.listen is not None else args.site_listen     # the command line wins
    specs += [(host or args.host, port, mode) for host, port, mode in listen or ()]
    if not specs:
        parser.error("give a PORT or at least one --listen")
    for host, port, mode in specs:
        if not 0 <= port <= 65535:
            parser.error("PORT must be between 0 and 65535")
        if mode is not None and mode not in args.modes:
            parser.error("--listen %s:%d/%s: the mode must be one of %s" % (host, port, mode, ", ".join(args.modes)))
    return [(host, port, mode or args.modes[0]) for host, port, mode in specs]


def tls_context(parser, cert, key, required):
    """The server's TLS certificate from --tls-cert/--tls-key, a ServerCertificate (None without them)."""
    if not cert and not key:
        if required:
            parser.error("--require-tls, --implicit-tls and the TLS listener modes need --tls-cert and --tls-key")
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
        """The file_stamp of the certificate and of the key."""
        return file_stamp(self.cert), file_stamp(self.key)


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


class StartError(Exception):
    """The server cannot start: why, and the exit code (2: the options, as argparse's)."""

    code = 2


class ListenError(StartError):
    """A listener could not be opened: the server does not start (exit 1)."""

    code = 1


class Listener:
    """A listening socket and what its mode asks of the sessions that come in on it (CONTRACT.md 8).

    The server-wide --implicit-tls, --require-tls and --require-auth hold
    on every listener; a mode can only add to them.
    """

    def __init__(self, host, port, mode, args):
        implicit_tls, require_tls, require_auth = LISTEN_MODES[mode]
        self.mode = mode
        self.implicit_tls = implicit_tls or args.implicit_tls
        self.require_tls = require_tls or args.require_tls
        self.require_auth = require_auth or getattr(args, "require_auth", False)
        try:
            self.socket = create_listener(host, port)
        except OSError as exc:
            raise ListenError("cannot listen on %s port %d (%s): %s" % (host, port, mode, exc))
        self.address = self.socket.getsockname()

    def __str__(self):
        return "%s port %d (%s)" % (self.address[0], self.address[1], self.mode)


def open_listeners(args):
    """A Listener for each of args.listeners, all or none (ListenError naming the first that failed)."""
    listeners = []
    try:
        for host, port, mode in args.listeners:
            listeners.append(Listener(host, port, mode, args))
    except ListenError:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def peer_text(address):
    """A client's address as the log shows it: 192.0.2.1:5000, [2001:db8::1]:5000."""
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def client_key(host):
    """The client a per-client limit counts: its IPv4 address, or the /64 of its IPv6 one."""
    if ":" not in host:
        return host
    ip = peer_ip(host)
    if ip is None:
        return host
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.ip_network((ip, IPV6_CLIENT_PREFIX), strict=False))


def peer_ip(host):
    """A peer's host as accept() gives it, as an ip_address (an IPv4-mapped one as IPv4); None if not one."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped:      # an IPv4 client of a dual-stack listener
        return ip.ipv4_mapped
    return ip


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
            if not self._count(client):
                return False
            self.open += 1
        return True

    def claim(self, client):
        """Count a slot taken for client None as client's: True, or False when client has all its own."""
        with self._guard:
            return self._count(client)

    def _count(self, client):
        """Count one more connection of client (None: not known yet), unless it has all its own (guard held)."""
        if client is None:
            return True
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
    replies = None           # its replies: BUSY (over the connection limit), BUSY_CLIENT (over its own)

    def __init__(self, args):
        self.users = UserTable(args.root)
        self.domain = args.domain
        self.timeout = args.timeout
        self.verbose = args.verbose
        self.tls = args.tls
        self.proxy_from = args.proxy_from      # the load balancers that send PROXY headers
        self.open_sessions = set()   # each session is in it while it runs (set.add is atomic)
        self.threads = ConnectionThreads()
        self.stopping = False        # True once a shutdown has begun
        self.slots = Slots(args.max_connections, args.max_per_client)
        self.in_flight = InFlight()
        self.listeners = open_listeners(args)
        self.selector = None         # with several listeners: the one wait for all of them
        if len(self.listeners) > 1:
            self.selector = selectors.DefaultSelector()
            for listener in self.listeners:
                listener.socket.setblocking(False)
                self.selector.register(listener.socket, selectors.EVENT_READ, listener)

    def serve_forever(self):
        """Accept connections until shutdown() closes the listeners."""
        for listener in self.listeners:
            log.info("listening on %s", listener)
        self.users.refresh()         # read userinfo.txt now, so its problems show at start
        while True:
            try:
                sock, address, listener = self.accept()
            except OSError as exc:
                if self.stopping:
                    return
                log.warning("accept failed: %s", exc)
                time.sleep(ACCEPT_RETRY_DELAY)    # e.g. out of descriptors: let sessions end first
                continue
            self.start_session(sock, address, listener)

    def accept(self):
        """The next connection, on any listener: (socket, address, Listener)."""
        if self.selector is None:                # one listener: a plain blocking accept, no extra wait
            listener = self.listeners[0]
            return listener.socket.accept() + (listener,)
        while True:
            for key, _ in self.selector.select():
                try:
                    return key.fileobj.accept() + (key.data,)
                except (BlockingIOError, InterruptedError):   # taken back by the client meanwhile
                    continue

    def start_session(self, sock, address, listener):
        """Serve a new connection in a thread of its own, or refuse it when there is no slot for it.

        A balancer's connection is counted in the total only: its client is
        known, and counted, once the session's thread has read the PROXY header.
        """
        from_balancer = self.proxy_from and in_networks(address[0], self.proxy_from)
        peer, client = peer_text(address), None if from_balancer else client_key(address[0])
        taken = self.slots.take(client)
        if taken is None:
            return self.refuse(sock, peer, client, self.replies.BUSY, "%d connections open" % self.slots.total)
        if not taken:
            return self.refuse(sock, peer, client, self.replies.BUSY_CLIENT,
                               "%d connections open from %s" % (self.slots.per_client, client))
        try:
            self.threads.start(peer, self.serve, sock, address, client, listener)
        except RuntimeError as exc:               # the system cannot make more threads
            self.slots.give_back(client)
            self.refuse(sock, peer, client, self.replies.BUSY, str(exc))

    def refuse(self, sock, peer, client, reply, reason):
        """Send a client the reply that there is no room for it now, and hang up (never waiting for it)."""
        if self.slots.worth_logging(client):
            log.warning("%s: refused, %s", peer, reason)
        try:
            sock.setblocking(False)
            # The reply comes before any greeting; an SMTP one names the server (RFC 5321 3.8).
            sock.send(reply.replace("%s", self.domain).encode("ascii") + b"\r\n")
        except OSError:
            pass
        sock.close()

    def serve(self, sock, address, client, listener):
        """Run one session (in its own thread); client None: a balancer's, whose PROXY header comes first."""
        leave_signals_to_main_thread()
        try:
            if client is None:
                address, client = self.proxied_client(sock, address)
                if client is None:
                    return
            set_wait(sock, self.timeout)
            self.session_class(self, sock, address, listener).run()
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
            self.refuse(sock, peer_text(address), client, self.replies.BUSY_CLIENT,
                        "%d connections open from %s" % (self.slots.per_client, client))
            return address, None
        return address, client

    def shutdown(self, signals):
        """Stop accepting; give the work in flight time to finish (until a second signal)."""
        self.stopping = True         # work that checks it after entering in_flight does not start
        for listener in self.listeners:
            listener.socket.close()
        log.info("shutting down, %d connections open", len(self.threads))
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
        if not self.threads.join(timeout):
            log.warning("exiting with connections still open: %s", ", ".join(self.threads.peers()))


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
    configure_logging(name)          # first: what the pinning logs is a line like any other
    run_on_one_cpu(args.cpu, args.root)
    try:
        server = server_class(args)
    except StartError as exc:
        log.error("%s", exc)
        return exc.code
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


def configure_logging(name):
    """INFO and above to stderr, one line per record, tagged with the server's name."""
    handler = UnlockedStreamHandler()
    handler.setFormatter(SecondFormatter("%(asctime)s " + name + " %(levelname)s %(message)s"))
    # A log that cannot be written (a full disk, EIO) must not cost a
    # session or a message, nor print a traceback to stderr.
    logging.raiseExceptions = False
    # Which thread, process and source line made a record: unused here, and costly to find.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    logging.basicConfig(level=logging.INFO, handlers=[handler])


# --------------------------------------------------------------------------
# The site file: the options of both servers in one INI file
# --------------------------------------------------------------------------
#
#   [mail]      what both servers take (root, domain, host, tls-cert, ...)
#   [smtp]      what only mailserver_smtp.py takes (listen, local-domains, relay-host, ...)
#   [pop3]      what only pop_server.py takes (listen, ...)
#
# Each key is a long option name without its "--"; a flag takes yes/no;
# listen takes several [ADDR:]PORT[/MODE] separated by spaces.  What the
# file says becomes the parser's default, so the command line wins.  A
# key of [mail] the POP3 server does not take is left to the SMTP server,
# which takes all of POP3's options and checks every key of [mail].

SITE_SECTIONS = ("mail", "smtp", "pop3")
SITE_NOT_KEYS = ("help", "site")


def parse_with_site(parser, argv, section):
    """parser.parse_args(argv), its defaults first set from --site FILE's [mail] and [section]."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--site")
    path = finder.parse_known_args(argv)[0].site
    if path is not None:
        parser.set_defaults(**site_defaults(parser, path, section))
    return parser.parse_args(argv)


def site_defaults(parser, path, section):
    """The defaults a site file gives parser from [mail] and [section]; an error (exit 2) names file and line."""
    text = read_site_file(parser, path)
    config = configparser.ConfigParser(interpolation=None, default_section="\0", delimiters=("=",))
    try:
        config.read_string(text, source=path)
    except configparser.Error as exc:
        parser.error("site file %s line %d: %s" % ((path,) + site_syntax_error(exc)))
    lines = site_lines(text)
    for name in config.sections():
        if name not in SITE_SECTIONS:
            parser.error("site file %s line %d: unknown section [%s] (sections: %s)"
                         % (path, lines[name, None], name, ", ".join(SITE_SECTIONS)))
    defaults = {}
    for name in ("mail", section):
        if config.has_section(name):
            for key, value in config.items(name):
                where = "site file %s line %d" % (path, lines[name, key])
                # [mail] keys POP3 does not take are the SMTP server's to check (it takes all of POP3's)
                site_value(parser, where, key, value, defaults, name == "mail" and section == "pop3")
    return defaults


def site_listener(parser, text):
    """One [ADDR:]PORT[/MODE] of a site file's listen, its mode one of parser's (ValueError if not)."""
    host, port, mode = listen_spec(text)
    if mode is not None and mode not in parser.get_default("modes"):
        raise ValueError("the mode must be one of %s" % ", ".join(parser.get_default("modes")))
    return host, port, mode


def site_syntax_error(exc):
    """(line number, what is wrong) of the configparser.Error a site file raised."""
    if isinstance(exc, configparser.DuplicateSectionError):
        return exc.lineno, "section [%s] given twice" % exc.section
    if isinstance(exc, configparser.DuplicateOptionError):
        return exc.lineno, "key %r given twice in [%s]" % (exc.option, exc.section)
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return exc.lineno, "a key before the first [section]: %r" % exc.line.strip()
    if isinstance(exc, configparser.ParsingError):
        return exc.errors[0][0], "not a 'key = value' line: %s" % exc.errors[0][1].replace("\\n", "")
    return 0, str(exc)


def read_site_file(parser, path):
    """The text of a site file: a regular file, not a symlink, readable (else an error, exit 2)."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            parser.error("site file %s is a symlink: give the file itself" % path)
        if not stat.S_ISREG(mode):          # a folder, or a FIFO whose open would wait for ever
            parser.error("site file %s is not a regular file" % path)
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error("cannot read the site file %s: %s" % (path, exc))


def site_lines(text):
    """{(section, key): its line number} of a site file, and {(section, None): its header's line}."""
    lines, section = {}, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;" or line[:1].isspace():
            continue
        if stripped.startswith("["):
            section = stripped[1:].partition("]")[0].strip()
            lines.setdefault((section, None), number)
        else:
            lines.setdefault((section, stripped.partition("=")[0].strip().lower()), number)
    return lines


def site_value(parser, where, key, value, defaults, lenient):
    """Check one key of a site file and put its value, as the option's type makes it, into defaults.

    lenient: a key parser does not know is passed over (not an error).
    """
    action = parser._option_string_actions.get("--" + key) if key not in SITE_NOT_KEYS else None
    if action is None:
        if lenient:
            return
        parser.error("%s: unknown key %r" % (where, key))
    try:
        if action.nargs == 0:        # a flag
            if value.lower() not in configparser.ConfigParser.BOOLEAN_STATES:
                raise ValueError("yes or no")
            if configparser.ConfigParser.BOOLEAN_STATES[value.lower()]:
                defaults[action.dest] = action.const
        elif action.dest == "listen":
            defaults["site_listen"] = [site_listener(parser, word) for word in value.split()]
        else:
            defaults[action.dest] = action.type(value) if action.type else value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        parser.error("%s: bad value %r for %s: %s" % (where, value, key, exc))


# --------------------------------------------------------------------------
# Speed-ups of both servers
# --------------------------------------------------------------------------
# Each makes a server faster without changing what it does, and says by
# how much (tests/bench_smtp.py, tests/bench_pop.py on 2 CPUs).

def set_wait(sock, seconds):
    """Make a connection's reads and writes wait at most seconds; past it they raise an IDLE_TIMEOUT_ERRORS.

    In the kernel (SO_RCVTIMEO, SO_SNDTIMEO on a blocking socket) where it
    can be: Python's own timeout polls before every recv and send, which
    lets go of the GIL twice per read instead of once, and with many
    connections on one CPU each time may hand it to another thread.
    Measured (tests/bench_smtp.py --clients 1,10, 5 alternating rounds,
    medians): 915 against 838 msgs/s at 1 client, 1710 against 1655 at 10.
    Not inside TLS: Python's ssl retries a read that the kernel timed out,
    for ever, on a blocking socket.
    """
    if not KERNEL_TIMEOUTS or isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    seconds = max(seconds, 0.001)        # 0 would mean no timeout at all
    value = struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6))      # struct timeval
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


# Linux takes a struct timeval of two longs (Windows takes milliseconds, other systems other layouts).
KERNEL_TIMEOUTS = hasattr(os, "uname") and os.uname().sysname == "Linux"


def use_small_thread_stacks():
    """Give the threads started from now on small stacks (call before starting any).

    Small stacks fit many more in glibc's cache of freed stacks, so a thread
    per connection does not map and unmap 8 MiB each time.  Measured: a few
    per cent at 10 and 50 clients, within the noise of a shared machine; it
    stays because it costs one line.
    """
    threading.stack_size(THREAD_STACK_SIZE)


class ConnectionThreads:
    """A server's connection threads: bare _thread threads, yet counted, listed and joined, their failures logged.

    threading.Thread.start() waits until the new thread runs: on the one CPU
    the server keeps to (run_on_one_cpu), the accept loop must hand the GIL
    over and wait to get it back before it takes the next connection, and a
    Thread's own bookkeeping adds more.  Measured (tests/bench_smtp.py, 10
    interleaved rounds on a busy machine, server CPU per message at 10 and
    50 clients): 0.54 and 0.56 ms against 0.61 and 0.61 with a Thread, as
    little as a bare _thread (0.55, 0.54); a Thread subclass that skips
    the wait saved nothing (0.62, 0.63) and needs threading's internals.
    The registry gives back what Thread gave: each thread is held here,
    with the peer it serves, from before it starts until it ends, and what
    escapes it is logged.
    """

    def __init__(self):
        self._running = {}        # a lock held while its thread runs -> the peer it serves

    def start(self, peer, function, *args):
        """Run function(*args) in a new thread that serves peer; RuntimeError if no thread can be made."""
        done = _thread.allocate_lock()
        done.acquire()
        self._running[done] = peer
        try:
            _thread.start_new_thread(self._run, (done, function, args))
        except BaseException:
            del self._running[done]
            raise

    def _run(self, done, function, args):
        """The new thread: function(*args), logged if anything escapes it, then off the list."""
        try:
            function(*args)
        except BaseException:     # SystemExit too, which a threading.Thread would drop unseen
            log.exception("the thread serving %s failed", self._running[done])
        finally:
            del self._running[done]
            done.release()

    def __len__(self):
        """How many threads are running."""
        return len(self._running)

    def peers(self):
        """The peers the threads running now serve."""
        return list(self._running.copy().values())

    def join(self, timeout):
        """Wait until every thread running now has ended; False if timeout seconds passed first."""
        deadline = time.monotonic() + timeout
        for done in self._running.copy():
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
            done.release()
        return True


class UnlockedStreamHandler(logging.StreamHandler):
    """logging's StreamHandler without its lock: each record is one write of one line.

    Under load, session threads queue on the handler's lock, and each hand-over
    is a GIL hand-over too.  sys.stderr writes each line whole (it is line
    buffered and holds its own buffer lock), so lines never mix without it.
    Measured (tests/bench_smtp.py, 50 clients): with SecondFormatter, 15-30%
    more messages per second than the plain StreamHandler and Formatter.
    """

    def createLock(self):
        self.lock = None


class SecondFormatter(logging.Formatter):
    """logging's Formatter with the date and time formatted once a second, not at every record."""

    _clock = (None, "")          # (second, its date and time as text)

    def formatTime(self, record, datefmt=None):
        second, stamp = self._clock
        if int(record.created) != second:
            second = int(record.created)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._clock = (second, stamp)       # one assignment: threads see the old pair or the new
        return "%s,%03d" % (stamp, record.msecs)


def run_on_one_cpu(chosen, root):
    """Keep this process's threads on one CPU, one its sibling servers do not use (call before any thread).

    Only one thread runs Python at a time (the GIL).  When session threads
    sit on different CPUs, every hand-over of the GIL is a cross-CPU
    wake-up, which costs far more than a switch on one CPU: measured
    (tests/bench_smtp.py, interleaved), twice the messages per second at
    10 and 50 clients (1187 against 585, 1180 against 594).  --cpu N picks
    the CPU; else the one fewest other servers of the mail root have
    claimed (lock files in ROOT/.run, held while the process lives: not in
    the temporary folder, which systemd's PrivateTmp= makes each server's
    own), so servers started side by side spread over the CPUs.
    """
    if not hasattr(os, "sched_setaffinity"):       # not on Windows or macOS
        return
    try:
        allowed = sorted(os.sched_getaffinity(0))
        cpu = chosen if chosen is not None else unclaimed_cpu(allowed, private_folder(root, RUN_NAME))
        os.sched_setaffinity(0, {cpu})
    except (OSError, ValueError) as exc:
        log.warning("staying on every CPU: %s", exc)


_CPU_CLAIM = []              # the lock on the claimed CPU, held until the process ends
CPU_CLAIM_LAYERS = 64        # claims per CPU: the 65th server process on one CPU picks by its pid


def unclaimed_cpu(allowed, folder):
    """The allowed CPU with the fewest of our servers on it (claimed now, by a lock file held for life).

    Claims come in layers: the first server of each CPU claims its layer 0,
    the next ones layer 1, and so on, so n servers started side by side on n
    CPUs run one on each, and 2n two on each.
    """
    for layer in range(CPU_CLAIM_LAYERS):
        for cpu in allowed:
            name = "mailserver-cpu-%d-%d.lock" % (cpu, layer)
            claim = FileLock(os.path.join(folder, name))
            try:
                if claim.acquire(blocking=False):
                    _CPU_CLAIM.append(claim)
                    return cpu
            except OSError:
                return allowed[os.getpid() % len(allowed)]
    return allowed[os.getpid() % len(allowed)]


# ##########################################################################
#
#   PART 2: THE SMTP SERVER
#
#   In the order a message travels: the replies and options, the session
#   and its commands, reading DATA and BDAT, the stored form, the spool,
#   delivery into the mailboxes; mail for other domains: the outbound queue,
#   DNS, delivery to other servers, bounces; then the server and main().
#
# ##########################################################################

# --------------------------------------------------------------------------
# Replies and options
# --------------------------------------------------------------------------

DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_TIMEOUT = 300        # RFC 5321 4.5.3.2.7 asks for at least 5 minutes
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
# A domain may end in a dot (a fully qualified name, as DNS writes it): it means the same without.
ADDRESS = re.compile(r"%s(?:\.%s)*(?:@(?:%s(?:\.%s)*\.?|\[[!-Z^-~]+\]))?\Z" % (_ATOM, _ATOM, _LABEL, _LABEL))


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
    QUEUED = "250 2.0.0 OK Message accepted for delivery, queued as %s"
    OK = "250 2.0.0 OK"
    USER = "250 2.1.5 %s <%s@%s>"
    HELP = ("214-2.0.0 Commands: %s",
            "214 2.0.0 MAIL_FROM: and RCPT_TO: work as MAIL FROM: and RCPT TO:")
    READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
    GOODBYE = "221 2.0.0 %s closing connection"
    BUSY = "421 4.3.2 %s Too many connections, try again later"
    BUSY_CLIENT = "421 4.7.0 %s Too many connections from your address"
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
    ALIAS_LOOP = "550 5.4.6 Alias loop or chain too deep"   # RFC 3463 3.5: routing loop detected
    RELAYING_DENIED = "550 5.7.1 relaying denied"
    # Checks on mail that comes in (CONTRACT.md section 10)
    SPF_FAILED = "550 5.7.23 %s"
    NOT_ONE_AUTHOR = "550 5.7.1 A message must have exactly one From: address (RFC 7489 6.6.1)"
    DMARC_REJECTED = "550 5.7.1 Message refused by the DMARC policy of %s"


POSTMASTER = "postmaster"    # RFC 5321 4.5.1: always accepted, in any case
SUBADDRESS = "+"             # RFC 5233: name+tag goes where name goes
MAX_ALIAS_DEPTH = 10         # aliases one recipient may pass through (Postfix: 1000; chasquid: 10)
SMTP_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")   # RFC 4616, the LOGIN draft, RFC 2195
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")   # they send the password itself: never in clear (RFC 4954 4)
SMTP_SASL_REPLIES = {        # why an AUTH exchange failed -> the reply (only after EHLO, so with codes)
    "cancelled": Replies.AUTH_CANCELLED,
    "malformed": Replies.AUTH_MALFORMED,
    "too long": Replies.AUTH_LINE_TOO_LONG,
    "invalid": Replies.AUTH_INVALID,
}


OTHER_COMMANDS = (           # what main() runs instead of a server, for --help
    ("--hash-password [--scheme scrypt]",
     "read a password (not echoed) and print a hashed password field for userinfo.txt"),
    ("--queue [--root DIR]", "list the outbound queue, as mailq does"),
    ("--flush [--root DIR]", "make the servers running on the mail root try every queued message now"),
    ("--delete ID [--root DIR]", "remove one queued message (one being sent: once that attempt is over)"),
    ("--hold ID [--root DIR]", "keep one queued message from being tried until --release"),
    ("--release ID [--root DIR]", "let a held message be tried again, now"),
    ("--dkim-keygen DOMAIN [--selector S] [--key-type rsa|ed25519] [--root DIR]",
     "make a DKIM key in ROOT/.dkim/DOMAIN/S.pem and print the TXT record to publish"),
    ("--dns-records DOMAIN [--root DIR] [--domain HOST] [--source-address ADDR]",
     "print the MX, SPF, DKIM, DMARC and PTR records the domain needs"),
    ("--check-dns DOMAIN [--root DIR] [--domain HOST] [--source-address ADDR] [--dns-server ADDR]",
     "ask DNS for each of them: right, missing, or wrong and why (exit 0 when all are right)"),
)


def parse_args(argv=None):
    """Read the command line."""
    parser = server_arguments("SMTP server: delivers mail into ROOT/<user>/my_mailbox.",
                              DEFAULT_TIMEOUT, "seconds an idle client may wait before 421",
                              "STARTTLS", "refuse mail and AUTH until the client has used STARTTLS",
                              ("smtp", "submission", "smtps"))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "other commands (each does one thing and exits):\n" + "".join(
        "  python3 mailserver_smtp.py %s\n      %s\n" % command for command in OTHER_COMMANDS)
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
    relay_arguments(parser)
    args = parse_with_site(parser, argv, "smtp")
    if args.max_size < 1 or args.quota is not None and args.quota < 1:
        parser.error("--max-size and --quota must be positive")
    if args.postmaster is not None and not is_valid_login(args.postmaster):
        parser.error("--postmaster must be a login name")
    check_relay_arguments(parser, args)
    return check_server_arguments(parser, args)


# The defaults of mail for other domains (CONTRACT.md section 7)
RETRY_BASE = 300             # seconds before the first retry, doubling (RFC 5321 4.5.4.1; Postfix's
RETRY_MAX = 4000             # minimal_backoff_time and maximal_backoff_time)
QUEUE_LIFETIME = 5 * 86400   # seconds a message may wait (Postfix's maximal_queue_lifetime)
DELAY_WARNING = 4 * 3600     # seconds before the sender hears it is late (Postfix's delay_warning_time)
DEFAULT_RELAY_CONCURRENCY = 100       # sessions to other servers at once (see OutboundQueue for why)
DEFAULT_PER_DESTINATION = 20          # of them to one destination (Postfix's default_destination_concurrency_limit)
DEFAULT_RELAY_NETWORKS = "127.0.0.0/8,::1/128"   # this machine only, like Postfix's mynetworks_style = host
SMTP_PORT = 25               # RFC 5321 4.5.4.2 ... mail exchangers listen here
SUBMISSION_PORT = 587        # RFC 6409 3.1: a smarthost, with STARTTLS
SUBMISSIONS_PORT = 465       # RFC 8314 3.3: a smarthost, with implicit TLS


def relay_arguments(parser):
    """The options of mail for other domains (with --local-domains only)."""
    group = parser.add_argument_group("mail for other domains (only with --local-domains)")
    group.add_argument("--relay-networks", metavar="CIDRS", type=network_list,
                       default=network_list(DEFAULT_RELAY_NETWORKS),
                       help="clients that may send to other domains without AUTH (default: %s; '' for none)"
                       % DEFAULT_RELAY_NETWORKS)
    group.add_argument("--relay-host", metavar="HOST[:PORT]",
                       help="send all outgoing mail through this server, with TLS (default port: %d, "
                       "%d with --relay-implicit-tls); default: to each domain's MX"
                       % (SUBMISSION_PORT, SUBMISSIONS_PORT))
    group.add_argument("--relay-implicit-tls", action="store_true",
                       help="TLS from the first byte to --relay-host instead of STARTTLS")
    group.add_argument("--relay-cafile", metavar="FILE",
                       help="CA certificates (PEM) --relay-host's certificate is checked against "
                       "(default: the system's)")
    group.add_argument("--relay-auth", metavar="FILE",
                       help="file holding one line 'LOGIN PASSWORD' to log in to --relay-host with")
    group.add_argument("--relay-concurrency", metavar="N", type=int, default=DEFAULT_RELAY_CONCURRENCY,
                       help="messages sent at once (default: %d)" % DEFAULT_RELAY_CONCURRENCY)
    group.add_argument("--relay-per-destination", metavar="N", type=int, default=DEFAULT_PER_DESTINATION,
                       help="sessions at once to one domain, or to --relay-host (default: %d)"
                       % DEFAULT_PER_DESTINATION)
    group.add_argument("--relay-timeout", metavar="SECONDS", type=float,
                       help="the longest a remote server may take for a reply (default: RFC 5321's, "
                       "2 to 10 minutes by command); a session lasts at most %d times this" % SESSION_CEILING)
    group.add_argument("--queue-lifetime", metavar="SECONDS", type=float, default=QUEUE_LIFETIME,
                       help="how long a message is retried before it bounces (default: %d, 5 days)"
                       % QUEUE_LIFETIME)
    group.add_argument("--delay-warning", metavar="SECONDS", type=float, default=DELAY_WARNING,
                       help="tell the sender once when a message still waits after this long (default: %d, "
                       "4 hours; 0: never)" % DELAY_WARNING)
    group.add_argument("--retry-base", metavar="SECONDS", type=float, default=RETRY_BASE,
                       help="the first wait before a retry, doubled each time up to %d s (default: %d)"
                       % (RETRY_MAX, RETRY_BASE))
    group.add_argument("--dns-server", metavar="ADDR[:PORT]",
                       help="the DNS server for MX lookups (default: those of /etc/resolv.conf)")
    group.add_argument("--mx-port", metavar="PORT", type=int, default=SMTP_PORT,
                       help="the port of other domains' mail exchangers (default: %d)" % SMTP_PORT)
    group.add_argument("--source-address", metavar="ADDR",
                       help="the address of this machine outgoing connections are made from: the one the "
                       "site's PTR and SPF records name (default: the one the system picks)")


def check_relay_arguments(parser, args):
    """Check the relay options; read --relay-auth (its password is never shown)."""
    if args.local_domains is None and (args.relay_host or args.relay_auth or args.dns_server):
        parser.error("--relay-host, --relay-auth and --dns-server need --local-domains "
                     "(without it every domain is local and nothing goes out)")
    if args.relay_concurrency < 1 or args.relay_per_destination < 1 or (args.relay_timeout or 1) <= 0 \
            or args.queue_lifetime <= 0 or args.retry_base <= 0 or args.delay_warning < 0 \
            or not 0 < args.mx_port < 65536:
        parser.error("--relay-concurrency, --relay-per-destination, --relay-timeout, --queue-lifetime, "
                     "--retry-base and --mx-port must be positive, --delay-warning 0 or more")
    try:
        if args.relay_host:
            args.relay_host = host_and_port(args.relay_host, SUBMISSIONS_PORT if args.relay_implicit_tls
                                            else SUBMISSION_PORT)
        if args.dns_server:
            args.dns_server = [host_and_port(args.dns_server, DNS_PORT)]
            ipaddress.ip_address(args.dns_server[0][0])
    except ValueError:
        parser.error("--relay-host takes HOST[:PORT], --dns-server ADDR[:PORT] ([IPv6]:PORT)")
    args.relay_credentials = None
    if args.relay_auth:
        try:
            args.relay_credentials = read_relay_credentials(args.relay_auth)
        except (OSError, ValueError) as exc:
            parser.error("--relay-auth: %s" % exc)
    if args.relay_cafile and not os.path.isfile(args.relay_cafile):
        parser.error("--relay-cafile %s is not a file" % args.relay_cafile)
    if args.source_address:
        try:
            check_own_address(args.source_address)
        except (ValueError, OSError) as exc:
            parser.error("--source-address %s is not an address of this machine: %s" % (args.source_address, exc))


RelayOptions = collections.namedtuple("RelayOptions", (
    "relay_host relay_implicit_tls relay_cafile relay_credentials relay_timeout relay_concurrency "
    "relay_per_destination queue_lifetime retry_base delay_warning dns_server mx_port source_address"))


def relay_options(args):
    """The checked relay options of the command line: what the queue and its Relay are made from."""
    return RelayOptions(*[getattr(args, name) for name in RelayOptions._fields])


def check_own_address(text):
    """Raise ValueError or OSError unless text is an IP address of this machine (one a socket can bind)."""
    ip = ipaddress.ip_address(text)
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((text, 0))


def domain_list(text):
    """The set of domains in a comma-separated --local-domains, in lower case, without a trailing dot."""
    domains = {name.strip().lower().rstrip(".") for name in text.split(",")}
    if "" in domains:
        raise argparse.ArgumentTypeError("a comma-separated list of domain names, none empty")
    return frozenset(domains)


def without_codes(replies):
    """The replies class with every enhanced status code taken out ("250 2.1.0 ok" becomes "250 ok")."""
    def plain(text):
        return tuple(map(plain_reply, text)) if isinstance(text, tuple) else plain_reply(text)
    return type("PlainReplies", (), {name: plain(text) for name, text in vars(replies).items()
                                     if name.isupper()})


def plain_reply(text):
    """A reply line without its enhanced status code: what a session that began with HELO is told."""
    return ENHANCED_CODE.sub(r"\1", text)


PLAIN_REPLIES = without_codes(Replies)


# --------------------------------------------------------------------------
# The session and its commands
# --------------------------------------------------------------------------

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


def path_after(argument, keyword, syntax):
    """Parse 'FROM:<addr> params' / 'TO:<addr>' (any case) into (address, [params]); Refused if malformed."""
    path = parse_path(argument[len(keyword):]) if argument[:len(keyword)].upper() == keyword else None
    if path is None:
        raise Refused(Replies.SYNTAX % syntax)
    return path


def local_part(address):
    """The part of an address before its last '@' (all of it when it has none)."""
    return address.rpartition("@")[0] if "@" in address else address


def printable(text):
    """Text from a message fit to go into a reply line: printable characters only, not too many."""
    return "".join(c for c in text[:MAX_PATH] if c.isprintable())


class Refused(Exception):
    """A command or a message is refused: carries the reply (from Replies, with its enhanced code)."""

    def __init__(self, reply):
        super().__init__(reply)
        self.reply = reply


class Route:
    """Where mail for one recipient goes: local mailboxes, addresses for the queue, addresses forwarded to."""

    __slots__ = ("logins", "remote", "forwarded")

    def __init__(self, logins=(), remote=(), forwarded=()):
        self.logins = logins         # logins whose mailboxes take a copy
        self.remote = remote         # addresses of other domains, queued as sent to us
        self.forwarded = forwarded   # addresses of other domains an alias leads to (SRS sender)


class Envelope:
    """One mail transaction (RFC 5321 3.3): the sender, the recipients, a message arriving in chunks."""

    def __init__(self):
        self.sender = None           # the reverse-path, once MAIL is taken
        self.utf8 = False            # MAIL had SMTPUTF8 (RFC 6531)
        self.declared_size = 0       # MAIL's SIZE= (RFC 1870)
        self.recipients = []         # the addresses as given, in order
        self.logins = {}             # the local ones' mailbox owners -> the addresses that lead there
        self.remote = []             # the addresses for other servers (the queue), without repeats
        self.forwarded = []          # those an alias leads to: queued with an SRS sender (not in remote)
        self.chunked = None          # the message BDAT chunks are building (RFC 3030)
        self.spf = None              # the SPFResult, when the checks on mail from outside apply

    def add(self, address, route):
        """Add a recipient and where its Route leads: mailboxes, the queue, forwarding."""
        self.recipients.append(address)
        for login in route.logins:
            addresses = self.logins.setdefault(login, [])
            if address.lower() not in map(str.lower, addresses):
                addresses.append(address)
        for target in route.remote:
            if target in self.forwarded:     # asked for itself: one copy, with the sender as it is
                self.forwarded.remove(target)
            if target not in self.remote:
                self.remote.append(target)
        self.forwarded += [t for t in route.forwarded if t not in self.remote and t not in self.forwarded]

    def ready_for_message(self):
        """Refuse DATA or BDAT before MAIL and RCPT."""
        if self.sender is None:
            raise Refused(Replies.NO_SENDER)
        if not self.recipients:
            raise Refused(Replies.NO_RECIPIENT)

    def discard(self):
        """Drop the message the chunks were building, if any (its spool file vanishes)."""
        if self.chunked is not None:
            self.chunked.spool.close()


class SMTPSession(Session):
    """One client's SMTP conversation: its state and one do_VERB method per command.

    A do_VERB method returns its reply (a line, or a tuple of lines) or
    raises Refused with it; None when it has answered by itself.  The
    loop (handle) sends the reply and counts the errors by its code.
    """

    SASL_CONTINUE = "334 "
    SASL_REPLIES = SMTP_SASL_REPLIES
    NOT_OFFERED = ("EXPN", "TURN")   # known verbs, answered 502

    def __init__(self, server, sock, address, listener):
        super().__init__(server, sock, address, listener)
        self.domain = server.domain
        self.replies = PLAIN_REPLIES    # Replies, with enhanced codes, once the client says EHLO
        self.bad_commands = 0        # syntax and sequence errors in a row
        self.client_name = None      # from HELO/EHLO
        self.login = None            # the user AUTH proved the client is
        self.delivered = 0
        self.envelope = Envelope()

    def reset(self):
        """Forget the transaction in progress (RSET, a new greeting, the end of a message)."""
        self.envelope.discard()
        self.envelope = Envelope()

    def start(self):
        self.reply(self.replies.GREETING % self.domain)

    def line_too_long(self):
        self.reply(self.replies.LINE_TOO_LONG)
        self.count(self.replies.LINE_TOO_LONG)

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
        self.reset()

    def release(self):
        self.reset()                 # a message half sent in BDAT chunks goes

    def summary(self, reason):
        return "connection from %s closed, %d message(s) delivered" % (self.peer, self.delivered)

    def handle(self, line):
        """Run one command line through the do_ method its verb names; send its reply, count errors."""
        text = line.decode("utf-8", "surrogateescape")
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if self.verbose:
            self.log_command(verb, text)
        # MAIL_FROM: and RCPT_TO: are the course assignment's spelling of MAIL FROM: and RCPT TO:
        if verb[:5] in ("MAIL_", "RCPT_"):
            verb, argument = verb[:4], text[5:]
        handler = getattr(self, "do_" + verb, None) if verb.isalpha() and verb.isascii() else None
        try:
            reply = handler(argument.strip()) if handler else self.replies.UNKNOWN_COMMAND
        except Refused as refused:
            reply = self.in_kind(refused.reply)
        if reply is not None:
            lines = (reply,) if isinstance(reply, str) else reply
            self.reply(*lines)
            self.count(lines[-1])

    def in_kind(self, reply):
        """A reply from Replies as this session speaks: with its enhanced code after EHLO, else without."""
        return reply if self.replies is Replies else plain_reply(reply)

    def count(self, reply):
        """Count a syntax or sequence error (500-504) in a row; too many end the session."""
        code = reply[:3]
        if "500" <= code <= "504":
            self.bad_commands += 1
            if self.bad_commands >= MAX_BAD_COMMANDS:
                self.reply(self.replies.TOO_MANY_ERRORS % self.domain)
                raise SessionEnd("too many errors")
        elif code[0] in "23":
            self.bad_commands = 0

    # -- the commands, in the order of a mail transaction

    def do_HELO(self, argument):
        """Greet the client; a new greeting also ends any transaction."""
        if not argument.isprintable() or not argument:    # bytes that are no UTF-8 show as unprintable
            return self.replies.SYNTAX % "HELO hostname"
        self.reset()
        self.client_name, self.replies = argument, PLAIN_REPLIES
        return self.replies.HELLO % argument

    def do_EHLO(self, argument):
        """Greet the client and list the service extensions (RFC 5321 4.1.1.1)."""
        if not argument.isprintable() or not argument:    # bytes that are no UTF-8 show as unprintable
            return self.replies.SYNTAX % "EHLO hostname"
        self.reset()
        self.client_name, self.replies = argument, Replies
        keywords = self.server.extensions(self.tls_active, self.listener.require_tls, self.password_refused())
        return (self.replies.EHLO % (self.domain, argument),
                *["250-" + k for k in keywords[:-1]], "250 " + keywords[-1])

    def do_AUTH(self, argument):
        """Log the client in with SASL (RFC 4954): PLAIN, LOGIN or CRAM-MD5."""
        mechanism, _, initial = argument.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if self.replies is not Replies:             # AUTH is an extension: EHLO first (RFC 4954 4)
            return self.replies.EHLO_FIRST
        if self.login is not None:
            return self.replies.AUTHENTICATED
        if self.envelope.sender is not None:
            return self.replies.AUTH_IN_TRANSACTION
        if not mechanism or " " in initial:
            return self.replies.AUTH_SYNTAX
        if self.listener.require_tls and not self.tls_active:
            return self.replies.AUTH_NEEDS_TLS
        if mechanism not in SMTP_MECHANISMS:
            return self.replies.AUTH_MECHANISM
        if mechanism in PASSWORD_MECHANISMS and self.password_refused():
            return self.replies.AUTH_NEEDS_TLS
        self.login = self.sasl(mechanism, initial or None)    # a failure is answered by sasl()
        return self.replies.AUTH_OK if self.login is not None else None

    def do_MAIL(self, argument):
        """Start a transaction with the sender (MAIL FROM: or MAIL_FROM:)."""
        self.may_send()
        if self.envelope.sender is not None:
            return self.replies.SENDER_GIVEN
        address, parameters = path_after(argument, "FROM:", "MAIL FROM:<address>")
        if self.login is not None and not self.server.is_own(address, self.login):
            return self.replies.NOT_YOURS % (address, self.login)
        utf8, size = False, 0
        for parameter in parameters:
            keyword, _, value = parameter.upper().partition("=")
            if keyword == "SIZE" and value.isdigit():
                size = int(value)
            elif keyword == "SMTPUTF8" and not value:
                utf8 = True
            elif not (keyword == "BODY" and value in ("7BIT", "8BITMIME")):
                return self.replies.MAIL_PARAMETER % parameter
        if size > self.server.max_size:
            return self.replies.MESSAGE_TOO_LARGE
        if not (utf8 or address.isascii()):
            return self.replies.NEEDS_SMTPUTF8
        self.envelope.sender, self.envelope.utf8, self.envelope.declared_size = address, utf8, size
        self.envelope.spf = self.server.sender_check(self, address)
        return self.replies.SENDER_OK % address

    def may_send(self):
        """Refuse MAIL before a greeting, before STARTTLS or AUTH where they are required, or at shutdown."""
        if self.client_name is None:
            raise Refused(Replies.HELO_FIRST)
        if self.listener.require_tls and not self.tls_active:
            raise Refused(Replies.STARTTLS_FIRST)
        if self.listener.require_auth and self.login is None:
            raise Refused(Replies.AUTH_REQUIRED)
        if self.server.stopping:
            self.shutting_down()
            raise SessionEnd("server shutting down")

    def do_RCPT(self, argument):
        """Add a recipient (RCPT TO: or RCPT_TO:): a user or alias here, or an address for the queue (route)."""
        envelope = self.envelope
        if envelope.sender is None:
            return self.replies.MAIL_FIRST
        address, parameters = path_after(argument, "TO:", "RCPT TO:<address>")
        if not address:
            return self.replies.SYNTAX % "RCPT TO:<address>"
        if parameters:
            return self.replies.RCPT_PARAMETERS
        if not (envelope.utf8 or address.isascii()):
            return self.replies.NEEDS_SMTPUTF8
        route = self.server.route(address, self.login, self.address)
        if envelope.spf is not None and envelope.spf.result == "fail" and local_part(address).lower() != POSTMASTER:
            raise Refused(Replies.SPF_FAILED % envelope.spf.explanation)   # postmaster: RFC 5321 4.5.1
        if len(envelope.recipients) >= MAX_RECIPIENTS:
            return self.replies.TOO_MANY_RECIPIENTS
        if self.server.quota is not None:
            for login in route.logins:
                self.server.check_quota(login, envelope.declared_size)
        envelope.add(address, route)
        return self.replies.RECIPIENT_OK % local_part(address)

    def do_DATA(self, argument):
        """Receive the message (up to its lone '.' line) and deliver it to every recipient."""
        if argument:
            return self.replies.SYNTAX % "DATA"
        self.envelope.ready_for_message()
        if self.envelope.chunked is not None:
            return self.replies.DATA_AFTER_BDAT
        with self.server.in_flight:     # from the 354 on, a shutdown waits for this message
            self.reply(self.replies.START_DATA)
            spool = Spool(self.server.spool_folder)
            try:
                read_data(self.wire, self.crlf, spool, self.server.max_size, self.server.timeout)
                return take_message(self, spool)
            finally:
                spool.close()
                self.reset()

    def do_BDAT(self, argument):
        """Take a chunk of exactly n octets of the message (RFC 3030); BDAT n LAST delivers it."""
        words = argument.split()
        if not words or not words[0].isdigit():
            return self.replies.SYNTAX % "BDAT size [LAST]"
        count, last = int(words[0]), len(words) == 2 and words[1].upper() == "LAST"
        try:
            if len(words) > 1 and not last:
                raise Refused(Replies.SYNTAX % "BDAT size [LAST]")
            self.envelope.ready_for_message()
            if self.envelope.chunked is not None and self.envelope.chunked.refused is not None:
                raise Refused(Replies.BDAT_FAILED)
        except Refused:
            # The client sends the octets whatever the reply: read them, to stay in step.
            for _ in read_octets(self.wire, count, self.server.timeout):
                pass
            raise
        return self.chunk(count, last)

    def chunk(self, count, last):
        """Store a chunk; with the last one, deliver the message."""
        envelope = self.envelope
        if envelope.chunked is None:
            envelope.chunked = ChunkedMessage(Spool(self.server.spool_folder), self.server.max_size)
        chunked = envelope.chunked
        chunked.read(self.wire, count, self.server.timeout)
        if not last:
            if chunked.refused is not None:      # RFC 3030 4: the client is to send RSET next
                raise chunked.refused
            return self.replies.CHUNK_OK % count
        with self.server.in_flight:          # from the last chunk on, a shutdown waits for it
            try:
                chunked.finish()
                return take_message(self, chunked.spool)
            finally:
                self.reset()

    # -- commands outside a transaction

    def do_STARTTLS(self, argument):
        """Turn the connection into a TLS one (RFC 3207); the client greets again."""
        if argument:
            return self.replies.SYNTAX % "STARTTLS"
        if self.server.tls is None:
            return self.replies.NOT_IMPLEMENTED
        if self.tls_active:
            return self.replies.TLS_ACTIVE
        self.reply(self.replies.READY_FOR_TLS)
        self.start_tls()
        return None

    def do_RSET(self, argument):
        """Drop the transaction in progress."""
        if argument:
            return self.replies.SYNTAX % "RSET"
        self.reset()
        return self.replies.OK

    def do_NOOP(self, argument):
        """Do nothing, successfully."""
        return self.replies.OK

    def do_VRFY(self, argument):
        """Tell whether a name is a user of this server."""
        path = parse_path(argument) if argument else None
        if not path or not path[0]:
            return self.replies.SYNTAX % "VRFY <address>"
        login = self.server.users.canonical(local_part(path[0]))
        if login is None:
            return self.replies.NO_SUCH_USER
        return self.replies.USER % (login, login, self.domain)

    def do_HELP(self, argument):
        """List the commands this session may use."""
        verbs = [name[3:] for name in dir(self) if name.startswith("do_") and name[3:] not in self.NOT_OFFERED]
        if not self.server.tls or self.tls_active:
            verbs.remove("STARTTLS")
        first, last = self.replies.HELP
        return first % " ".join(sorted(verbs)), last

    def do_EXPN(self, argument):
        """Known but not offered: mailing lists, relaying turns."""
        return self.replies.NOT_IMPLEMENTED

    do_TURN = do_EXPN

    def do_QUIT(self, argument):
        """Say goodbye and end the session."""
        self.reply(self.replies.GOODBYE % self.domain)
        raise SessionEnd("quit")

# --------------------------------------------------------------------------
# Reading DATA and BDAT
# --------------------------------------------------------------------------

def read_data(wire, strict, spool, max_size, timeout):
    """Read a DATA block up to its lone '.' line into spool, stored; Refused (once all is read) if it is not taken.

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
                refused = store(spool, _taken(buffer, start, dot), strict, max_size)
            del buffer[:after]
            if refused is not None:
                raise refused
            return
        whole = buffer.rfind(line_end, start) + len(line_end)
        if refused is None and whole > start:
            refused = store(spool, _taken(buffer, start, whole), strict, max_size)
            start = whole
        if refused is None and len(buffer) - start > MAX_TEXT_LINE + 1:    # + a stuffing dot
            refused = Refused(Replies.LINE_TOO_LONG)
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
        self.refused = None          # Refused, once the message is

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
            self.refused = store(self.spool, b"." + run if run.startswith(b".") else run,
                                 True, self.max_size)
            data = data[whole:]
        self.partial = data
        if self.refused is None and len(self.partial) > MAX_TEXT_LINE:
            self.refused = Refused(Replies.LINE_TOO_LONG)

    def finish(self):
        """The last chunk is in: end a last line that has no line end; Refused if the message is not taken."""
        if self.refused is None and self.partial:
            self._add(b"\r\n")
        if self.refused is not None:
            raise self.refused


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


def store(spool, run, strict, max_size):
    """Add whole wire lines to the spool in their stored form; None, or the Refused that ends the message."""
    stored, longest = stored_lines(run, strict)
    if longest > MAX_TEXT_LINE - 2 and too_long(run, strict):
        return Refused(Replies.LINE_TOO_LONG)
    try:
        spool.write(stored)
    except OSError as exc:
        log.error("cannot spool a message in %s: %s", spool.folder, exc)
        return Refused(Replies.LOCAL_ERROR)
    if spool.wire_size > max_size:
        return Refused(Replies.MESSAGE_TOO_LARGE)
    return None


# --------------------------------------------------------------------------
# The stored form: from the lines on the wire to the lines in a mailbox
# --------------------------------------------------------------------------

def take_message(session, spool):
    """Store a received message for every recipient of the session's envelope: the 250, or Refused.

    Local recipients get it in their mailboxes, remote ones in the queue;
    the 250 comes once both are durable, and a failure leaves neither.
    """
    envelope, server = session.envelope, session.server
    header = Header(spool.lines())   # read once: the sender check, the stored form, the queue's facts
    message_id = new_queue_id()      # ours: in the trace fields, the log, and the queue's file name
    checked = server.message_check(session, spool, header)
    copies = received_form(session, spool, header, message_id, checked)
    size = max(map(len, copies.values()), default=0)
    if envelope.logins and server.quota is not None and size > server.quota:
        # No deletion could ever make room: a permanent refusal (RFC 3463 5.2.2), not a retry.
        log.info("not delivered from <%s>: %d bytes, more than the quota", envelope.sender, size)
        raise Refused(Replies.OVER_QUOTA)
    queued = []
    try:
        queued = queue_copies(session, spool, header, message_id)
        publish = functools.partial(publish_all, queued)
        if envelope.logins:          # the queue files are renamed into place under the mailboxes' locks
            deliver({server.users.mailbox_path(login): copy for login, copy in copies.items()}, server.quota,
                    publish if queued else None)
        else:
            publish()
    except MailboxFull as full:
        log.info("not delivered from <%s>: %s is full", envelope.sender, full)
        raise Refused(Replies.MAILBOX_FULL)
    except DKIMError as error:       # a key that cannot be used: nothing is queued (section 9)
        log.error("not delivered from <%s>: not signed: %s", envelope.sender, error)
        raise Refused(Replies.LOCAL_ERROR)
    except OSError as exc:
        log.error("delivery from %s to %s failed: %s", session.peer,
                  ", ".join(list(envelope.logins) + envelope.remote + envelope.forwarded), exc)
        raise Refused(Replies.LOCAL_ERROR)
    finally:
        for queue_file in queued:
            queue_file.close()
    session.delivered += 1
    return stored_reply(session, header, message_id, queued, size, spool.size)


def stored_reply(session, header, message_id, queued, stored_size, received_size):
    """Log a message now stored; the 250 (naming its queue ids when some recipients are remote).

    stored_size: its largest copy in a mailbox; received_size: as it came (what the queue holds).
    """
    if not queued:
        log.info("%s: delivered %d bytes from <%s> to %s, %s", message_id, stored_size, session.envelope.sender,
                 ", ".join(session.envelope.logins), arrival_text(session, header))
        return session.replies.ACCEPTED
    return queued_reply(session, [q.id for q in queued], header, received_size)


def publish_all(queued):
    """Rename sealed queue files into place; one that fails takes back those published before it."""
    try:
        for queue_file in queued:
            queue_file.publish()
    except BaseException:
        for queue_file in queued:
            if queue_file.published:
                remove_file(queue_file.path)
        raise


def arrival_text(session, header):
    """What the delivery log line says of a message's arrival: client, login, Message-ID:, TLS version."""
    return "client=%s login=%s message-id=%s tls=%s" % (session.peer, session.login or "-", header.message_id,
                                                        session.wire.tls_version() or "none")


def queue_copies(session, spool, header, message_id):
    """The queue files of a message's remote recipients, durable under their .tmp names: [QueueFile].

    Written before any mailbox is touched.  Mail an alias forwards goes
    apart: it is not ours, so its sender is rewritten (SRS) and it is not
    signed.  On a failure none is left.
    """
    envelope, server, queued = session.envelope, session.server, []
    try:
        if envelope.remote:
            queued.append(queue_received(session, spool, header, message_id, envelope.sender, envelope.remote))
        if envelope.forwarded:
            queued.append(queue_received(session, spool, header, new_queue_id() if queued else message_id,
                                         server.srs.forward(envelope.sender), envelope.forwarded, forwarded=True))
    except BaseException:
        for queue_file in queued:
            queue_file.close()
        raise
    return queued


def received_form(session, spool, header, message_id, checked=None):
    """Each local recipient's copy in its stored form, {login: StoredMessage}; Refused if the sender is not the login's.

    header: the message's Header.  Copies differ only in the To: added to
    a message that has none: it names that copy's recipients alone, so no
    copy tells who else (Bcc) got the message.  checked: the CheckedMessage
    of mail from outside, whose results each copy gets.
    """
    envelope, login = session.envelope, session.login
    foreign = foreign_sender(header, functools.partial(session.server.is_own, login=login)) if login else None
    if foreign is not None:
        raise Refused(Replies.NOT_YOURS % (printable(foreign), login))
    now = time.time()                # one moment for both Received: fields, so the client lists either alike
    sender, received = envelope.sender.encode("utf-8", "surrogateescape"), received_stamp(now)
    traced = session.server.local_domains is not None      # the course's mailboxes stay as they were
    copies = {}
    for owner, addresses in envelope.logins.items():
        layout = stored_layout(header, spool.size, sender, [r.encode("utf-8", "surrogateescape") for r in addresses],
                               received)
        if checked:                  # the checks' results, right after our trace fields
            layout = checked_layout(layout, checked)
        if traced:
            layout.insert(0, trace_fields(session, addresses[0], message_id, now))
        copies[owner] = spool.message(layout)
    return copies


def too_long(run, strict):
    """Whether a wire line of run passes the text line limit, a stuffing dot not counted (RFC 5321 4.5.3.1.6)."""
    for line in run.split(b"\r\n" if strict else b"\n"):
        if len(line) - line.startswith(b".") - (not strict and line.endswith(b"\r")) > MAX_TEXT_LINE - 2:
            return True
    return False


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


class Header:
    """A stored message's header block, read in one pass: its fields' names and places, some fields whole.

    lines: the stored body's lines from the first; only the header block
    and the line after it are read (header_block decides where it ends).
    """

    SENDER_FIELDS = (b"from", b"sender")
    # kept whole: the sender check, the delivery log, forged authentication results (Part 4)
    KEPT_FIELDS = SENDER_FIELDS + (b"message-id", b"authentication-results")

    def __init__(self, lines):
        seen = []                     # per line: (name, or None if folded; start; end; the line if kept)
        count, _ = header_block(self._recording(lines, seen))
        self.fields = []              # [name in lower case, start, end] of each field, folded lines included
        self.kept = []                # [name, start, end, the field as stored] of KEPT_FIELDS, folded lines joined
        for name, start, end, line in seen[:count]:
            if name is None:          # a folded line continues its field
                self.fields[-1][2] = end
                if line is not None:
                    self.kept[-1][2] = end
                    self.kept[-1][3] += line
            else:
                self.fields.append([name, start, end])
                if line is not None:
                    self.kept.append([name, start, end, line])
        self.end = seen[count - 1][2] if count else 0
        self.senders = [line for name, _, _, line in self.kept if name in self.SENDER_FIELDS]
        self.message_id = next((printable(" ".join(line.partition(b":")[2].decode("utf-8", "replace").split()))
                                [:MAX_PATH] for name, _, _, line in self.kept if name == b"message-id"), "-")

    def kept_fields(self, name):
        """[(start, end, field as stored)] of one of the KEPT_FIELDS."""
        return [(start, end, field) for kept, start, end, field in self.kept if kept == name]

    def _recording(self, lines, seen):
        """The lines, each noted in seen as it is read (a line of the KEPT_FIELDS kept whole)."""
        pos, keeping = 0, False
        for line in lines:
            name = None if line[:1] in (b" ", b"\t") else line.partition(b":")[0].lower()
            if name is not None:
                keeping = name in self.KEPT_FIELDS
            seen.append((name, pos, pos + len(line), line if keeping else None))
            pos += len(line)
            yield line


def stored_layout(header, size, sender, recipients, received):
    """The stored message as pieces: bytes to add, and (start, end) ranges of the stored body.

    header: the body's Header; size: the body's length.  Missing From/To
    come from the envelope; Received goes right after Subject (and its
    folded lines), or, with no Subject, an empty Subject and then Received
    close the header block.  A body with no line gets an empty one, and '.'
    ends the message.
    """
    present = {name for name, _, _ in header.fields}
    subject_end = next((end for name, _, end in header.fields if name == b"subject"), None)
    head = b""
    if b"from" not in present:
        head += b"From: " + sender + b"\n"
    if b"to" not in present:
        head += b"To: " + b", ".join(recipients) + b"\n"
    received = b"Received: " + received + b"\n"
    end = b"\n.\n" if header.end == size else b".\n"     # the format wants one body line at least
    if subject_end is None:
        return [head, (0, header.end), b"Subject: \n" + received, (header.end, size), end]
    return [head, (0, subject_end), received, (subject_end, size), end]


def trace_fields(session, recipient, message_id, when):
    """Return-Path: and our Received: (RFC 5321 4.4) that start a copy stored for recipient, \\n lines."""
    return_path = b"Return-Path: <%s>\n" % session.envelope.sender.encode("utf-8", "surrogateescape")
    return return_path + trace_header(session.client_name, session.address[0], session.domain,
                                      session_protocol(session), message_id, recipient, b"\n", when)


def received_stamp(when=None):
    """The Received: value for when (default: now), local time, as the mailbox format writes it."""
    return time.strftime("%Y-%m-%d : %H : %M", time.localtime(when)).encode("ascii")


def stored_bounce(report, sender, domain):
    """A bounce (CRLF lines) as the mailbox stores it: a StoredMessage."""
    body, _ = stored_lines(b"".join(dot_stuffed_chunks(io.BytesIO(report), 0)), True)
    layout = stored_layout(Header(io.BytesIO(body)), len(body), b"MAILER-DAEMON@" + domain.encode("utf-8"),
                           [sender.encode("utf-8", "surrogateescape")], received_stamp())
    return StoredMessage(memoryview(body), layout)


def foreign_sender(header, is_own):
    """The first From: or Sender: address of a message for which is_own(address) is false, else None.

    The address decides, whatever the display name.  A From: or Sender:
    that holds no address at all is no one's own ('' is returned).
    """
    for field in header.senders:
        text = " ".join(field.partition(b":")[2].decode("utf-8", "replace").split())
        addresses = [address for _, address in email.utils.getaddresses([text]) if address]
        for address in addresses or [""]:
            if not is_own(address):
                return address
    return None


# --------------------------------------------------------------------------
# The spool: a message while it arrives
# --------------------------------------------------------------------------

def prepare_spool(root):
    """The path of ROOT/.spool, rid of what crashes left there, but for commit records still to undo.

    A commit record that names mailboxes waits for their next holders (see
    make_whole); an empty one goes once its process is gone (no one holds
    its lock).  Spool files have no name, so other leftovers are rare: a
    record being rewritten, a spool file of a system without unnamed files.
    """
    path = os.path.join(root, SPOOL_NAME)
    try:
        names = os.listdir(path) if stat.S_ISDIR(os.lstat(path).st_mode) else []
    except OSError:
        names = []
    for name in names:
        full = os.path.join(path, name)
        if name.endswith(COMMIT_SUFFIX):
            remove_unused_record(full)
        elif not (name.endswith(COMMIT_SUFFIX + ".lock") and os.path.exists(full[:-len(".lock")])):
            remove_file(full)
    return path


def remove_unused_record(record):
    """Remove a commit record that names no mailbox and whose process is gone."""
    with held_by_nobody(record) as free:
        if free and not read_commit_record(record):
            remove_file(record)


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
        """The stored message that stored_layout describes, ready to append."""
        if self.file is None:
            return StoredMessage(memoryview(self.body()), layout)
        self.file.flush()
        return StoredMessage(self.file, layout)

    def close(self):
        """Forget the body (a spool file vanishes)."""
        if self.file is not None:
            self.file.close()
        self.file, self.parts = None, []


class StoredMessage:
    """A message in its stored form: pieces of bytes to add, and (start, end) ranges of the spooled body.

    The body is not copied into the message: its ranges are written
    straight from memory (a memoryview), or from the spool file a chunk at
    a time.
    """

    def __init__(self, body, layout):
        self.body = body             # a memoryview, or the spool file
        self.layout = layout
        self.size = sum(p[1] - p[0] if isinstance(p, tuple) else len(p) for p in layout)

    def __len__(self):
        return self.size

    def pieces(self):
        """The message's bytes in order, in pieces (of at most COPY_CHUNK bytes from a spool file)."""
        for piece in self.layout:
            if not isinstance(piece, tuple):
                yield piece
            elif isinstance(self.body, memoryview):
                yield self.body[piece[0]:piece[1]]
            else:
                yield from self._read(*piece)

    def _read(self, start, end):
        while start < end:
            self.body.seek(start)
            chunk = self.body.read(min(COPY_CHUNK, end - start))
            if not chunk:
                raise OSError(errno.EIO, "the spool file shrank")
            start += len(chunk)
            yield chunk

    def write_to(self, fd):
        """Write the message to fd: in one writev while it is in memory, else a chunk at a time."""
        if isinstance(self.body, memoryview) and hasattr(os, "writev"):
            pieces = list(self.pieces())
            written = os.writev(fd, pieces)
            if written < self.size:          # a short write: rare, so the rest may be copied
                write_all(fd, b"".join(pieces)[written:])
            return
        for piece in self.pieces():
            write_all(fd, piece)


# --------------------------------------------------------------------------
# Delivery: appending a message to the recipients' mailboxes
# --------------------------------------------------------------------------

class MailboxFull(Exception):
    """A message would make a mailbox hold more than its quota; it was stored for nobody."""


def deliver(copies, quota=None, commit=None):
    """Append a message's copies, {mailbox path: StoredMessage}; return once each is on disk.

    All or none: a message is in every mailbox or, after any error, in
    none; a mailbox it would take past quota bytes stops it before anything
    is written (MailboxFull).  commit, if given, runs once the message is
    on disk everywhere, before the locks are given back; if it fails, so
    does the delivery.

    Group commit: the message waits in each of its mailboxes' queues while
    its thread takes their writer locks, in sorted order.  Holding them, the
    thread writes every message waiting for those mailboxes in one batch,
    its own and its neighbours', and fsyncs each mailbox once; a thread
    that finds its message written by a neighbour just returns.  Under load
    one fsync serves many messages (see write_batch for what it buys).
    """
    delivery = Delivery(copies, quota, commit)
    mailboxes = [MailboxQueue.of(path) for path in delivery.paths]
    for mailbox in mailboxes:
        with mailbox.guard:
            mailbox.waiting.append(delivery)
    taken = 0
    try:
        for mailbox in mailboxes:
            mailbox.writer.acquire()
            taken += 1
        if not delivery.done:
            write_batch(mailboxes, take_batch(mailboxes))
    finally:
        for mailbox in mailboxes[:taken]:
            mailbox.writer.release()
    if delivery.error is not None:
        raise delivery.error


class Delivery:
    """One message on its way into its mailboxes, and how that ended."""

    __slots__ = ("copies", "paths", "quota", "commit", "done", "error")

    def __init__(self, copies, quota, commit):
        self.copies = copies         # mailbox path -> StoredMessage
        self.paths = sorted(copies)
        self.quota = quota
        self.commit = commit
        self.done = False            # written, or failed
        self.error = None            # why it failed


class MailboxQueue:
    """A mailbox as this process's deliveries share it: the messages waiting for it, and its writer."""

    _all = {}                        # path -> MailboxQueue
    _all_guard = threading.Lock()

    @classmethod
    def of(cls, path):
        """The one MailboxQueue of a mailbox path in this process."""
        mailbox = cls._all.get(path)
        if mailbox is None:
            with cls._all_guard:
                mailbox = cls._all.setdefault(path, cls(path))
        return mailbox

    def __init__(self, path):
        self.path = path
        self.lock = delivery_lock(path)  # taken by the thread that holds writer
        self.writer = threading.Lock()   # held by the thread that writes a batch to it
        self.guard = threading.Lock()    # guards waiting
        self.waiting = []                # Deliveries not written yet
        self.whole_at = None             # (inode, size) after our last batch: the file ends whole there

    def open(self, held):
        """Take the delivery lock, open the mailbox and make it whole (held gives both back): an Append."""
        held.enter_context(self.lock)
        fd, st = open_mailbox(self.path)
        held.callback(os.close, fd)
        known_whole, self.whole_at = (st.st_ino, st.st_size) == self.whole_at, None
        return Append(self, fd, st.st_ino, make_whole(fd, self.path, st.st_size, known_whole))


def take_batch(mailboxes):
    """Take out of their queues the waiting deliveries whose mailboxes are all among these (held)."""
    held = {mailbox.path for mailbox in mailboxes}
    batch, taken = [], set()
    for mailbox in mailboxes:
        with mailbox.guard:
            waiting, mailbox.waiting = mailbox.waiting, []
            for delivery in waiting:
                if id(delivery) in taken:
                    continue
                if held.issuperset(delivery.paths):
                    taken.add(id(delivery))
                    batch.append(delivery)
                else:
                    mailbox.waiting.append(delivery)
    return batch


def write_batch(mailboxes, batch):
    """Append a batch of deliveries under their mailboxes' delivery locks, fsync each mailbox once.

    A delivery over its quota is left out; any other error cuts every
    mailbox back and fails the whole batch: each sender is told the truth,
    and nobody's message is stored twice or half.  For a batch that spans
    several mailboxes a commit record makes this hold across a crash too.
    Measured (tests/bench_smtp.py --users 1, interleaved, medians): batching
    gives 40-50% more messages per second at 10 and 50 clients of one
    mailbox than a lock and an fsync for each message; with 10 mailboxes
    the two are within the noise.
    """
    try:
        with contextlib.ExitStack() as held:
            appends = {mailbox.path: mailbox.open(held) for mailbox in mailboxes}
            writing = [delivery for delivery in batch if fits(delivery, appends)]
            if writing:
                commit_all(writing, appends)
    except BaseException as exc:
        for delivery in batch:
            delivery.error = delivery.error or exc
        if not isinstance(exc, Exception):
            raise
    finally:
        for delivery in batch:
            delivery.done = True


def fits(delivery, appends):
    """Whether a delivery stays within its quota in each of its mailboxes (and count it in if so)."""
    for path in delivery.paths:
        if delivery.quota is not None and appends[path].size + len(delivery.copies[path]) > delivery.quota:
            delivery.error = MailboxFull(path)
            return False
    for path in delivery.paths:
        appends[path].size += len(delivery.copies[path])
    return True


def commit_all(writing, appends):
    """Append every message, fsync every mailbox, run the commit steps; cut all back on any error."""
    slot = CommitSlot.take(commit_folder(next(iter(appends)))) if len(appends) > 1 else None
    try:
        if slot is not None:
            slot.record({os.path.basename(os.path.dirname(path)): append.start for path, append in appends.items()})
        for delivery in writing:
            for path in delivery.paths:
                appends[path].write(delivery.copies[path])
        for append in appends.values():
            os.fsync(append.fd)
        for delivery in writing:
            if delivery.commit is not None:
                delivery.commit()
        if slot is not None:
            slot.clear()           # the commit point
    except BaseException:
        cut = all([append.cut_back() for append in appends.values()])    # every one, even after a failure
        if slot is not None:
            slot.release(cut and slot.clear_if_possible())
        raise
    if slot is not None:
        slot.release(True)
    for append in appends.values():
        append.mailbox.whole_at = (append.inode, append.size)


class CommitSlot:
    """A commit record file of this process, rewritten in place from one delivery to the next.

    Creating a record for each delivery and removing it after costs four
    fsyncs (the file's and the folder's, twice); rewriting a file that is
    there costs two.  The process holds a kernel lock on each of its record
    files while it lives, so a server starting on the root removes only the
    empty records of dead processes (prepare_spool).  Measured with
    tests/bench_smtp.py --recipients 2: 30-50% more messages per second
    at 1 and 10 clients than a new record each time.
    """

    _free = {}                       # folder -> CommitSlots not in use
    _guard = threading.Lock()

    @classmethod
    def take(cls, folder):
        """A record file of this process in folder, for one delivery."""
        with cls._guard:
            free = cls._free.setdefault(folder, [])
            if free:
                return free.pop()
        return cls(folder)

    def __init__(self, folder):
        os.makedirs(folder, 0o700, exist_ok=True)
        self.folder = folder
        self.path = os.path.join(folder, "%d-%s%s" % (os.getpid(), os.urandom(4).hex(), COMMIT_SUFFIX))
        self.fd, _ = open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            _lock_fd(self.fd, False)
            fsync_directory(folder, strict=True)
        except BaseException:
            os.close(self.fd)
            remove_file(self.path)
            raise

    def record(self, sizes):
        """Write the record ({login: size before the delivery}), durably, before the first append."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        write_all(self.fd, commit_record_text(sizes))
        os.fsync(self.fd)

    def clear(self):
        """Empty the record, durably: the delivery is done."""
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)

    def clear_if_possible(self):
        """Empty the record after a failed delivery whose mailboxes are all cut back; False if that failed."""
        try:
            self.clear()
            return True
        except OSError:
            return False

    def release(self, cleared):
        """Keep the file for the next delivery; or, when its record must stay (cleared False), leave it for good."""
        if cleared:
            with self._guard:
                self._free[self.folder].append(self)
        else:
            os.close(self.fd)          # the next holders of its mailboxes undo what it names


class Append:
    """A mailbox open for a batch, its delivery lock held: where it started, how large it is to be."""

    def __init__(self, mailbox, fd, inode, size):
        self.mailbox = mailbox
        self.fd = fd
        self.inode = inode
        self.start = size            # before the batch: what a failure cuts back to
        self.size = size             # with the messages of the batch counted in

    def write(self, message):
        """Write a message at the end of the mailbox."""
        message.write_to(self.fd)

    def cut_back(self):
        """Undo the batch, so that nothing unacknowledged stays in the mailbox; False if that failed."""
        try:
            os.ftruncate(self.fd, self.start)
            os.fsync(self.fd)
            return True
        except OSError as exc:
            log.critical("could not cut %s back to %d bytes after a failed delivery: %s",
                         self.mailbox.path, self.start, exc)
            return False


def open_mailbox(path):
    """Open a mailbox for appending, creating it (durably) when it is absent: (fd, os.stat_result)."""
    flags = os.O_RDWR | os.O_APPEND
    try:
        return open_regular(path, flags)
    except FileNotFoundError:
        opened = open_regular(path, flags | os.O_CREAT)
        fsync_directory(os.path.dirname(path))
        return opened


# --------------------------------------------------------------------------
# The outbound queue
# --------------------------------------------------------------------------
#
# With --local-domains, mail for other domains is taken only from a client
# that has logged in with AUTH or connects from --relay-networks, and waits
# in ROOT/.queue until a runner thread has sent it on (Delivery to other
# servers, below).
#
# Files.  One file per message, named by its queue id:
#
#   ROOT/.queue/<id>        the envelope, a blank line, then the message
#   ROOT/.queue/<id>.tmp    a queue file being written; renamed to <id>
#   ROOT/.queue/.flush      a line added by --flush ("*": every runner on the root
#                           retries all) or --release (the id: tried now)
#   ROOT/.queue/<id>.held   --hold: the message is not tried until --release
#   ROOT/.queue/<id>.delete --delete of a message being sent: its runner
#                           deletes it once the attempt is over
#
# The envelope is text, a line per field, each "NAME<TAB>VALUE":
#
#   mailserver-queue 1                  the format and its version
#   id        <id>
#   sender    <address>                 <> for a bounce
#   arrived   <epoch seconds>
#   login     <login, or ->             who submitted it with AUTH
#   needs     <8bit,smtputf8 or ->      what the message asks of the next server
#   hops      <n>                       its Received: headers, ours included
#   warned    <1>                       the delay notice is sent (absent until then)
#   rcpt      <state> <attempts> <next try> <address> <last reply>   (one per recipient)
#
# state is pending, sent or failed.  The message follows the blank line
# as it goes out, CRLF lines with our Received: first, but without SMTP's
# dot-stuffing: that is added as it is sent (dot_stuffed_chunks).
#
# Durability.  A new queue file is written under its .tmp name and fsync'd
# before the local mailboxes are appended to; it is renamed into place
# (and the folder fsync'd) while their delivery locks are still held, so
# the client's 250 means both are durable, and a failure of either leaves
# neither.  A change of a recipient's state writes a whole new file under
# the .tmp name and renames it over the old one: a crash leaves the old
# state or the new, never half of each.  A .tmp file is locked by its
# writer (a kernel lock on the file itself) from its creation to its
# rename, so a server starting on the root removes only those whose
# writer has died.
#
# At least once.  A recipient is marked sent after the remote server's 250:
# a crash between the two sends it again at the next try.  Nothing is ever
# lost, at worst a message is sent twice.
#
# Several servers may share one root.  A runner sends a message only
# holding its lock, a kernel lock on the queue file itself taken without
# waiting: a message is never sent by two runners at once, and a runner
# that dies lets it go.  A state change renames a new file over the locked
# one; the new file is locked by its writer from its creation (above) until
# after the rename, so the message is never unlocked in between, and a
# runner that has locked a file no longer at the path (replaced, removed)
# lets it go.  (No lock file beside each message: creating and removing one
# cost more than the rest of a delivery's file work, measured.)
#
# By hand (OpenSMTPD's smtpctl, Postfix's postsuper).  --delete, --hold and
# --release run in a process of their own, as --queue and --flush do, and
# act on the files, so they work with or without a server running: --hold
# makes <id>.held, which a runner looks for once it holds the message's
# lock, so a message being sent is held after that attempt; --release
# removes it and asks for the message through .flush; --delete takes the
# message's lock and removes the file, or, while a runner holds it, leaves
# <id>.delete, which that runner looks for when it lets the message go.

QUEUE_NAME = ".queue"
QUEUE_FORMAT = "mailserver-queue 1"
QUEUE_ID = re.compile(r"[0-9A-F]{21}\Z")      # see new_queue_id
TEMP_SUFFIX = ".tmp"
HELD_SUFFIX = ".held"
DELETE_SUFFIX = ".delete"
FLUSH_NAME = ".flush"
FLUSH_ALL = "*"              # a .flush line asking for every message (else it names one id)
MAX_FLUSH_FILE = 64 * 1024   # bytes .flush may grow to before a request starts it afresh
BY_HAND_DONE = {"delete": "deleted", "hold": "held"}
DEAD_NAME = ".dead"          # the dead destinations and when each is tried again, for --queue
MAX_ENVELOPE = 256 * 1024    # bytes: MAX_RECIPIENTS recipients with their last replies, and room
MAX_REPLY_TEXT = 400         # characters of a remote reply kept in the envelope
RESCAN_INTERVAL = 60         # seconds between looks at the whole queue (other servers' messages)
FLUSH_POLL = 1.0             # seconds between looks at the --flush trigger
DESTINATIONS_KEPT = 10000    # destinations whose grown share of sessions is remembered
DESTINATION_START = 5        # sessions a destination starts with, one more for each that reaches a server
                             # (Postfix's initial_destination_concurrency): a dead one costs a few, not 20

_queue_serials = itertools.count(int.from_bytes(os.urandom(2), "big"))


def new_queue_id():
    """A new queue id, unique among the servers of one root: milliseconds, pid, a counter, in hex.

    Names in the order messages arrived, and safe in a path and a log line.
    """
    return "%011X%06X%04X" % (int(time.time() * 1000) & (16 ** 11 - 1), os.getpid() & (16 ** 6 - 1),
                              next(_queue_serials) & 0xFFFF)


def recipient_domain(address):
    """The domain of an address in lower case, without a trailing dot; None when it has no '@'."""
    if "@" not in address:
        return None
    domain = address.rpartition("@")[2].lower()
    return domain[:-1] if domain.endswith(".") else domain


def is_remote(address, local_domains):
    """Whether an address is for another server: --local-domains given and its domain not in them.

    An address literal ([192.0.2.1]) is never local, whatever it names.
    """
    domain = recipient_domain(address)
    if local_domains is None or domain is None:
        return False
    return domain.startswith("[") or domain not in local_domains


class QueuedRecipient:
    """One recipient of a queued message: where it stands."""

    __slots__ = ("state", "attempts", "next_try", "address", "reply")

    def __init__(self, address, state="pending", attempts=0, next_try=0.0, reply=""):
        self.address = address
        self.state = state           # pending, sent or failed
        self.attempts = attempts
        self.next_try = next_try     # epoch seconds
        self.reply = reply           # the last reply, or why it failed

    def line(self):
        return "rcpt\t%s\t%d\t%d\t%s\t%s" % (self.state, self.attempts, self.next_try, self.address,
                                             self.reply or "-")

    @classmethod
    def parse(cls, value):
        state, attempts, next_try, address, reply = value.split("\t")
        if state not in ("pending", "sent", "failed") or not address:
            raise ValueError("bad recipient")
        return cls(address, state, int(attempts), float(next_try), "" if reply == "-" else reply)


class QueuedMessage:
    """A queue file's envelope: the message's id, sender, arrival, needs and recipients."""

    def __init__(self, queue_id, sender, recipients, login=None, arrived=None, needs=(), hops=0, warned=False):
        self.id = queue_id
        self.sender = sender
        self.recipients = recipients  # QueuedRecipients
        self.login = login
        self.arrived = time.time() if arrived is None else arrived
        self.needs = frozenset(needs)   # "8bit", "smtputf8"
        self.hops = hops
        self.warned = warned         # the sender has had its delay notice
        self.offset = 0              # where the message starts in the file
        self.size = 0                # the message's bytes

    def pending(self):
        """The recipients not sent to, and not failed, yet."""
        return [r for r in self.recipients if r.state == "pending"]

    def next_try(self):
        """When the earliest pending recipient is due (epoch seconds), or None when none is pending."""
        return min((r.next_try for r in self.pending()), default=None)

    def envelope(self):
        """The envelope as the file holds it, the blank line included."""
        lines = [QUEUE_FORMAT, "id\t" + self.id, "sender\t<%s>" % self.sender, "arrived\t%.3f" % self.arrived,
                 "login\t" + (self.login or "-"), "needs\t" + (",".join(sorted(self.needs)) or "-"),
                 "hops\t%d" % self.hops] + ["warned\t1"] * self.warned
        lines += [r.line() for r in self.recipients]
        return ("\n".join(lines) + "\n\n").encode("utf-8", "surrogateescape")

    @classmethod
    def parse(cls, data):
        """The envelope of a file's first bytes (up to the blank line, excluded); ValueError if malformed."""
        lines = data.decode("utf-8", "surrogateescape").split("\n")
        if lines[0] != QUEUE_FORMAT:
            raise ValueError("not a queue file of this format")
        fields, recipients = {}, []
        for line in lines[1:]:
            name, _, value = line.partition("\t")
            if name == "rcpt":
                recipients.append(QueuedRecipient.parse(value))
            elif name in ("id", "sender", "arrived", "login", "needs", "hops", "warned") and name not in fields:
                fields[name] = value
            else:
                raise ValueError("unknown line %r" % line[:40])
        sender = fields.get("sender", "")
        if not (sender.startswith("<") and sender.endswith(">")) or not recipients:
            raise ValueError("bad sender or no recipient")
        try:
            needs, login = fields["needs"], fields["login"]
            return cls(fields["id"], sender[1:-1], recipients, None if login == "-" else login,
                       float(fields["arrived"]), () if needs == "-" else needs.split(","),
                       int(fields["hops"]), "warned" in fields)
        except KeyError as missing:
            raise ValueError("no %s line" % missing)


def read_queued(path):
    """The envelope of the queue file at path, with its offset and size (OSError, ValueError)."""
    fd, _ = open_regular(path, os.O_RDONLY)
    try:
        return read_envelope(fd)
    finally:
        os.close(fd)


def read_envelope(fd):
    """The envelope of an open queue file, with its offset and size (OSError, ValueError)."""
    data = b""
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        end = data.find(b"\n\n")
        if end >= 0:
            break
        chunk = os.read(fd, 8192)
        if not chunk or len(data) > MAX_ENVELOPE:
            raise ValueError("no envelope end")
        data += chunk
    entry = QueuedMessage.parse(data[:end])
    entry.offset = end + 2
    entry.size = os.fstat(fd).st_size - entry.offset
    return entry


class QueueFile:
    """A queue file being written under its .tmp name, locked until it is renamed into place or dropped."""

    def __init__(self, folder, queue_id):
        self.folder = folder
        self.id = queue_id
        self.path = os.path.join(folder, queue_id)
        self.temp = self.path + TEMP_SUFFIX
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd, _ = open_regular(self.temp, flags)
        except FileExistsError:      # a state change of a writer that died (a live one holds its lock)
            remove_orphan(self.temp)
            fd, _ = open_regular(self.temp, flags)
        try:
            if not _lock_fd(fd, False):      # a server starting meanwhile must not take it for debris
                raise OSError(errno.EAGAIN, "taken for debris by a server starting", self.temp)
        except BaseException:
            os.close(fd)
            remove_file(self.temp)
            raise
        self.file = os.fdopen(fd, "wb", COPY_CHUNK)
        self.published = False

    def write(self, data):
        self.file.write(data)

    def copy_from(self, path, offset):
        """Add the bytes of the file at path from offset on, a chunk at a time."""
        fd, _ = open_regular(path, os.O_RDONLY)
        with open(fd, "rb", 0) as source:
            source.seek(offset)
            while True:
                chunk = source.read(COPY_CHUNK)
                if not chunk:
                    return
                self.file.write(chunk)

    def seal(self):
        """Make what was written durable (still under the .tmp name)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def publish(self):
        """Rename the sealed file into place and make the rename durable: deliver()'s commit hook.

        If the folder's fsync fails, the file is taken back out: the client
        is told 451, so nothing of the message may be sent.
        """
        os.replace(self.temp, self.path)
        try:
            fsync_directory(self.folder, strict=True)
        except BaseException:
            remove_file(self.path)
            raise
        self.published = True

    def close(self):
        """Give the file up; one never published is removed."""
        if not self.published:
            remove_file(self.temp)
        self.file.close()


def prepare_queue(root):
    """The path of ROOT/.queue (made private if absent), emptied of the .tmp files of dead writers."""
    path = private_folder(root, QUEUE_NAME)
    for name in os.listdir(path):
        if name.endswith(TEMP_SUFFIX):
            remove_orphan(os.path.join(path, name))
        elif name.endswith((HELD_SUFFIX, DELETE_SUFFIX)) and not os.path.lexists(
                os.path.join(path, name.rpartition(".")[0])):
            remove_file(os.path.join(path, name))      # its message is gone: sent, or deleted meanwhile
    return path


def remove_queued(path):
    """Remove a queue file and what --hold and --delete left beside it."""
    remove_file(path)
    remove_file(path + HELD_SUFFIX)
    remove_file(path + DELETE_SUFFIX)


def remove_orphan(path):
    """Remove a .tmp queue file unless its writer, still alive, holds its lock."""
    with held_by_nobody(path) as free:
        if free:
            remove_file(path)
            log.info("removed %s, left half-written by a server that stopped", path)


# One set of relay settings per mail root.  Every runner on a root sends
# every queued message, so servers that disagreed on where mail goes would
# misroute it.  Each SMTP server with a queue writes its settings to a
# file ROOT/.run/relay-<pid>-<random>.settings, locked for its life; a
# server starting on the root compares its own with those of each living
# server (under ROOT/.run/relay.lock, one starter at a time) and refuses
# to start when one differs.

RELAY_SETTINGS = ("domain", "source_address", "local_domains", "relay_host", "relay_implicit_tls",
                  "relay_cafile", "relay_auth", "relay_timeout", "queue_lifetime", "retry_base",
                  "dns_server", "mx_port")
RELAY_SETTINGS_LOCK = "relay.lock"
RELAY_SETTINGS_SUFFIX = ".settings"
_RELAY_RECORD = []           # this process's settings file, open and locked until it ends


def relay_settings(args):
    """{option name: its value as text} of the settings every server of one root must share."""
    def text(value):
        if isinstance(value, frozenset):
            return ",".join(sorted(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return "%g" % value           # --retry-base 300 is the default 300, not 300.0
        return str(value)
    return {"--" + name.replace("_", "-"): text(getattr(args, name)) for name in RELAY_SETTINGS}


def record_relay_settings(root, settings):
    """Record this server's relay settings in ROOT/.run; StartError if a running server's differ."""
    folder = private_folder(root, RUN_NAME)
    with FileLock(os.path.join(folder, RELAY_SETTINGS_LOCK)):
        for name in sorted(os.listdir(folder)):
            if name.startswith("relay-") and name.endswith(RELAY_SETTINGS_SUFFIX):
                compare_relay_settings(os.path.join(folder, name), settings)
        path = os.path.join(folder, "relay-%d-%s%s" % (os.getpid(), os.urandom(4).hex(), RELAY_SETTINGS_SUFFIX))
        fd, _ = open_regular(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        _lock_fd(fd, False)
        _RELAY_RECORD.append(fd)
        write_all(fd, "".join("%s\t%s\n" % item for item in settings.items()).encode("utf-8", "surrogateescape"))


def compare_relay_settings(path, settings):
    """Remove a dead server's settings file; StartError naming the first setting a living one differs in."""
    with held_by_nobody(path) as dead:
        if dead:
            remove_file(path)
            return
    with open(path, "rb") as f:
        theirs = dict(line.split("\t", 1) for line in f.read().decode("utf-8", "surrogateescape").splitlines()
                      if "\t" in line)
    for name, value in settings.items():
        if theirs.get(name) != value:
            raise StartError("relay settings differ from those of a running server on this mail root (%s): %s is "
                             "%r there, %r here; every server of one root must use the same relay settings"
                             % (os.path.basename(path), name, theirs.get(name), value))


def outgoing_chunks(spool):
    """The stored body of a spool (LF lines, dot-stuffed) as it goes out, in chunks: CRLF, unstuffed."""
    if spool.file is None:
        chunks = [spool.body()]
    else:
        spool.file.seek(0)
        chunks = iter(lambda: spool.file.read(COPY_CHUNK), b"")
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        whole = data.rfind(b"\n") + 1       # whole lines only: a chunk may end inside one
        carry = data[whole:]
        if whole:
            yield outgoing_lines(data[:whole])
    if carry:
        yield outgoing_lines(carry + b"\n")


def outgoing_lines(stored):
    """Whole stored lines (LF, dot-stuffed) as they go out: CRLF, the stuffing dots taken away."""
    data = stored.replace(b"\n.", b"\n")
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\n", b"\r\n")


def dot_stuffed_chunks(file, offset):
    """A queued message (CRLF, not stuffed) read from offset, a chunk at a time, dot-stuffed for DATA."""
    file.seek(offset)
    carry = b""
    while True:
        chunk = file.read(COPY_CHUNK)
        data = carry + chunk
        whole = data.rfind(b"\n") + 1 if chunk else len(data)   # each piece starts at a line start
        carry = data[whole:]
        piece = data[:whole].replace(b"\n.", b"\n..")
        if piece.startswith(b"."):
            piece = b"." + piece
        if piece:
            yield piece
        if not chunk:
            return


def spool_is_ascii(spool, end=None):
    """Whether a spooled body (or its first end bytes) is all 7-bit."""
    if spool.file is None:
        return spool.body()[:end].isascii()
    spool.file.seek(0)
    left = spool.size if end is None else end
    while left > 0:
        chunk = spool.file.read(min(COPY_CHUNK, left))
        if not chunk.isascii():
            return False
        left -= len(chunk) or left
    return True


def trace_header(client_name, client_ip, domain, protocol, queue_id, recipient=None, eol=b"\r\n", when=None):
    """Our Received: field (RFC 5321 4.4), folded, with its line end (for one recipient, or several)."""
    name = printable(client_name or "unknown").replace("(", "").replace(")", "")
    literal = ("IPv6:" if ":" in client_ip else "") + client_ip     # RFC 5321 4.1.3
    to = "" if recipient is None else "\n\tfor <%s>" % printable(recipient)
    text = ("Received: from %s ([%s])\n\tby %s with %s id %s%s;\n\t%s\n"
            % (name, literal, domain, protocol, queue_id, to, email.utils.formatdate(when, localtime=True)))
    return text.encode("utf-8", "surrogateescape").replace(b"\n", eol)


def session_protocol(session):
    """The 'with' word of a session's Received: SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA (RFC 3848)."""
    if session.replies is not Replies:        # the client began with HELO
        return "SMTP"
    return "ESMTP" + ("S" if session.tls_active else "") + ("A" if session.login else "")


def submission_headers(names, domain):
    """Date: and Message-ID: for a submitted message that lacks them (RFC 6409 8.2, 8.3), with CRLFs."""
    added = b""
    if b"date" not in names:
        added += b"Date: " + email.utils.formatdate(localtime=True).encode("ascii") + b"\r\n"
    if b"message-id" not in names:
        added += b"Message-ID: " + email.utils.make_msgid(domain=domain).encode("ascii") + b"\r\n"
    return added


def author_domain(header):
    """The domain of the first From: address of a message (header: its Header), or None."""
    domains = [address.rpartition("@")[2] for addresses in from_addresses(header) for address in addresses
               if "@" in address]
    return domains[0] if domains else None


def from_addresses(header):
    """The addresses of each From: field of a message (header: its Header), [[address, ...], ...]."""
    fields = []
    for _, _, field in header.kept_fields(b"from"):
        text = " ".join(field.partition(b":")[2].decode("utf-8", "surrogateescape").split())
        fields.append([address for _, address in email.utils.getaddresses([text]) if address])
    return fields


def queue_received(session, spool, header, queue_id, sender, recipients, forwarded=False):
    """Write a received message for recipients of other domains into a sealed .tmp queue file.

    A copy an alias forwards (forwarded) is not ours: it gets no submission
    fields and no signature.  Others are signed only when they come from a
    logged-in client or a relay network (section 9), never for a stranger
    whose mail a bounce address of ours (SRS) lets through.
    """
    envelope, server = session.envelope, session.server
    trace = trace_header(session.client_name, session.address[0], session.domain, session_protocol(session), queue_id)
    trusted = not forwarded and (session.login is not None or in_networks(session.address[0], server.relay_networks))
    return server.queue.write(queue_id, spool, header, sender, recipients, None if forwarded else session.login,
                              trace, envelope.utf8, trusted)


def queued_reply(session, queue_ids, header, size):
    """Log a received message that is now in the queue, hand it to a runner; the 250 naming its ids."""
    envelope = session.envelope
    log.info("%s: from=<%s> size=%d %s, queued for %s%s", " ".join(queue_ids), envelope.sender, size,
             arrival_text(session, header), ", ".join(envelope.remote + envelope.forwarded),
             ", delivered to " + ", ".join(envelope.logins) if envelope.logins else "")
    for queue_id in queue_ids:
        session.server.queue.wake(queue_id)
    return session.replies.QUEUED % " ".join(queue_ids)


def write_queued(folder, entry, head, chunks):
    """Write a new queue file (envelope, head bytes, then the message's chunks) under its .tmp name, sealed.

    Returns the QueueFile, to be published (renamed) or closed by the caller.
    """
    queued = QueueFile(folder, entry.id)
    try:
        queued.write(entry.envelope())
        queued.write(head)
        for chunk in chunks:
            queued.write(chunk)
        queued.seal()
    except BaseException:
        queued.close()
        raise
    return queued


def rewrite_queued(folder, entry, path):
    """Record new recipient states: a new file (the envelope, the message copied) renamed over the old."""
    offset = entry.offset
    queued = QueueFile(folder, entry.id)
    try:
        queued.write(entry.envelope())
        queued.copy_from(path, offset)
        queued.seal()
        queued.publish()
    finally:
        queued.close()
    entry.offset = len(entry.envelope())


class MessageLock:
    """A queued message's lock: a kernel lock on its queue file, taken without waiting (see above)."""

    def __init__(self, path):
        self.path = path
        self.fd = None               # the queue file, open for reading while the lock is held

    def acquire(self):
        """Take the lock; False if another runner (of any process) holds it, or the message is gone."""
        try:
            fd, st = open_regular(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            if _lock_fd(fd, False):
                now = os.stat(self.path)     # still the message's file, not one replaced meanwhile
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    self.fd = fd
                    return True
        except OSError:
            pass
        os.close(fd)
        return False

    def release(self):
        """Give the lock up."""
        os.close(self.fd)
        self.fd = None


def backoff(attempts, base):
    """Seconds to wait after the attempts-th failed try: base, doubling, at most RETRY_MAX."""
    return min(RETRY_MAX, base * 2 ** min(attempts - 1, 32))


class Destinations:
    """Where outgoing mail goes, as the runners share it: the sessions each destination has, and the dead ones.

    As Postfix's qmgr does: a destination (a domain, or the smarthost) has
    at most --relay-per-destination sessions at once, so one large or slow
    domain cannot take every runner; it starts with DESTINATION_START and
    is given one more each time a session reaches a server.  A message for
    a full one is left due and handed to a runner again when a session of
    it ends.  A destination
    whose servers could not be reached (a timeout, a refused connection, a
    DNS server that does not answer) is dead for a while, --retry-base at
    first and doubling with each failure in a row, up to RETRY_MAX: its
    recipients are deferred with its last reason and no connection at all,
    until then or a --flush.  The dead ones are written to ROOT/.queue/.dead
    for --queue (not fsync'd: they are advice, and a crash forgets them).
    """

    def __init__(self, folder, per_destination, retry_base):
        self.path = os.path.join(folder, DEAD_NAME)
        self.limit = per_destination
        self.retry_base = retry_base
        self._guard = threading.Lock()
        self._sessions = collections.Counter()   # destination -> its sessions now
        self._window = collections.OrderedDict()   # destination -> the sessions it may have (most recent last)
        self._waiting = {}           # destination -> {queue id: None}: messages waiting for a session of it
        self._dead = {}              # destination -> (epoch seconds it is tried again, failures, last reason)
        self._saving = threading.Lock()   # one writer of the file at a time, each writing the marks as they are

    def dead(self, destination):
        """(when it is tried again, the last reason) of a dead destination; None for a live one."""
        with self._guard:
            mark = self._dead.get(destination)
        return (mark[0], mark[2]) if mark and mark[0] > time.time() else None

    def take(self, destination, queue_id):
        """Take a session of destination for a message; False (and the message waits) when it has its share."""
        with self._guard:
            if self._sessions[destination] < self._window.get(destination, min(DESTINATION_START, self.limit)):
                self._sessions[destination] += 1
                return True
            self._waiting.setdefault(destination, {})[queue_id] = None
            return False

    def give_back(self, destination, unreachable):
        """End a session of destination; the ids of the messages to try now.

        unreachable: why its servers could not be reached, or "" when one
        answered.  One waiting message takes the session's place; once the
        destination is dead, every waiting one goes (to be deferred at once).
        """
        with self._guard:
            self._sessions[destination] -= 1
            if not self._sessions[destination]:
                del self._sessions[destination]
            changed = self._judge(destination, unreachable)
            waiting = self._waiting.pop(destination, {})
            woken = list(waiting) if unreachable else list(waiting)[:1]
            for queue_id in woken:
                del waiting[queue_id]
            if waiting:
                self._waiting[destination] = waiting
        if changed:
            self._save()
        return woken

    def _judge(self, destination, unreachable):
        """Mark destination dead or alive after a session (guard held); True if the marks changed."""
        if not unreachable:
            self._window[destination] = min(self.limit, self._window.pop(destination, DESTINATION_START) + 1)
            if len(self._window) > DESTINATIONS_KEPT:
                self._window.popitem(last=False)    # forgotten: it starts again from DESTINATION_START
            return self._dead.pop(destination, None) is not None
        self._window.pop(destination, None)
        now = time.time()
        for name in [d for d, mark in self._dead.items() if mark[0] <= now - RETRY_MAX]:
            del self._dead[name]     # long past: forgotten, so the marks stay few
        mark = self._dead.get(destination)
        if mark and mark[0] > now:   # marked already, by a session at the same time: one failure, not two
            return False
        failures = mark[1] + 1 if mark else 1
        self._dead[destination] = (now + backoff(failures, self.retry_base), failures, unreachable)
        return True

    def clear(self):
        """Forget every dead destination (a --flush)."""
        with self._guard:
            changed, self._dead = bool(self._dead), {}
        if changed:
            self._save()

    def _save(self):
        """Write the dead destinations for --queue: 'DESTINATION<TAB>EPOCH<TAB>FAILURES<TAB>REASON' lines."""
        with self._saving:           # two runners at once would write one temporary file together
            with self._guard:
                lines = ["%s\t%d\t%d\t%s\n" % (d or "(relay host)", until, failures, reason)
                         for d, (until, failures, reason) in sorted(self._dead.items())]
            temp = self.path + TEMP_SUFFIX
            try:
                with open(temp, "w", encoding="utf-8") as f:
                    f.writelines(lines)
                os.replace(temp, self.path)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc)


class OutboundQueue:
    """One server's outbound queue: new messages written in, runner threads sending them out.

    --relay-concurrency runners each take one message at a time: a message
    just queued at once (it is handed over in memory), the others from a
    look at the whole folder, one name at a time, when one is due (the
    earliest next try any runner has seen), every RESCAN_INTERVAL (messages
    of other servers on the root) or when --flush has touched ROOT/.queue/.flush.
    """

    def __init__(self, root, domain, local_domains, options, deliver_locally, original_sender=lambda a: a):
        """The queue of mail root root; options: RelayOptions; deliver_locally(address, report): see
        _send_report; original_sender(address): who hears of a message sent from address (see
        _report_recipient)."""
        self.folder = prepare_queue(root)
        self.domain = domain         # our name: in EHLO, bounces, the Message-ID of a submission
        self.local_domains = local_domains
        self.deliver_locally = deliver_locally
        self.original_sender = original_sender
        self.concurrency = options.relay_concurrency
        self.lifetime = options.queue_lifetime
        self.retry_base = options.retry_base
        self.delay_warning = options.delay_warning     # seconds; 0: no delay notices
        self.relay = Relay(options, domain)
        self.keys = DKIMKeys(root)
        self.flush_path = os.path.join(self.folder, FLUSH_NAME)
        self.flush_seen = file_stamp(self.flush_path)
        self.flush_checked = 0.0
        self.changed = threading.Condition()
        self.fresh = collections.deque()     # (id, forced) of messages just queued here, or released
        self.flush_read = self._flush_size()   # what of .flush was asked before we started: not for us
        self.scan = None             # the folder listing being gone through, if any
        self.scan_forced = False     # it is a --flush: everything is due
        self.next_scan = 0.0         # epoch seconds: at start, at once
        self.stopping = False
        self.stopped = threading.Event()     # the same, for the idle connection timer
        self.destinations = Destinations(self.folder, options.relay_per_destination, options.retry_base)
        self.active = {}             # queue id -> whether to try it again at once: the attempts under way
        # queue id -> epoch seconds before which it has nothing due, as our last attempt left it: a look
        # at the whole queue skips it unread (10,000 messages waiting for dead destinations are not
        # read again at every look), and forgets the ids it did not see
        self.not_before = {}
        self.scan_seen = set()

    # -- messages in

    def write(self, queue_id, spool, header, sender, recipients, login, trace, utf8, signed):
        """Write a received message (header: its Header) for recipients into a sealed .tmp queue file.

        signed: whether it is ours to sign (section 9).
        """
        names = [name for name, _, _ in header.fields]
        head = trace + (submission_headers(set(names), self.domain) if login else b"")
        ascii_body = spool_is_ascii(spool)
        needs = set() if ascii_body else {"8bit"}
        ascii_headers = ascii_body or spool_is_ascii(spool, header.end)
        if utf8 and not (ascii_headers and sender.isascii() and all(r.isascii() for r in recipients)):
            needs.add("smtputf8")
        entry = QueuedMessage(queue_id, sender, [QueuedRecipient(r) for r in recipients], login,
                              needs=needs, hops=names.count(b"received") + 1)
        # Signed once, here, after our own fields: every retry sends the same bytes (section 9).
        domain = author_domain(header) if signed and self.keys.present() else None   # a stat, not a parse, without keys
        signatures = self.keys.signatures(domain, itertools.chain([head], outgoing_chunks(spool))) if domain else b""
        return write_queued(self.folder, entry, signatures + head, outgoing_chunks(spool))

    def queue_message(self, sender, recipient, message):
        """Queue a message we made (a bounce: bytes, CRLF lines) for one recipient; return its id."""
        needs = set() if message.isascii() else {"8bit"}
        if not (sender.isascii() and recipient.isascii()):
            needs.add("smtputf8")            # RFC 6531: a UTF-8 address goes only with SMTPUTF8
        entry = QueuedMessage(new_queue_id(), sender, [QueuedRecipient(recipient)], needs=needs)
        try:                         # a bounce is signed with --domain's keys
            signatures = self.keys.signatures(self.domain, [message])
        except DKIMError as error:   # better unsigned than lost
            log.error("%s: bounce sent without a DKIM signature: %s", entry.id, error)
            signatures = b""
        queued = write_queued(self.folder, entry, signatures, [message])
        try:
            queued.publish()
        finally:
            queued.close()
        self.wake(entry.id)
        return entry.id

    def wake(self, queue_id, forced=False):
        """Hand a message just queued (or released) to a runner, to be tried at once."""
        with self.changed:
            self.fresh.append((queue_id, forced))
            self.changed.notify()

    # -- the runners

    def start(self):
        """Start the runner threads, and the timer that closes idle connections."""
        for _ in range(self.concurrency):
            threading.Thread(target=self._run, name="queue runner", daemon=True).start()
        threading.Thread(target=self._close_idle, name="idle connections", daemon=True).start()
        log.info("queue: %d runners started on %s", self.concurrency, self.folder)

    def _close_idle(self):
        # Not a waiter on self.changed: a notify() meant for a runner must never wake this instead.
        leave_signals_to_main_thread()
        while not self.stopped.wait(CONNECTION_CACHE_TIME / 2):
            self.relay.idle.close_expired()

    def stop(self):
        """Make the runners take no more work (an attempt under way is cut by the exit: at least once)."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.stopped.set()

    def _run(self):
        leave_signals_to_main_thread()
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self.attempt(*job)
            except Exception:
                log.exception("%s: delivery attempt failed", job[0])

    def _next_job(self):
        """The next (queue id, forced) to try, waiting until there is one; None once stopping."""
        with self.changed:
            while not self.stopping:
                if self.fresh:
                    return self.fresh.popleft()
                now = time.time()
                if self.scan is not None:
                    for item in self.scan:
                        if QUEUE_ID.match(item.name):
                            self.scan_seen.add(item.name)
                            if self.scan_forced or self.not_before.get(item.name, 0) <= now:
                                return item.name, self.scan_forced
                    self.scan.close()
                    self.scan = None
                    for queue_id in set(self.not_before) - self.scan_seen:
                        del self.not_before[queue_id]      # gone: sent by another server, or removed
                    self.scan_seen = set()
                flushed = self._flushed(now)
                if flushed or now >= self.next_scan:
                    self._start_scan(now, flushed)
                elif not self.fresh:         # (--release may have handed one over)
                    self.changed.wait(min(FLUSH_POLL, self.next_scan - now))
            return None

    def _flushed(self, now):
        """Whether --flush has asked for everything since we last looked (at most once per FLUSH_POLL).

        The messages --release asked for meanwhile are handed to runners, forced.
        """
        if now - self.flush_checked < FLUSH_POLL:
            return False
        self.flush_checked = now
        stamp = file_stamp(self.flush_path)     # tells one request from the next
        if stamp == self.flush_seen:
            return False
        self.flush_seen = stamp
        everything = False
        for line in self._flush_requests():
            if QUEUE_ID.match(line):
                log.info("%s: released by --release: trying it now", line)
                self.fresh.append((line, True))
            else:
                everything = True
        if everything:
            log.info("flush requested: trying every queued message now")
            self.destinations.clear()
        return everything

    def _flush_size(self):
        stamp = file_stamp(self.flush_path)
        return stamp[1] if stamp else 0

    def _flush_requests(self):
        """The lines added to .flush since we last read it (all of it if it was started afresh)."""
        try:
            fd, st = open_regular(self.flush_path, os.O_RDONLY)
        except OSError:
            return []
        try:
            start = self.flush_read if st.st_size >= self.flush_read else 0
            os.lseek(fd, start, os.SEEK_SET)
            data = os.read(fd, MAX_FLUSH_FILE)
        finally:
            os.close(fd)
        whole = data.rfind(b"\n") + 1          # a line still being written is read next time
        self.flush_read = start + whole
        return [line.split(" ")[0] for line in data[:whole].decode("ascii", "replace").splitlines()]

    def _start_scan(self, now, forced):
        self.next_scan = now + RESCAN_INTERVAL
        try:
            self.scan = os.scandir(self.folder)
        except OSError as exc:
            log.error("cannot list the queue %s: %s", self.folder, exc)
            return
        self.scan_forced = forced

    def due_at(self, when):
        """A message will be due at when (epoch seconds): look at the queue then at the latest."""
        with self.changed:
            if when < self.next_scan:
                self.next_scan = when
                self.changed.notify()

    # -- one attempt at one message

    def attempt(self, queue_id, forced):
        """Try the due recipients of one message, unless another runner holds it, or it is held or deleted."""
        path = os.path.join(self.folder, queue_id)
        with self.changed:
            if queue_id in self.active:      # a runner of ours has it: it tries again once done
                self.active[queue_id] = True
                return
            self.active[queue_id] = False
        try:
            self._attempt_locked(queue_id, path, forced)
            if os.path.lexists(path + DELETE_SUFFIX):    # --delete came during the attempt: done now
                self._attempt_locked(queue_id, path, forced)
        finally:
            with self.changed:
                again = self.active.pop(queue_id)
            if again:
                self.wake(queue_id)

    def _attempt_locked(self, queue_id, path, forced):
        lock = MessageLock(path)
        if not lock.acquire():
            return
        try:
            if self._by_hand(queue_id, path):
                return
            try:
                entry = read_envelope(lock.fd)
            except (OSError, ValueError) as exc:
                return self._set_aside(path, exc)
            self._attempt(entry, path, lock.fd, forced)
        finally:
            lock.release()

    def _by_hand(self, queue_id, path):
        """Whether --delete (now done) or --hold keeps a message we hold the lock of from being tried."""
        if os.path.lexists(path + DELETE_SUFFIX):
            remove_queued(path)
            with self.changed:
                self.not_before.pop(queue_id, None)
            log.info("%s: deleted by --delete, after the attempt under way", queue_id)
            return True
        if os.path.lexists(path + HELD_SUFFIX):
            log.info("%s: held by --hold: not tried", queue_id)
            return True
        return False

    def _attempt(self, entry, path, fd, forced):
        """Send to the due recipients (the file open at fd), record what happened; remove the file once done."""
        now = time.time()
        due = [r for r in entry.pending() if forced or r.next_try <= now]
        if not due:
            if entry.pending():
                self._still_waiting(entry, path, False, entry.next_try())
            else:
                self._remove(entry, path)
            return
        outcomes = self._send(entry, fd, due)
        if not outcomes:                      # each destination had its share: it waits for a session
            return
        if all(o.retry_at is not None and o.retry_at < entry.arrived + self.lifetime for o in outcomes.values()):
            # Only dead destinations: nothing was tried, so nothing is written (no fsync for them).
            for address, outcome in outcomes.items():
                self._log_outcome(entry, address, outcome)
            self._still_waiting(entry, path, False, min(o.retry_at for o in outcomes.values()))
            return
        failed = self._record(entry, due, outcomes)
        if failed and not self._bounce(entry, path, failed):
            for recipient, _ in failed:       # tried again later, and bounced then
                recipient.state = "pending"
                recipient.next_try = time.time() + backoff(recipient.attempts, self.retry_base)
        if not entry.pending():
            self._remove(entry, path)
            return
        self._still_waiting(entry, path, True, entry.next_try())

    def _still_waiting(self, entry, path, changed, when):
        """A message waits (nothing due before when): its delay notice if it is time, its file rewritten
        if anything changed, and a look at it then, or at the notice's time if that comes first."""
        if self._warn_if_late(entry, path):
            changed = True
        if changed:
            rewrite_queued(self.folder, entry, path)
        warning = self._warning_due(entry)
        self._wait_until(entry.id, when if warning is None else min(when, warning))

    def _wait_until(self, queue_id, when):
        """A message has nothing due before when: a look at the queue skips it till then, and comes by then."""
        with self.changed:
            self.not_before[queue_id] = when
        self.due_at(when)

    def _warning_due(self, entry):
        """When the sender of a message is to hear that it is late (epoch seconds); None: never (again)."""
        if entry.warned or not entry.sender or not self.delay_warning:
            return None                  # told already, from <> (RFC 3461 6.2: no report on a report), or off
        return entry.arrived + self.delay_warning

    def _warn_if_late(self, entry, path):
        """Send the delay notice (RFC 3464 Action: delayed) for the recipients still waiting, if it is time."""
        warning = self._warning_due(entry)
        if warning is None or time.time() < warning:
            return False
        sender = self._report_recipient(entry)
        try:
            report = delay_notification(entry, path, self.domain, sender, entry.arrived + self.lifetime)
            self._send_report(entry, sender, report, "delay notice")
        except (OSError, ValueError) as exc:
            log.error("%s: cannot send the delay notice to <%s>: %s", entry.id, sender, exc)
            return False
        entry.warned = True
        return True

    def _remove(self, entry, path):
        """A message is done (every recipient sent or failed): remove its file.

        The removal is not fsync'd: a crash that undoes it sends the message
        again, which at least once allows, and it saves an fsync per message.
        """
        remove_queued(path)
        with self.changed:
            self.not_before.pop(entry.id, None)
        log.info("%s: removed", entry.id)

    def _record(self, entry, due, outcomes):
        """Set each tried recipient's new state and log it; return [(recipient, outcome)] of the failed."""
        now = time.time()
        expires = entry.arrived + self.lifetime
        failed = []
        for recipient in due:
            outcome = outcomes.get(recipient.address)
            if outcome is None:               # not tried: its destination had its share of sessions
                continue
            recipient.attempts += outcome.retry_at is None       # a dead destination's deferral is no try
            if outcome.status == "deferred" and now >= expires:
                outcome = outcome.expired()
            recipient.reply = outcome.reply
            if outcome.status == "sent":
                recipient.state = "sent"
            elif outcome.status == "bounced":
                recipient.state = "failed"
                failed.append((recipient, outcome))
            else:
                retry_at = outcome.retry_at or now + backoff(recipient.attempts, self.retry_base)
                recipient.next_try = min(retry_at, expires)
            self._log_outcome(entry, recipient.address, outcome)
        return failed

    @staticmethod
    def _log_outcome(entry, address, outcome):
        """The log line of one recipient's attempt (Postfix's form)."""
        log.info("%s: to=<%s> relay=%s delay=%.1f status=%s (%s)", entry.id, address,
                 outcome.relay, outcome.at - entry.arrived, outcome.status, outcome.reply)

    def _send(self, entry, fd, due):
        """Send the due recipients (the file open at fd), each destination in a session of its own, at once.

        Returns {address: Outcome}.  A slow or silent destination of a
        message holds up none of its others: each goes in a thread of its
        own (the last in the runner's).  A recipient whose destination is
        dead is deferred at once; one whose destination has its share of
        sessions is left out (still due: see Destinations).
        """
        if entry.hops > MAX_RECEIVED:
            reply = "554 5.4.6 mail loop: %d Received: headers" % entry.hops
            return {r.address: Outcome("bounced", reply) for r in due}
        groups, outcomes = {}, {}
        for recipient in due:
            groups.setdefault(self.relay.destination(recipient.address), []).append(recipient.address)
        sending = []
        for destination, addresses in groups.items():
            dead = self.destinations.dead(destination)
            if dead is not None:
                outcomes.update(dict.fromkeys(addresses, Outcome.of_dead(*dead)))
            elif self.destinations.take(destination, entry.id):
                sending.append((destination, addresses))
        results = [{} for _ in sending]
        threads = [threading.Thread(target=self._send_to, args=(entry, fd, destination, addresses, result),
                                    name="queue runner", daemon=True)
                   for (destination, addresses), result in zip(sending[1:], results[1:])]
        for thread in threads:
            thread.start()
        if sending:
            self._send_to(entry, fd, *sending[0], results[0])
        for thread in threads:
            thread.join()
        for result in results:
            outcomes.update(result)
        return outcomes

    def _send_to(self, entry, fd, destination, addresses, result):
        """One destination's session for a message: its outcomes into result; its session given back."""
        unreachable = ""
        try:
            outcomes, unreachable = self.relay.send_to(entry, MessageReader(fd), destination, addresses)
            result.update(outcomes)
        except Exception as exc:          # a bug of ours: logged, and the recipients tried again later
            log.exception("%s: sending to %s failed", entry.id, destination or "the relay host")
            result.update(dict.fromkeys(addresses, Outcome("deferred", "451 4.3.0 local error in processing: %s"
                                                           % type(exc).__name__)))
        finally:
            for woken in self.destinations.give_back(destination, unreachable):
                self.wake(woken)

    def _set_aside(self, path, exc):
        """Move a queue file we cannot read out of the way (never deleted: an admin may look)."""
        log.critical("%s cannot be read (%s): moved to %s.bad", path, exc, path)
        with contextlib.suppress(OSError):
            os.replace(path, path + ".bad")

    def _bounce(self, entry, path, failed):
        """Tell the sender what failed (never for <>); False when that could not be done now."""
        if not entry.sender:
            log.info("%s: a bounce (from <>) failed; dropped", entry.id)
            return True
        sender = self._report_recipient(entry)
        try:
            report = delivery_status_notification(entry, path, failed, self.domain, sender)
            self._send_report(entry, sender, report, "bounce")
            return True
        except (OSError, ValueError) as exc:
            log.error("%s: cannot bounce to <%s>: %s", entry.id, sender, exc)
            return False

    def _report_recipient(self, entry):
        """Who hears what became of a message: its sender, or the one a sender we rewrote (SRS) stands for."""
        return self.original_sender(entry.sender)

    def _send_report(self, entry, sender, report, kind):
        """Put a report (a bounce, a delay notice) into the sender's mailbox when the sender is a user here,
        else into the queue.

        deliver_locally(address, report) stores the report for a local
        address and returns the login it went to, or None for no user.
        """
        if not is_remote(sender, self.local_domains):
            login = self.deliver_locally(sender, report)
            if login is None:
                log.warning("%s: the sender <%s> is no user here: %s dropped", entry.id, sender, kind)
            else:
                log.info("%s: %s delivered to %s", entry.id, kind, login)
            return
        report_id = self.queue_message("", sender, report)
        log.info("%s: %s queued as %s", entry.id, kind, report_id)


def request_flush(folder, queue_id=FLUSH_ALL):
    """Add a line to ROOT/.queue/.flush: every runner on the root reads it within FLUSH_POLL and
    tries everything ("*"), or the one message named, now."""
    path = os.path.join(folder, FLUSH_NAME)
    fd, st = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        if st.st_size > MAX_FLUSH_FILE:      # old requests, read long ago: start afresh
            os.ftruncate(fd, 0)
        write_all(fd, ("%s %d %.6f\n" % (queue_id, os.getpid(), time.time())).encode("ascii"))
    finally:
        os.close(fd)


def queue_by_hand(folder, action, queue_id):
    """--delete, --hold or --release one message: what was done, as a line; LookupError if it is not queued."""
    path = os.path.join(folder, queue_id)
    if not (QUEUE_ID.match(queue_id) and os.path.isfile(path)):
        raise LookupError("%s is not in the queue %s" % (queue_id, folder))
    if action == "release":
        if not os.path.lexists(path + HELD_SUFFIX):
            raise LookupError("%s is not held" % queue_id)
        remove_file(path + HELD_SUFFIX)
        request_flush(folder, queue_id)
        return "%s: released: the servers on the root try it within %g s" % (queue_id, FLUSH_POLL)
    marker = path + (HELD_SUFFIX if action == "hold" else DELETE_SUFFIX)
    os.close(open_regular(marker, os.O_WRONLY | os.O_CREAT)[0])   # first the request, then the lock
    lock = MessageLock(path)
    if not lock.acquire():
        if not os.path.lexists(path):
            remove_file(marker)
            raise LookupError("%s left the queue meanwhile (sent, or deleted)" % queue_id)
        return "%s: being sent now: %s once this attempt is over" % (queue_id, BY_HAND_DONE[action])
    try:
        if action == "delete":
            remove_queued(path)
    finally:
        lock.release()
    return "%s: %s" % (queue_id, "deleted" if action == "delete" else "held: not tried until --release")


def next_try_text(when):
    """When a recipient is tried next, for --queue: its local time, or "now" when it is due.

    A recipient not tried yet has 0 (the epoch): due at once, never "1970-01-01".
    """
    if when <= time.time():
        return "now"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def queue_listing(folder, out):
    """Print what is queued, as mailq does: each message, then its pending recipients and why they wait."""
    try:
        names = sorted(name for name in os.listdir(folder) if QUEUE_ID.match(name))
    except FileNotFoundError:
        names = []
    total = count = 0
    for name in names:
        try:
            entry = read_queued(os.path.join(folder, name))
        except (OSError, ValueError):
            continue                 # sent and removed meanwhile, or unreadable (the server logs it)
        if count == 0:
            out.write("%-21s %9s %-24s %s\n" % ("-Queue ID-", "--Size--", "----Arrival Time----",
                                                "-Sender/Recipient-"))
        count += 1
        total += entry.size
        held = os.path.lexists(os.path.join(folder, name + HELD_SUFFIX))   # marked "!", as mailq does
        out.write("%-21s %9d %-24s %s\n" % (entry.id + "!" * held, entry.size, time.ctime(entry.arrived),
                                            entry.sender or "MAILER-DAEMON"))
        for recipient in entry.pending():
            out.write("%57s(%s; next try %s)\n" % ("", recipient.reply or "not tried yet",
                                                    next_try_text(recipient.next_try)))
            out.write("%57s%s\n" % ("", recipient.address))
    if count == 0:
        out.write("Mail queue is empty\n")
    else:
        out.write("-- %d Kbytes in %d Request%s.\n" % ((total + 1023) // 1024, count, "s" * (count != 1)))
    dead_listing(folder, out)


def dead_listing(folder, out):
    """Print the dead destinations (see Destinations) and when each is tried again."""
    try:
        with open(os.path.join(folder, DEAD_NAME), encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\n").split("\t", 3) for line in f]
    except OSError:
        return
    now = time.time()
    dead = [(d, float(until), failures, reason) for d, until, failures, reason in
            (line for line in lines if len(line) == 4 and line[1].isdigit()) if float(until) > now]
    if dead:
        out.write("Dead destinations (no connection tried until then; --flush tries them now):\n")
    for destination, until, failures, reason in dead:
        out.write("  %s: next try %s after %s failure%s: %s\n" % (
            destination, next_try_text(until), failures, "s" * (failures != "1"), reason))


# --------------------------------------------------------------------------
# DNS: a stub resolver for MX, TXT and PTR lookup (RFC 1035, RFC 5321 5.1, RFC 7505)
# --------------------------------------------------------------------------
# The standard library resolves host names but has no MX lookup, so outbound
# delivery asks the servers of /etc/resolv.conf (or --dns-server) itself.
# Only what mail needs is here: MX, A, AAAA, the CNAMEs on the way, TXT
# (DKIM keys, SPF, DMARC) and PTR (the name of an address).

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53                # RFC 1035 4.2
DNS_MAX_SERVERS = 3          # resolv.conf(5): only the first three nameserver lines count
DNS_FALLBACK_SERVER = ("127.0.0.1", DNS_PORT)   # resolv.conf(5): no nameserver line means the local one
DNS_TIMEOUT = 5.0            # seconds one server gets to answer one try
DNS_ATTEMPTS = 2             # rounds over the servers before a temporary failure
DNS_MAX_MESSAGE = 65535      # RFC 1035 4.2.2: the TCP length prefix is 16 bits, so no reply is longer
DNS_HEADER = struct.Struct("!HHHHHH")   # RFC 1035 4.1.1: id, flags, then the four section counts
DNS_QUESTION_TAIL = struct.Struct("!HH")   # RFC 1035 4.1.2: QTYPE, QCLASS
DNS_RECORD_TAIL = struct.Struct("!HHIH")   # RFC 1035 4.1.3: TYPE, CLASS, TTL, RDLENGTH
DNS_TCP_LENGTH = struct.Struct("!H")       # RFC 1035 4.2.2: the length before a message over TCP
DNS_FLAG_QR = 0x8000         # RFC 1035 4.1.1: this is a response
DNS_OPCODE_MASK = 0x7800     # RFC 1035 4.1.1: 0 is a standard query
DNS_FLAG_TC = 0x0200         # RFC 1035 4.1.1: truncated, ask again over TCP (RFC 7766 5)
DNS_FLAG_RD = 0x0100         # RFC 1035 4.1.1: recursion desired: we are a stub
DNS_RCODE_MASK = 0x000F
DNS_NOERROR, DNS_SERVFAIL, DNS_NXDOMAIN, DNS_REFUSED = 0, 2, 3, 5   # RFC 1035 4.1.1
DNS_CLASS_IN = 1             # RFC 1035 3.2.4
DNS_TYPES = {"A": 1, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}   # RFC 1035 3.2.2, RFC 3596 2.1
DNS_TYPE_SOA = 6             # RFC 1035 3.2.2: read only in a negative reply's authority section (RFC 2308 3)
DNS_SOA_TAIL = struct.Struct("!IIIII")    # RFC 1035 3.3.13: SERIAL, REFRESH, RETRY, EXPIRE, MINIMUM
DNS_POINTER = 0xC0           # RFC 1035 4.1.4: the two high bits of a compression pointer
DNS_MAX_LABEL = 63           # RFC 1035 2.3.4, octets
DNS_MAX_NAME = 255           # RFC 1035 2.3.4, octets of a name on the wire
DNS_MAX_POINTERS = 64        # jumps one name may take: more is a loop
DNS_MAX_CNAMES = 8           # links of a CNAME chain followed before giving up
DNS_CACHE_ENTRIES = 10000    # answers a DNSCache holds at most
DNS_CACHE_OCTETS = 4 << 20   # and the octets of their records at most (a TXT answer may be 64 KiB)
DNS_TTL_FLOOR = 10           # seconds an answer is kept at least, even with a TTL of 0
DNS_TTL_CEILING = 86400      # and at most (RFC 8767 4 suggests a day as the largest TTL worth believing)
DNS_NEGATIVE_CEILING = 3 * 3600   # RFC 2308 5: negative answers kept 1 to 3 hours at most
DNS_FAILURE_TTL = 30         # RFC 2308 7: a server failure or timeout is remembered a while (5 min at most)
DNS_DEADLINE = 5.0           # seconds a runner gives one question, over every server and try: a working
                             # recursive server answers in well under a second, even for a name it must
                             # chase, so a question still open after 5 s is a silent or broken server,
                             # and the runner should give up on it and go on (its failure is cached)
DNS_MIN_TRY = 1.0            # seconds one try gets at least, when the deadline is shared among the tries
DNS_MAX_EXCHANGERS = 5       # best MX hosts looked up and tried (Postfix's smtp_mx_address_limit is 5):
                             # a domain's owner could list a thousand, each a slow lookup for a runner
DNS_HOST_LABEL = re.compile(r"[a-z0-9_-]+\Z")   # RFC 952/1123 host names, "_" as in real zones
# Any label the resolver may ask for: a DNS label may hold any octet (RFC 2181 11), and SPF's names
# any visible character or a space (RFC 7208 7.1); we take printable ASCII.
DNS_ANY_LABEL = re.compile(r"[ -~]+\Z")

DNS_NO_SUCH_DOMAIN = "no such domain"
DNS_NULL_MX = "null MX: the domain accepts no mail (RFC 7505)"
DNS_NO_ADDRESS = "no MX and no address"
DNS_NO_EXCHANGER_ADDRESS = "no address for any mail exchanger"
DNS_SERVER_FAILURE = "DNS server failure (SERVFAIL)"
DNS_SERVER_REFUSED = "DNS server refused the query (REFUSED)"
DNS_SERVER_ERROR = "DNS server error (rcode %d)"
DNS_TIME_OUT = "DNS timeout"
DNS_UNREACHABLE = "DNS server unreachable (%s)"
DNS_MALFORMED = "malformed DNS reply (%s)"
DNS_CNAME_CHAIN = "CNAME chain too long or looping"
DNS_BAD_NAME = "invalid domain name"
DNS_BAD_LITERAL = "invalid address literal"

_dns_random = random.SystemRandom()   # thread safe, and not predictable by whoever sees our mail


class DNSError(Exception):
    """A failed lookup; temporary says whether trying later may help (4xx/defer) or not (5xx/bounce)."""

    def __init__(self, reason, name="", temporary=True, ttl=None):
        super().__init__("%s: %s" % (name, reason) if name else reason)
        self.reason = reason      # the words alone, e.g. DNS_NO_SUCH_DOMAIN
        self.name = name
        self.temporary = temporary
        self.ttl = ttl            # an NXDOMAIN's negative TTL (RFC 2308 5), None when the reply gave none


def _dns_malformed(why):
    """The error for a reply we cannot trust: temporary, another server or a later try may do better."""
    return DNSError(DNS_MALFORMED % why)


def _dns_normalize(name, allowed=DNS_HOST_LABEL):
    """A domain name as it goes on the wire: lower case, no trailing dot, IDNA for non-ASCII (RFC 5890).

    Each label must match allowed: by default a host name's (what names a
    host, a mail domain or a key folder must be); the resolver itself asks
    for any name DNS_ANY_LABEL allows.
    """
    text = name.lower()
    if text.endswith("."):
        text = text[:-1]
    try:
        text.encode("ascii")
    except UnicodeError:
        try:    # the stdlib codec is IDNA 2003 (RFC 3490): the only one without a package
            text = text.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise DNSError(DNS_BAD_NAME, name, temporary=False) from None
    labels = text.split(".")
    if (not text or len(text) + 2 > DNS_MAX_NAME
            or not all(len(label) <= DNS_MAX_LABEL and allowed.match(label) for label in labels)):
        raise DNSError(DNS_BAD_NAME, name, temporary=False)
    return text


def _dns_encode_name(name):
    """A normalized name in wire form (RFC 1035 3.1): length-prefixed labels, then the root's 0."""
    return b"".join(bytes((len(label),)) + label.encode("ascii") for label in name.split(".")) + b"\0"


def _dns_build_query(qid, name, qtype):
    """One standard query with recursion desired (RFC 1035 4.1)."""
    return (DNS_HEADER.pack(qid, DNS_FLAG_RD, 1, 0, 0, 0) + _dns_encode_name(name)
            + DNS_QUESTION_TAIL.pack(qtype, DNS_CLASS_IN))


def _dns_read_name(message, offset):
    """The name at offset, following compression pointers (RFC 1035 4.1.4); returns (name, offset after it).

    Every pointer must point before itself, jumps are counted and the name
    may not outgrow 255 octets, so a looping or forward pointer is an error.
    """
    labels, end, jumps, size = [], None, 0, 1
    while True:
        if offset >= len(message):
            raise _dns_malformed("name runs past the end")
        length = message[offset]
        if length & DNS_POINTER == DNS_POINTER:
            if offset + 1 >= len(message):
                raise _dns_malformed("pointer cut short")
            target = (length & ~DNS_POINTER) << 8 | message[offset + 1]
            jumps += 1
            if target >= offset or jumps > DNS_MAX_POINTERS:
                raise _dns_malformed("compression loop")
            end = offset + 2 if end is None else end
            offset = target
            continue
        if length & DNS_POINTER:   # 0x40 and 0x80: label types RFC 6891 retired
            raise _dns_malformed("unknown label type")
        offset += 1
        if length == 0:
            return ".".join(labels), offset if end is None else end
        label = message[offset:offset + length]
        size += length + 1
        if len(label) < length or size > DNS_MAX_NAME:
            raise _dns_malformed("label cut short or name too long")
        labels.append(_dns_decode_label(label))
        offset += length


def _dns_decode_label(label):
    """A label in lower case; one that no host name could hold (a dot, non-ASCII) is an error."""
    try:
        text = label.decode("ascii").lower()
    except UnicodeError:
        raise _dns_malformed("non-ASCII label") from None
    if "." in text:
        raise _dns_malformed("dot inside a label")
    return text


def _dns_parse_reply(message, qid, name, qtype):
    """(flags, answers) of a reply to our query, answers as (owner, type, data); None if it is not ours.

    A reply with another id or question is someone else's (a late answer,
    or a spoof), so it is ignored, not an error (RFC 5452 9.1).
    """
    if len(message) < DNS_HEADER.size:
        raise _dns_malformed("shorter than a header")
    rid, flags, qdcount, ancount, nscount, _ = DNS_HEADER.unpack_from(message)
    if rid != qid:
        return None
    if not flags & DNS_FLAG_QR or flags & DNS_OPCODE_MASK:
        raise _dns_malformed("not a response to a query")
    rcode = flags & DNS_RCODE_MASK
    if qdcount == 0 and rcode not in (DNS_NOERROR, DNS_NXDOMAIN):
        return flags, []   # RFC 1035 leaves the question out of some errors; these are temporary anyway
    if qdcount != 1:
        raise _dns_malformed("%d questions" % qdcount)
    qname, offset = _dns_read_name(message, DNS_HEADER.size)
    if offset + DNS_QUESTION_TAIL.size > len(message):
        raise _dns_malformed("question cut short")
    if (qname, DNS_QUESTION_TAIL.unpack_from(message, offset)) != (name, (qtype, DNS_CLASS_IN)):
        return None
    offset += DNS_QUESTION_TAIL.size
    if flags & DNS_FLAG_TC:
        return flags, []   # the answers are asked again over TCP
    return flags, _dns_read_answers(message, offset, ancount, nscount)


def _dns_read_answers(message, offset, count, authority=0):
    """The answer section's records from offset, each as (owner, type, data, ttl); others skipped.

    The authority section's SOA (of a negative reply, RFC 2308 3) follows
    them, its data the MINIMUM field, read only for its negative TTL.
    """
    answers = []
    for index in range(count + authority):   # each takes 11 octets or more: bounded by the length
        owner, offset = _dns_read_name(message, offset)
        if offset + DNS_RECORD_TAIL.size > len(message):
            raise _dns_malformed("record cut short")
        rtype, rclass, ttl, length = DNS_RECORD_TAIL.unpack_from(message, offset)
        offset += DNS_RECORD_TAIL.size
        if offset + length > len(message):
            raise _dns_malformed("record data cut short")
        if rclass == DNS_CLASS_IN and rtype in DNS_TYPES.values() and index < count:
            answers.append((owner, rtype, _dns_read_rdata(message, rtype, offset, length), ttl))
        elif rclass == DNS_CLASS_IN and rtype == DNS_TYPE_SOA and index >= count:
            answers.append((owner, rtype, _dns_soa_minimum(message, offset, length), ttl))
        offset += length
    return answers


def _dns_soa_minimum(message, start, length):
    """The MINIMUM field of an SOA record's data (RFC 1035 3.3.13), after its two names."""
    _, end = _dns_read_name(message, start)
    _, end = _dns_read_name(message, end)
    if end + DNS_SOA_TAIL.size != start + length:
        raise _dns_malformed("SOA record of the wrong length")
    return DNS_SOA_TAIL.unpack_from(message, end)[4]


def _dns_negative_ttl(answers):
    """How long a reply without the records asked for may be believed (RFC 2308 5); None without an SOA."""
    ttls = [min(ttl, minimum) for _, rtype, minimum, ttl in answers if rtype == DNS_TYPE_SOA]
    return min(ttls) if ttls else None


def _dns_read_rdata(message, rtype, start, length):
    """A record's data: an address string (A, AAAA), a name (CNAME, PTR), (preference, exchange) (MX), text (TXT)."""
    if rtype in (DNS_TYPES["A"], DNS_TYPES["AAAA"]):
        size = 4 if rtype == DNS_TYPES["A"] else 16    # RFC 1035 3.4.1, RFC 3596 2.2
        if length != size:
            raise _dns_malformed("address of %d octets" % length)
        return str(ipaddress.ip_address(message[start:start + length]))
    if rtype == DNS_TYPES["TXT"]:
        return _dns_read_text(message[start:start + length])
    name_start = start + 2 if rtype == DNS_TYPES["MX"] else start   # RFC 1035 3.3.9: preference first
    if length < name_start - start + 1:
        raise _dns_malformed("record data too short")
    name, end = _dns_read_name(message, name_start)
    if end != start + length:
        raise _dns_malformed("name does not fill its record")
    if rtype == DNS_TYPES["MX"]:
        return DNS_TCP_LENGTH.unpack_from(message, start)[0], name
    return name


def _dns_read_text(data):
    """A TXT record's character-strings (RFC 1035 3.3.14), joined into one text.

    The strings of one record are one value (RFC 7208 3.3, RFC 6376
    3.6.2.2): a long DKIM key is published as several.  Octets are read as
    Latin-1, so every one survives and a non-ASCII one stands out to the
    reader of the text.
    """
    strings, offset = [], 0
    while offset < len(data):
        end = offset + 1 + data[offset]
        if end > len(data):
            raise _dns_malformed("TXT string cut short")
        strings.append(data[offset + 1:end])
        offset = end
    return b"".join(strings).decode("latin-1")


def reverse_name(ip):
    """The PTR name of an IP address (RFC 1035 3.5, RFC 3596 2.5): 4.3.2.1.in-addr.arpa, nibbles for IPv6."""
    return ipaddress.ip_address(ip).reverse_pointer


def _dns_follow_cnames(answers, name, qtype):
    """(records of qtype, where a CNAME chain from name ends without them, least TTL on the way).

    Without records the TTL is the negative one of RFC 2308 5 (None
    without an SOA), or the chain's own when it is left unfinished.
    """
    owner, seen, ttls = name, {name}, []
    while True:
        found = [(data, ttl) for o, t, data, ttl in answers if o == owner and t == qtype]
        if found:
            return [data for data, _ in found], None, min(ttls + [ttl for _, ttl in found])
        targets = [(data, ttl) for o, t, data, ttl in answers if o == owner and t == DNS_TYPES["CNAME"]]
        if not targets or qtype == DNS_TYPES["CNAME"]:
            negative = _dns_negative_ttl(answers)
            if owner == name:
                return [], None, negative
            return [], owner, min(ttls)
        owner, ttl = targets[0]
        ttls.append(ttl)
        if owner in seen or len(seen) > DNS_MAX_CNAMES:
            raise DNSError(DNS_CNAME_CHAIN, name)
        seen.add(owner)


def _dns_same_address(one, other):
    """True when two socket addresses name the same IP and port (IPv6 has several spellings)."""
    try:
        return (ipaddress.ip_address(one[0].split("%")[0]) == ipaddress.ip_address(other[0].split("%")[0])
                and one[1] == other[1])
    except ValueError:
        return False


def _dns_family(ip):
    """The socket family of an IP address string."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _dns_recv_exactly(sock, size, deadline):
    """size bytes from a TCP socket before deadline (monotonic), or DNSError."""
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DNSError(DNS_TIME_OUT)
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise _dns_malformed("connection closed mid-reply")
        data += chunk
    return data


def _dns_read_resolv_conf(path):
    """The (ip, port) of the first nameserver lines of a resolv.conf; [] when it has none or is unreadable."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as conf:
            lines = conf.readlines()
    except OSError:
        return servers
    for line in lines:
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:    # a scoped IPv6 address keeps its %zone for the socket
            ipaddress.ip_address(words[1].split("%")[0])
        except ValueError:
            continue
        servers.append((words[1], DNS_PORT))
    return servers[:DNS_MAX_SERVERS]


class Resolver:
    """A DNS stub resolver: asks recursive servers over UDP, and TCP for truncated replies (RFC 1035 4.2).

    It keeps no state between queries (each has its own socket, id and
    port), so the queue runner threads may share one.
    """

    def __init__(self, servers=None, timeout=DNS_TIMEOUT, attempts=DNS_ATTEMPTS):
        """servers: [(ip, port)], None for those of /etc/resolv.conf; ValueError if one is not an IP."""
        if servers is None:
            servers = _dns_read_resolv_conf(RESOLV_CONF)
        self.servers = [(str(ip), int(port)) for ip, port in servers] or [DNS_FALLBACK_SERVER]
        for ip, _ in self.servers:   # a host name here would fail every query, silently
            ipaddress.ip_address(ip.split("%")[0])
        self.timeout = timeout
        self.attempts = max(1, attempts)

    def query(self, name, rtype):
        """The records of type rtype ("MX", "A", "AAAA", "CNAME", "TXT", "PTR") for name, CNAMEs followed; [] if none.

        MX records come as (preference, exchange), addresses, names and
        texts (a TXT record's strings joined) as strings.
        """
        return self.lookup(name, rtype)[0]

    def lookup(self, name, rtype, deadline=None):
        """(records, TTL) as query() finds them, before deadline (monotonic) if given; for a cache.

        The TTL is the least on the way (CNAMEs too); with no record it is
        the negative TTL of RFC 2308 5, None when the reply had no SOA (an
        NXDOMAIN's is the DNSError's ttl).
        """
        qtype = DNS_TYPES[rtype]
        owner, ttls = _dns_normalize(name, DNS_ANY_LABEL), []
        for _ in range(DNS_MAX_CNAMES):
            # A chain the server did not finish in its answer is asked for again from its end.
            found, dangling, ttl = _dns_follow_cnames(self._ask(owner, qtype, deadline), owner, qtype)
            ttls.append(ttl)
            if dangling is None:
                return found, None if None in ttls else min(ttls)
            owner = dangling
        raise DNSError(DNS_CNAME_CHAIN, name)

    def _ask(self, name, qtype, deadline=None):
        """The answer records for one question, from the first server that answers it in one of the rounds.

        Under a deadline the tries share what is left of it (DNS_MIN_TRY at
        least), so a silent first server leaves time for the others.
        """
        error = None
        tries = [server for _ in range(self.attempts) for server in self.servers]
        for left, server in zip(range(len(tries), 0, -1), tries):
            try_deadline = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DNSError(DNS_TIME_OUT, name)
                try_deadline = time.monotonic() + min(remaining, max(DNS_MIN_TRY, remaining / left))
            try:
                return self._ask_server(server, name, qtype, try_deadline)
            except DNSError as failure:
                if not failure.temporary:
                    raise
                error = failure
        raise DNSError(error.reason, name, temporary=True)

    def _ask_server(self, server, name, qtype, deadline=None):
        """The answer records from one server: over UDP, again over TCP when truncated (RFC 7766 5)."""
        qid = secrets.randbits(16)   # RFC 5452 9.2: an unpredictable id, and a random port below
        query = _dns_build_query(qid, name, qtype)
        deadline = min(time.monotonic() + self.timeout, deadline or float("inf"))
        try:
            flags, answers = self._udp_exchange(server, query, qid, name, qtype, deadline)
            if flags & DNS_FLAG_TC:
                flags, answers = self._tcp_exchange(server, query, qid, name, qtype, deadline)
        except socket.timeout:
            raise DNSError(DNS_TIME_OUT, name) from None
        except OSError as failure:
            raise DNSError(DNS_UNREACHABLE % (failure.strerror or failure), name) from None
        return self._answers_or_error(flags, answers, name)

    @staticmethod
    def _answers_or_error(flags, answers, name):
        """The answers of a NOERROR reply; the DNSError that any other rcode means."""
        rcode = flags & DNS_RCODE_MASK
        if rcode == DNS_NOERROR:
            return answers
        if rcode == DNS_NXDOMAIN:
            raise DNSError(DNS_NO_SUCH_DOMAIN, name, temporary=False, ttl=_dns_negative_ttl(answers))
        if rcode == DNS_SERVFAIL:
            raise DNSError(DNS_SERVER_FAILURE, name)
        if rcode == DNS_REFUSED:
            raise DNSError(DNS_SERVER_REFUSED, name)
        raise DNSError(DNS_SERVER_ERROR % rcode, name)

    def _udp_exchange(self, server, query, qid, name, qtype, deadline):
        """Send query over UDP and return the parsed reply that comes from server, for this query, by deadline."""
        family = _dns_family(server[0])
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))   # port 0: the kernel's random one
            sock.connect(server)   # the kernel drops other senders, and reports a closed port
            sock.send(query)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DNSError(DNS_TIME_OUT, name)
                sock.settimeout(remaining)
                reply, source = sock.recvfrom(DNS_MAX_MESSAGE)
                parsed = _dns_same_address(source, server) and _dns_parse_reply(reply, qid, name, qtype)
                if parsed:
                    return parsed

    def _tcp_exchange(self, server, query, qid, name, qtype, deadline):
        """Send query over TCP with its length prefix (RFC 1035 4.2.2) and return the parsed reply by deadline."""
        with socket.create_connection(server, timeout=max(0.001, deadline - time.monotonic())) as sock:
            sock.sendall(DNS_TCP_LENGTH.pack(len(query)) + query)
            size = DNS_TCP_LENGTH.unpack(_dns_recv_exactly(sock, DNS_TCP_LENGTH.size, deadline))[0]
            parsed = _dns_parse_reply(_dns_recv_exactly(sock, size, deadline), qid, name, qtype)
        if not parsed:   # one query per connection: a reply to another one is nonsense
            raise _dns_malformed("TCP reply to another question")
        return parsed


class DNSDeadline:
    """A DNSCache as mail_exchangers asks it: each question answered within its own deadline, or a temporary
    DNSError (its tries share the deadline: see Resolver._ask)."""

    def __init__(self, cache, seconds):
        self.cache = cache
        self.seconds = seconds

    def query(self, name, rtype):
        return self.cache.query(name, rtype, time.monotonic() + self.seconds)


class DNSCache:
    """The answers of a Resolver, each kept for its TTL: one cache for every record type, in bounded memory.

    query(name, type, deadline) answers as Resolver.query does, from the
    cache while an answer is fresh.  A TTL is held between a floor and a
    ceiling; a negative answer (NXDOMAIN or no record) is kept for the
    SOA's negative TTL (RFC 2308 5), not at all without an SOA; a server
    failure or timeout for a short while (RFC 2308 7).  The least recently
    used answers go first when there are too many or they are too large.
    Threads may share one; a question one of them is asking is not asked
    again by another, which waits for that answer (within its deadline).
    """

    def __init__(self, resolver, entries=DNS_CACHE_ENTRIES, octets=DNS_CACHE_OCTETS, clock=time.monotonic):
        self.resolver, self.clock = resolver, clock
        self.max_entries, self.max_octets = entries, octets
        self.octets = 0
        self._answers = collections.OrderedDict()   # (name, type) -> (expires, records or DNSError, octets)
        self._asking = {}            # (name, type) -> [Event set when answered, the answer]: questions in flight
        self._lock = threading.Lock()

    def query(self, name, rtype, deadline=None):
        """The records of type rtype for name ([] if none); DNSError as the resolver raises it."""
        key = (name.lower().rstrip("."), rtype)
        with self._lock:
            entry = self._answers.get(key)
            if entry is not None and entry[0] > self.clock():
                self._answers.move_to_end(key)
                answer = entry[1]
            else:
                answer = None
        if answer is None:
            answer = self._ask_once(key, name, rtype, deadline)
        if isinstance(answer, DNSError):
            raise answer
        return answer

    def _ask_once(self, key, name, rtype, deadline):
        """Ask the resolver; or, while another thread asks the same question, wait for its answer."""
        with self._lock:
            asking = self._asking.get(key)
            first = asking is None
            if first:
                asking = self._asking[key] = [threading.Event(), None]
        if not first:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if asking[0].wait(wait) and asking[1] is not None:
                return asking[1]
            return DNSError(DNS_TIME_OUT, name)
        try:
            asking[1] = self._ask(key, name, rtype, deadline)
        finally:
            with self._lock:
                del self._asking[key]
            asking[0].set()
        return asking[1]

    def _ask(self, key, name, rtype, deadline):
        """Ask the resolver, and keep what it says for as long as it may be believed."""
        try:
            answer, ttl = self.resolver.lookup(name, rtype, deadline)
            if not answer and ttl is not None:
                ttl = min(ttl, DNS_NEGATIVE_CEILING)
        except DNSError as error:
            answer = error
            ttl = DNS_FAILURE_TTL if error.temporary else error.ttl
            if ttl is not None:
                ttl = min(ttl, DNS_NEGATIVE_CEILING)
        if ttl is not None:
            self._keep(key, answer, min(max(ttl, DNS_TTL_FLOOR), DNS_TTL_CEILING))
        return answer

    def _keep(self, key, answer, ttl):
        """Store an answer, then drop the least recently used until the cache is within its bounds."""
        size = len(key[0]) + (sum(len(str(record)) for record in answer) if isinstance(answer, list) else 0)
        with self._lock:
            old = self._answers.pop(key, None)
            if old is not None:
                self.octets -= old[2]
            self._answers[key] = (self.clock() + ttl, answer, size)
            self.octets += size
            while len(self._answers) > self.max_entries or self.octets > self.max_octets:
                _, (_, _, dropped) = self._answers.popitem(last=False)
                self.octets -= dropped


def mail_exchangers(resolver, domain):
    """Where mail for domain goes (RFC 5321 5.1): [(host, [addresses, A then AAAA])], best first.

    An address literal needs no DNS; a domain without MX is its own
    exchanger; a null MX (RFC 7505) or no address at all raise a
    permanent DNSError.
    """
    if domain.startswith("[") and domain.endswith("]"):
        return [(domain, [_dns_address_literal(domain)])]
    name = _dns_normalize(domain)
    records = resolver.query(name, "MX")
    if not records:
        addresses = _dns_host_addresses(resolver, name)   # RFC 5321 5.1: the implicit MX
        if not addresses:
            raise DNSError(DNS_NO_ADDRESS, domain, temporary=False)
        return [(name, addresses)]
    hosts = _dns_order_mx(records)
    if not hosts:   # RFC 7505 3: "." alone as the exchange says no mail is taken
        raise DNSError(DNS_NULL_MX, domain, temporary=False)
    return _dns_exchanger_addresses(resolver, domain, hosts[:DNS_MAX_EXCHANGERS])


def _dns_address_literal(literal):
    """The IP address in "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 4.1.3), or a permanent DNSError."""
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise DNSError(DNS_BAD_LITERAL, literal, temporary=False) from None


def _dns_order_mx(records):
    """The exchangers of MX records, lowest preference first, shuffled among equals (RFC 5321 5.1).

    The root (a null MX) and repeated names are left out.
    """
    by_preference = {}
    for preference, host in records:
        by_preference.setdefault(preference, []).append(host)
    hosts = []
    for preference in sorted(by_preference):
        equals = by_preference[preference]
        _dns_random.shuffle(equals)
        for host in equals:
            if host and host not in hosts:
                hosts.append(host)
    return hosts


def _dns_host_addresses(resolver, host):
    """The A then AAAA addresses of host; a temporary failure raises only if it leaves none."""
    addresses, error = [], None
    for rtype in ("A", "AAAA"):
        try:
            addresses.extend(resolver.query(host, rtype))
        except DNSError as failure:
            if not failure.temporary:   # NXDOMAIN: the AAAA query would say the same
                break
            error = failure
    if not addresses and error:
        raise error
    return addresses


def _dns_exchanger_addresses(resolver, domain, hosts):
    """[(host, addresses)] for the hosts that have any; DNSError (temporary if any lookup was) if none has."""
    exchangers, error = [], None
    for host in hosts:
        try:
            addresses = _dns_host_addresses(resolver, host)
        except DNSError as failure:
            error = failure
            continue
        if addresses:
            exchangers.append((host, addresses))
    if exchangers:
        return exchangers
    if error:
        raise DNSError(error.reason, domain, temporary=True)
    raise DNSError(DNS_NO_EXCHANGER_ADDRESS, domain, temporary=False)


# --------------------------------------------------------------------------
# Delivery to other servers
# --------------------------------------------------------------------------
#
# A runner sends a message's due recipients with smtplib: through the
# smarthost (--relay-host) when there is one, else to each domain's mail
# exchangers (RFC 5321 5.1) found by the resolver above, one connection per
# destination for all of its recipients.  The smarthost gets TLS with a
# checked certificate (STARTTLS, or --relay-implicit-tls) and our AUTH
# login; a mail exchanger gets STARTTLS when it offers it, without a
# certificate check (RFC 7435: encryption against eavesdroppers, better
# than none), and the message in clear when TLS fails.

REPLY_TIMEOUTS = {           # RFC 5321 4.5.3.2: seconds a client waits for each reply of the server
    "greeting": 300,         # 4.5.3.2.1 the initial 220
    "command": 300,          # 4.5.3.2.2, 4.5.3.2.3 MAIL and RCPT; the same for EHLO, STARTTLS, AUTH, RSET
    "data": 120,             # 4.5.3.2.4 DATA's 354
    "block": 180,            # 4.5.3.2.5 each block of the message sent
    "end": 600,              # 4.5.3.2.6 the reply after the final dot
}
CONNECT_TIMEOUT = 30         # seconds for a TCP connection to be made (Postfix's smtp_connect_timeout)
SESSION_CEILING = 2          # a session may last this many times its longest wait, trickled or not
MAX_RECEIVED = 50            # Received: headers a message may carry (Postfix's hopcount_limit): more, a loop
CONNECTION_CACHE_TIME = 2.0  # seconds an idle connection waits for another message (Postfix's
                             # smtp_connection_cache_time_limit)
REPLY_CODE = re.compile(r"\d{3} ([245]\.\d{1,3}\.\d{1,3})\b")   # an RFC 3463 code after a reply code


class Outcome:
    """What happened to one recipient in one attempt: sent, deferred or bounced, and the reply why."""

    def __init__(self, status, reply, relay="none", remote=None, unreachable=False, retry_at=None):
        self.status = status         # sent, deferred, bounced
        # "CODE [d.d.d] text": the remote's, or ours in its form; one printable line for the envelope
        self.reply = "".join(c for c in reply if c.isprintable())[:MAX_REPLY_TEXT]
        self.relay = relay           # host[ip]:port as the log shows it
        self.remote = remote         # the remote server's name when the reply is its own
        self.unreachable = unreachable   # no server answered: a timeout, a refused connection, a silent DNS
        self.retry_at = retry_at     # epoch seconds: a dead destination's deferral, not tried before then
        self.at = time.time()        # when it happened: the delay the log gives (its destination's, not the slowest's)

    @classmethod
    def of_dead(cls, retry_at, reason):
        """The deferral of a recipient whose destination is dead (see Destinations): no session was tried."""
        return cls("deferred", reason, retry_at=retry_at)

    @classmethod
    def of_reply(cls, code, text, relay, remote):
        """The outcome of a remote server's reply (code, text bytes)."""
        words = " ".join(text.decode("utf-8", "replace").split())
        status = "sent" if 200 <= code < 300 else "bounced" if 500 <= code < 600 else "deferred"
        return cls(status, "%d %s" % (code, words), relay, remote)

    def expired(self):
        """This deferral, past --queue-lifetime: a failure with the last reply (RFC 3463 4.4.7)."""
        return Outcome("bounced", self.reply + " (delivery time expired)", self.relay, self.remote)

    def dsn_status(self):
        """The RFC 3463 status of this failure for a bounce."""
        if self.reply.endswith("(delivery time expired)"):
            return "4.4.7"
        return reply_status(self.reply)


def reply_status(reply):
    """The RFC 3463 status a reply ("CODE [d.d.d] text") carries, else its class's: 5.0.0 or 4.0.0."""
    found = REPLY_CODE.match(reply)
    return found.group(1) if found else ("5.0.0" if reply.startswith("5") else "4.0.0")


class IdleConnections:
    """Connections kept open after a message, for the next one to the same server (as Postfix's cache).

    A burst of mail for one destination then costs one connection, EHLO,
    STARTTLS and AUTH, not one per message.  A connection idle for
    CONNECTION_CACHE_TIME is closed with QUIT (close_expired, from a timer).
    """

    def __init__(self, limit):
        self.limit = limit           # connections kept per server
        self._guard = threading.Lock()
        self._idle = {}              # (name, address, port) -> [(smtplib client, relay, since)]

    def keep(self, key, smtp, relay):
        """Keep a connection whose transaction is over, or close it when enough are kept."""
        with self._guard:
            kept = self._idle.setdefault(key, [])
            if len(kept) < self.limit:
                kept.append((smtp, relay, time.monotonic()))
                return
        quit_quietly(smtp)

    def take(self, key):
        """(smtplib client, relay) of a kept connection to key's server, or None."""
        with self._guard:
            kept = self._idle.get(key)
            if not kept:
                return None
            smtp, relay, _ = kept.pop()
            return smtp, relay

    def close_expired(self, everything=False):
        """Close the connections idle for CONNECTION_CACHE_TIME (every one, with everything)."""
        oldest = time.monotonic() - (0 if everything else CONNECTION_CACHE_TIME)
        expired = []
        with self._guard:
            for key, kept in list(self._idle.items()):
                expired += [smtp for smtp, _, since in kept if since <= oldest]
                kept[:] = [item for item in kept if item[2] > oldest]
                if not kept:
                    del self._idle[key]
        for smtp in expired:
            quit_quietly(smtp)


def quit_quietly(smtp):
    """End an SMTP connection with QUIT, whatever state it is in."""
    with contextlib.suppress(OSError, smtplib.SMTPException):
        smtp.quit()
    smtp.close()


def host_and_port(text, default):
    """(host, port) of 'HOST', 'HOST:PORT', '[IPv6]' or '[IPv6]:PORT' (ValueError if malformed)."""
    host, port = text, default
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(text)
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port = text.split(":")
        port = int(port)
    if not host or not 0 < port < 65536:
        raise ValueError(text)
    return host, port


def read_relay_credentials(path):
    """The (login, password) of a --relay-auth file: one line 'LOGIN PASSWORD' (ValueError, OSError)."""
    with open(path, "rb") as f:
        lines = [line.strip() for line in f.read().decode("utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    if len(lines) != 1 or len(lines[0].split(None, 1)) != 2:
        raise ValueError("%s must hold one line: LOGIN PASSWORD" % path)
    login, password = lines[0].split(None, 1)
    return login, password


class MessageReader:
    """A queued message's file read at an offset of its own (os.pread), so that sessions to several
    destinations at once read it without moving each other's place."""

    _guard = threading.Lock()        # where there is no os.pread (Windows): one seek and read at a time

    def __init__(self, fd):
        self.fd = fd
        self.offset = 0

    def seek(self, offset):
        self.offset = offset

    def read(self, size):
        if hasattr(os, "pread"):
            data = os.pread(self.fd, size, self.offset)
        else:
            with self._guard:
                os.lseek(self.fd, self.offset, os.SEEK_SET)
                data = os.read(self.fd, size)
        self.offset += len(data)
        return data


class Deadlines:
    """Cuts the sessions that outlive their ceiling: one thread for all, closing a late session's socket.

    A reply's timeout starts again with each byte, so a server sending one
    byte every few minutes would hold a runner for hours; SESSION_CEILING
    times the longest wait bounds a session whatever it sends.
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._due = []               # heap of (monotonic deadline, serial, socket)
        self._serials = itertools.count()
        self._thread = None

    def watch(self, sock, seconds):
        """Shut sock's connection down after seconds unless forget() comes first; returns what forget() takes.

        The caller forgets before it closes the socket, so the descriptor
        cut is always still the session's (STARTTLS keeps its number).
        """
        item = (time.monotonic() + seconds, next(self._serials), sock.fileno())
        with self._changed:
            heapq.heappush(self._due, item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="session deadlines", daemon=True)
                self._thread.start()
            self._changed.notify()
        return item

    def forget(self, item):
        with self._changed:
            with contextlib.suppress(ValueError):
                self._due.remove(item)
                heapq.heapify(self._due)

    def _run(self):
        leave_signals_to_main_thread()
        with self._changed:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, _, fd = heapq.heappop(self._due)
                    # On a copy of the descriptor, not the session's socket object, which
                    # TLS may be using in its thread: the reader just sees the end and gives up.
                    with contextlib.suppress(OSError):
                        with socket.socket(fileno=os.dup(fd)) as copy:
                            copy.shutdown(socket.SHUT_RDWR)
                self._changed.wait(self._due[0][0] - now if self._due else None)


class RelayClient(smtplib.SMTP):
    """smtplib's client, but a connection is given CONNECT_TIMEOUT to be made (timeout is the greeting's),
    and the session is under a ceiling from its first byte (deadlines: (Deadlines, seconds))."""

    def __init__(self, deadlines, **options):
        self.deadlines, self.watched = deadlines, None
        super().__init__(**options)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, min(CONNECT_TIMEOUT, timeout))
        sock.settimeout(timeout)
        self.watched = self.deadlines[0].watch(sock, self.deadlines[1])
        return sock

    def watch(self):
        """Put the session (a kept connection used again) under its ceiling anew."""
        self.watched = self.deadlines[0].watch(self.sock, self.deadlines[1])

    def end_watch(self):
        """The session is over: no ceiling (a kept connection waits under IdleConnections' rule)."""
        if self.watched is not None:
            self.deadlines[0].forget(self.watched)
            self.watched = None

    def close(self):
        self.end_watch()             # before the socket closes: see Deadlines.watch
        super().close()


class RelayClientSSL(RelayClient, smtplib.SMTP_SSL):
    """The same, with TLS from the first byte."""


class Relay:
    """How a runner reaches other servers: the smarthost, or the mail exchangers of each domain."""

    def __init__(self, args, domain):
        """args: the RelayOptions; domain: our EHLO name."""
        self.domain = domain
        self.host = args.relay_host                  # (host, port), or None
        self.implicit_tls = args.relay_implicit_tls
        self.credentials = args.relay_credentials    # (login, password), or None; never logged
        self.timeout = args.relay_timeout            # a ceiling on each wait of REPLY_TIMEOUTS, or None
        self.deadlines = Deadlines()
        self.mx_port = args.mx_port
        self.source = (args.source_address, 0) if args.source_address else None    # None: the system picks
        self.resolver = DNSDeadline(DNSCache(Resolver(args.dns_server)), DNS_DEADLINE)   # shared by the runners
        self.verified = ssl.create_default_context(cafile=args.relay_cafile)
        self.opportunistic = ssl.create_default_context()
        self.opportunistic.check_hostname = False
        self.opportunistic.verify_mode = ssl.CERT_NONE
        self.idle = IdleConnections(args.relay_concurrency)

    def destination(self, address):
        """Where a recipient's mail goes: '' (the smarthost), or its domain."""
        return "" if self.host else recipient_domain(address)

    def routes(self, destination):
        """The servers to try for a destination, in order: [(name, [addresses], port)] (DNSError)."""
        if self.host:
            return [(self.host[0], [self.host[0]], self.host[1])]
        return [(name, addresses, self.mx_port)
                for name, addresses in mail_exchangers(self.resolver, destination)]

    def wait(self, smtp, stage):
        """Give the server the time RFC 5321 4.5.3.2 allows for its next reply (at most --relay-timeout)."""
        smtp.sock.settimeout(self.wait_of(stage))

    def wait_of(self, stage):
        """Seconds to wait for a reply at stage (a key of REPLY_TIMEOUTS)."""
        return min(REPLY_TIMEOUTS[stage], self.timeout or float("inf"))

    def send_to(self, entry, file, destination, addresses):
        """Send to one destination's recipients, each server in turn until one answers.

        Returns ({address: Outcome}, why the destination is unreachable, or
        "" when a server answered), for Destinations.
        """
        try:
            routes = self.routes(destination)
        except DNSError as exc:
            reply = ("451 4.4.3 " if exc.temporary else
                     "556 5.1.10 " if exc.reason == DNS_NULL_MX else "550 5.1.2 ") + str(exc)
            outcome = Outcome("deferred" if exc.temporary else "bounced", reply, unreachable=exc.temporary)
            return dict.fromkeys(addresses, outcome), reply if exc.temporary else ""
        last, answered = Outcome("deferred", "451 4.4.4 no server to try for %s" % destination), False
        for name, servers, port in routes:
            for server in servers:
                result = self.session(entry, file, name, server, port, addresses, True)
                if result == "no tls":                 # RFC 7435: in clear rather than not at all
                    result = self.session(entry, file, name, server, port, addresses, False)
                if isinstance(result, dict):
                    return result, ""
                last, answered = result, answered or not result.unreachable
        return dict.fromkeys(addresses, last), "" if answered or not routes else last.reply

    def session(self, entry, file, name, server, port, addresses, tls):
        """One SMTP session: {address: Outcome}, an Outcome when the next server should be tried,
        or "no tls" when an opportunistic TLS handshake failed."""
        key = (name, server, port)
        if tls:
            result = self.reuse(key, entry, file, addresses)
            if result is not None:
                return result
        relay = "%s[%s]:%d" % (name, server, port)
        smtp, greeted = None, False
        try:
            smtp = self.connect(server, port)
            greeted = True
            relay = "%s[%s]:%d" % (name, smtp.sock.getpeername()[0], port)
            result = self.converse(smtp, entry, file, relay, name, addresses, tls)
            smtp.end_watch()
            if isinstance(result, dict) and tls:
                self.idle.keep(key, smtp, relay)
                smtp = None
            else:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    smtp.quit()
            return result
        except smtplib.SMTPConnectError as exc:          # a greeting other than 220
            return Outcome.of_reply(exc.smtp_code, exc.smtp_error, relay, name)
        except ssl.SSLError as exc:
            if not self.host and tls:
                log.info("%s: TLS with %s failed (%s): sending in clear", entry.id, relay, exc)
                return "no tls"
            return Outcome("deferred", "451 4.7.5 TLS with %s failed: %s" % (relay, exc), relay)
        except (OSError, smtplib.SMTPException) as exc:
            # No greeting, a timeout, or a session cut at its ceiling: nobody is there to talk to.
            unreachable = not greeted or isinstance(exc, (socket.timeout, smtplib.SMTPServerDisconnected))
            return Outcome("deferred", "451 4.4.1 conversation with %s failed: %s"
                           % (relay, exc or type(exc).__name__), relay, unreachable=unreachable)
        except Exception as exc:            # a bug of ours: logged, and the message tried again later
            log.exception("%s: sending to %s failed", entry.id, relay)
            return Outcome("deferred", "451 4.3.0 local error in processing: %s" % type(exc).__name__, relay)
        finally:
            if smtp is not None:
                smtp.close()

    def connect(self, server, port):
        """An smtplib client connected to server and greeted by it (the smarthost's certificate must match its name)."""
        ceiling = (self.deadlines, SESSION_CEILING * self.wait_of("end"))
        if self.host and self.implicit_tls:
            smtp = RelayClientSSL(ceiling, local_hostname=self.domain, timeout=self.wait_of("greeting"),
                                  context=self.verified, source_address=self.source)
        else:
            smtp = RelayClient(ceiling, local_hostname=self.domain, timeout=self.wait_of("greeting"),
                               source_address=self.source)
        smtp._host = server              # what smtplib checks the certificate against (its constructor sets it)
        try:
            code, message = smtp.connect(server, port)
        except BaseException:
            smtp.close()
            raise
        if code != 220:
            smtp.close()
            raise smtplib.SMTPConnectError(code, message)
        # Commands go one by one, each waiting for its reply: without this, Nagle's
        # algorithm holds back the short ones until the remote's delayed ACK (40 ms).
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return smtp

    def converse(self, smtp, entry, file, relay, name, addresses, tls):
        """Greet, secure, log in, then the transaction (see session)."""
        self.wait(smtp, "command")
        code, text = smtp.ehlo()
        if code != 250:
            code, text = smtp.helo()
            if code != 250:
                return Outcome.of_reply(code, text, relay, name)
        if self.host and not self.implicit_tls or not self.host and tls and smtp.has_extn("starttls"):
            if not smtp.has_extn("starttls"):
                return Outcome("deferred", "451 4.7.4 the relay host %s offers no STARTTLS" % relay, relay)
            smtp.starttls(context=self.verified if self.host else self.opportunistic)
            smtp.ehlo()
        if self.credentials:
            try:
                smtp.login(*self.credentials)
            except smtplib.SMTPAuthenticationError as exc:
                return Outcome("deferred", "451 4.7.0 the relay host %s refused our login: %d %s"
                               % (relay, exc.smtp_code, exc.smtp_error.decode("utf-8", "replace")), relay)
        return self.deliver_over(smtp, entry, file, relay, name, addresses)

    def deliver_over(self, smtp, entry, file, relay, name, addresses):
        """The message over a ready connection: refused by what the server lacks, or the transaction."""
        refusal = self.refusal(smtp, entry)
        if refusal:
            return dict.fromkeys(addresses, Outcome("bounced", refusal, relay))
        return self.transaction(smtp, entry, file, relay, name, addresses)

    def reuse(self, key, entry, file, addresses):
        """Send over a kept connection to the same server if it answers RSET: {address: Outcome}, or None."""
        cached = self.idle.take(key)
        if cached is None:
            return None
        smtp, relay = cached
        try:
            self.wait(smtp, "command")
            code, _ = smtp.rset()          # also sets the commands back to ASCII
        except (OSError, smtplib.SMTPException):
            code = None
        if code != 250:                    # closed by the server meanwhile: a new connection
            smtp.close()
            return None
        smtp.watch()
        try:
            result = self.deliver_over(smtp, entry, file, relay, key[0], addresses)
        except (OSError, smtplib.SMTPException) as exc:
            smtp.close()
            return dict.fromkeys(addresses, Outcome("deferred", "451 4.4.1 conversation with %s failed: %s"
                                                    % (relay, exc or type(exc).__name__), relay))
        smtp.end_watch()
        self.idle.keep(key, smtp, relay)
        return result

    def refusal(self, smtp, entry):
        """Why this server cannot take the message at all (our reply text), or None."""
        if "smtputf8" in entry.needs and not smtp.has_extn("smtputf8"):
            return "553 5.6.7 the next server does not support SMTPUTF8 (RFC 6531 3.2)"
        limit = smtp.esmtp_features.get("size", "").strip()
        if limit.isdigit() and 0 < int(limit) < entry.size:
            return "552 5.3.4 message size %d exceeds the next server's limit %s" % (entry.size, limit)
        return None

    def transaction(self, smtp, entry, file, relay, name, addresses):
        """MAIL, a RCPT per recipient, DATA with the message streamed; {address: Outcome}."""
        options = ""
        if smtp.has_extn("size"):
            options += " SIZE=%d" % entry.size
        if "8bit" in entry.needs and smtp.has_extn("8bitmime"):
            options += " BODY=8BITMIME"
        if "smtputf8" in entry.needs:
            options += " SMTPUTF8"
            smtp.command_encoding = "utf-8"
        self.wait(smtp, "command")
        code, text = smtp.docmd("MAIL", "FROM:<%s>%s" % (entry.sender, options))
        if code != 250:
            return dict.fromkeys(addresses, Outcome.of_reply(code, text, relay, name))
        outcomes, accepted = {}, []
        for address in addresses:
            code, text = smtp.docmd("RCPT", "TO:<%s>" % address)
            if code in (250, 251):
                accepted.append(address)
            else:
                outcomes[address] = Outcome.of_reply(code, text, relay, name)
        if accepted:
            self.wait(smtp, "data")
            code, text = smtp.docmd("DATA")
            if code == 354:
                self.wait(smtp, "block")
                for piece in dot_stuffed_chunks(file, entry.offset):
                    smtp.send(piece)
                smtp.send(b".\r\n")
                self.wait(smtp, "end")
                code, text = smtp.getreply()
            outcomes.update(dict.fromkeys(accepted, Outcome.of_reply(code, text, relay, name)))
        return outcomes


# --------------------------------------------------------------------------
# Bounces
# --------------------------------------------------------------------------
#
# A recipient that fails for good, or whose time in the queue runs out,
# makes a delivery status notification (RFC 3464) from <> to the sender:
# into the sender's mailbox when the sender is a user here, else through
# the queue.  Mail from <> is never bounced (RFC 5321 4.5.5), so two
# servers can never bounce a message to each other for ever.

MAX_BOUNCED_HEADERS = 64 * 1024   # bytes of the original header block a bounce carries back


def delivery_status_notification(entry, path, failed, domain, sender):
    """The bounce to sender of the failed [(QueuedRecipient, Outcome)] of a queued message: bytes, CRLF lines."""
    reasons = "".join("<%s>: %s\r\n" % (r.address, o.reply) for r, o in failed)
    readable = ("This is the mail system at %s.\r\n\r\nYour message could not be delivered to the "
                "recipients below, and will not be tried again:\r\n\r\n%s" % (domain, reasons))
    fields = []
    for recipient, outcome in failed:
        fields.append(["Final-Recipient: rfc822; %s" % recipient.address, "Action: failed",
                       "Status: %s" % outcome.dsn_status()])
        if outcome.remote:
            fields[-1] += ["Remote-MTA: dns; %s" % outcome.remote, "Diagnostic-Code: smtp; %s" % outcome.reply]
    return delivery_report(entry, path, domain, sender, BOUNCE_SUBJECT, readable, fields)


def delay_notification(entry, path, domain, sender, give_up):
    """The delay notice to sender for the recipients of a queued message still waiting: bytes, CRLF lines.

    RFC 3464 2.3.3 and 2.3.8: Action: delayed, and Will-Retry-Until, when
    the server gives up (give_up, epoch seconds).
    """
    until = email.utils.formatdate(give_up, localtime=True)
    waiting = entry.pending()
    reasons = "".join("<%s>: %s\r\n" % (r.address, r.reply or "not tried yet") for r in waiting)
    readable = ("This is the mail system at %s.\r\n\r\nYour message has not been delivered yet to the "
                "recipients below.  It is tried again until %s; you need not send it again.\r\n\r\n%s"
                % (domain, until, reasons))
    fields = [["Final-Recipient: rfc822; %s" % r.address, "Action: delayed",
               "Status: %s" % reply_status(r.reply), "Will-Retry-Until: %s" % until]
              for r in waiting]
    return delivery_report(entry, path, domain, sender, DELAY_SUBJECT, readable, fields)


def delivery_report(entry, path, domain, sender, subject, readable, recipient_fields):
    """A multipart/report (RFC 3464, RFC 6522) from MAILER-DAEMON to sender about a queued message.

    subject: what the Subject starts with, the original subject after it;
    recipient_fields: the per-recipient fields, a list of lines for each.
    """
    boundary = "%s/%s" % (entry.id, domain)
    status = ["Reporting-MTA: dns; %s" % domain,
              "Arrival-Date: %s" % email.utils.formatdate(entry.arrived, localtime=True)]
    for fields in recipient_fields:
        status += [""] + fields
    headers = original_headers(path, entry.offset)
    head = "\r\n".join([
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % domain,
        "To: <%s>" % sender,
        report_subject(subject, headers),
        "Date: %s" % email.utils.formatdate(localtime=True),
        "Message-ID: %s" % email.utils.make_msgid(domain=domain),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="%s"' % boundary,
        "", "This is a MIME-formatted delivery report.", "",
        "--" + boundary, "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", "",
        readable + "\r\nThe headers of your message follow this report.\r\n--" + boundary,
        "Content-Type: message/delivery-status", "",
        "\r\n".join(status), "", "--" + boundary, "Content-Type: text/rfc822-headers", "", ""])
    return head.encode("utf-8", "surrogateescape") + headers + ("\r\n--%s--\r\n" % boundary).encode("ascii")


def decoded_words(value):
    """A header value with its RFC 2047 encoded words decoded; a word in an unknown charset as ASCII, '?' for the rest."""
    try:
        parts = email.header.decode_header(value)
    except email.errors.HeaderParseError:
        return value
    text = ""
    for data, charset in parts:
        if isinstance(data, bytes):
            try:
                data = data.decode(charset or "ascii", "replace")
            except LookupError:
                data = data.decode("ascii", "replace")
        text += data
    return text


BOUNCE_SUBJECT = "Undelivered Mail Returned to Sender"     # Postfix's words, so people know them
DELAY_SUBJECT = "Delayed Mail (still being retried)"
MAX_REPORT_SUBJECT = 100     # characters of the original subject a report's Subject repeats


def report_subject(prefix, headers):
    """The Subject: field of a report: prefix, then the original subject (decoded, one line, shortened).

    The subject is decoded from RFC 2047 and cut between characters, never
    inside one or inside an encoded word; a non-ASCII result is encoded
    again (RFC 2047, folded), so the field is 7-bit whatever came in.
    """
    raw = re.search(rb"(?im)^subject:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", headers)
    text = decoded_words(raw.group(1).replace(b"\r\n", b"").decode("utf-8", "replace")) if raw else ""
    text = "".join(c for c in " ".join(text.split()) if c.isprintable())
    if len(text) > MAX_REPORT_SUBJECT:
        text = text[:MAX_REPORT_SUBJECT - 3].rstrip() + "..."
    subject = "%s: %s" % (prefix, text) if text else prefix
    if subject.isascii():
        return "Subject: " + subject
    return "Subject: " + email.header.Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")


def original_headers(path, offset):
    """The header block of a queued message (at most MAX_BOUNCED_HEADERS of it), CRLF lines."""
    fd, _ = open_regular(path, os.O_RDONLY)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, MAX_BOUNCED_HEADERS)
    finally:
        os.close(fd)
    lines = data.split(b"\r\n")[:-1]       # whole lines only
    count, _ = header_block(lines)
    return b"".join(line + b"\r\n" for line in lines[:count])


# --------------------------------------------------------------------------
# The SMTP server and main
# --------------------------------------------------------------------------

class SMTPServer(Server):
    """The SMTP server: its sessions are SMTPSessions."""

    session_class = SMTPSession
    replies = Replies

    def __init__(self, args):
        super().__init__(args)
        self.max_size = args.max_size
        self.quota = args.quota
        self.local_domains = args.local_domains
        self.relay_networks = args.relay_networks
        self.postmaster_name = args.postmaster
        self.aliases = AliasTable(self.users.root, self.users)
        self.spool_folder = prepare_spool(self.users.root)
        # Forwarding to other domains rewrites the sender (SRS), and needs a queue to send from.
        try:
            self.srs = SRS.of_root(self.users.root, self.domain) if self.local_domains is not None else None
        except (OSError, ValueError) as exc:
            raise StartError("cannot use the SRS secret: %s" % exc)
        # Mail goes out only when some domains are not ours (CONTRACT.md section 7).
        self.queue = None
        if self.local_domains is not None:
            record_relay_settings(self.users.root, relay_settings(args))
            self.queue = OutboundQueue(self.users.root, self.domain, self.local_domains, relay_options(args),
                                       self.deliver_bounce, self.srs.original)
        # and mail from outside is checked (CONTRACT.md section 10)
        self.checks = None if self.local_domains is None else IncomingChecks(
            self.domain, Resolver(args.dns_server, INCOMING_DNS_TIMEOUT, INCOMING_DNS_ATTEMPTS))

    def serve_forever(self):
        for listener in self.listeners if self.local_domains is None else ():
            ip = peer_ip(listener.address[0])
            if not (ip and ip.is_loopback):
                log.warning("every domain is local (the course mode): mail for any address is taken for the "
                            "users here, from anyone who can reach %s; give --local-domains to take mail for "
                            "your domains only", "any interface" if ip.is_unspecified else listener.address[0])
                break
        self.aliases.refresh()       # read aliases.txt now, so its problems show at start
        if self.queue is not None:
            self.queue.start()
        super().serve_forever()

    def shutdown(self, signals):
        if self.queue is not None:
            self.queue.stop()
        super().shutdown(signals)

    def extensions(self, tls_active, require_tls, password_refused):
        """The service extensions EHLO lists (RFC 5321 4.1.1.1), for a session in TLS or not.

        AUTH lists only what the session may use now: no method that sends
        a password where one would be refused (password_refused).
        """
        keywords = ["SIZE %d" % self.max_size, "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES",
                    "SMTPUTF8", "CHUNKING"]
        if tls_active or not require_tls:
            keywords.append("AUTH " + " ".join(m for m in SMTP_MECHANISMS
                                               if not (password_refused and m in PASSWORD_MECHANISMS)))
        if self.tls and not tls_active:
            keywords.append("STARTTLS")
        return keywords + ["HELP"]

    def route(self, address, login, client):
        """Where mail for a recipient goes (a Route); Refused if nowhere it may.

        Mail for another domain goes to the queue only from a logged-in
        client (login) or one whose address (client) is in --relay-networks.
        A bounce to an SRS address of ours goes back to the sender it stands
        for, from anyone: the hash shows that we made the address.
        """
        try:
            original = self.srs.reverse(address) if self.srs is not None else None
        except SRSError as exc:
            log.info("RCPT <%s> refused: %s", address, exc)
            raise Refused(Replies.NO_SUCH_USER)
        if original is not None:
            return Route(remote=[original]) if is_remote(original, self.local_domains) else self.local_route(original)
        if is_remote(address, self.local_domains):
            if login is None and not in_networks(client[0], self.relay_networks):
                raise Refused(Replies.RELAYING_DENIED)
            return Route(remote=[address])
        return self.local_route(address)

    def local_route(self, address):
        """The Route of an address in a local domain: a user, an alias, postmaster, the catch-all; Refused if none.

        name+tag goes where name goes.  postmaster is an alias's if
        aliases.txt names it, else section 5's; the catch-all of the
        address's domain takes what nothing else does.
        """
        name = local_part(address).partition(SUBADDRESS)[0]
        login = self.users.canonical(name)
        if login is not None:
            return Route([login])
        self.aliases.refresh()
        try:
            targets = self.aliases.targets(name)
            if targets is not None:
                return self.expand(name, targets)
            if name.lower() == POSTMASTER and self.postmaster() is not None:
                return Route([self.postmaster()])
            catch_all = "@%s" % recipient_domain(address)
            targets = self.aliases.targets(catch_all) if "@" in address else None
            if targets is not None:
                return self.expand(catch_all, targets)
        except OSError as exc:
            log.error("no alias lookup for <%s>: %s", address, exc)
            raise Refused(Replies.LOCAL_ERROR)
        raise Refused(Replies.NO_SUCH_USER)

    def expand(self, alias, targets):
        """The Route of an alias's targets, followed through further aliases; Refused on a loop or too long a chain.

        A login reached twice gets one copy.  Targets in other domains are
        forwarded (their copy is queued with an SRS sender).  A target that
        is nothing (a user removed) is logged and skipped.
        """
        logins, forwarded, done = {}, {}, set()

        def follow(targets, chain):
            for target in targets:
                if is_remote(target, self.local_domains):
                    forwarded.setdefault(target.lower(), target)
                    continue
                name = local_part(target).partition(SUBADDRESS)[0]
                login = self.users.canonical(name)
                further = None if login else self.aliases.targets(name)
                if further is None and not login and name.lower() == POSTMASTER:
                    login = self.postmaster()
                if login:
                    logins[login] = True
                elif further is None:
                    self.aliases.report_once("alias %r leads to %r, no user or alias: skipped", chain[-1], target)
                elif name.lower() in chain or len(chain) >= MAX_ALIAS_DEPTH:
                    raise Refused(Replies.ALIAS_LOOP)
                elif name.lower() not in done:
                    done.add(name.lower())
                    follow(further, chain + [name.lower()])

        follow(targets, [alias.lower()])
        if not logins and not forwarded:
            raise Refused(Replies.NO_SUCH_USER)
        return Route(list(logins), (), list(forwarded.values()))

    def is_own(self, address, login):
        """Whether a sender address belongs to login (CONTRACT.md section 5).

        Its local part is the login, in any case, or the login and a +tag
        (RFC 5233 subaddressing), or an alias that leads to the login; with
        --local-domains its domain must be one of them, so that a user of
        ours cannot sign as somebody else's domain.  A bare name has no
        domain, so it is no one's there.
        """
        name = local_part(address).partition(SUBADDRESS)[0]
        if name.lower() != login.lower() and not self.alias_of(name, login):
            return False
        if self.local_domains is None:
            return True
        domain = recipient_domain(address)
        return domain is not None and domain in self.local_domains

    def alias_of(self, name, login):
        """Whether name is an alias (not a user, not the catch-all) that leads to login's mailbox."""
        if self.users.canonical(name) is not None:
            return False
        self.aliases.refresh()
        try:
            targets = self.aliases.targets(name)
            return targets is not None and login in self.expand(name, targets).logins
        except (Refused, OSError):
            return False

    def sender_check(self, session, sender):
        """The SPFResult of a transaction from outside (CONTRACT.md section 10); None where no check applies.

        Checked: with --local-domains, a client neither logged in nor in
        --relay-networks (its address from a PROXY header if there is one).
        """
        if self.checks is None or session.login is not None or in_networks(session.address[0],
                                                                            self.relay_networks):
            return None
        return self.checks.spf(session.address[0], sender, session.client_name)

    def message_check(self, session, spool, header):
        """The CheckedMessage of a message whose transaction was checked, else None; Refused by DMARC."""
        spf = session.envelope.spf
        if spf is None:
            return None
        return self.checks.message(spf, session.address[0], session.client_name, header, spool)

    def deliver_bounce(self, address, report):
        """Store a report (RFC 3464, CRLF lines) for a local address; the login, None if no user.

        An alias gets it in the mailbox of its first local target.
        """
        try:
            logins = self.local_route(address).logins
        except Refused:
            return None
        if not logins:
            return None
        deliver({self.users.mailbox_path(logins[0]): stored_bounce(report, address, self.domain)})
        return logins[0]

    def check_quota(self, login, declared_size):
        """Refuse a recipient whose mailbox (under --quota) cannot take a message of the declared size."""
        quota = self.quota
        if declared_size > quota:
            raise Refused(Replies.OVER_QUOTA)
        try:
            held = os.stat(self.users.mailbox_path(login)).st_size
        except OSError:
            held = 0
        if held >= quota or held + declared_size > quota:
            raise Refused(Replies.MAILBOX_FULL)

    def postmaster(self):
        """The login that mail for postmaster goes to: --postmaster, else the first user."""
        if self.postmaster_name is not None:
            return self.users.canonical(self.postmaster_name)
        users = self.users.logins()
        return users[0] if users else None


def main(argv=None):
    """Run the SMTP server until Ctrl-C or SIGTERM, or one of its commands (--hash-password, --queue,
    --flush, --delete, --hold, --release, --dkim-keygen, --dns-records, --check-dns)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--hash-password" in argv:
        return hash_password_main(argv)
    if any(command in argv for command in QUEUE_COMMANDS):
        return queue_main(argv)
    for option, command in (("--dkim-keygen", dkim_keygen_main), ("--dns-records", dns_records_main),
                            ("--check-dns", check_dns_main)):
        if option in argv:
            return command(argv)
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


QUEUE_COMMANDS = ("--queue", "--flush", "--delete", "--hold", "--release")


def queue_main(argv):
    """--queue: list the outbound queue of a mail root; --flush: make its servers try everything now;
    --delete, --hold, --release: act on one message."""
    parser = argparse.ArgumentParser(prog="mailserver_smtp.py --queue | --flush | --delete/--hold/--release ID",
                                     description="List the outbound queue (--queue), make the servers "
                                                 "running on the mail root try every queued message now (--flush), "
                                                 "or act on one message.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--queue", action="store_true", help="list the queue, as mailq does")
    action.add_argument("--flush", action="store_true", help="retry every queued message now")
    for name, text in (("delete", "remove a message"), ("hold", "keep a message from being tried"),
                       ("release", "let a held message be tried, now")):
        action.add_argument("--" + name, metavar="ID", help=text)
    parser.add_argument("--root", default=".", help="the mail root (default: .)")
    args = parser.parse_args(argv)
    folder = os.path.join(args.root, QUEUE_NAME)
    if not os.path.isdir(folder):
        print("no queue in %s (a server with --local-domains makes it)" % args.root, file=sys.stderr)
        return 1
    for name in ("delete", "hold", "release"):
        if getattr(args, name) is not None:
            try:
                print(queue_by_hand(folder, name, getattr(args, name)))
            except (LookupError, OSError) as exc:
                print("cannot %s: %s" % (name, exc.args[0] if isinstance(exc, LookupError) else exc),
                      file=sys.stderr)
                return 1
            return 0
    if args.flush:
        try:
            request_flush(folder)
        except OSError as exc:
            print("cannot flush the queue: %s" % exc, file=sys.stderr)
            return 1
        print("flush requested: the servers on %s try every queued message within %g s"
              % (args.root, FLUSH_POLL))
        return 0
    return print_to_pipe(functools.partial(queue_listing, folder))


def print_to_pipe(write):
    """Run write(sys.stdout): 0, or 1 quietly when the reader went away (as in '--queue | head')."""
    try:
        write(sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout once more at exit: aim it at /dev/null, so that raises nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


# --------------------------------------------------------------------------
# The site's keys and DNS records: --dkim-keygen, --dns-records, --check-dns
# --------------------------------------------------------------------------
# What a domain publishes so that other servers take its mail (CONTRACT.md
# section 9): an MX naming us, SPF allowing our sending address, a DKIM key
# record per key, a DMARC policy, and a PTR for the address that names our
# host, which in turn resolves back to it (Gmail's 5.7.25).

TXT_STRING = 255                     # RFC 1035 3.3: characters of one string of a TXT record
MX_PREFERENCE = 10
DMARC_FIRST_POLICY = "v=DMARC1; p=none; rua=mailto:postmaster@%s"   # watch reports first (RFC 7489 6.3)
CHECK_DNS_TIMEOUT = 5.0              # seconds a DNS server gets per question


def site_arguments(prog, description, action, help_text):
    """The parser shared by --dns-records and --check-dns."""
    parser = argparse.ArgumentParser(prog="mailserver_smtp.py %s DOMAIN" % prog, description=description)
    parser.add_argument(action, metavar="DOMAIN", required=True, help=help_text)
    parser.add_argument("--root", default=".", help="the mail root, whose .dkim/DOMAIN/ holds the keys (default: .)")
    parser.add_argument("--domain", default=socket.gethostname(), metavar="HOST",
                        help="the mail host: the MX, the PTR's name, the EHLO name (default: this host's name)")
    parser.add_argument("--source-address", metavar="ADDR",
                        help="the address mail leaves from (default: HOST's address)")
    return parser


def site_names(parser, args, domain):
    """(domain, host, address or None) of the command line, normalized; parser.error if one is malformed."""
    try:
        domain, host = _dns_normalize(domain), _dns_normalize(args.domain)
        address = str(ipaddress.ip_address(args.source_address)) if args.source_address else None
    except (DNSError, ValueError) as error:
        parser.error("not a domain name or address: %s" % error)
    return domain, host, address


def zone_line(name, rtype, value):
    """One record in zone-file form (RFC 1035 5.1); a TXT text as quoted strings of at most 255 characters."""
    if rtype == "TXT":
        strings = ['"%s"' % value[i:i + TXT_STRING] for i in range(0, len(value), TXT_STRING)] or ['""']
        value = strings[0] if len(strings) == 1 else "( %s )" % "\n\t".join(strings)
    return "%s.\tIN\t%s\t%s" % (name, rtype, value)


def site_records(domain, host, address, keys):
    """[(what, name, type, value)] of the records the domain and its address need."""
    spf = "v=spf1 %s:%s -all" % ("ip6" if ":" in address else "ip4", address) if address else "v=spf1 mx -all"
    records = [("MX", domain, "MX", "%d %s." % (MX_PREFERENCE, host)), ("SPF", domain, "TXT", spf)]
    records += [("DKIM", "%s._domainkey.%s" % (selector, domain), "TXT", key.public.record())
                for selector, key in keys]
    records.append(("DMARC", "_dmarc." + domain, "TXT", DMARC_FIRST_POLICY % domain))
    if address:
        records.append(("A", host, "AAAA" if ":" in address else "A", address))
        records.append(("PTR", reverse_name(address), "PTR", host + "."))
    return records


def dkim_keygen_main(argv):
    """--dkim-keygen: make a key in ROOT/.dkim/DOMAIN/SELECTOR.pem (never overwriting) and print its record."""
    parser = argparse.ArgumentParser(prog="mailserver_smtp.py --dkim-keygen DOMAIN",
                                     description="Make a DKIM signing key for DOMAIN and print the TXT record "
                                                 "to publish.")
    parser.add_argument("--dkim-keygen", metavar="DOMAIN", required=True)
    parser.add_argument("--selector", default=time.strftime("%Y%m%d"), help="the key's name (default: today)")
    parser.add_argument("--key-type", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (2048 bits, what every receiver verifies) or ed25519 (RFC 8463)")
    parser.add_argument("--root", default=".", help="the mail root (default: .)")
    args = parser.parse_args(argv)
    folder = dkim_domain_folder(args.root, args.dkim_keygen)
    if folder is None or dkim_selector(args.selector + DKIM_KEY_SUFFIX) != args.selector:
        parser.error("not a domain name or selector: %s, %s" % (args.dkim_keygen, args.selector))
    key = generate_rsa_key() if args.key_type == "rsa" else generate_ed25519_key()
    path = os.path.join(folder, args.selector + DKIM_KEY_SUFFIX)
    try:
        for made in (os.path.dirname(folder), folder):    # the keys are for the servers' user only
            os.makedirs(made, mode=0o700, exist_ok=True)
        write_new_file(path, key.private_pem().encode("ascii"))
    except OSError as error:
        hint = ": a key is never overwritten, choose another --selector" if error.errno == errno.EEXIST else ""
        print("no key made: %s: %s%s" % (path, error.strerror or error, hint), file=sys.stderr)
        return 1
    domain = os.path.basename(folder)
    print("; %s key %s for %s, in %s; publish:" % (key.algorithm, args.selector, domain, path))
    print(zone_line("%s._domainkey.%s" % (args.selector, domain), "TXT", key.public.record()))
    return 0


def write_new_file(path, data):
    """Write a file that must not exist yet (mode 0600, fsync'd); OSError (EEXIST) if it does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_BINARY, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def dns_records_main(argv):
    """--dns-records: print the records a domain needs, in zone-file form."""
    parser = site_arguments("--dns-records", "Print the DNS records DOMAIN needs (MX, SPF, DKIM, DMARC, PTR).",
                            "--dns-records", "the mail domain")
    args = parser.parse_args(argv)
    domain, host, address = site_names(parser, args, args.dns_records)
    try:
        keys = DKIMKeys(args.root).keys_for(domain)
    except DKIMKeyError as error:
        print("unusable DKIM key: %s" % error, file=sys.stderr)
        return 1
    lines = [zone_line(name, rtype, value) for _, name, rtype, value in site_records(domain, host, address, keys)]
    if not keys:
        lines.append("; no DKIM key yet: python3 mailserver_smtp.py --dkim-keygen %s --root %s" % (domain, args.root))
    if not address:
        lines.append("; and the PTR of the address mail leaves from, naming %s: give --source-address" % host)
    return print_to_pipe(lambda out: out.write("\n".join(lines) + "\n"))


def check_dns_main(argv):
    """--check-dns: ask DNS for each record the domain needs; one line each; 0 only when all are right."""
    parser = site_arguments("--check-dns", "Ask DNS for each record DOMAIN needs and say whether it is right.",
                            "--check-dns", "the mail domain")
    parser.add_argument("--dns-server", metavar="ADDR[:PORT]",
                        help="the DNS server to ask (default: those of /etc/resolv.conf)")
    args = parser.parse_args(argv)
    domain, host, address = site_names(parser, args, args.check_dns)
    try:
        servers = [host_and_port(args.dns_server, DNS_PORT)] if args.dns_server else None
        resolver = Resolver(servers, timeout=CHECK_DNS_TIMEOUT)
    except ValueError:
        parser.error("--dns-server takes ADDR[:PORT] ([IPv6]:PORT)")
    try:
        keys = DKIMKeys(args.root).keys_for(domain)
    except DKIMKeyError as error:
        print("unusable DKIM key: %s" % error, file=sys.stderr)
        return 1
    results = list(site_checks(SiteDNS(resolver), domain, host, address, keys))
    lines = ["%s %s: %s%s" % (what, name, status, " (%s)" % why if why else "")
             for what, name, status, why in results]
    if print_to_pipe(lambda out: out.write("\n".join(lines) + "\n")):
        return 1
    return 0 if all(status == "right" for _, _, status, _ in results) else 1


class SiteDNS:
    """Lookups for the checks: [] for a name that does not exist; DNSError only for a temporary failure."""

    def __init__(self, resolver):
        self.resolver = resolver

    def __call__(self, name, rtype):
        try:
            return self.resolver.query(name, rtype)
        except DNSError as error:
            if error.temporary:
                raise
            return []


def site_checks(lookup, domain, host, address, keys):
    """(what, name, right/missing/wrong, why) for each record the domain needs, asked of lookup."""
    for rtype in ("A", "AAAA") if address is None else ():
        try:                         # the address the MX host's name gives, if any
            address = (lookup(host, rtype) + [None])[0]
        except DNSError:
            continue
        if address:
            break
    yield ("MX", domain) + _site_answer(lambda: check_mx(lookup, domain, host))
    yield ("SPF", domain) + _site_answer(lambda: check_spf_record(lookup, domain, host, address))
    for selector, key in keys:
        name = "%s._domainkey.%s" % (selector, domain)
        yield ("DKIM", name) + _site_answer(lambda: check_dkim_record(lookup, name, key))
    if not keys:                     # nothing to look up, and mail would go out unsigned
        yield ("DKIM", domain, "missing", "no key in the mail root: make one with --dkim-keygen")
    yield ("DMARC", "_dmarc." + domain) + _site_answer(lambda: check_dmarc_record(lookup, "_dmarc." + domain))
    yield ("PTR", address or host) + _site_answer(lambda: check_ptr(lookup, host, address))


def _site_answer(check):
    """What check() says, or ("wrong", why) when DNS failed on the way."""
    try:
        return check()
    except DNSError as error:
        return ("wrong", "DNS failed: %s" % error)


def check_mx(lookup, domain, host):
    """The MX records of domain name host (RFC 5321 5.1)."""
    hosts = [exchange for _, exchange in lookup(domain, "MX")]
    if not hosts:
        return ("missing", "no MX record")
    if host in hosts:
        return ("right", "")
    return ("wrong", "MX names %s, not %s" % (", ".join(h or "." for h in hosts), host))


def check_spf_record(lookup, domain, host, address):
    """One SPF record (RFC 7208 4.5) that passes for the address mail leaves from."""
    records = [text for text in lookup(domain, "TXT") if re.match(r"v=spf1(?: |\Z)", text, re.IGNORECASE)]
    if not records:
        return ("missing", "no v=spf1 record")
    if len(records) > 1:
        return ("wrong", "%d SPF records: a permerror (RFC 7208 4.5)" % len(records))
    if address is None:
        return ("wrong", "no address to check it for: give --source-address, or an address record for %s" % host)
    result = check_spf(lookup, address, "postmaster@" + domain, host, host)
    if result.result == "pass":
        return ("right", "")
    return ("wrong", "SPF %s for %s, not pass (%s)" % (result.result, address, result.why))


def check_dkim_record(lookup, name, key):
    """A key record at name holding key's public key (RFC 6376 3.6.1)."""
    texts = lookup(name, "TXT")
    if not texts:
        return ("missing", "no key record")
    why = "not a key record"
    for text in texts:
        try:
            record = DKIMKeyRecord(text)
            if record.revoked:
                why = "the key is revoked (p= is empty)"
                continue
            published = public_key_from_record(record.kind, record.data)
            if record.kind == key.kind and published.record() == key.public.record():
                return ("right", "")
            why = "the record holds another key, not ours"
        except DKIMError as error:
            why = "malformed: %s" % error
    return ("wrong", why)


def check_dmarc_record(lookup, name):
    """One DMARC record with a policy (RFC 7489 6.3, 6.6.3)."""
    records = [text for text in lookup(name, "TXT") if re.match(r"v\s*=\s*DMARC1\s*(?:;|\Z)", text)]
    if not records:
        return ("missing", "no DMARC record")
    if len(records) > 1:
        return ("wrong", "%d DMARC records: none applies (RFC 7489 6.6.3)" % len(records))
    if not re.search(r";\s*p\s*=\s*(?:none|quarantine|reject)\s*(?:;|\Z)", records[0]):
        return ("wrong", "no p=none, quarantine or reject")
    return ("right", "")


def check_ptr(lookup, host, address):
    """A PTR for the sending address naming host, and host resolving back to it (forward-confirmed)."""
    if address is None:
        return ("wrong", "no address to check: give --source-address, or an address record for %s" % host)
    names = lookup(reverse_name(address), "PTR")
    if not names:
        return ("missing", "no PTR record for %s" % address)
    if host not in names:
        return ("wrong", "PTR names %s, not %s" % (", ".join(names), host))
    forward = lookup(host, "AAAA" if ":" in address else "A")
    if not any(ipaddress.ip_address(found) == ipaddress.ip_address(address) for found in forward):
        return ("wrong", "%s does not resolve back to %s" % (host, address))
    return ("right", "")


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


# ##########################################################################
#
#   PART 3: MESSAGE AUTHENTICATION: DKIM
#
#   DomainKeys Identified Mail (RFC 6376) with rsa-sha256 (RFC 8301) and
#   ed25519-sha256 (RFC 8463), from the bytes up: keys and the DER they are
#   written in, RSA, Ed25519, canonicalization, signing, verifying.  What
#   the rest of the file uses is small:
#     read_private_key(text), generate_rsa_key(), generate_ed25519_key(),
#     key.private_pem(), key.public.record()     the keys (--dkim-keygen)
#     dkim_sign(chunks, domain, keys, now)       DKIM-Signature fields to put on top
#     dkim_verify(header, body, lookup_txt, now) one DKIMResult per signature
#     DKIMKeys(root).signatures(domain, chunks)  the same with the keys of ROOT/.dkim/DOMAIN/
#   Nothing here opens a socket: DNS comes in as lookup_txt(name), a
#   function returning the TXT texts of name ([] for none) or raising
#   DNSError.
#
# ##########################################################################

# --------------------------------------------------------------------------
# Keys and DER
# --------------------------------------------------------------------------
# A key file is PEM (RFC 7468): base64 DER between BEGIN and END lines.  We
# read PKCS#1 RSAPrivateKey (RFC 8017 A.1.2), PKCS#8 PrivateKeyInfo /
# OneAsymmetricKey (RFC 5208, RFC 5958) holding RSA or Ed25519 (RFC 8410),
# and write PKCS#8.  The DER reader is strict (X.690 10): definite lengths
# in their shortest form, integers without padding, nothing left over.  A
# key file is the start of everything we sign, so anything else in it is an
# error that says what is wrong, never a guess.

DKIM_KEY_FOLDER = ".dkim"            # ROOT/.dkim/DOMAIN/SELECTOR.pem
DKIM_KEY_SUFFIX = ".pem"
DKIM_MAX_KEY_FILE = 64 * 1024        # bytes: an RSA-16384 PEM is 13 KB
DKIM_MIN_SIGNING_BITS = 2048         # RFC 8301 3.2: signers MUST use at least 1024, SHOULD 2048
DKIM_MIN_VERIFYING_BITS = 1024       # RFC 8301 3.2: verifiers MUST NOT accept shorter
DKIM_MAX_VERIFYING_BITS = 8192       # a key record longer than this costs too much to use (RFC 6376 3.3.3)
RSA_PUBLIC_EXPONENT = 65537          # FIPS 186-5 A.1.1: odd, 2**16 < e < 2**256
DER_SEQUENCE, DER_INTEGER, DER_BIT_STRING, DER_OCTET_STRING, DER_NULL, DER_OID = 0x30, 0x02, 0x03, 0x04, 0x05, 0x06
DER_ATTRIBUTES, DER_PUBLIC_KEY = 0xA0, 0x81      # RFC 5958 2: [0] attributes, [1] publicKey (implicit)
OID_RSA = bytes.fromhex("2a864886f70d010101")    # 1.2.840.113549.1.1.1 rsaEncryption (RFC 8017 A.1)
OID_ED25519 = bytes.fromhex("2b6570")            # 1.3.101.112 id-Ed25519 (RFC 8410 3)
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL)
BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")
PEM_LINE = 64                        # RFC 7468 2: base64 lines of 64 characters


class DKIMError(ValueError):
    """A message that cannot be signed, or a signature or key record that breaks the RFC (permerror)."""


class DKIMKeyError(DKIMError):
    """A key that cannot be used: unreadable, malformed, of a kind we do not know, or too short."""


def _der_element(data, pos, end):
    """(tag, start, stop) of the DER element at pos, which must end by end: its value is data[start:stop]."""
    if pos + 2 > end:
        raise DKIMKeyError("DER cut short")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise DKIMKeyError("DER tag of several octets")   # none occurs in a key
    pos += 2
    if first == 0x80:
        raise DKIMKeyError("DER with an indefinite length")
    if first > 0x80:
        count = first & 0x7F
        if count > 4 or pos + count > end:
            raise DKIMKeyError("DER length cut short or too long")
        length = int.from_bytes(data[pos:pos + count], "big")
        if data[pos] == 0 or length < 0x80:
            raise DKIMKeyError("DER length not in its shortest form")
        pos += count
    else:
        length = first
    if pos + length > end:
        raise DKIMKeyError("DER length larger than its data")
    return tag, pos, pos + length


def der_fields(data, tags, optional=(), start=0, end=None):
    """The values (bytes) of one DER SEQUENCE filling data[start:end], whose elements have these tags.

    After the tags, the elements in optional may follow, each at most
    once and in order; an absent one is None.
    """
    end = len(data) if end is None else end
    tag, pos, stop = _der_element(data, start, end)
    if tag != DER_SEQUENCE or stop != end:
        raise DKIMKeyError("not one DER SEQUENCE" if tag != DER_SEQUENCE else "bytes after the DER SEQUENCE")
    values, wanted = [], list(tags) + list(optional)
    for index, expected in enumerate(wanted):
        if pos == stop:
            if index < len(tags):
                raise DKIMKeyError("DER SEQUENCE with too few elements")
            values.append(None)
            continue
        tag, value_start, value_stop = _der_element(data, pos, stop)
        if tag != expected:
            if index < len(tags):
                raise DKIMKeyError("DER element 0x%02x where 0x%02x belongs" % (tag, expected))
            values.append(None)
            continue
        values.append(data[value_start:value_stop])
        pos = value_stop
    if pos != stop:
        raise DKIMKeyError("DER SEQUENCE with elements left over")
    return values


def der_integer(value):
    """The non-negative INTEGER with these content octets (X.690 8.3: shortest form)."""
    if not value:
        raise DKIMKeyError("empty DER INTEGER")
    if len(value) > 1 and (value[0] == 0 and value[1] < 0x80 or value[0] == 0xFF and value[1] >= 0x80):
        raise DKIMKeyError("DER INTEGER not in its shortest form")
    if value[0] >= 0x80:
        raise DKIMKeyError("negative DER INTEGER")
    return int.from_bytes(value, "big")


def der(tag, content):
    """One DER element."""
    if len(content) < 0x80:
        return bytes((tag, len(content))) + content
    size = (len(content).bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + len(content).to_bytes(size, "big") + content


def der_int(number):
    """A non-negative INTEGER in DER."""
    return der(DER_INTEGER, number.to_bytes(number.bit_length() // 8 + 1, "big"))


def pem_decode(text):
    """(label, DER bytes) of the one PEM block that text holds (RFC 7468 2), else DKIMKeyError."""
    blocks = PEM_BLOCK.findall(text)
    if len(blocks) != 1 or PEM_BLOCK.sub("", text).strip():
        raise DKIMKeyError("not one PEM block (cut short, or other text around it)")
    label, body, end_label = blocks[0]
    if label != end_label:
        raise DKIMKeyError("PEM BEGIN %s ended by END %s" % (label, end_label))
    if ":" in body:
        raise DKIMKeyError("PEM with headers: an encrypted key cannot be used without its passphrase")
    joined = "".join(body.split())
    if not BASE64_TEXT.match(joined) or len(joined) % 4:
        raise DKIMKeyError("PEM base64 is malformed")
    return label, base64.b64decode(joined)


def pem_encode(label, data):
    """A PEM block (RFC 7468 2) of DER bytes."""
    text = base64.b64encode(data).decode("ascii")
    lines = [text[i:i + PEM_LINE] for i in range(0, len(text), PEM_LINE)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def read_private_key(text):
    """The private key (RSAPrivateKey or Ed25519PrivateKey) in a PEM text; DKIMKeyError says why not."""
    label, data = pem_decode(text)
    if label == "RSA PRIVATE KEY":                       # PKCS#1
        return _rsa_private_from_der(data)
    if label == "PRIVATE KEY":                           # PKCS#8
        return _pkcs8_private_from_der(data)
    if label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
        raise DKIMKeyError("a public key, where the private key belongs")
    if label == "ENCRYPTED PRIVATE KEY":
        raise DKIMKeyError("an encrypted key cannot be used without its passphrase")
    raise DKIMKeyError("PEM of a %s, not an RSA or Ed25519 private key" % label)


def _pkcs8_private_from_der(data):
    """The key in a PKCS#8 PrivateKeyInfo (RFC 5208 5) or OneAsymmetricKey (RFC 5958 2)."""
    version, algorithm, private, _, _ = der_fields(
        data, (DER_INTEGER, DER_SEQUENCE, DER_OCTET_STRING), (DER_ATTRIBUTES, DER_PUBLIC_KEY))
    if der_integer(version) not in (0, 1):
        raise DKIMKeyError("PKCS#8 version %d" % der_integer(version))
    oid = der(DER_SEQUENCE, algorithm)
    if oid == der(DER_SEQUENCE, der(DER_OID, OID_RSA) + der(DER_NULL, b"")):
        return _rsa_private_from_der(private)
    if oid == der(DER_SEQUENCE, der(DER_OID, OID_ED25519)):   # RFC 8410 3: no parameters
        tag, start, stop = _der_element(private, 0, len(private))
        if tag != DER_OCTET_STRING or stop != len(private) or stop - start != ED25519_KEY_SIZE:
            raise DKIMKeyError("an Ed25519 private key is an OCTET STRING of 32 bytes (RFC 8410 7)")
        return Ed25519PrivateKey(private[start:stop])
    raise DKIMKeyError("PKCS#8 key of an algorithm other than RSA and Ed25519")


def _rsa_private_from_der(data):
    """The key in a PKCS#1 RSAPrivateKey (RFC 8017 A.1.2): two primes, every value consistent."""
    values = [der_integer(value) for value in der_fields(data, (DER_INTEGER,) * 9)]
    version, n, e, d, p, q, dp, dq, qinv = values
    if version != 0:
        raise DKIMKeyError("RSA key with more than two primes")
    key = RSAPrivateKey(n, e, d, p, q)
    if (dp, dq, qinv) != (key.dp, key.dq, key.qinv):
        raise DKIMKeyError("RSA key whose CRT values do not match its primes")
    return key


def public_key_from_record(kind, data):
    """The public key of a key record's p= (base64-decoded): RSA as SubjectPublicKeyInfo or
    RSAPublicKey (RFC 6376 3.6.1), Ed25519 as its 32 bytes (RFC 8463 4)."""
    if kind == "ed25519":
        if len(data) != ED25519_KEY_SIZE:
            raise DKIMKeyError("an Ed25519 public key is 32 bytes")
        return Ed25519PublicKey(data)
    _, start, stop = _der_element(data, 0, len(data))
    if start < stop and data[start] == DER_SEQUENCE:       # SubjectPublicKeyInfo (RFC 5280 4.1.2.7)
        algorithm, bits = der_fields(data, (DER_SEQUENCE, DER_BIT_STRING))
        if der(DER_SEQUENCE, algorithm) != der(DER_SEQUENCE, der(DER_OID, OID_RSA) + der(DER_NULL, b"")):
            raise DKIMKeyError("public key of an algorithm other than RSA")
        if bits[:1] != b"\0":
            raise DKIMKeyError("BIT STRING with unused bits")
        data = bits[1:]
    n, e = [der_integer(value) for value in der_fields(data, (DER_INTEGER, DER_INTEGER))]
    return RSAPublicKey(n, e)


# --------------------------------------------------------------------------
# RSA (RFC 8017; keys by FIPS 186-5 appendix A.1.3 and B.3)
# --------------------------------------------------------------------------
# A signature is pow(m, d, n) for the padded digest m (EMSA-PKCS1-v1_5,
# RFC 8017 9.2), computed with the Chinese remainder theorem (3x faster).
# CPython's big integers are not constant-time, so m is blinded with a
# fresh random r per signature (m * r**e, then times 1/r): the exponent
# sees numbers an observer cannot choose or predict.  Each signature is
# checked with the public key before it is used (a fault in the CRT would
# otherwise reveal a prime: Boneh, DeMillo, Lipton 1997).

SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")   # RFC 8017 9.2 note 1
RSA_KEY_BITS = 2048
RSA_PRIME_ROUNDS = {1024: 5, 1536: 4, 2048: 4}   # FIPS 186-5 table B.1: M-R rounds for p, q of these
                                                 # sizes, error below 2**-112, 2**-128, 2**-144
SMALL_PRIMES = [n for n in range(3, 2000, 2) if all(n % k for k in range(3, int(n ** 0.5) + 1, 2))]


class RSAPublicKey:
    """An RSA public key (n, e): verifies RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 8.2.2)."""

    kind = "rsa"
    algorithm = "rsa-sha256"

    def __init__(self, n, e):
        if n < 3 or e < 3 or e % 2 == 0 or e >= n:
            raise DKIMKeyError("RSA public key with impossible values")
        self.n, self.e = n, e
        self.bits = n.bit_length()
        self.size = (self.bits + 7) // 8

    def verify(self, data, signature):
        """Whether signature is this key's signature of data."""
        if len(signature) != self.size:           # RFC 8017 8.2.2 step 1
            return False
        s = int.from_bytes(signature, "big")
        return s < self.n and pow(s, self.e, self.n) == rsa_encode(data, self.size)

    def der(self):
        """SubjectPublicKeyInfo (RFC 5280 4.1.2.7), what a DKIM key record's p= holds."""
        algorithm = der(DER_SEQUENCE, der(DER_OID, OID_RSA) + der(DER_NULL, b""))
        key = der(DER_SEQUENCE, der_int(self.n) + der_int(self.e))
        return der(DER_SEQUENCE, algorithm + der(DER_BIT_STRING, b"\0" + key))

    def record(self):
        """The DKIM key record's text (RFC 6376 3.6.1)."""
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(self.der()).decode("ascii")


def rsa_encode(data, size):
    """EMSA-PKCS1-v1_5 (RFC 8017 9.2) of data's SHA-256 digest, as an integer of size octets."""
    digest_info = SHA256_DIGEST_INFO + hashlib.sha256(data).digest()
    if size < len(digest_info) + 11:
        raise DKIMKeyError("RSA key too short for SHA-256")
    return int.from_bytes(b"\0\1" + b"\xff" * (size - len(digest_info) - 3) + b"\0" + digest_info, "big")


class RSAPrivateKey:
    """An RSA private key of two primes, signing with CRT and blinding (see above)."""

    kind = "rsa"
    algorithm = "rsa-sha256"

    def __init__(self, n, e, d, p, q):
        if p * q != n or p == q or min(p, q) < 3:
            raise DKIMKeyError("RSA key whose primes do not make its modulus")
        self.public = RSAPublicKey(n, e)
        lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)   # FIPS 186-5 A.1.1: d * e = 1 mod lcm(p-1, q-1)
        if d * e % lam != 1:
            raise DKIMKeyError("RSA key whose private exponent does not match")
        self.n, self.e, self.d, self.p, self.q = n, e, d, p, q
        self.dp, self.dq, self.qinv = d % (p - 1), d % (q - 1), pow(q, -1, p)
        self.bits = self.public.bits

    def sign(self, data):
        """The RSASSA-PKCS1-v1_5 SHA-256 signature of data (RFC 8017 8.2.1)."""
        m = rsa_encode(data, self.public.size)
        r = secrets.randbelow(self.n - 2) + 2          # the blinding factor, fresh each time
        while math.gcd(r, self.n) != 1:
            r = secrets.randbelow(self.n - 2) + 2
        blinded = m * pow(r, self.e, self.n) % self.n
        s1, s2 = pow(blinded % self.p, self.dp, self.p), pow(blinded % self.q, self.dq, self.q)
        s = (s2 + (self.qinv * (s1 - s2) % self.p) * self.q) * pow(r, -1, self.n) % self.n
        if pow(s, self.e, self.n) != m:
            raise DKIMKeyError("RSA signature failed its check (a fault): not used")
        return s.to_bytes(self.public.size, "big")

    def der(self):
        """PKCS#1 RSAPrivateKey (RFC 8017 A.1.2)."""
        values = (0, self.n, self.e, self.d, self.p, self.q, self.dp, self.dq, self.qinv)
        return der(DER_SEQUENCE, b"".join(der_int(value) for value in values))

    def private_pem(self):
        """The key as a PKCS#8 PEM file (RFC 5208, RFC 7468 10)."""
        algorithm = der(DER_SEQUENCE, der(DER_OID, OID_RSA) + der(DER_NULL, b""))
        return pem_encode("PRIVATE KEY", der(DER_SEQUENCE, der_int(0) + algorithm + der(DER_OCTET_STRING, self.der())))


def is_probable_prime(n, rounds):
    """Miller-Rabin with random bases (FIPS 186-5 B.3.1, C.3.1), after trial division by small primes."""
    if n < 2 or n % 2 == 0:
        return n == 2
    for small in SMALL_PRIMES:
        if n % small == 0:
            return n == small
    m, a = n - 1, 0
    while m % 2 == 0:
        m, a = m // 2, a + 1
    for _ in range(rounds):
        b = secrets.randbelow(n - 3) + 2               # C.3.1 step 4.1: 1 < b < n - 1
        z = pow(b, m, n)
        if z in (1, n - 1):
            continue
        for _ in range(a - 1):
            z = z * z % n
            if z == n - 1:
                break
        else:
            return False
    return True


def _rsa_prime(half, e, other=None):
    """A random probable prime p of half bits for e (FIPS 186-5 B.3.3 steps 4 and 5).

    p * p >= 2**(2*half - 1) (that is p >= sqrt(2) * 2**(half-1), so the
    modulus has all its bits), gcd(p - 1, e) = 1, and p is far from other:
    |p - q| > 2**(half - 100).
    """
    rounds = RSA_PRIME_ROUNDS.get(half, 5)   # smaller primes (test keys only): as many as for 1024 bits
    for _ in range(50 * half):           # B.3.3 starts again after 5 * half; going on with fresh candidates is the same
        p = secrets.randbits(half) | 1
        if p * p < 1 << (2 * half - 1):
            continue
        if other is not None and abs(p - other) <= 1 << (half - 100):
            continue
        if math.gcd(p - 1, e) == 1 and is_probable_prime(p, rounds):
            return p
    raise DKIMKeyError("no prime found: is the random source broken?")


def generate_rsa_key(bits=RSA_KEY_BITS, e=RSA_PUBLIC_EXPONENT):
    """A new RSA key of bits bits from secrets (FIPS 186-5 B.3.3 with probable primes)."""
    half = bits // 2
    while True:
        p = _rsa_prime(half, e)
        q = _rsa_prime(half, e, p)
        lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
        d = pow(e, -1, lam)
        if d > 1 << half:                # FIPS 186-5 A.1.1: d > 2**(nlen/2), else start again
            return RSAPrivateKey(p * q, e, d, max(p, q), min(p, q))


# --------------------------------------------------------------------------
# Ed25519 (RFC 8032 5.1)
# --------------------------------------------------------------------------
# The curve -x**2 + y**2 = 1 + d*x**2*y**2 over the integers mod 2**255-19,
# points in extended coordinates (X:Y:Z:T) with x = X/Z, y = Y/Z, x*y = T/Z
# (RFC 8032 5.1.4).  Secrets are 32 random bytes; signing is deterministic,
# so the RFC 8463 example signature comes out byte for byte.  (Pure Python,
# so neither constant-time nor fast: a few milliseconds a signature.)

ED25519_P = 2 ** 255 - 19
ED25519_L = 2 ** 252 + 27742317777372353535851937790883648493   # the order of the base point
ED25519_D = -121665 * pow(121666, -1, ED25519_P) % ED25519_P
ED25519_SQRT_M1 = pow(2, (ED25519_P - 1) // 4, ED25519_P)
ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64


def _ed_add(P, Q):
    """P + Q (RFC 8032 5.1.4)."""
    p = ED25519_P
    a = (P[1] - P[0]) * (Q[1] - Q[0]) % p
    b = (P[1] + P[0]) * (Q[1] + Q[0]) % p
    c = 2 * P[3] * Q[3] * ED25519_D % p
    d = 2 * P[2] * Q[2] % p
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % p, g * h % p, f * g % p, e * h % p)


def _ed_double(P):
    """P + P (RFC 8032 5.1.4, the doubling formulas)."""
    p = ED25519_P
    a, b = P[0] * P[0] % p, P[1] * P[1] % p
    c = 2 * P[2] * P[2] % p
    h = a + b
    e = h - (P[0] + P[1]) * (P[0] + P[1]) % p
    g = a - b
    f = c + g
    return (e * f % p, g * h % p, f * g % p, e * h % p)


def _ed_multiply(s, P):
    """s * P, by double and add."""
    Q = (0, 1, 1, 0)                     # the neutral element
    while s:
        if s & 1:
            Q = _ed_add(Q, P)
        P = _ed_double(P)
        s >>= 1
    return Q


@functools.lru_cache(maxsize=None)
def _ed_base_table():
    """[[j * 16**i * B for j in 0..15] for i in 0..63]: the base point's multiples, made once (10 ms)."""
    table, row_base = [], None
    for _ in range(64):
        row_base = ED25519_BASE if row_base is None else _ed_double(_ed_double(_ed_double(_ed_double(row_base))))
        row = [(0, 1, 1, 0), row_base]
        for _ in range(14):
            row.append(_ed_add(row[-1], row_base))
        table.append(row)
    return table


def _ed_base_multiply(s):
    """s * B (s < 2**256) from the table: 64 additions, not the 380 steps of double and add.

    A speed-up: signing takes 0.3 ms instead of 1.4, verifying 1.6 instead of 2.8.
    """
    Q = (0, 1, 1, 0)
    for row in _ed_base_table():
        if s & 15:
            Q = _ed_add(Q, row[s & 15])
        s >>= 4
    return Q


def _ed_recover_x(y, sign):
    """The x of the point with this y and x's low bit (RFC 8032 5.1.3 steps 2-4); None if there is none."""
    p = ED25519_P
    if y >= p:
        return None
    x2 = (y * y - 1) * pow(ED25519_D * y * y + 1, -1, p) % p
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (p + 3) // 8, p)
    if (x * x - x2) % p:
        x = x * ED25519_SQRT_M1 % p
    if (x * x - x2) % p:
        return None
    return p - x if x & 1 != sign else x


def _ed_encode(P):
    """A point's 32 bytes: y, and x's low bit in the top bit (RFC 8032 5.1.2)."""
    zinv = pow(P[2], -1, ED25519_P)
    x, y = P[0] * zinv % ED25519_P, P[1] * zinv % ED25519_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _ed_decode(data):
    """The point of 32 bytes (RFC 8032 5.1.3), or None."""
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _ed_recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % ED25519_P)


def _ed_hash(*parts):
    """SHA-512 of the parts as an integer mod L (RFC 8032 5.1.6 steps 2 and 4)."""
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little") % ED25519_L


_ED_BASE_Y = 4 * pow(5, -1, ED25519_P) % ED25519_P
ED25519_BASE = (_ed_recover_x(_ED_BASE_Y, 0), _ED_BASE_Y, 1, _ed_recover_x(_ED_BASE_Y, 0) * _ED_BASE_Y % ED25519_P)


class Ed25519PublicKey:
    """An Ed25519 public key (its 32 bytes): verifies ed25519-sha256 (RFC 8463 3: Ed25519 of the SHA-256 digest)."""

    kind = "ed25519"
    algorithm = "ed25519-sha256"
    bits = 256

    def __init__(self, data):
        self.data = bytes(data)
        self.point = _ed_decode(self.data)
        if self.point is None:
            raise DKIMKeyError("Ed25519 public key that is no point of the curve")

    def verify(self, data, signature):
        """Whether signature is this key's signature of data's SHA-256 digest (RFC 8032 5.1.7)."""
        if len(signature) != ED25519_SIGNATURE_SIZE:
            return False
        R, s = _ed_decode(signature[:32]), int.from_bytes(signature[32:], "little")
        if R is None or s >= ED25519_L:
            return False
        k = _ed_hash(signature[:32], self.data, hashlib.sha256(data).digest())
        left, right = _ed_base_multiply(s), _ed_add(R, _ed_multiply(k, self.point))
        p = ED25519_P
        return (left[0] * right[2] - right[0] * left[2]) % p == 0 and (left[1] * right[2] - right[1] * left[2]) % p == 0

    def record(self):
        """The DKIM key record's text (RFC 8463 4)."""
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(self.data).decode("ascii")


class Ed25519PrivateKey:
    """An Ed25519 private key: its 32-byte secret (RFC 8032 5.1.5)."""

    kind = "ed25519"
    algorithm = "ed25519-sha256"
    bits = 256

    def __init__(self, secret):
        digest = hashlib.sha512(secret).digest()
        self.secret = bytes(secret)
        self.scalar = int.from_bytes(digest[:32], "little") & ((1 << 254) - 8) | 1 << 254
        self.prefix = digest[32:]
        self.public = Ed25519PublicKey(_ed_encode(_ed_base_multiply(self.scalar)))

    def sign(self, data):
        """The Ed25519 signature of data's SHA-256 digest (RFC 8032 5.1.6, RFC 8463 3)."""
        message = hashlib.sha256(data).digest()
        r = _ed_hash(self.prefix, message)
        R = _ed_encode(_ed_base_multiply(r))
        s = (r + _ed_hash(R, self.public.data, message) * self.scalar) % ED25519_L
        return R + s.to_bytes(32, "little")

    def private_pem(self):
        """The key as a PKCS#8 PEM file (RFC 8410 7)."""
        algorithm = der(DER_SEQUENCE, der(DER_OID, OID_ED25519))
        private = der(DER_OCTET_STRING, der(DER_OCTET_STRING, self.secret))
        return pem_encode("PRIVATE KEY", der(DER_SEQUENCE, der_int(0) + algorithm + private))


def generate_ed25519_key():
    """A new Ed25519 key: 32 random bytes (RFC 8032 5.1.5)."""
    return Ed25519PrivateKey(secrets.token_bytes(ED25519_KEY_SIZE))


# --------------------------------------------------------------------------
# Canonicalization (RFC 6376 3.4)
# --------------------------------------------------------------------------
# One canonicalizer serves signing and verifying.  A header field is the
# bytes of its lines, CRLFs and folding included; a body is fed in chunks
# of any size (a message may be large), and only its SHA-256 is kept.

DKIM_WSP_RUN = re.compile(rb"[ \t]+")
DKIM_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
DKIM_MAX_HEADER = 1024 * 1024        # bytes of a header block we sign or verify
DKIM_BODY_CARRY = 64 * 1024          # bytes of a line without its end held back, at most


def canonical_header(field, relaxed):
    """A header field as it is hashed: simple keeps it (RFC 6376 3.4.1); relaxed lowers its name,
    unfolds it, makes each run of WSP one space and drops it around the colon and at the end (3.4.2)."""
    if not relaxed:
        return field
    name, _, value = field.partition(b":")
    value = DKIM_WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


class BodyHash:
    """The SHA-256 of a canonicalized body (RFC 6376 3.4.3 simple, 3.4.4 relaxed), fed in chunks.

    Empty lines at the end are not hashed (both); relaxed also drops WSP
    at line ends and makes each run of it one space.  Empty lines are
    counted, not kept, until a line with text follows them, so memory is
    bounded however many there are; so is a line without its end (its
    safe start is hashed once it is long).  limit: hash only this many
    canonical octets (the l= tag, 3.5); length counts all of them.
    """

    def __init__(self, relaxed, limit=None):
        self.relaxed, self.limit = relaxed, limit
        self.sha = hashlib.sha256()
        self.carry = b""             # the last line, while its end has not come
        self.blank = 0               # empty lines seen and not yet hashed
        self.length = 0              # canonical octets so far, hashed or not
        self.empty = True            # no text at all yet: the whole body is empty lines, or nothing
        self.open = False            # the start of the last line, text, is hashed already

    def update(self, data):
        data = self.carry + data
        whole = data.rfind(b"\r\n") + 2
        if whole < 2:
            self.carry = data
            if len(data) > DKIM_BODY_CARRY:
                self._part_line()
            return
        self.carry = data[whole:]
        block = data[:whole]
        if self.relaxed:
            block = DKIM_WSP_BEFORE_CRLF.sub(b"\r\n", DKIM_WSP_RUN.sub(b" ", block))
        tail = block[len(block.rstrip(b"\r\n")):]   # the last text line's end, then the empty lines
        broken = max(tail.rfind(b"\n\n"), tail.rfind(b"\r\r"))   # a bare CR or LF ends the text before it
        pairs = (len(tail) - broken - 1) // 2
        text_end = len(block) - 2 * pairs
        if text_end or self.open:
            self._emit(b"\r\n" * self.blank + block[:text_end] + b"\r\n")
            self.blank, self.open = pairs - 1, False
        else:
            self.blank += pairs

    def _part_line(self):
        """Hash the start of a long line still without its end, up to its last character that no
        later byte can change (not WSP, not CR)."""
        keep = len(self.carry.rstrip(b" \t\r"))
        if keep:
            part = self.carry[:keep]
            self.carry = self.carry[keep:]
            self._emit(b"\r\n" * self.blank + (DKIM_WSP_RUN.sub(b" ", part) if self.relaxed else part))
            self.blank, self.open = 0, True

    def _emit(self, data):
        """Hash canonical octets, up to the limit."""
        self.empty = False
        if self.limit is not None and self.length + len(data) > self.limit:
            self.sha.update(data[:max(0, self.limit - self.length)])
        else:
            self.sha.update(data)
        self.length += len(data)

    def digest(self):
        """The body hash (call once, after the last chunk): a body not ending in CRLF gets one, and
        an empty body is one CRLF in simple, nothing in relaxed."""
        if self.carry:
            self.update(b"\r\n")
        if self.empty and not self.relaxed:
            self._emit(b"\r\n")
        return self.sha.digest()


def header_fields(header):
    """The fields of a header block (bytes, CRLF lines, without the empty line after it), each with
    its folded lines and its CRLF (RFC 5322 2.2.3)."""
    if header and not header.endswith(b"\r\n"):
        header += b"\r\n"
    fields = []
    for line in header.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def field_name(field):
    """A field's name in lower case, as bytes."""
    return field.partition(b":")[0].strip(b" \t").lower()


def split_message(chunks):
    """(header block, the body's chunks) of a message given in chunks (CRLF lines).

    The header block ends at the first empty line (RFC 5322 2.1); a message
    with none is all header.  DKIMError if it is longer than DKIM_MAX_HEADER.
    """
    chunks, data = iter(chunks), b""
    for chunk in chunks:
        data += chunk
        end = 0 if data.startswith(b"\r\n") else data.find(b"\r\n\r\n") + 2
        if end == 1 and len(data) <= DKIM_MAX_HEADER:
            continue
        if end == 1 or end > DKIM_MAX_HEADER:
            raise DKIMError("header block longer than %d bytes" % DKIM_MAX_HEADER)
        return data[:end], itertools.chain([data[end + 2:]], chunks)
    return data, iter(())


# --------------------------------------------------------------------------
# The DKIM-Signature field and key records (RFC 6376 3.2, 3.5, 3.6.1)
# --------------------------------------------------------------------------

DKIM_FIELD = b"DKIM-Signature"
DKIM_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")          # RFC 6376 3.2 tag-name
DKIM_TAG_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]*(?:[ \t]+[\x21-\x3a\x3c-\x7e]+)*\Z")   # 3.2 tag-value, unfolded
DKIM_FWS = re.compile(r"[ \t\r\n]+")
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")               # RFC 8301 3.1, RFC 8463 3
DKIM_KEY_KINDS = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}
DKIM_CANONICALIZATIONS = ("simple", "relaxed")
DKIM_REQUIRED_TAGS = ("v", "a", "b", "bh", "d", "h", "s")         # RFC 6376 3.5
DKIM_CLOCK_SKEW = 300                # seconds a t= may lie ahead of our clock
DKIM_MAX_SIGNATURES = 5              # signatures verified per message; the others are ignored
DKIM_SIGNED = (b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"message-id", b"in-reply-to",
               b"references", b"mime-version", b"content-type", b"content-transfer-encoding")
DKIM_OVERSIGNED = (b"from", b"to", b"cc", b"subject", b"date", b"message-id")   # once more: none can be added
DKIM_FOLD = 72                       # characters of a signature line before it is folded
DKIM_DOMAIN = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\.)*[A-Za-z0-9_-]+\Z")


def parse_tag_list(text):
    """A tag=value list (RFC 6376 3.2) as a dict, whitespace around names and values removed.

    A tag twice, a bad name or a bad value is a DKIMError.
    """
    tags = {}
    parts = DKIM_FWS.sub(" ", text).split(";")
    if parts[-1].strip() == "":
        parts.pop()                  # a ";" may end the list
    for part in parts:
        name, equals, value = part.partition("=")
        name, value = name.strip(" "), value.strip(" ")
        if not equals or not DKIM_TAG_NAME.match(name) or not DKIM_TAG_VALUE.match(value):
            raise DKIMError("malformed tag %r" % part.strip()[:40])
        if name in tags:
            raise DKIMError("tag %s twice" % name)
        tags[name] = value
    return tags


def _dkim_base64(value, tag):
    """The bytes of a base64 tag value, whitespace inside it ignored (RFC 6376 2.4)."""
    text = value.replace(" ", "")
    if not BASE64_TEXT.match(text) or len(text) % 4:
        raise DKIMError("%s= is not base64" % tag)
    return base64.b64decode(text)


def _dkim_number(value, tag):
    """A t=, x= or l= value: up to 12 digits (RFC 6376 3.5 allows no more than 76 bits of them)."""
    if not value.isdigit() or not value.isascii() or len(value) > 12:
        raise DKIMError("%s= is not a number" % tag)
    return int(value)


class DKIMSignature:
    """A DKIM-Signature field, its tags checked as RFC 6376 3.5 and 6.1.1 say; DKIMError if they break it.

    now: the time t= and x= are checked against (None: they are not).
    """

    def __init__(self, field, now=None):
        self.field = field
        self.tags = tags = parse_tag_list(field.partition(b":")[2].decode("ascii", "replace"))
        self.domain, self.selector = tags.get("d", ""), tags.get("s", "")
        self.b_text = DKIM_FWS.sub("", tags.get("b", ""))
        missing = [name for name in DKIM_REQUIRED_TAGS if name not in tags]
        if missing:
            raise DKIMError("no %s= tag" % missing[0])
        if tags["v"] != "1":
            raise DKIMError("version v=%s" % tags["v"])
        self.algorithm = tags["a"].lower()
        if self.algorithm == "rsa-sha1":
            raise DKIMError("rsa-sha1 is not accepted (RFC 8301)")
        if self.algorithm not in DKIM_ALGORITHMS:
            raise DKIMError("unknown algorithm %s" % tags["a"][:20])
        self.signature, self.body_hash = _dkim_base64(tags["b"], "b"), _dkim_base64(tags["bh"], "bh")
        self._check_names()
        self._check_canonicalization(tags.get("c", "simple"))
        if now is not None:
            self._check_times(now)
        self.length = _dkim_number(tags["l"], "l") if "l" in tags else None
        if "dns/txt" not in [method.strip(" ").lower() for method in tags.get("q", "dns/txt").split(":")]:
            raise DKIMError("no q=dns/txt")

    def _check_names(self):
        """d=, s=, i= and h= (RFC 6376 3.5; From must be signed, 5.4)."""
        tags = self.tags
        if not DKIM_DOMAIN.match(self.domain) or not DKIM_DOMAIN.match(self.selector):
            raise DKIMError("malformed d= or s=")
        self.identity = tags.get("i", "@" + self.domain)
        local, at, identity_domain = self.identity.rpartition("@")
        self.identity_domain = identity_domain.lower()
        domain = self.domain.lower()
        if not at or not (self.identity_domain == domain or self.identity_domain.endswith("." + domain)):
            raise DKIMError("i= not in the domain of d=")
        self.signed = [name.strip(" ").lower().encode("ascii") for name in tags["h"].split(":")]
        if not all(HEADER_LINE.match(name + b":") for name in self.signed):
            raise DKIMError("malformed h=")
        if b"from" not in self.signed:
            raise DKIMError("From is not signed")

    def _check_canonicalization(self, text):
        """c=: header/body, each simple or relaxed; the body's defaults to simple (RFC 6376 3.5)."""
        header, _, body = text.lower().partition("/")
        body = body or "simple"
        if header not in DKIM_CANONICALIZATIONS or body not in DKIM_CANONICALIZATIONS:
            raise DKIMError("unknown canonicalization %s" % text[:30])
        self.relaxed_header, self.relaxed_body = header == "relaxed", body == "relaxed"

    def _check_times(self, now):
        """t= not in the future, x= not in the past and not before t= (RFC 6376 3.5)."""
        tags = self.tags
        timestamp = _dkim_number(tags["t"], "t") if "t" in tags else None
        expires = _dkim_number(tags["x"], "x") if "x" in tags else None
        if timestamp is not None and timestamp > now + DKIM_CLOCK_SKEW:
            raise DKIMError("t= is in the future")
        if expires is not None and timestamp is not None and expires < timestamp:
            raise DKIMError("x= is before t=")
        if expires is not None and expires < now:
            raise DKIMError("signature expired")

    def signed_data(self, fields):
        """What the signature covers (RFC 6376 3.7): the h= fields canonicalized, each instance taken
        from the bottom up and a missing one as nothing (5.4.2), then this field with b= empty."""
        by_name = {}
        for field in fields:
            by_name.setdefault(field_name(field), []).append(field)
        data = []
        for name in self.signed:
            instances = by_name.get(name)
            if instances:
                data.append(canonical_header(instances.pop(), self.relaxed_header))
        data.append(canonical_header(without_b_value(self.field), self.relaxed_header)[:-2])
        return b"".join(data)


def without_b_value(field):
    """The field with the value of its b= tag deleted (RFC 6376 3.5 b=, 3.7), all else kept byte for byte."""
    match = re.search(rb"(?:^|;)[ \t\r\n]*b[ \t\r\n]*=", field.partition(b":")[2])
    if match is None:
        return field
    start = len(field.partition(b":")[0]) + 1 + match.end()
    stop = field.find(b";", start)
    stop = len(field) - 2 if stop < 0 else stop     # to the end, less the field's CRLF
    return field[:start] + field[stop:]


class DKIMKeyRecord:
    """A key record (RFC 6376 3.6.1): the key, and what it may be used for; DKIMError if it is malformed."""

    def __init__(self, text):
        tags = parse_tag_list(text)
        if "v" in tags and (tags["v"] != "DKIM1" or next(iter(tags)) != "v"):
            raise DKIMError("key record v= is not DKIM1 first")
        self.kind = tags.get("k", "rsa").lower()
        self.hashes = [name.strip(" ").lower() for name in tags.get("h", "sha256").split(":")]
        self.services = [name.strip(" ").lower() for name in tags.get("s", "*").split(":")]
        self.flags = [name.strip(" ").lower() for name in tags.get("t", "").split(":")]
        if "p" not in tags:
            raise DKIMError("key record without p=")
        self.revoked = tags["p"] == ""
        self.data = _dkim_base64(tags["p"], "p") if not self.revoked else b""

    def key_for(self, signature):
        """The public key, if this record may verify signature; else DKIMError (RFC 6376 6.1.2, RFC 8301)."""
        if self.revoked:
            raise DKIMError("key revoked")
        if self.kind != DKIM_KEY_KINDS[signature.algorithm]:
            raise DKIMError("key of kind k=%s for a=%s" % (self.kind, signature.algorithm))
        if "sha256" not in self.hashes:
            raise DKIMError("key record h= without sha256")
        if "*" not in self.services and "email" not in self.services:
            raise DKIMError("key not for email (s=)")
        if "s" in self.flags and signature.identity_domain != signature.domain.lower():
            raise DKIMError("key with t=s for a subdomain i=")
        try:
            key = public_key_from_record(self.kind, self.data)
        except DKIMKeyError as error:
            raise DKIMError("key unusable: %s" % error) from None
        if key.kind == "rsa" and not DKIM_MIN_VERIFYING_BITS <= key.bits <= DKIM_MAX_VERIFYING_BITS:
            raise DKIMError("RSA key of %d bits" % key.bits)
        return key


# --------------------------------------------------------------------------
# Signing (RFC 6376 5) and verifying (RFC 6376 6)
# --------------------------------------------------------------------------

DKIMResult = collections.namedtuple("DKIMResult", "result reason domain selector b")
DKIMResult.__doc__ = """One signature's outcome: result is pass, fail, neutral, temperror or permerror
(RFC 8601 2.7.1); reason says why in a few words; b is the signature's b= text."""


def _dkim_fold(tags):
    """A DKIM-Signature field of tags [(name, value)], folded before a tag or inside h= and b=
    (where FWS is allowed) so no line is longer than DKIM_FOLD."""
    lines, line = [], "DKIM-Signature:"
    for name, value in tags:
        if name == "h":
            pieces = ["h="] + [piece + ":" for piece in value.split(":")]
            pieces[-1] = pieces[-1][:-1]
        elif name == "b":
            pieces = ["b="] + [value[i:i + DKIM_FOLD - 8] for i in range(0, len(value), DKIM_FOLD - 8)]
        else:
            pieces = [name + "=" + value]
        if name != "b":
            pieces[-1] += ";"
        line += " "
        for piece in pieces:
            if len(line) + len(piece) > DKIM_FOLD and line.strip():
                lines.append(line.rstrip(" "))
                line = " "
            line += piece
    lines.append(line)
    return "\r\n".join(lines).encode("ascii")


def dkim_sign(chunks, domain, keys, now=None):
    """The DKIM-Signature fields (bytes, CRLF lines) that sign a message given in chunks with
    each (selector, key) of keys for domain (CONTRACT.md section 9): c=relaxed/relaxed, the
    DKIM_SIGNED fields it has and all of DKIM_OVERSIGNED once more (RFC 6376 8.15), t=, no l=.

    Each signature is verified before it is returned; DKIMError if one fails.
    """
    now = int(time.time() if now is None else now)
    header, body = split_message(chunks)
    hasher = BodyHash(relaxed=True)
    for chunk in body:
        hasher.update(chunk)
    body_hash = base64.b64encode(hasher.digest()).decode("ascii")
    fields = header_fields(header)
    present = {field_name(field) for field in fields}
    signed = [name.decode("ascii") for name in DKIM_SIGNED if name in present] + \
        [name.decode("ascii") for name in DKIM_OVERSIGNED]       # absent or not: none can be added
    made = []
    for selector, key in keys:
        tags = [("v", "1"), ("a", key.algorithm), ("c", "relaxed/relaxed"), ("d", domain), ("s", selector),
                ("t", str(now)), ("h", ":".join(signed)), ("bh", body_hash)]
        unsigned = _dkim_fold(tags + [("b", "")]) + b"\r\n"
        signature = DKIMSignature(unsigned, now)       # the same code reads it as a verifier will
        value = base64.b64encode(key.sign(signature.signed_data(fields))).decode("ascii")
        field = _dkim_fold(tags + [("b", value)]) + b"\r\n"
        check = DKIMSignature(field, now)
        if not key.public.verify(check.signed_data(fields), check.signature):
            raise DKIMError("signature with %s failed its check" % selector)
        made.append(field)
    return b"".join(made)


def dkim_verify(header, body, lookup_txt, now=None, limit=DKIM_MAX_SIGNATURES):
    """One DKIMResult for each of the first limit DKIM-Signature fields of a message, top down.

    header: its header block (bytes, CRLF lines); body: its body as an
    iterable of chunks (bytes), read once; lookup_txt(name): the TXT texts
    of name, or DNSError (RFC 6376 6).
    """
    now = int(time.time() if now is None else now)
    fields = header_fields(header)
    signatures = []
    for field in [field for field in fields if field_name(field) == b"dkim-signature"][:limit]:
        try:
            signatures.append(DKIMSignature(field, now))
        except DKIMError as error:
            signatures.append(_dkim_unparsed(field, error))
    hashers = {}
    for signature in signatures:
        if isinstance(signature, DKIMSignature):
            hashers.setdefault((signature.relaxed_body, signature.length), BodyHash(signature.relaxed_body,
                                                                                    signature.length))
    for chunk in [body] if isinstance(body, bytes) else body:
        for hasher in hashers.values():
            hasher.update(chunk)
    digests = {key: (hasher.digest(), hasher.length) for key, hasher in hashers.items()}
    return [signature if isinstance(signature, DKIMResult)
            else _dkim_check(signature, fields, digests[(signature.relaxed_body, signature.length)], lookup_txt)
            for signature in signatures]


def _dkim_unparsed(field, error):
    """The permerror of a signature whose tags break the RFC, with what d=, s= and b= could be read."""
    try:
        tags = parse_tag_list(field.partition(b":")[2].decode("ascii", "replace"))
    except DKIMError:
        tags = {}
    return DKIMResult("permerror", str(error), tags.get("d", ""), tags.get("s", ""),
                      DKIM_FWS.sub("", tags.get("b", "")))


def _dkim_check(signature, fields, body, lookup_txt):
    """The DKIMResult of one well-formed signature: its key from DNS (6.1.2), then the body hash
    and the signature itself (6.1.3)."""
    def result(outcome, reason):
        return DKIMResult(outcome, reason, signature.domain, signature.selector, signature.b_text)

    try:
        key = dkim_public_key(signature, lookup_txt)
    except DNSError as error:
        return result("temperror" if error.temporary else "permerror",
                      "key lookup: %s" % error.reason if error.temporary else "no key for the signature")
    except DKIMError as error:
        return result("permerror", str(error))
    digest, length = body
    if signature.length is not None and signature.length > length:
        return result("permerror", "l= longer than the body")
    if digest != signature.body_hash:
        return result("fail", "body hash did not verify")
    if not key.verify(signature.signed_data(fields), signature.signature):
        return result("fail", "signature did not verify")
    return result("pass", "good signature")


def dkim_public_key(signature, lookup_txt):
    """The public key of selector._domainkey.domain for signature: the first TXT record that is a
    key record (RFC 6376 3.6.2.2); DKIMError if none is, or it may not verify signature."""
    records = lookup_txt("%s._domainkey.%s" % (signature.selector, signature.domain))
    errors = []
    for text in records:
        try:
            return DKIMKeyRecord(text).key_for(signature)
        except DKIMError as error:
            errors.append(error)
    raise errors[0] if errors else DKIMError("no key for the signature")


# --------------------------------------------------------------------------
# The signing keys of a mail root
# --------------------------------------------------------------------------
# ROOT/.dkim/DOMAIN/SELECTOR.pem, one file per key (CONTRACT.md section 9).
# A domain's keys are read again when its folder or one of its files
# changes, so a key is rotated without a restart: add SELECTOR2.pem,
# publish its record, and remove the old file once its record has gone.
# Key files are opened like mailboxes: no symlink, regular files only.

def dkim_domain_folder(root, domain):
    """ROOT/.dkim/DOMAIN for a domain in any case or Unicode; None for anything but a host name
    (so no "/", "..", or absolute path can lead outside the folder)."""
    try:
        name = _dns_normalize(domain)
    except DNSError:
        return None
    return os.path.join(root, DKIM_KEY_FOLDER, name) if DKIM_DOMAIN.match(name) else None


def read_key_file(path):
    """The private key in a key file; DKIMKeyError (with the path) if it cannot be used for signing."""
    try:
        fd, _ = open_regular(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as file:
            data = file.read(DKIM_MAX_KEY_FILE + 1)
    except OSError as error:
        raise DKIMKeyError("%s: %s" % (path, error.strerror or error)) from None
    try:
        if len(data) > DKIM_MAX_KEY_FILE:
            raise DKIMKeyError("larger than any key")
        key = read_private_key(data.decode("ascii", "replace"))
        if key.kind == "rsa" and key.bits < DKIM_MIN_SIGNING_BITS:
            raise DKIMKeyError("RSA key of %d bits: we sign with %d or more" % (key.bits, DKIM_MIN_SIGNING_BITS))
    except DKIMKeyError as error:
        raise DKIMKeyError("%s: %s" % (path, error)) from None
    return key


class DKIMKeys:
    """The signing keys of ROOT/.dkim/, per domain, read again when they change on disk."""

    def __init__(self, root):
        self.root = root
        self.lock = threading.Lock()
        self.read = {}               # folder -> (stamp, [(selector, key)] or the DKIMKeyError)

    def present(self):
        """Whether the root has a key folder at all (one stat: what unsigned mail pays)."""
        return os.path.isdir(os.path.join(self.root, DKIM_KEY_FOLDER))

    def signatures(self, domain, chunks):
        """The DKIM-Signature fields (bytes) that sign a message, given in chunks, with each key of
        domain; b"" when it has none.  DKIMError if a key cannot be used or a signature fails."""
        keys = self.keys_for(domain)
        return dkim_sign(chunks, _dns_normalize(domain), keys) if keys else b""

    def keys_for(self, domain):
        """[(selector, key)] of a domain, sorted by selector ([] without a folder); DKIMKeyError if one is unusable."""
        folder = dkim_domain_folder(self.root, domain)
        stamp = folder and self._stamp(folder)
        if not stamp:
            return []
        with self.lock:
            known = self.read.get(folder)
        if known is None or known[0] != stamp:
            known = (stamp, self._read(folder, stamp[1]))
            with self.lock:
                self.read[folder] = known
        if isinstance(known[1], DKIMKeyError):
            raise known[1]
        return known[1]

    @staticmethod
    def _stamp(folder):
        """What a change in the folder changes: its own stamp and its key files' names and stamps."""
        folder_stamp = file_stamp(folder)
        if folder_stamp is None:
            return None
        try:
            names = sorted(name for name in os.listdir(folder) if dkim_selector(name))
        except OSError:
            names = []
        return folder_stamp, tuple((name, file_stamp(os.path.join(folder, name))) for name in names)

    @staticmethod
    def _read(folder, files):
        """The keys of the files (or the first file's DKIMKeyError), logged once per change."""
        try:
            keys = [(dkim_selector(name), read_key_file(os.path.join(folder, name))) for name, _ in files]
        except DKIMKeyError as error:
            log.error("DKIM key unusable, mail from %s is refused until it is fixed: %s",
                      os.path.basename(folder), error)
            return error
        log.info("DKIM keys of %s: %s", os.path.basename(folder),
                 ", ".join("%s (%s)" % (selector, key.algorithm) for selector, key in keys) or "none")
        return keys


def dkim_selector(name):
    """The selector of a key file's name (SELECTOR.pem), or None for any other file."""
    selector = name[:-len(DKIM_KEY_SUFFIX)] if name.endswith(DKIM_KEY_SUFFIX) else ""
    return selector if DKIM_DOMAIN.match(selector) and not selector.startswith(".") else None


# ##########################################################################
#
#   PART 4: CHECKS ON MAIL THAT COMES IN: SPF, DMARC, AUTHENTICATION-RESULTS
#
#   With --local-domains, mail from a client that is neither logged in nor
#   in --relay-networks is checked (CONTRACT.md section 10): SPF of the
#   MAIL FROM domain at MAIL (RFC 7208), every DKIM signature and DMARC of
#   the From: domain after the data (RFC 6376, RFC 7489), and each stored
#   copy is told the results (RFC 8601, RFC 7208 9.1).  What the rest of
#   the file uses is small:
#     IncomingChecks(domain, resolver)      one per server: its name, its DNSCache
#     .spf(ip, sender, helo)                an SPFResult, once per transaction at MAIL
#     .message(spf, ip, helo, header, spool)  a CheckedMessage after the data, or Refused
#     checked_layout(layout, checked)       a stored copy told the results
#   Below them all is pure functions over lookup(name, type) (a DNSCache's
#   query with a deadline), so the rules read without sockets, each beside
#   its RFC section; DKIM is Part 3's dkim_verify.
#
# ##########################################################################

# --------------------------------------------------------------------------
# SPF: check_host() of RFC 7208
# --------------------------------------------------------------------------

SPF_MAX_TERMS = 10           # RFC 7208 4.6.4: include, a, mx, ptr, exists and redirect, all records together
SPF_MAX_VOID = 2             # RFC 7208 4.6.4: lookups answered with no record (NOERROR empty, or NXDOMAIN)
SPF_MAX_NAMES = 10           # RFC 7208 4.6.4: MX hosts of one mx (more: permerror), PTR names (more: ignored)
SPF_DEADLINE = 20.0          # seconds for one whole check (RFC 7208 4.6.4 allows a limit of 20 s or more)
SPF_MAX_NAME = 253           # RFC 7208 7.3: an expanded name longer than this loses labels on its left
SPF_MAX_EXPLANATION = 300    # characters of a domain's explanation put into our 550 reply
SPF_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}   # RFC 7208 4.6.2
SPF_VERSION = re.compile(r"v=spf1(?: |\Z)", re.IGNORECASE)           # RFC 7208 4.5: "v=spf1", then SP or end
SPF_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)\Z", re.DOTALL)   # RFC 7208 4.6.1: name "=" ...
SPF_MECHANISM = re.compile(r"([-+?~]?)([A-Za-z][A-Za-z0-9]*)(.*)\Z", re.DOTALL)
# RFC 7208 7.1: a macro-expand, or one macro-literal (visible ASCII but "%"); explain-string adds SP
SPF_MACRO_TOKEN = re.compile(r"%\{([slodiphcrtv])([0-9]*)(r?)([.+,/_=-]*)\}|%[%_-]|[!-$&-~]", re.IGNORECASE)
SPF_EXPLAIN_TOKEN = re.compile(SPF_MACRO_TOKEN.pattern + "| ", re.IGNORECASE)
SPF_EXPLAIN_ONLY = "crt"     # RFC 7208 7.2: macro letters allowed only in exp= text
# RFC 7208 7.1: domain-end = "." toplabel ["."], toplabel LDH with a letter or an inner "-"
SPF_DOMAIN_END = re.compile(r"(?:.*)\.(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\.?\Z",
                            re.DOTALL)
SPF_CIDR = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?\Z")            # RFC 7208 5.6: dual-cidr-length
SPF_CIDR_NUMBER = re.compile(r"0\Z|[1-9][0-9]{0,2}\Z")                # RFC 7208 5.6: no leading zero, 3 digits
SPF_MAX_PARTS = 128          # more parts than any name has (RFC 1035 2.3.4): a larger DIGIT keeps them all
SPF_IP4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                     r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\Z")   # RFC 7208 5.6: qnum, no leading 0
SPF_DEFAULT_EXPLANATION = "%{d} does not designate %{c} as permitted sender of %{s}"
SPF_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")   # RFC 7208 5


class SPFError(Exception):
    """Ends an SPF check early with temperror or permerror (result), saying why."""

    def __init__(self, result, why):
        super().__init__(why)
        self.result = result
        self.why = why


def spf_permerror(why, *args):
    """The SPFError of a record that cannot be evaluated (RFC 7208 2.6.7)."""
    return SPFError("permerror", why % args if args else why)


class SPFResult:
    """What an SPF check found: the result, the identity and domain checked, why, and a fail's explanation."""

    def __init__(self, result, identity, sender, domain, why, explanation=None):
        self.result = result         # none, neutral, pass, fail, softfail, temperror, permerror (RFC 7208 2.6)
        self.identity = identity     # "mailfrom", or "helo" for the null reverse-path (RFC 7208 2.4)
        self.sender = sender         # the <sender> checked: MAIL FROM, or postmaster@HELO
        self.domain = domain
        self.why = why               # the mechanism that matched, or the error
        self.explanation = explanation


class SPFRecord:
    """A parsed SPF record (RFC 7208 4.6): its directives, in order, and its redirect= and exp= targets."""

    def __init__(self, text):
        self.directives = []         # (qualifier, mechanism name, domain-spec or network, cidr4, cidr6, term)
        self.redirect = self.explanation = None
        for term in text[len("v=spf1"):].split(" "):   # RFC 7208 4.6.1: terms are separated by SP only
            if term:
                self._add(term)

    def _add(self, term):
        """Add one term; a term of no known form is a permerror, wherever it is (RFC 7208 4.6)."""
        modifier = SPF_MODIFIER.match(term)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                attribute = "redirect" if name == "redirect" else "explanation"
                if getattr(self, attribute) is not None:   # RFC 7208 6: each at most once
                    raise spf_permerror("%s= given twice", name)
                setattr(self, attribute, spf_domain_spec(value))
            else:                    # RFC 7208 6: an unknown modifier is ignored, but its syntax is checked
                spf_macro_string(value)
            return
        mechanism = SPF_MECHANISM.match(term)
        name = mechanism.group(2).lower() if mechanism else None
        if name not in SPF_MECHANISMS:
            raise spf_permerror("unknown mechanism %r", term)
        self.directives.append((mechanism.group(1) or "+", name) + spf_argument(name, mechanism.group(3))
                               + (term,))


def spf_argument(name, rest):
    """(target, cidr4, cidr6) of a mechanism from what follows its name (RFC 7208 5.1 to 5.7)."""
    if name == "all":
        if rest:
            raise spf_permerror("all takes no argument")
        return None, None, None
    if name in ("ip4", "ip6"):
        return spf_network(name, rest)
    cidr4 = cidr6 = None
    if name in ("a", "mx"):          # RFC 7208 5.3, 5.4: [":" domain-spec] [dual-cidr-length]
        cidr = SPF_CIDR.search(rest)
        cidr4, cidr6 = spf_prefix(cidr.group(1), 32), spf_prefix(cidr.group(2), 128)
        rest = rest[:cidr.start()]
    if not rest:
        if name in ("include", "exists"):
            raise spf_permerror("%s needs a domain", name)
        return None, cidr4, cidr6
    if not rest.startswith(":"):
        raise spf_permerror("%s: ':' expected before %r", name, rest)
    return spf_domain_spec(rest[1:]), cidr4, cidr6


def spf_prefix(digits, largest):
    """The length of a CIDR prefix (RFC 7208 5.6), None if absent; permerror if out of range."""
    if digits is None:
        return None
    if not SPF_CIDR_NUMBER.match(digits) or int(digits) > largest:
        raise spf_permerror("bad prefix length /%s", digits)
    return int(digits)


def spf_network(name, rest):
    """(network, prefix, None) of ip4:/ip6: (RFC 7208 5.6): an address, then an optional /length."""
    address, slash, digits = rest[1:].partition("/")
    if not rest.startswith(":"):
        raise spf_permerror("%s needs ':' and an address", name)
    prefix = spf_prefix(digits, 32 if name == "ip4" else 128) if slash else None
    try:
        if name == "ip4" and SPF_IP4.match(address):
            return ipaddress.IPv4Address(address), prefix, None
        if name == "ip6" and "%" not in address:
            return ipaddress.IPv6Address(address), prefix, None
    except ValueError:
        pass
    raise spf_permerror("%s: bad address %r", name, address)


def spf_macro_string(text, explain=False):
    """The tokens of a macro-string (RFC 7208 7.1), each a match; permerror if text is not one.

    c, r and t are only allowed in explanations (RFC 7208 7.2).
    """
    tokens, pos = [], 0
    pattern = SPF_EXPLAIN_TOKEN if explain else SPF_MACRO_TOKEN
    while pos < len(text):
        token = pattern.match(text, pos)
        if token is None:
            raise spf_permerror("bad macro or character at %r", text[pos:pos + 10])
        letter = token.group(1)
        if letter and not explain and letter.lower() in SPF_EXPLAIN_ONLY:
            raise spf_permerror("%%{%s} is only allowed in exp= text", letter)
        tokens.append(token)
        pos = token.end()
    return tokens


def spf_domain_spec(text):
    """A domain-spec, checked (RFC 7208 7.1): a macro-string ending in a macro or '.' toplabel."""
    tokens = spf_macro_string(text)
    if not tokens:
        raise spf_permerror("empty domain")
    last_macro = max((t.end() for t in tokens if t.group().startswith("%")), default=0)
    if last_macro != len(text) and not SPF_DOMAIN_END.match(text, last_macro):
        raise spf_permerror("%r does not end in a top-level label", text)
    return text


def spf_domain_is_valid(domain):
    """Whether a domain may be checked at all (RFC 7208 4.3): multi-label, each label 1 to 63 octets."""
    if domain.startswith("["):       # an address literal (RFC 5321 4.1.3) names no domain
        return False
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return len(labels) > 1 and all(0 < len(label) <= DNS_MAX_LABEL for label in labels) and domain.isascii()


def check_spf(lookup, ip, sender, helo, receiver, timeout=SPF_DEADLINE):
    """The SPF result for a client: of the MAIL FROM domain, or of the HELO name for <> (RFC 7208 2.3, 2.4).

    lookup(name, type) gives a record list ([] for none or NXDOMAIN) or
    raises DNSError; the whole check ends within timeout seconds (a lookup
    that may take long should have a deadline of its own: IncomingChecks').
    """
    identity = "mailfrom" if sender else "helo"
    if not sender:
        sender = "postmaster@" + helo
    local, _, domain = sender.rpartition("@")
    if not local:                    # RFC 7208 4.3: no local part, "postmaster" stands in
        sender = "postmaster@" + domain
    if not spf_domain_is_valid(domain):
        return SPFResult("none", identity, sender, domain, "no domain that SPF can check")
    check = SPFCheck(lookup, ip, sender, helo, receiver, time.monotonic() + timeout)
    try:
        result, where, why = check.check_host(domain.rstrip(".").lower())
    except SPFError as error:
        return SPFResult(error.result, identity, sender, domain, error.why)
    explanation = check.explanation(*where) if result == "fail" else None
    return SPFResult(result, identity, sender, domain, why, explanation)


class SPFCheck:
    """One evaluation of check_host() (RFC 7208 4): the client, the sender, and the counts of 4.6.4."""

    def __init__(self, lookup, ip, sender, helo, receiver, deadline):
        address = ipaddress.ip_address(ip)
        # RFC 7208 5: an IPv4-mapped IPv6 address is the IPv4 address it holds
        self.ip = getattr(address, "ipv4_mapped", None) or address
        self.address_type = "A" if self.ip.version == 4 else "AAAA"
        self.lookup, self.sender, self.helo, self.receiver = lookup, sender, helo, receiver
        self.deadline = deadline
        self.terms = 0               # DNS-querying terms evaluated so far
        self.voids = 0
        self._validated = None       # the client's validated names (RFC 7208 5.5), found once

    def check_host(self, domain):
        """(result, (domain, exp target) of the deciding record, why) for one domain (RFC 7208 4.4 to 4.7)."""
        record = self.record(domain)
        if record is None:
            return "none", None, "no SPF record"
        for qualifier, name, target, cidr4, cidr6, term in record.directives:
            if getattr(self, "match_" + name)(domain, target, cidr4, cidr6):
                return SPF_QUALIFIERS[qualifier], (domain, record.explanation), term
        if record.redirect is None:
            return "neutral", (domain, record.explanation), "default"   # RFC 7208 4.7; "default" as 9.1 says
        self.count_term()            # RFC 7208 6.1: the exp= of the redirecting record is not used
        result, where, why = self.check_host(self.target(record.redirect, domain))
        if result == "none":
            raise spf_permerror("redirect to a domain without an SPF record")
        return result, where, why

    def record(self, domain):
        """The one SPF record of domain, parsed, or None (RFC 7208 4.4, 4.5); permerror if several."""
        texts = [text for text in self.query(domain, "TXT") if SPF_VERSION.match(text)]
        if len(texts) > 1:
            raise spf_permerror("%d SPF records for %s", len(texts), domain)
        if not texts:
            return None
        if not texts[0].isascii():   # RFC 7208 3.1: a record is 7-bit ASCII (octets arrive as Latin-1)
            raise spf_permerror("SPF record of %s is not ASCII", domain)
        return SPFRecord(texts[0])

    def query(self, name, rtype, void_counts=True):
        """The records of a lookup; [] for NXDOMAIN or a name DNS cannot hold; temperror if DNS fails."""
        if time.monotonic() > self.deadline:
            raise SPFError("temperror", "SPF check took longer than %d s" % SPF_DEADLINE)
        labels = name.rstrip(".").split(".")
        if not all(0 < len(label) <= DNS_MAX_LABEL for label in labels):
            return []                # RFC 7208 4.3 and 4.8: a name DNS cannot hold has no records
        try:
            records = self.lookup(name, rtype)
        except DNSError as error:
            if error.temporary:
                raise SPFError("temperror", "DNS: %s" % error) from None
            records = []
        if not records and void_counts:
            self.voids += 1
            if self.voids > SPF_MAX_VOID:
                raise spf_permerror("more than %d void DNS lookups", SPF_MAX_VOID)
        return records

    def count_term(self):
        """Count a DNS-querying term (RFC 7208 4.6.4): the eleventh is a permerror."""
        self.terms += 1
        if self.terms > SPF_MAX_TERMS:
            raise spf_permerror("more than %d DNS-querying terms", SPF_MAX_TERMS)

    def target(self, spec, domain):
        """The <target-name> of a mechanism: its domain-spec expanded, or the current domain (RFC 7208 4.8)."""
        if spec is None:
            return domain
        name = self.expand(spec, domain)
        while len(name) > SPF_MAX_NAME and "." in name:   # RFC 7208 7.3: drop labels on the left
            name = name.partition(".")[2]
        return name.rstrip(".").lower()

    # -- the mechanisms (RFC 7208 5), each: does it match?

    def match_all(self, domain, target, cidr4, cidr6):
        return True                  # RFC 7208 5.1

    def match_include(self, domain, target, cidr4, cidr6):
        """RFC 7208 5.2: the other domain's pass matches; its errors are ours; no record there is a permerror."""
        self.count_term()
        result, _, why = self.check_host(self.target(target, domain))
        if result in ("temperror", "permerror"):
            raise SPFError(result, why)
        if result == "none":
            raise spf_permerror("include of a domain without an SPF record")
        return result == "pass"

    def match_a(self, domain, target, cidr4, cidr6):
        """RFC 7208 5.3: an address of the target name is the client's, in its network."""
        self.count_term()
        return self.in_addresses(self.query(self.target(target, domain), self.address_type), cidr4, cidr6)

    def match_mx(self, domain, target, cidr4, cidr6):
        """RFC 7208 5.4: an address of one of the target's mail exchangers (at most 10) is the client's."""
        self.count_term()
        hosts = [host for _, host in self.query(self.target(target, domain), "MX")]
        if len(hosts) > SPF_MAX_NAMES:
            raise spf_permerror("more than %d MX records", SPF_MAX_NAMES)
        return any(self.in_addresses(self.query(host, self.address_type), cidr4, cidr6)
                   for host in hosts if host)

    def match_ptr(self, domain, target, cidr4, cidr6):
        """RFC 7208 5.5: a validated name of the client is the target or ends in it."""
        self.count_term()
        name = self.target(target, domain)
        return any(valid == name or valid.endswith("." + name) for valid in self.validated_names())

    def match_ip4(self, domain, network, prefix, _):
        """RFC 7208 5.6: the client's address is in the network (of its own family)."""
        return self.in_network(network, prefix)

    match_ip6 = match_ip4

    def match_exists(self, domain, target, cidr4, cidr6):
        """RFC 7208 5.7: the target name has an A record (whatever the client's address family)."""
        self.count_term()
        return bool(self.query(self.target(target, domain), "A"))

    def in_addresses(self, addresses, cidr4, cidr6):
        """Whether the client is in the network of one of the addresses (cidr by its family)."""
        prefix = cidr4 if self.ip.version == 4 else cidr6
        return any(self.in_network(ipaddress.ip_address(address), prefix) for address in addresses)

    def in_network(self, address, prefix):
        """Whether the client's address is in address/prefix (the whole address without a prefix)."""
        if address.version != self.ip.version:
            return False
        network = ipaddress.ip_network((address, address.max_prefixlen if prefix is None else prefix),
                                       strict=False)
        return self.ip in network

    def validated_names(self):
        """The client's names whose addresses lead back to it (RFC 7208 5.5), the first 10 PTR names tried."""
        if self._validated is None:
            self._validated = [name.rstrip(".").lower()
                               for name in self.query_or_none(reverse_name(str(self.ip)), "PTR")[:SPF_MAX_NAMES]
                               if self.ip in map(ipaddress.ip_address, self.query_or_none(name, self.address_type))]
        return self._validated

    def query_or_none(self, name, rtype):
        """query(), with a DNS failure taken as no record: RFC 7208 5.5 skips a name whose lookup fails."""
        try:
            return self.query(name, rtype)
        except SPFError as error:
            if error.result != "temperror":
                raise
            return []

    # -- macros (RFC 7208 7) and explanations (RFC 7208 6.2)

    def expand(self, text, domain, explain=False):
        """A macro-string with its macros expanded (RFC 7208 7.3, 7.4)."""
        out = []
        for token in spf_macro_string(text, explain):
            piece, letter = token.group(), token.group(1)
            if letter:
                piece = self.macro(letter, token.group(2), token.group(3), token.group(4), domain)
            elif piece.startswith("%"):
                piece = {"%%": "%", "%_": " ", "%-": "%20"}[piece]
            out.append(piece)
        return "".join(out)

    def macro(self, letter, digits, reverse, delimiters, domain):
        """One macro's value, transformed (RFC 7208 7.3): split, reversed, right-hand parts kept, URL-escaped."""
        value = self.macro_value(letter.lower(), domain)
        if digits or reverse or delimiters:
            parts = re.split("[%s]" % re.escape(delimiters or "."), value)
            if reverse:
                parts.reverse()
            if digits:
                count = int(digits.lstrip("0")[:4] or "0")   # 4 digits at most: a record may hold 5000
                if count == 0:           # RFC 7208 7.3: a DIGIT transformer is nonzero
                    raise spf_permerror("macro keeps zero parts")
                parts = parts[-min(count, SPF_MAX_PARTS):]
            value = ".".join(parts)
        if letter.isupper():             # RFC 7208 7.3: upper case means URL-escaped (RFC 3986)
            value = urllib.parse.quote(value, safe="")
        return value

    def macro_value(self, letter, domain):
        """The value of a macro letter (RFC 7208 7.2)."""
        if letter == "s":
            return self.sender
        if letter in "lo":
            local, _, sender_domain = self.sender.rpartition("@")
            return local if letter == "l" else sender_domain
        if letter == "d":
            return domain
        if letter == "i":                # dotted nibbles for IPv6
            return str(self.ip) if self.ip.version == 4 else ".".join(self.ip.exploded.replace(":", ""))
        if letter == "p":
            return self.validated_name(domain)
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.receiver
        return str(int(time.time()))    # t

    def validated_name(self, domain):
        """%{p} (RFC 7208 7.3): the domain if validated, else a validated subdomain of it, else any, else 'unknown'."""
        names = self.validated_names()
        for wanted in (lambda name: name == domain, lambda name: name.endswith("." + domain), lambda name: True):
            for name in names:
                if wanted(name):
                    return name
        return "unknown"

    def explanation(self, domain, spec):
        """A fail's explanation (RFC 7208 6.2): the exp= TXT record expanded, else our default; safe to show."""
        text = None
        if spec is not None:
            try:
                texts = self.query(self.target(spec, domain), "TXT", void_counts=False)
                if len(texts) == 1 and texts[0].isascii():
                    text = self.expand(texts[0], domain, explain=True)
            except SPFError:             # RFC 7208 6.2: any trouble with exp= means no explanation
                text = None
        if text is None:
            text = self.expand(SPF_DEFAULT_EXPLANATION, domain, explain=True)
        return safe_text(text, SPF_MAX_EXPLANATION)


def safe_text(text, limit):
    """Text from outside fit for a reply or header line: printable ASCII only, at most limit characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


# --------------------------------------------------------------------------
# DMARC: the policy of the From: domain (RFC 7489)
# --------------------------------------------------------------------------

DMARC_PREFIX = "_dmarc."     # RFC 7489 6.1: the record is a TXT record at _dmarc.<domain>
DMARC_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|\Z)")   # RFC 7489 6.4: v=DMARC1 first, exactly
DMARC_MAX_LABELS = 8         # labels of the longest name the walk for an organizational domain asks for
DMARC_POLICIES = ("none", "quarantine", "reject")           # RFC 7489 6.3 p= and sp=


class DMARCRecord:
    """A DMARC policy record (RFC 7489 6.3): p, sp, adkim, aspf and pct; ValueError if it has no valid p=."""

    def __init__(self, text):
        tags = {}
        for part in text.split(";"):
            name, equals, value = part.partition("=")
            if equals:
                tags.setdefault(name.strip().lower(), value.strip())
        policy = tags.get("p", "").lower()
        if policy not in DMARC_POLICIES:      # RFC 7489 6.6.3 step 6: p=none if there is a rua=, else no record
            if not tags.get("rua"):
                raise ValueError("no valid p=")
            policy = "none"
        self.policy = policy
        subdomains = tags.get("sp", "").lower()
        self.subdomain_policy = subdomains if subdomains in DMARC_POLICIES else policy
        # RFC 7489 6.3: anything else that is not valid takes its default
        self.strict_dkim = tags.get("adkim", "r").lower() == "s"
        self.strict_spf = tags.get("aspf", "r").lower() == "s"
        pct = tags.get("pct", "100")
        self.percent = int(pct) if re.fullmatch("[0-9]{1,3}", pct) and int(pct) <= 100 else 100


def dmarc_record(lookup, domain):
    """The DMARC record published at domain, or None (RFC 7489 6.6.3: none, or more than one, is none)."""
    try:
        texts = [t for t in lookup(DMARC_PREFIX + domain, "TXT") if DMARC_VERSION.match(t)]
    except DNSError as error:
        if error.temporary:
            raise
        return None
    if len(texts) != 1:
        return None
    try:
        return DMARCRecord(texts[0])
    except ValueError:
        return None


def organizational_domain(lookup, domain):
    """(organizational domain, its record) of domain (CONTRACT.md section 10, for RFC 7489 3.2).

    Without a Public Suffix List: the shortest ancestor of two labels or
    more that publishes a DMARC record, else the domain itself (with no
    record).  One query per name, names of at most 8 labels.
    """
    labels = domain.split(".")
    for count in range(2, min(len(labels), DMARC_MAX_LABELS) + 1):
        candidate = ".".join(labels[-count:])
        record = dmarc_record(lookup, candidate)
        if record is not None:
            return candidate, record
    return domain, None


def dmarc_aligned(identifier, domain, organizational, strict):
    """Whether an authenticated domain is aligned with the From: domain (RFC 7489 3.1).

    Strict: the same domain.  Relaxed: the same organizational domain; as
    that is the shortest ancestor publishing a record, a name under it has
    it as its own organizational domain too, so no further query is needed.
    """
    identifier = identifier.lower().rstrip(".")
    if strict:
        return identifier == domain
    return identifier == organizational or identifier.endswith("." + organizational)


def check_dmarc(lookup, from_domain, spf, dkim):
    """(result, policy, why) of DMARC for the From: domain (RFC 7489 6.6): result none/pass/fail/temperror.

    policy is the action a failure asks for (p=, or sp= when the record
    is the organizational domain's and From: is a subdomain), "none" if
    pct= samples; spf: the SPFResult; dkim: the DKIMResults.
    """
    try:
        organizational, record = organizational_domain(lookup, from_domain)
        walked = len(from_domain.split(".")) <= DMARC_MAX_LABELS     # the walk asked the domain itself
        own = record if organizational == from_domain and walked else dmarc_record(lookup, from_domain)
    except DNSError as error:
        return "temperror", "none", "DNS: %s" % error
    if own is not None:
        record = own
    if record is None:
        return "none", "none", "no DMARC record"
    subdomain = own is None and organizational != from_domain
    policy = record.subdomain_policy if subdomain else record.policy
    passed = [d.domain for d in dkim if d.result == "pass"
              and dmarc_aligned(d.domain, from_domain, organizational, record.strict_dkim)]
    if passed:
        return "pass", policy, "DKIM of %s aligned" % passed[0]
    if spf is not None and spf.result == "pass" and dmarc_aligned(spf.domain, from_domain, organizational,
                                                                    record.strict_spf):
        return "pass", policy, "SPF of %s aligned" % spf.domain
    if record.percent < 100:         # RFC 7489 6.6.4: sampled; recorded only (CONTRACT.md section 10)
        policy = "none"
    return "fail", policy, "neither SPF nor DKIM aligned with %s" % from_domain


# --------------------------------------------------------------------------
# The checks of a transaction and its message, and what each stored copy is told
# --------------------------------------------------------------------------
# (RFC 8601 Authentication-Results, RFC 7208 9.1 Received-SPF)

INCOMING_DNS_TIMEOUT = 3.0   # seconds one DNS server gets for one try of a check's query
INCOMING_DNS_ATTEMPTS = 2    # tries per server: a silent server costs a query 6 s, the check's deadline bounds all
MESSAGE_CHECKS_DEADLINE = 20.0   # seconds DKIM and DMARC of one message may take, all queries together
AR_SIGNATURE_PREFIX = 8      # characters of b= in header.b, to tell two signatures of a domain apart (RFC 6008)
AR_TOKEN = re.compile(r"[!#-'*+.0-9A-Z^-~-]+\Z")   # RFC 2045 token (no tspecials): a value needs no quotes
AR_FIELD = b"authentication-results"
SPF_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")   # RFC 5322 3.2.3
SPF_COMMENTS = {             # Received-SPF's comment for each result (RFC 7208 9.1)
    "pass": "domain of {sender} designates {ip} as permitted sender",
    "fail": "domain of {sender} does not designate {ip} as permitted sender",
    "softfail": "domain of transitioning {sender} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {sender}",
    "none": "domain of {sender} does not designate permitted sender hosts",
    "temperror": "error in processing during lookup of {sender}: {why}",
    "permerror": "permanent error in processing domain of {sender}: {why}",
}


class CheckedMessage:
    """The checks' outcome for one message: the fields each stored copy starts with, the forged ones it loses."""

    def __init__(self, fields, forged):
        self.fields = fields         # bytes: Authentication-Results and Received-SPF, LF lines
        self.forged = forged         # [(start, end)] in the stored body: results claiming to be ours


class IncomingChecks:
    """SPF, DKIM and DMARC of mail from outside, for one server: its name (the authserv-id) and DNS cache."""

    def __init__(self, domain, resolver):
        self.domain = domain
        self.cache = DNSCache(resolver)

    def spf(self, ip, sender, helo):
        """The SPFResult of a transaction, found once at MAIL (RFC 7208 2.4)."""
        lookup = functools.partial(self._lookup, deadline=time.monotonic() + SPF_DEADLINE)
        return check_spf(lookup, ip, sender, helo, self.domain)

    def message(self, spf, ip, helo, header, spool):
        """The CheckedMessage of a received message; Refused if From: is not one address or DMARC rejects it."""
        deadline = time.monotonic() + MESSAGE_CHECKS_DEADLINE
        lookup = functools.partial(self._lookup, deadline=deadline)
        author = single_author_domain(header)
        dkim = self.dkim(header, spool, lookup)
        dmarc, policy, why = check_dmarc(lookup, author, spf, dkim)
        log.info("checks of mail from %s: spf=%s (%s) dkim=%s dmarc=%s (%s, policy %s)", ip, spf.result,
                 spf.why, ",".join(d.result for d in dkim) or "none", dmarc, why, policy)
        if dmarc == "fail" and policy == "reject":     # RFC 7489 6.6.4, 7.3 (CONTRACT.md section 10)
            raise Refused(Replies.DMARC_REJECTED % author)
        fields = (authentication_results(self.domain, spf, dkim, dmarc, author)
                  + received_spf(spf, ip, helo, self.domain))
        return CheckedMessage(fields, forged_results(header, self.domain))

    def _lookup(self, name, rtype, deadline):
        """A cached DNS lookup within the message checks' deadline."""
        return self.cache.query(name, rtype, deadline)

    def dkim(self, header, spool, lookup):
        """The DKIMResult of each of the first signatures (RFC 6376 6); [] for a message without any."""
        if not any(name == b"dkim-signature" for name, _, _ in header.fields):
            return []
        try:
            head, body = split_message(outgoing_chunks(spool))
        except DKIMError as error:   # a header block too large to verify
            return [DKIMResult("permerror", str(error), "", "", "")]
        return dkim_verify(head, body, lambda name: lookup(name, "TXT"))   # the first 5 (Part 3)


def single_author_domain(header):
    """The domain of the message's one From: address; Refused for several or none (RFC 7489 6.6.1)."""
    fields = from_addresses(header)
    if len(fields) != 1 or len(fields[0]) != 1 or not fields[0][0].rpartition("@")[0]:
        raise Refused(Replies.NOT_ONE_AUTHOR)
    return fields[0][0].rpartition("@")[2].lower().rstrip(".")


def ar_value(text):
    """A value for a header field's property (RFC 8601 2.2, RFC 2045 5.1): a token, else a quoted-string."""
    text = safe_text(text, MAX_PATH)
    if AR_TOKEN.match(text):
        return text
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def authentication_results(authserv_id, spf, dkim, dmarc, author):
    """Our Authentication-Results field (RFC 8601 2.2), as stored: one method a line, one dkim= per signature."""
    methods = ["spf=%s smtp.mailfrom=%s" % (spf.result, ar_value(spf.domain))]
    for result in dkim:                # why it did not pass: a comment at the end (RFC 8601 2.2 allows CFWS)
        properties = (("header.d", result.domain), ("header.s", result.selector),
                      ("header.b", result.b[:AR_SIGNATURE_PREFIX]))
        why = "" if result.result == "pass" else " (%s)" % ar_comment(result.reason)
        methods.append("dkim=" + result.result + "".join(" %s=%s" % (name, ar_value(value))
                                                         for name, value in properties if value) + why)
    if not dkim:
        methods.append("dkim=none")
    methods.append("dmarc=%s header.from=%s" % (dmarc, ar_value(author)))
    return ("Authentication-Results: %s;\n\t%s\n" % (authserv_id, ";\n\t".join(methods))).encode("ascii")


def received_spf(spf, ip, helo, receiver):
    """The Received-SPF field (RFC 7208 9.1), as stored: the result, a comment, then key-value pairs."""
    comment = ar_comment(SPF_COMMENTS[spf.result].format(sender=spf.sender, ip=ip, why=spf.why))
    key = "mechanism" if spf.result not in ("temperror", "permerror", "none") else "problem"
    pairs = ["%s=%s" % (name, value if SPF_DOT_ATOM.match(value) else ar_quoted(value)) for name, value in (
        ("client-ip", ip), ("envelope-from", spf.sender), ("helo", helo), ("receiver", receiver),
        ("identity", spf.identity), (key, spf.why))]
    return ("Received-SPF: %s (%s: %s)\n\t%s;\n" % (spf.result, safe_text(receiver, MAX_PATH), comment,
                                                   ";\n\t".join(pairs))).encode("ascii")


def ar_comment(text):
    """Text from outside for a comment (RFC 5322 3.2.2): safe, and without parentheses or backslashes."""
    return safe_text(text, MAX_PATH).translate({ord(c): None for c in "()\\"})


def ar_quoted(text):
    """A quoted-string (RFC 5322 3.2.4) of text from outside, made safe."""
    return '"%s"' % safe_text(text, MAX_PATH).replace("\\", "\\\\").replace('"', '\\"')


def forged_results(header, authserv_id):
    """[(start, end)] of the Authentication-Results fields that name our authserv-id (RFC 8601 5): forged."""
    forged = []
    for start, end, field in header.kept_fields(AR_FIELD):
        value = field.partition(b":")[2].decode("utf-8", "replace").replace("\r", "").replace("\n", "")
        if authserv_id_of(value).lower().rstrip(".") == authserv_id.lower().rstrip("."):
            forged.append((start, end))
    return forged


def authserv_id_of(value):
    """The authserv-id of an Authentication-Results value (RFC 8601 2.2): its first word, comments skipped."""
    text = value
    while True:
        text = text.lstrip(" \t")
        if not text.startswith("("):
            break
        depth, index = 0, 0
        for index, char in enumerate(text):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        text = text[index + 1:]
    return re.split(r"[\s;(]", text, maxsplit=1)[0]


def checked_layout(layout, checked):
    """A stored layout told the checks: their fields first (our trace fields go before them, received_form),
    the forged results cut out of the body's ranges."""
    pieces = [checked.fields]
    for piece in layout:
        if isinstance(piece, tuple):
            start, end = piece
            for cut_start, cut_end in checked.forged:
                if start <= cut_start < end:
                    if start < cut_start:
                        pieces.append((start, cut_start))
                    start = cut_end
            pieces.append((start, end))
        else:
            pieces.append(piece)
    return pieces


# ##########################################################################
#
#   PART 5: FORWARDING THAT SPF ACCEPTS: THE SENDER REWRITING SCHEME
#
#   Mail that an alias forwards to another domain goes out from us, so the
#   original sender's SPF record would fail it there.  Its envelope sender
#   is rewritten to an address of --domain that only we can have made
#   (Shu et al., "Mail Forwarding with SRS", in the form of libsrs2):
#
#       SRS0=HHHH=TT=orig-domain=orig-local@<--domain>
#
#   TT is the day, HHHH an HMAC-SHA1 under a secret of the mail root over
#   TT, the domain and the local part.  A bounce to such an address goes
#   back to the sender it stands for; one with a wrong hash or older than
#   SRS_MAX_AGE days is refused, so nobody can use us to send elsewhere.
#   A sender that is itself SRS0 of another forwarder becomes SRS1 (the
#   paper's 4.2 and libsrs2's "guarded" scheme): the hop back goes to that
#   forwarder, not through every one.  What the rest of the file uses is
#   small:
#     SRS.of_root(root, domain)    one per server: --domain, the secret of ROOT/.srs-secret
#     .forward(sender)             the sender of a copy an alias forwards (take_message)
#     .reverse(address)            the sender an address of ours stands for, None, or SRSError
#                                  (a recipient at RCPT)
#     .original(address)           the same, the address itself if it is none (who hears of a
#                                  queued message: the queue's original_sender)
#
# ##########################################################################

SRS_SECRET_NAME = ".srs-secret"
SRS_SECRET_SIZE = 32         # random bytes made once (libsrs2 wants at least 16)
SRS_MIN_SECRET = 16          # bytes a secret file must hold
SRS_HASH_LENGTH = 4          # base64 characters of the HMAC kept (libsrs2's hashlength)
SRS_MAX_AGE = 21             # days a rewritten address is good for (libsrs2's maxage)
SRS_DAY = 86400              # seconds: the timestamp counts days
SRS_TIME_SLOTS = 1024        # two base32 characters: days modulo 1024
SRS_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"   # RFC 4648 6, as libsrs2 writes the timestamp
SRS_SEPARATORS = "=+-"       # what may follow SRS0/SRS1 (libsrs2 reads all three, writes "=")
SRS_TAG = re.compile(r"SRS([01])[=+-]", re.IGNORECASE)


class SRSError(Exception):
    """An SRS address of ours that is forged, expired or malformed: its mail is refused (550 5.1.1)."""


class SRS:
    """Rewrites the senders of forwarded mail to addresses of our domain, and back."""

    def __init__(self, secret, domain, clock=time.time):
        self.secret = secret
        self.domain = domain.lower().rstrip(".")
        self.clock = clock

    @classmethod
    def of_root(cls, root, domain):
        """The SRS of a mail root: its secret read from ROOT/.srs-secret, made (mode 0600) the first time."""
        return cls(read_or_make_secret(os.path.join(root, SRS_SECRET_NAME)), domain)

    def forward(self, sender):
        """The envelope sender of a copy we forward: SRS0 (or SRS1) of ours; <>, and our own, unchanged."""
        local, at, domain = sender.rpartition("@")
        if not at or not local or domain.startswith("[") or domain.lower().rstrip(".") == self.domain:
            return sender            # <>, a bare name, an address literal (no local part can hold one), ours
        tagged = SRS_TAG.match(local)
        if tagged and tagged.group(1) == "1":        # SRS1=HHHH=first-forwarder=rest: keep the first
            first, _, rest = local[len("SRS1="):].partition("=")[2].partition("=")
            return self._srs1(first, rest)
        if tagged:                                   # SRS0 of another forwarder: the way back is through it
            return self._srs1(domain, local[len("SRS0"):])
        stamp = self._stamp(self.clock())
        return "SRS0=%s=%s=%s=%s@%s" % (self._hash(stamp, domain, local), stamp, domain, local, self.domain)

    def original(self, address):
        """The sender an address stands for: reversed if it is a good SRS address of ours, else itself."""
        try:
            return self.reverse(address) or address
        except SRSError:
            return address

    def reverse(self, address):
        """The sender an SRS address of ours stands for; None if it is no SRS address of ours, SRSError if bad."""
        local, _, domain = address.rpartition("@")
        tagged = SRS_TAG.match(local)
        if not tagged or domain.lower().rstrip(".") != self.domain:
            return None
        fields = local[5:].split("=", 3 if tagged.group(1) == "0" else 2)
        if tagged.group(1) == "1":                   # SRS1=HHHH=forwarder=rest -> SRS0rest@forwarder
            if len(fields) != 3 or not fields[1] or not fields[2]:
                raise SRSError("malformed SRS1 address")
            self._check(fields[0], fields[1], fields[2])
            return "SRS0%s@%s" % (fields[2], fields[1])
        if len(fields) != 4 or not all(fields):
            raise SRSError("malformed SRS0 address")
        given, stamp, orig_domain, orig_local = fields
        if not self._fresh(stamp):
            raise SRSError("SRS address older than %d days" % SRS_MAX_AGE)
        self._check(given, stamp, orig_domain, orig_local)
        return "%s@%s" % (orig_local, orig_domain)

    def _srs1(self, first, rest):
        return "SRS1=%s=%s=%s@%s" % (self._hash(first, rest), first, rest, self.domain)

    def _hash(self, *parts):
        """HMAC-SHA1 of the parts in lower case, in base64, cut to SRS_HASH_LENGTH (libsrs2's srs_hash_create)."""
        data = "".join(parts).lower().encode("utf-8", "surrogateescape")
        digest = hmac.new(self.secret, data, hashlib.sha1).digest()
        return base64.b64encode(digest).decode("ascii")[:SRS_HASH_LENGTH]

    def _check(self, given, *parts):
        """SRSError unless given is the hash of the parts: compared in constant time, in any case."""
        expected = self._hash(*parts).lower().encode("ascii")
        if not hmac.compare_digest(given.lower().encode("utf-8", "surrogateescape"), expected):
            raise SRSError("SRS hash does not match")

    @staticmethod
    def _stamp(now):
        """Today as two base32 characters: days since the epoch, modulo 1024."""
        days = int(now // SRS_DAY)
        return SRS_BASE32[(days >> 5) & 31] + SRS_BASE32[days & 31]

    def _fresh(self, stamp):
        """Whether a timestamp is at most SRS_MAX_AGE days old (one 'in the future' wrapped round: too old)."""
        if len(stamp) != 2 or not all(c in SRS_BASE32 for c in stamp.upper()):
            return False
        then = SRS_BASE32.index(stamp[0].upper()) << 5 | SRS_BASE32.index(stamp[1].upper())
        today = int(self.clock() // SRS_DAY) % SRS_TIME_SLOTS
        return (today - then) % SRS_TIME_SLOTS <= SRS_MAX_AGE


def read_or_make_secret(path):
    """The SRS secret at path (bytes); the first time, SRS_SECRET_SIZE random bytes put there whole, mode 0600.

    Written under a name of its own and linked into place, so two servers
    starting at once on a root end with one secret, never half of one.
    """
    try:
        fd, _ = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        temp = "%s.%d.tmp" % (path, os.getpid())
        fd, _ = open_regular(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, base64.b64encode(secrets.token_bytes(SRS_SECRET_SIZE)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)          # never over a secret another server made meanwhile
            log.info("made the SRS secret %s", path)
        except FileExistsError:
            pass
        finally:
            remove_file(temp)
        fd, _ = open_regular(path, os.O_RDONLY)
    with open(fd, "rb") as f:
        secret = f.read(4096).strip()
    if len(secret) < SRS_MIN_SECRET:
        raise ValueError("%s holds fewer than %d bytes: not a secret" % (path, SRS_MIN_SECRET))
    return secret


if __name__ == "__main__":
    sys.exit(main())

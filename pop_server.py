#!/usr/bin/env python3
"""POP3 server of the course mail system: lets users read and delete the mail in their mailbox.

    python pop_server.py 1110 [--host ADDR] [--root DIR] [--timeout 600] ...

RFC 1939 with the RFC 2449 extensions TOP, UIDL, CAPA, RESP-CODES and
PIPELINING, and STLS (RFC 2595) given --tls-cert and --tls-key.  One thread serves each connection.  A session sees the mailbox
as it was at login; deletions are applied at QUIT by writing a new mailbox
beside the old one and renaming it over, under the lock the SMTP server
takes for every delivery, so mail that arrives during a session is kept.
"""

import argparse
import array
import hashlib
import hmac
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time

from mailserver_smtp import (FileLock, UserTable, configure_logging, create_listener, delivery_lock,
                             fsync_directory, is_valid_login, leave_signals_to_main_thread,
                             run_on_one_cpu, serve_until_signalled, tls_context, wait_until_idle)

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

DEFAULT_HOST = "0.0.0.0"
DEFAULT_TIMEOUT = 600            # RFC 1939 section 3: autologout at least 10 minutes
DEFAULT_MAX_CONNECTIONS = 100

SESSION_LOCK_NAME = ".my_mailbox.pop.lock"   # held by the one POP3 session of a user
SIDECAR_NAME = ".my_mailbox.index"           # unique ids and index cache, written by POP3 only
NEW_SIDECAR_NAME = ".my_mailbox.index.new"
NEW_MAILBOX_NAME = ".my_mailbox.new"         # the rewritten mailbox before it is renamed over
SIDECAR_MAGIC = b"pop3-index 2"

MAX_LINE = 255                   # RFC 2449 section 4: a command is at most 255 octets with CRLF
MAX_NUMBER_DIGITS = 10           # longer message numbers cannot exist; keeps int() cheap
RECV_SIZE = 65536
READ_CHUNK = 1 << 20             # bytes read from a mailbox at a time
SEND_THRESHOLD = 256 * 1024      # buffered replies are sent once they reach this size
LISTING_BATCH = 4096             # LIST/UIDL lines formatted at a time
CACHE_SAMPLES = 32               # messages re-hashed at login to trust the cached index
DIGEST_SIZE = 8                  # bytes of the content hash kept per message for UIDL

AUTH_DELAY_FROM = 3              # failed PASS number from which replies are slowed down
AUTH_DELAY_STEP = 0.2            # seconds added per further failure
MAX_AUTH_FAILURES = 5            # then the connection is closed
ACCEPT_RETRY_DELAY = 0.1         # seconds to wait after accept() fails (e.g. out of descriptors)

GREETING = "+OK POP3 server is ready"
GOODBYE = "+OK Thanks for using POP3 server"
CAPABILITIES = ["USER", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "EXPIRE NEVER", "IMPLEMENTATION course-pop3"]

AUTHORIZATION, TRANSACTION = "AUTHORIZATION", "TRANSACTION"
COMMANDS = {
    AUTHORIZATION: {"USER", "PASS", "QUIT", "CAPA", "STLS"},
    TRANSACTION: {"STAT", "LIST", "RETR", "DELE", "RSET", "NOOP", "QUIT",
                  "TOP", "UIDL", "CAPA"},
}
ALL_COMMANDS = set().union(*COMMANDS.values())

NUMBER = re.compile(r"[0-9]{1,%d}\Z" % MAX_NUMBER_DIGITS)
HEADER_LINE = re.compile(rb"[!-9;-~]+:")     # RFC 5322 field name then a colon

log = logging.getLogger("pop3")


def parse_args(argv=None):
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="POP3 server: serves the mailboxes ROOT/<user>/my_mailbox.")
    parser.add_argument("port", type=int, metavar="PORT", help="TCP port to listen on (0: any free port)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: all IPv4 interfaces; '::' or '::1' for IPv6)")
    parser.add_argument("--root", default=".", help="mail root holding userinfo.txt and user folders (default: .)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds an idle client may wait before it is logged out (default: 600)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="connections served at once; one more gets -ERR (default: 100)")
    parser.add_argument("--verbose", action="store_true",
                        help="log every command and reply (passwords masked)")
    parser.add_argument("--tls-cert", metavar="FILE", help="certificate (PEM) for STLS")
    parser.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for STLS")
    parser.add_argument("--require-tls", action="store_true",
                        help="refuse USER and PASS until the client has used STLS")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("PORT must be between 0 and 65535")
    if args.max_connections < 1 or args.timeout <= 0:
        parser.error("--max-connections and --timeout must be positive")
    if not os.path.isdir(args.root):
        parser.error("--root %s is not a directory" % args.root)
    args.tls = tls_context(parser, args.tls_cert, args.tls_key, args.require_tls)
    return args


# --------------------------------------------------------------------------
# The mailbox: index, unique ids, the rewrite at QUIT
# --------------------------------------------------------------------------

def index_messages(f, offset, limit):
    """Scan f from offset (where a message starts) up to limit for complete messages.

    Returns (starts, sizes, digests): starts holds the offset of each message
    and, last, the end of the last complete message (a torn message after it
    is left alone); sizes the octets of each message on the wire with CRLF
    and without byte-stuffing; digests a DIGEST_SIZE-byte hash of each.
    """
    starts, sizes, digests = array.array("q"), array.array("q"), bytearray()
    blake2b = hashlib.blake2b
    f.seek(offset)
    buf, base, pos = b"", offset, 0      # base: file offset of buf[0]; pos: current message in buf
    remaining = limit - offset
    while True:
        length = len(buf)
        while True:
            # The line "." ends a message; any other line starting with "." is stuffed.
            dots, scan, end = 0, pos, -1
            if buf.startswith(b".", pos):
                if pos + 1 >= length:
                    break
                if buf[pos + 1] == 10:
                    end = pos
                else:
                    dots, scan = 1, pos + 1
            while end < 0:
                found = buf.find(b"\n.", scan)
                if found < 0 or found + 2 >= length:
                    break
                if buf[found + 2] == 10:
                    end = found + 1
                else:
                    dots += 1
                    scan = found + 2
            if end < 0:
                break
            starts.append(base + pos)
            # Each stored line loses its \n and gains CRLF; a stuffed line loses its extra dot.
            sizes.append((end - pos) + buf.count(b"\n", pos, end) - dots)
            digests += blake2b(memoryview(buf)[pos:end], digest_size=DIGEST_SIZE).digest()
            pos = end + 2
        if remaining <= 0:
            break
        chunk = f.read(min(READ_CHUNK, remaining))
        if not chunk:
            break
        remaining -= len(chunk)
        buf = buf[pos:] + chunk
        base += pos
        pos = 0
    starts.append(base + pos)
    return starts, sizes, bytes(digests)


class Section:
    """The index and ids of one mailbox file (known by its inode), as kept in the sidecar."""

    __slots__ = ("inode", "starts", "sizes", "serials", "digests")

    def __init__(self, inode, starts, sizes, serials, digests):
        self.inode = inode
        self.starts = starts        # array q: offset of each message, then the indexed end
        self.sizes = sizes          # array q: octets on the wire
        self.serials = serials      # array q: the number in each message's unique id
        self.digests = digests      # bytes: DIGEST_SIZE-byte content hash of each message

    def digest(self, index):
        return self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]


class Sidecar:
    """The file beside a mailbox that keeps its unique ids and a cache of its index.

    Ids are "<epoch>-<serial>": the epoch is random, made with the file, and
    serials only grow, so an id is never handed out twice, even to two
    identical messages.  The file holds, for the mailbox file (inode) it
    describes, each message's offset, size, serial and content hash, so a
    login only has to index the mail appended since.  While a QUIT rewrite is
    in progress it describes both the old and the new file, so a crash
    between the two renames still finds the right ids for the file that won.
    Only POP3 writes it, under the session lock.
    """

    ARRAYS = ("starts", "sizes", "serials")

    def __init__(self, folder):
        self.path = os.path.join(folder, SIDECAR_NAME)
        self.temp_path = os.path.join(folder, NEW_SIDECAR_NAME)
        self.epoch = None
        self.next_serial = 1
        self.sections = []

    def load(self):
        """Read the sidecar; a missing or damaged one just starts a new epoch."""
        try:
            with open(self.path, "rb") as f:
                self._parse(f)
            return
        except FileNotFoundError:
            pass
        except (OSError, ValueError, IndexError, TypeError) as exc:
            log.warning("%s is unusable (%s); starting new ids", self.path, exc)
        self.epoch = os.urandom(6).hex()
        self.next_serial = 1
        self.sections = []

    def _parse(self, f):
        if f.readline().rstrip(b"\n") != SIDECAR_MAGIC:
            raise ValueError("unknown format")
        fields, sections, current = {}, [], None
        for line in f:        # one line at a time: the arrays are large
            key, _, value = line.rstrip(b"\n").partition(b" ")
            key = key.decode("ascii")
            if key == "section":
                inode, count = (int(v) for v in value.split())
                current = Section(inode, None, None, None, None)
                sections.append((current, count))
            elif key in self.ARRAYS:
                values = array.array("q", bytes.fromhex(value.decode("ascii")))
                if fields.get("order", sys.byteorder) != sys.byteorder:
                    values.byteswap()
                setattr(current, key, values)
            elif key == "digests":
                current.digests = bytes.fromhex(value.decode("ascii"))
            else:
                fields[key] = value.decode("ascii")
        epoch, next_serial = fields["epoch"], int(fields["next"])
        if not re.match(r"[0-9a-f]{1,32}\Z", epoch):
            raise ValueError("bad epoch")
        for section, count in sections:
            if len(section.starts) != count + 1 or len(section.sizes) != count \
                    or len(section.serials) != count or len(section.digests) != count * DIGEST_SIZE \
                    or max(section.serials, default=0) >= next_serial:
                raise ValueError("inconsistent section")
        self.epoch, self.next_serial = epoch, next_serial
        self.sections = [section for section, _ in sections]

    def section_for(self, inode):
        """The section recorded for the mailbox file with this inode, or None."""
        for section in self.sections:
            if inode and section.inode == inode:
                return section
        return None

    def save(self, sections):
        """Write the sidecar atomically with the given sections (the current file first)."""
        try:
            with open(self.temp_path, "wb") as f:
                f.write(b"%s\nepoch %s\nnext %d\norder %s\n" % (
                    SIDECAR_MAGIC, self.epoch.encode("ascii"), self.next_serial,
                    sys.byteorder.encode("ascii")))
                for section in sections:
                    f.write(b"section %d %d\n" % (section.inode, len(section.sizes)))
                    for key in self.ARRAYS:
                        f.write(b"%s %s\n" % (key.encode("ascii"),
                                              getattr(section, key).tobytes().hex().encode("ascii")))
                    f.write(b"digests %s\n" % section.digests.hex().encode("ascii"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.temp_path, self.path)
        except BaseException:
            remove_quietly(self.temp_path)
            raise
        fsync_directory(os.path.dirname(self.path))
        self.sections = list(sections)


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


class Mailbox:
    """A user's maildrop as one session sees it: the messages present at login, fixed."""

    def __init__(self, path):
        self.path = path
        self.folder = os.path.dirname(path)
        self.file = None
        self.inode = 0
        self.starts = array.array("q", [0])
        self.sizes = array.array("q")
        self.serials = array.array("q")
        self.digests = b""
        self.sidecar = Sidecar(self.folder)

    def open(self):
        """Index the mailbox as it is now and give every message its unique id."""
        # The delivery lock only guarantees no append is half done at the size we read.
        with delivery_lock(self.path):
            try:
                self.file = open(self.path, "rb")
            except FileNotFoundError:
                self.file = None
            limit = os.fstat(self.file.fileno()).st_size if self.file else 0
        self.inode = os.fstat(self.file.fileno()).st_ino if self.file else 0
        self.sidecar.load()
        known = self.sidecar.section_for(self.inode)
        if self.file is None:
            self._assign_ids(None)
        elif known is not None and self._unchanged(known, limit):
            # SMTP only appends, so only the mail after the known part needs indexing.
            starts, sizes, digests = index_messages(self.file, known.starts[-1], limit)
            self.starts = known.starts[:-1] + starts
            self.sizes = known.sizes + sizes
            self.digests = known.digests + digests
            self.serials = array.array("q", known.serials)
            self._assign_ids(None)
        else:
            self.starts, self.sizes, self.digests = index_messages(self.file, 0, limit)
            self._assign_ids(known or (self.sidecar.sections[0] if self.sidecar.sections else None))

    def _unchanged(self, known, limit):
        """Whether the known part of the file is still what the sidecar says, by sampling.

        Appends keep it; a file emptied in place and refilled (same inode) is
        caught because sampled messages no longer hash the same.
        """
        count = len(known.sizes)
        if known.starts[-1] > limit:
            return False
        samples = set(range(0, count, max(1, count // CACHE_SAMPLES)))
        samples.add(count - 1)
        for index in sorted(samples):
            if index < 0:
                continue
            start, end = known.starts[index], known.starts[index + 1]
            self.file.seek(start)
            data = self.file.read(end - start)
            if not data.endswith(b".\n") or (len(data) > 2 and not data.endswith(b"\n.\n")) \
                    or hashlib.blake2b(data[:-2], digest_size=DIGEST_SIZE).digest() != known.digest(index):
                return False
        return True

    def _assign_ids(self, previous):
        """Match the messages to a previous id list in order; new messages get new ids."""
        count = len(self.sizes)
        if previous is not None:
            # Only deletions remove messages and SMTP only appends, so an in-order match holds.
            self.serials = array.array("q")
            j, known = 0, len(previous.serials)
            for i in range(count):
                mine = self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
                while j < known and previous.digest(j) != mine:
                    j += 1
                if j == known:
                    break
                self.serials.append(previous.serials[j])
                j += 1
        recorded = self.sidecar.sections[0] if self.sidecar.sections else None
        changed = recorded is None or len(self.sidecar.sections) > 1 or recorded.inode != self.inode \
            or recorded.starts[-1] != self.starts[-1] or len(recorded.sizes) != count
        while len(self.serials) < count:
            self.serials.append(self.sidecar.next_serial)
            self.sidecar.next_serial += 1
        if changed:
            try:
                self.sidecar.save([Section(self.inode, self.starts, self.sizes,
                                           self.serials, self.digests)])
            except OSError as exc:
                log.warning("cannot write %s: %s; ids may change", self.sidecar.path, exc)

    def count(self):
        """How many messages the session sees (deleted ones included)."""
        return len(self.sizes)

    def uid(self, index):
        """The unique id of a message, as UIDL shows it."""
        return "%s-%d" % (self.sidecar.epoch, self.serials[index])

    def read(self, index):
        """The stored bytes of a message: dot-stuffed lines ending in LF, without the final dot."""
        start, end = self.starts[index], self.starts[index + 1] - 2
        self.file.seek(start)
        data = self.file.read(end - start)
        if len(data) != end - start:
            raise OSError("mailbox shrank while being read")
        return data

    def chunks(self, index):
        """The stored bytes of a message in pieces of at most READ_CHUNK bytes."""
        start, end = self.starts[index], self.starts[index + 1] - 2
        self.file.seek(start)
        while start < end:
            piece = self.file.read(min(READ_CHUNK, end - start))
            if not piece:
                raise OSError("mailbox shrank while being read")
            start += len(piece)
            yield piece

    def top(self, index, body_lines):
        """The header block, the blank line after it if there is one, then body_lines lines."""
        lines = []
        in_header, taken = True, 0
        for line in self._lines(index):
            if in_header:
                if HEADER_LINE.match(line) or (lines and line[:1] in (b" ", b"\t")):
                    lines.append(line)
                    continue
                in_header = False
                if line == b"\n":
                    lines.append(line)
                    continue
            if taken >= body_lines:
                break
            lines.append(line)
            taken += 1
        return b"".join(lines)

    def _lines(self, index):
        """The stored lines of a message, each with its LF, read piece by piece."""
        rest = b""
        for piece in self.chunks(index):
            parts = (rest + piece).split(b"\n")
            rest = parts.pop()
            for part in parts:
                yield part + b"\n"
        if rest:
            yield rest

    def commit(self, deleted):
        """Remove the messages marked deleted: new file beside the old one, then rename over.

        Keeps every byte after the last indexed message (mail delivered during
        the session, or a torn message).  On any failure the old file stays.
        """
        if not any(deleted):
            return
        temp_path = os.path.join(self.folder, NEW_MAILBOX_NAME)
        kept = Section(0, array.array("q"), array.array("q"), array.array("q"), bytearray())
        with delivery_lock(self.path):
            try:
                # Private from the start; the mode of the old file is copied before the rename.
                fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                             0o600)
                with open(fd, "wb") as out:
                    index, count = 0, len(self.sizes)
                    while index < count:
                        if deleted[index]:
                            index += 1
                            continue
                        run_start, position = index, out.tell()
                        while index < count and not deleted[index]:
                            kept.starts.append(position + self.starts[index] - self.starts[run_start])
                            kept.sizes.append(self.sizes[index])
                            kept.serials.append(self.serials[index])
                            kept.digests += self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]
                            index += 1
                        self._copy(out, self.starts[run_start], self.starts[index])
                    kept.starts.append(out.tell())
                    self._copy(out, self.starts[-1], None)
                    out.flush()
                    os.fsync(out.fileno())
                    kept.inode = os.fstat(out.fileno()).st_ino
                kept.digests = bytes(kept.digests)
                self.sidecar.save([kept, Section(self.inode, self.starts, self.sizes,
                                                 self.serials, self.digests)])
                os.chmod(temp_path, os.fstat(self.file.fileno()).st_mode & 0o777)
                self.close()          # Windows cannot rename over an open file
                os.replace(temp_path, self.path)
            except BaseException:
                remove_quietly(temp_path)
                raise
            fsync_directory(self.folder)

    def _copy(self, out, start, end):
        """Copy bytes start..end (end None: to the end of the file) of the mailbox to out."""
        self.file.seek(start)
        while end is None or start < end:
            piece = self.file.read(READ_CHUNK if end is None else min(READ_CHUNK, end - start))
            if not piece:
                if end is None:
                    break
                raise OSError("mailbox shrank during the rewrite")
            out.write(piece)
            start += len(piece)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


# --------------------------------------------------------------------------
# The protocol session
# --------------------------------------------------------------------------

class Disconnect(Exception):
    """The session is over: the client left, timed out, or must be dropped."""


class Session:
    """One client's POP3 dialogue: its state, its mailbox, one method per command."""

    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.state = AUTHORIZATION
        self.tls_active = False
        self.user_name = None         # as given by USER, until PASS
        self.login = None
        self.lock = None
        self.mailbox = None
        self.deleted = None           # bytearray: 1 for each message marked by DELE
        self.auth_failures = 0
        self.commands = 0
        self.outcome = "dropped"
        self.inbuf = b""
        self.inpos = 0
        self.skipping = False         # inside a line too long to serve
        self.outbuf = []
        self.outsize = 0

    # -- input and output ---------------------------------------------------

    def read_line(self):
        """The next line without its line end; b'' marks a line that was too long."""
        while True:
            newline = self.inbuf.find(b"\n", self.inpos)
            if newline >= 0:
                line = self.inbuf[self.inpos:newline]
                self.inpos = newline + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if self.skipping:
                    self.skipping = False
                    return b""
                return line if len(line) + 2 <= MAX_LINE else b""
            if len(self.inbuf) - self.inpos > MAX_LINE:
                self.skipping = True                  # drop the rest of this overlong line
                self.inbuf, self.inpos = b"", 0
            # Replies wait until the client's pipelined commands are all read.
            self.flush()
            try:
                data = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                self.outcome = "timed out"
                raise Disconnect()
            except OSError:
                raise Disconnect()
            if not data:
                raise Disconnect()
            self.inbuf = self.inbuf[self.inpos:] + data
            self.inpos = 0

    def reply(self, text, body=None):
        """Queue a reply line, and for a multi-line reply its body lines and the final dot."""
        if self.server.verbose:
            log.info("%s S: %s", self.peer, text)
        data = text.encode("utf-8") + b"\r\n"
        if body is not None:
            data += b"".join(line.encode("utf-8") + b"\r\n" for line in body) + b".\r\n"
        self.send(data)

    def send(self, data):
        self.outbuf.append(data)
        self.outsize += len(data)
        if self.outsize >= SEND_THRESHOLD:
            self.flush()

    def flush(self):
        if self.outbuf:
            data = b"".join(self.outbuf)
            self.outbuf, self.outsize = [], 0
            try:
                self.sock.sendall(data)
            except socket.timeout:
                self.outcome = "timed out"
                raise Disconnect()
            except OSError:
                raise Disconnect()

    # -- the dialogue -------------------------------------------------------

    def run(self):
        """Serve the connection until QUIT, disconnect or timeout; log one line about it."""
        try:
            self.reply(GREETING)
            while True:
                line = self.read_line()
                self.commands += 1
                self.handle(line)
        except Disconnect:
            pass
        except Exception:
            self.outcome = "failed"
            log.exception("%s: session failed", self.peer)
        finally:
            try:
                self.flush()
            except Disconnect:
                pass
            self.end()
            log.info("%s: user %s, %d commands, %d failed logins, %s", self.peer,
                     self.login or "-", self.commands, self.auth_failures, self.outcome)

    def handle(self, line):
        """Check one command line and call the do_ method its keyword names."""
        if not line:
            self.reply("-ERR line too long or empty")
            return
        if b"\0" in line:
            self.reply("-ERR NUL in command")
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.reply("-ERR command is not valid UTF-8")
            return
        keyword, _, argument = text.partition(" ")
        keyword = keyword.upper()
        if self.server.verbose:
            shown = "PASS ****" if keyword == "PASS" else text
            log.info("%s C: %s", self.peer, shown)
        if keyword not in ALL_COMMANDS:
            self.reply("-ERR unknown command")
        elif keyword not in COMMANDS[self.state]:
            if self.state == AUTHORIZATION:
                self.reply("-ERR log in first with USER and PASS")
            else:
                self.reply("-ERR already logged in")
        else:
            try:
                getattr(self, "do_" + keyword)(argument)
            except OSError as exc:
                # Part of a reply may be out already, so the connection cannot go on.
                log.error("%s: mailbox of %s unreadable: %s", self.peer, self.login, exc)
                self.reply("-ERR [SYS/TEMP] cannot read the maildrop")
                self.outcome = "mailbox error"
                raise Disconnect()

    def message_number(self, text):
        """The 0-based index of an existing, undeleted message, or None after an -ERR reply."""
        text = text.strip()
        if not NUMBER.match(text):
            self.reply("-ERR invalid message number")
            return None
        number = int(text)
        if not 1 <= number <= self.mailbox.count():
            self.reply("-ERR no such message")
            return None
        if self.deleted[number - 1]:
            self.reply("-ERR message %d already deleted" % number)
            return None
        return number - 1

    def send_listing(self, values, prefix=b""):
        """Send "n <prefix><value>" for each message not deleted, then the final dot.

        Done in batches so a listing of a huge mailbox never sits whole in memory.
        """
        deleted = self.deleted
        for first in range(0, len(values), LISTING_BATCH):
            last = min(first + LISTING_BATCH, len(values))
            self.send(b"".join(b"%d %s%d\r\n" % (i + 1, prefix, values[i])
                               for i in range(first, last) if not deleted[i]))
        self.send(b".\r\n")

    def drop_stats(self):
        """Count and octets of the messages not marked deleted."""
        count, octets = 0, 0
        for size, gone in zip(self.mailbox.sizes, self.deleted):
            if not gone:
                count += 1
                octets += size
        return count, octets

    # -- AUTHORIZATION --------------------------------------------------------

    def plaintext_refused(self):
        """Under --require-tls, refuse a password exchange before STLS (True if refused)."""
        if self.server.require_tls and not self.tls_active:
            self.reply("-ERR [AUTH] use STLS first: this server takes no password in clear text")
            return True
        return False

    def do_USER(self, argument):
        """Remember the user name; whether it exists is only told after PASS."""
        if self.plaintext_refused():
            return
        argument = argument.strip()
        if not argument or " " in argument:
            self.reply("-ERR usage: USER name")
            return
        self.user_name = argument
        self.reply("+OK send PASS")

    def do_PASS(self, argument):
        """Check the password and, on success, lock and open the maildrop."""
        if self.plaintext_refused():
            return
        if self.user_name is None:
            self.reply("-ERR send USER first")
            return
        name, self.user_name = self.user_name, None
        users = self.server.users
        login = users.canonical(name) if is_valid_login(name) else None
        expected = users.password(login) if login else None
        # Compare even for unknown users, so timing does not tell them apart.
        matches = hmac.compare_digest(argument.encode("utf-8"), expected or b"\0unknown user")
        if not (login and expected is not None and matches):
            self.auth_failures += 1
            if self.auth_failures >= AUTH_DELAY_FROM:
                time.sleep(AUTH_DELAY_STEP * (self.auth_failures - AUTH_DELAY_FROM + 1))
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.reply("-ERR [AUTH] invalid user name or password; closing")
                self.outcome = "too many failed logins"
                raise Disconnect()
            self.reply("-ERR [AUTH] invalid user name or password")
            return
        lock = FileLock(os.path.join(users.root, login, SESSION_LOCK_NAME))
        if not lock.acquire(blocking=False):
            self.reply("-ERR [IN-USE] maildrop already locked by another session")
            return
        mailbox = Mailbox(users.mailbox_path(login))
        try:
            mailbox.open()
        except BaseException as exc:
            mailbox.close()
            lock.release()
            if not isinstance(exc, OSError):
                raise
            log.error("cannot open the mailbox of %s: %s", login, exc)
            self.reply("-ERR [SYS/TEMP] cannot open the maildrop")
            return
        self.login, self.lock, self.mailbox = login, lock, mailbox
        self.deleted = bytearray(mailbox.count())
        self.state = TRANSACTION
        count, octets = self.drop_stats()
        self.reply("+OK %s's maildrop has %d messages (%d octets)" % (login, count, octets))

    def do_QUIT(self, argument):
        """End the session; in TRANSACTION state first remove the messages marked deleted."""
        if self.state == TRANSACTION and any(self.deleted):
            try:
                self.server.commit(self.mailbox, self.deleted)
            except OSError as exc:
                log.error("cannot update the mailbox of %s: %s", self.login, exc)
                self.release()
                self.reply("-ERR [SYS/TEMP] some deleted messages not removed")
                self.outcome = "quit, update failed"
                raise Disconnect()
        # Unlock before the goodbye, so a client may log in again as soon as it reads it.
        self.release()
        self.reply(GOODBYE)
        self.outcome = "quit"
        raise Disconnect()

    def do_CAPA(self, argument):
        """List the capabilities (RFC 2449): only what the client may use now."""
        capabilities = list(CAPABILITIES)
        if self.server.require_tls and not self.tls_active:
            capabilities.remove("USER")
        if self.server.tls and not self.tls_active and self.state == AUTHORIZATION:
            capabilities.append("STLS")
        self.reply("+OK Capability list follows", capabilities)

    def do_STLS(self, argument):
        """Start TLS (RFC 2595); what the client sent before the handshake is discarded."""
        if self.server.tls is None:
            self.reply("-ERR STLS is not available on this server")
            return
        if self.tls_active:
            self.reply("-ERR TLS is already active")
            return
        if argument.strip():
            self.reply("-ERR usage: STLS")
            return
        self.reply("+OK Begin TLS negotiation")
        self.flush()
        # Commands pipelined behind STLS came in clear text: never execute them.
        self.inbuf, self.inpos, self.skipping = b"", 0, False
        try:
            self.sock = self.server.tls.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("%s: TLS handshake failed: %s", self.peer, exc)
            self.outcome = "TLS handshake failed"
            raise Disconnect()
        self.tls_active = True
        self.user_name = None         # RFC 2595 4: forget what was said before

    def do_NOOP(self, argument):
        """Do nothing; keeps the connection alive."""
        self.reply("+OK")

    # -- TRANSACTION ----------------------------------------------------------

    def do_STAT(self, argument):
        """Count and octets of the maildrop."""
        count, octets = self.drop_stats()
        self.reply("+OK %d %d" % (count, octets))

    def do_LIST(self, argument):
        """Size of one message, or of every message not deleted."""
        if argument.strip():
            index = self.message_number(argument)
            if index is not None:
                self.reply("+OK %d %d" % (index + 1, self.mailbox.sizes[index]))
            return
        count, octets = self.drop_stats()
        self.reply("+OK %d messages (%d octets)" % (count, octets))
        self.send_listing(self.mailbox.sizes)

    def do_UIDL(self, argument):
        """Unique id of one message, or of every message not deleted."""
        if argument.strip():
            index = self.message_number(argument)
            if index is not None:
                self.reply("+OK %d %s" % (index + 1, self.mailbox.uid(index)))
            return
        self.reply("+OK unique-id listing follows")
        epoch = self.mailbox.sidecar.epoch
        self.send_listing(self.mailbox.serials, epoch.encode("ascii") + b"-")

    def do_RETR(self, argument):
        """Send a whole message."""
        index = self.message_number(argument)
        if index is None:
            return
        size = self.mailbox.sizes[index]
        if self.server.verbose:
            log.info("%s S: +OK %d octets", self.peer, size)
        head = b"+OK %d octets\r\n" % size
        # Stored lines are already byte-stuffed; only the line ends change on the wire.
        if self.mailbox.starts[index + 1] - self.mailbox.starts[index] <= READ_CHUNK:
            self.send(head + self.mailbox.read(index).replace(b"\n", b"\r\n") + b".\r\n")
            return
        self.send(head)
        for piece in self.mailbox.chunks(index):
            self.send(piece.replace(b"\n", b"\r\n"))
        self.send(b".\r\n")

    def do_TOP(self, argument):
        """Send the header block and the first n body lines of a message.

        Our own messages have no blank line between headers and body: the
        header block is the leading run of "Name: value" lines (and their
        continuation lines); a blank line right after it is sent with it when
        the message has one.  So TOP n 0 sends just the header block, and TOP
        output is always a prefix of RETR output.
        """
        number, _, lines = argument.strip().partition(" ")
        lines = lines.strip()
        if not NUMBER.match(lines):
            self.reply("-ERR usage: TOP message non-negative-line-count")
            return
        index = self.message_number(number)
        if index is None:
            return
        text = self.mailbox.top(index, int(lines))
        if self.server.verbose:
            log.info("%s S: +OK top of message follows", self.peer)
        self.send(b"+OK top of message follows\r\n" + text.replace(b"\n", b"\r\n") + b".\r\n")

    def do_DELE(self, argument):
        """Mark a message for removal at QUIT."""
        index = self.message_number(argument)
        if index is not None:
            self.deleted[index] = 1
            self.reply("+OK message %d deleted" % (index + 1))

    def do_RSET(self, argument):
        """Unmark every message marked by DELE in this session."""
        self.deleted = bytearray(self.mailbox.count())
        count, octets = self.drop_stats()
        self.reply("+OK maildrop has %d messages (%d octets)" % (count, octets))

    # -- the end ------------------------------------------------------------------

    def release(self):
        """Close the mailbox and give up the maildrop lock."""
        if self.mailbox is not None:
            self.mailbox.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def end(self):
        """Release the maildrop and close the socket; nothing is deleted here."""
        self.release()
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# The server loop
# --------------------------------------------------------------------------

class Server:
    """Accepts connections and runs one session thread per connection."""

    def __init__(self, args):
        self.host = args.host
        self.port = args.port
        self.timeout = args.timeout
        self.verbose = args.verbose
        self.tls = args.tls
        self.require_tls = args.require_tls
        self.users = UserTable(args.root)
        self.slots = threading.BoundedSemaphore(args.max_connections)
        self.updates = threading.Condition()
        self.updating = 0               # QUIT rewrites in progress
        self.stopping = False
        self.listener = None

    def listen(self):
        self.listener = create_listener(self.host, self.port)
        log.info("listening on %s port %d", self.host, self.listener.getsockname()[1])

    def serve_forever(self):
        """Accept connections until interrupted."""
        while True:
            try:
                sock, address = self.listener.accept()
            except OSError as exc:
                # Out of file descriptors, or a client gone before accept: keep serving.
                log.warning("accept failed: %s", exc)
                time.sleep(ACCEPT_RETRY_DELAY)
                continue
            peer = "[%s]:%d" % address[:2] if ":" in address[0] else "%s:%d" % address[:2]
            if not self.slots.acquire(blocking=False):
                self.refuse(sock, peer)
                continue
            sock.settimeout(self.timeout)
            session = Session(self, sock, peer)
            try:
                threading.Thread(target=self.run_session, args=(session,), daemon=True).start()
            except RuntimeError as exc:          # the system cannot make more threads
                self.slots.release()
                self.refuse(sock, peer, str(exc))

    def refuse(self, sock, peer, reason="too many connections"):
        """Tell a client the server is full, and hang up."""
        try:
            sock.settimeout(1)
            sock.sendall(b"-ERR [SYS/TEMP] server busy, try again later\r\n")
        except OSError:
            pass
        finally:
            sock.close()
        log.warning("%s: refused, %s", peer, reason)

    def run_session(self, session):
        leave_signals_to_main_thread()
        try:
            session.run()
        finally:
            self.slots.release()

    def commit(self, mailbox, deleted):
        """Apply a session's deletions, unless the server is stopping (then delete nothing)."""
        with self.updates:
            if self.stopping:
                raise OSError("server is shutting down")
            self.updating += 1
        try:
            mailbox.commit(deleted)
        finally:
            with self.updates:
                self.updating -= 1
                self.updates.notify_all()

    def shutdown(self, signals):
        """Stop accepting and let QUIT rewrites in progress finish (until a second signal).

        A rewrite cut short leaves the old mailbox whole.
        """
        if self.listener is not None:
            self.listener.close()
            log.info("shutting down")
        with self.updates:
            self.stopping = True
        wait_until_idle(self._no_updates, signals)

    def _no_updates(self, timeout):
        """Wait up to timeout for the rewrites in progress; True when there are none."""
        with self.updates:
            return self.updates.wait_for(lambda: self.updating == 0, timeout)


def main(argv=None):
    """Run the POP3 server until Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    run_on_one_cpu()
    configure_logging("pop3")
    server = Server(args)
    try:
        server.listen()
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", args.host, args.port, exc)
        return 1
    serve_until_signalled(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""POP3 server of the course mail system: lets users read and delete the mail in their mailbox.

    python pop_server.py 1110 [--host ADDR] [--root DIR] [--timeout 600] ...

RFC 1939 with the RFC 2449 extensions TOP, UIDL, CAPA, RESP-CODES and
PIPELINING, and STLS (RFC 2595) given --tls-cert and --tls-key.  One thread
serves each connection.  A session sees the mailbox as it was at login;
deletions are applied at QUIT by writing a new mailbox beside the old one
and renaming it over, under the lock the SMTP server takes for every
delivery, so mail that arrives during a session is kept.

Built on mailserver_smtp.py: the mail root, the locks and the mailbox
format, the session skeleton and the server loop are the ones SMTP uses.
"""

import array
import errno
import hashlib
import itertools
import logging
import os
import re
import sys

from mailserver_smtp import (INDEX_NAME, NEW_INDEX_NAME, NEW_MAILBOX_NAME, Server, Session, SessionEnd,
                             check_server_arguments, delivery_lock, fresh_timestamp, fsync_directory,
                             header_block, message_end, name_and_digest, open_regular, parse_with_site,
                             remove_file, make_whole, run_server, server_arguments, session_lock, wire_size)

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

DEFAULT_TIMEOUT = 600            # RFC 1939 section 3: autologout at least 10 minutes

MAX_LINE = 255                   # RFC 2449 section 4: a command is at most 255 octets with CRLF
MAX_NUMBER_DIGITS = 10           # longer message numbers cannot exist; keeps int() cheap
READ_CHUNK = 1 << 20             # bytes read from a mailbox at a time
LISTING_BATCH = 4096             # LIST/UIDL lines formatted at a time
CACHE_SAMPLES = 32               # messages re-hashed at login to trust the cached index
DIGEST_SIZE = 8                  # bytes of the content hash kept per message for UIDL
INDEX_MAGIC = b"pop3-index 2"

CAPABILITIES = ["USER", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "EXPIRE NEVER", "IMPLEMENTATION course-pop3"]
SASL_MECHANISMS = ("PLAIN", "CRAM-MD5")      # RFC 5034; CAPA says "SASL PLAIN CRAM-MD5"


class Replies:
    """What the POP3 server answers, with the RFC 2449 8 / RFC 3206 response code of those that have one.

    Named as SMTP's Replies are where a reply means the same.  The codes:
    [SYS/TEMP] a retry later may work, [AUTH] the credentials failed (or
    must come another way), [IN-USE] another session holds the maildrop.
    """

    GREETING = "+OK POP3 server is ready %s"     # the APOP timestamp (RFC 1939 7)
    GOODBYE = "+OK Thanks for using POP3 server"
    BUSY = "-ERR [SYS/TEMP] server busy, try again later"
    BUSY_CLIENT = "-ERR [SYS/TEMP] too many connections from your address"
    OK = "+OK"
    LINE_TOO_LONG = "-ERR line too long or empty"
    NUL_IN_COMMAND = "-ERR NUL in command"
    NOT_UTF8 = "-ERR command is not valid UTF-8"
    UNKNOWN_COMMAND = "-ERR unknown command"
    SYNTAX = "-ERR usage: %s"
    CAPABILITIES = "+OK Capability list follows"
    # The AUTHORIZATION state (RFC 1939 4 and 7, RFC 2595, RFC 5034)
    AUTH_REQUIRED = "-ERR log in first with USER and PASS"
    USER_OK = "+OK send PASS"
    USER_FIRST = "-ERR send USER first"
    STARTTLS_FIRST = "-ERR [AUTH] use STLS first: this server takes no password in clear text"
    NOT_IMPLEMENTED = "-ERR STLS is not available on this server"
    TLS_ACTIVE = "-ERR TLS is already active"
    READY_FOR_TLS = "+OK Begin TLS negotiation"
    AUTH_MECHANISM = "-ERR unsupported authentication mechanism; CAPA lists them"
    AUTH_INVALID = "-ERR [AUTH] invalid user name or password"
    AUTH_CANCELLED = "-ERR authentication cancelled"
    AUTH_MALFORMED = "-ERR [AUTH] cannot decode the response (base64 expected)"
    AUTH_LINE_TOO_LONG = "-ERR [AUTH] authentication line too long"
    TOO_MANY_FAILURES = "%s; closing"            # the failed login's own reply, then the close
    IN_USE = "-ERR [IN-USE] maildrop already locked by another session"
    CANNOT_OPEN = "-ERR [SYS/TEMP] cannot open the maildrop"
    LOGGED_IN = "+OK %s's maildrop has %d messages (%d octets)"
    # The TRANSACTION state (RFC 1939 5, RFC 2449 6)
    AUTHENTICATED = "-ERR already logged in"
    DROP_LISTING = "+OK %d %d"                   # STAT: count, octets
    SCAN_LISTING = "+OK %d %d"                   # LIST n: number, octets
    LISTING_FOLLOWS = "+OK %d messages (%d octets)"
    UNIQUE_ID = "+OK %d %s"
    UNIQUE_IDS_FOLLOW = "+OK unique-id listing follows"
    MESSAGE_FOLLOWS = "+OK %d octets"
    TOP_FOLLOWS = "+OK top of message follows"
    DELETED = "+OK message %d deleted"
    RESET = "+OK maildrop has %d messages (%d octets)"
    BAD_NUMBER = "-ERR invalid message number"
    NO_SUCH_MESSAGE = "-ERR no such message"
    ALREADY_DELETED = "-ERR message %d already deleted"
    CANNOT_READ = "-ERR [SYS/TEMP] cannot read the maildrop"
    # The UPDATE state (RFC 1939 6)
    UPDATE_FAILED = "-ERR [SYS/TEMP] some deleted messages not removed"


SASL_REPLIES = {             # why an AUTH exchange failed -> the reply (RFC 5034 4)
    "cancelled": Replies.AUTH_CANCELLED,
    "malformed": Replies.AUTH_MALFORMED,
    "too long": Replies.AUTH_LINE_TOO_LONG,
    "invalid": Replies.AUTH_INVALID,
}

AUTHORIZATION, TRANSACTION = "AUTHORIZATION", "TRANSACTION"   # RFC 1939 section 3
COMMANDS = {
    AUTHORIZATION: {"USER", "PASS", "APOP", "AUTH", "QUIT", "CAPA", "STLS"},
    TRANSACTION: {"STAT", "LIST", "RETR", "DELE", "RSET", "NOOP", "QUIT",
                  "TOP", "UIDL", "CAPA"},
}
ALL_COMMANDS = set().union(*COMMANDS.values())

NUMBER = re.compile(r"[0-9]{1,%d}\Z" % MAX_NUMBER_DIGITS)

log = logging.getLogger("pop3")


def parse_args(argv=None):
    """Read the command line."""
    parser = server_arguments("POP3 server: serves the mailboxes ROOT/<user>/my_mailbox.",
                              DEFAULT_TIMEOUT, "seconds an idle client may wait before it is logged out",
                              "STLS", "refuse USER/PASS and AUTH PLAIN until the client has used STLS",
                              ("pop3", "pop3s"))
    return check_server_arguments(parser, parse_with_site(parser, argv, "pop3"))


# --------------------------------------------------------------------------
# The maildrop: index, unique ids, the rewrite at QUIT
# --------------------------------------------------------------------------
# Where a stored message ends is found by the format's own rule, message_end,
# which index_messages calls.  Past that, this part knows one more thing of
# the format: the last two bytes of each message are its '.' line, which is
# neither sent nor hashed (MessageScan.take, Maildrop.chunks and
# _still_there, the index cache check, rely on it).

def index_messages(f, offset, limit):
    """Scan f from offset (where a message starts) up to limit for complete messages.

    Returns (starts, sizes, digests): starts holds the offset of each message
    and, last, the end of the last complete message (a torn message after it
    is left alone); sizes the octets of each message on the wire; digests a
    DIGEST_SIZE-byte hash of each.  Reads a chunk at a time and never holds
    more than a chunk and one line, however large a message is.
    """
    scan = MessageScan(offset)
    f.seek(offset)
    buf = bytearray()
    base, pos = offset, 0           # the file offset of buf[0]; in buf, the first line not yet scanned
    remaining = limit - offset
    while True:
        pos = scan.take(buf, base, pos)
        chunk = f.read(min(READ_CHUNK, remaining)) if remaining > 0 else b""
        if not chunk:
            break
        remaining -= len(chunk)
        del buf[:pos]
        base, pos = base + pos, 0
        buf += chunk
    scan.starts.append(scan.start)
    return scan.starts, scan.sizes, bytes(scan.digests)


class MessageScan:
    """What index_messages knows so far: the messages found, and the lines seen of the one begun."""

    def __init__(self, offset):
        self.starts, self.sizes, self.digests = array.array("q"), array.array("q"), bytearray()
        self.start = offset         # the file offset of the message begun
        self.size = 0               # its wire size, of the lines seen in earlier chunks
        self.hasher = None          # their hash, if any

    def take(self, buf, base, pos):
        """Record every complete message in buf from pos, then the whole lines of the one begun; the new pos.

        base is the file offset of buf[0].
        """
        with memoryview(buf) as view:
            end, stuffed = message_end(buf, pos)
            while end >= 0:
                hasher = self.hasher
                if hasher is None:
                    hasher = hashlib.blake2b(view[pos:end - 2], digest_size=DIGEST_SIZE)
                else:
                    hasher.update(view[pos:end - 2])
                self.starts.append(self.start)
                self.sizes.append(self.size + wire_size(buf, pos, end - 2, stuffed))
                self.digests += hasher.digest()
                pos, self.start, self.size, self.hasher = end, base + end, 0, None
                end, stuffed = message_end(buf, pos)
            whole = buf.rfind(b"\n", pos) + 1
            if whole > pos:
                if self.hasher is None:
                    self.hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
                self.hasher.update(view[pos:whole])
                self.size += wire_size(buf, pos, whole)
                pos = whole
        return pos


class Section:
    """What the index file knows of one mailbox file (known by its inode): ids and index."""

    __slots__ = ("inode", "starts", "sizes", "serials", "digests")

    def __init__(self, inode, starts, sizes, serials, digests):
        self.inode = inode
        self.starts = starts        # array q: offset of each message, then the indexed end
        self.sizes = sizes          # array q: octets on the wire
        self.serials = serials      # array q: the number in each message's unique id
        self.digests = digests      # bytes: DIGEST_SIZE-byte content hash of each message


def digest_at(digests, index):
    """The content hash of message index in a run of DIGEST_SIZE-byte hashes."""
    return digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]


class IndexFile:
    """The file beside a mailbox that keeps its unique ids (and, as a speed-up, its index).

    Ids are "<epoch>-<serial>": the epoch is random, made with the file, and
    serials only grow, so an id is never handed out twice, even to two
    identical messages.  For the mailbox file (inode) it describes, the file
    holds each message's serial and content hash, which is what lets ids
    survive (the UIDL store), and each message's offset and size, which
    lets a login index only the mail appended since (the index cache).
    While a QUIT rewrite is in progress it describes both the old and the
    new file, so a crash between the two renames still finds the right ids
    for the file that won.  Only POP3 writes it, under the session lock.
    """

    ARRAYS = ("starts", "sizes", "serials")

    def __init__(self, folder):
        self.path = os.path.join(folder, INDEX_NAME)
        self.temp_path = os.path.join(folder, NEW_INDEX_NAME)
        self.epoch = None
        self.next_serial = 1
        self.sections = []

    def load(self):
        """Read the file; a missing or damaged one just starts a new epoch (OSError if it is no file)."""
        try:
            fd, _ = open_regular(self.path, os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                with os.fdopen(fd, "rb") as f:
                    self._parse(f)
                return
        except (ValueError, IndexError, TypeError, AttributeError) as exc:
            log.warning("%s is unusable (%s); starting new ids", self.path, exc)
        self.epoch = os.urandom(6).hex()
        self.next_serial = 1
        self.sections = []

    def _parse(self, f):
        if f.readline().rstrip(b"\n") != INDEX_MAGIC:
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
        """Write the file atomically with the given sections (the current mailbox file first)."""
        try:
            fd, _ = open_regular(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(fd, "wb") as f:
                f.write(b"%s\nepoch %s\nnext %d\norder %s\n" % (
                    INDEX_MAGIC, self.epoch.encode("ascii"), self.next_serial,
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
            remove_file(self.temp_path)
            raise
        fsync_directory(os.path.dirname(self.path))
        self.sections = list(sections)


class Maildrop:
    """A user's maildrop (RFC 1939) as one session sees it: the messages present at login, fixed."""

    def __init__(self, path):
        self.path = path
        self.folder = os.path.dirname(path)
        self.file = None
        self.inode = 0
        self.starts = array.array("q", [0])
        self.sizes = array.array("q")
        self.serials = array.array("q")
        self.digests = b""
        self.index_file = IndexFile(self.folder)

    def open(self):
        """Index the mailbox as it is now and give every message its unique id.

        The caller holds the session lock, so what a crashed rewrite left
        behind can go, and a torn last message (an append a crash cut short)
        is set aside before it could be seen.
        """
        remove_file(os.path.join(self.folder, NEW_MAILBOX_NAME))
        remove_file(self.index_file.temp_path)
        # Under the delivery lock no append is half done at the size we read.
        with delivery_lock(self.path):
            try:
                fd, st = open_regular(self.path, os.O_RDWR)
            except FileNotFoundError:
                fd, limit = None, 0
            if fd is not None:
                self.file = os.fdopen(fd, "rb")
                self.inode = st.st_ino
                limit = make_whole(fd, self.path, st.st_size)
        self.index_file.load()
        known = self.index_file.section_for(self.inode)
        if self.file is None:
            self._assign_ids(None)
        elif known is not None and cached_index_holds(self.file, known, limit):
            # SMTP only appends, so only the mail after the known part needs indexing.
            starts, sizes, digests = index_messages(self.file, known.starts[-1], limit)
            self.starts = known.starts[:-1] + starts
            self.sizes = known.sizes + sizes
            self.digests = known.digests + digests
            self.serials = array.array("q", known.serials)
            self._assign_ids(None)
        else:
            self.starts, self.sizes, self.digests = index_messages(self.file, 0, limit)
            sections = self.index_file.sections
            self._assign_ids(known or (sections[0] if sections else None))

    def _assign_ids(self, previous):
        """Match the messages to a previous id list in order; new messages get new ids."""
        count = len(self.sizes)
        if previous is not None:
            # Only deletions remove messages and SMTP only appends, so an in-order match holds.
            self.serials = array.array("q")
            j, known = 0, len(previous.serials)
            for i in range(count):
                mine = digest_at(self.digests, i)
                while j < known and digest_at(previous.digests, j) != mine:
                    j += 1
                if j == known:
                    break
                self.serials.append(previous.serials[j])
                j += 1
        index_file = self.index_file
        recorded = index_file.sections[0] if index_file.sections else None
        changed = recorded is None or len(index_file.sections) > 1 or recorded.inode != self.inode \
            or recorded.starts[-1] != self.starts[-1] or len(recorded.sizes) != count
        while len(self.serials) < count:
            self.serials.append(index_file.next_serial)
            index_file.next_serial += 1
        if changed:
            try:
                index_file.save([Section(self.inode, self.starts, self.sizes,
                                         self.serials, self.digests)])
            except OSError as exc:
                log.warning("cannot write %s: %s; ids may change", index_file.path, exc)

    def count(self):
        """How many messages the session sees (deleted ones included)."""
        return len(self.sizes)

    def uid_format(self):
        """The unique ids of this maildrop as a format of a message's serial: "<epoch>-%d" (see IndexFile)."""
        return self.index_file.epoch + "-%d"

    def uid(self, index):
        """The unique id of a message, as UIDL shows it."""
        return self.uid_format() % self.serials[index]

    def stats(self, deleted):
        """Count and octets of the messages not marked in deleted."""
        count, octets = 0, 0
        for size, gone in zip(self.sizes, deleted):
            if not gone:
                count += 1
                octets += size
        return count, octets

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
        """The header block, the blank line after it if there is one, then body_lines lines, in pieces."""
        count, blank = header_block(self._lines(index))
        return _batches(itertools.islice(self._lines(index), count + blank + body_lines))

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
        the session, or a torn message).  On any failure the old file stays;
        once the new file is renamed over it, it stands, even if unlocking
        the delivery lock then fails (FileLock.release never raises).
        """
        if not any(deleted):
            return
        temp_path = os.path.join(self.folder, NEW_MAILBOX_NAME)
        with delivery_lock(self.path):
            try:
                self._make_whole()
                kept = self._write_kept(temp_path, deleted)
                self.index_file.save([kept, Section(self.inode, self.starts, self.sizes,
                                                    self.serials, self.digests)])
                os.chmod(temp_path, os.fstat(self.file.fileno()).st_mode & 0o777)
                self.close()          # Windows cannot rename over an open file
                os.replace(temp_path, self.path)
            except BaseException:
                remove_file(temp_path)
                raise
            fsync_directory(self.folder)

    def _make_whole(self):
        """Set aside what a delivery that died during the session left (see make_whole), before the copy."""
        fd, st = open_regular(self.path, os.O_RDWR)     # its own offset: self.file's buffer stays right
        try:
            make_whole(fd, self.path, st.st_size)
        finally:
            os.close(fd)

    def _write_kept(self, temp_path, deleted):
        """Write the kept messages and what follows them to temp_path, fsync'd; return their Section."""
        kept = Section(0, array.array("q"), array.array("q"), array.array("q"), bytearray())
        # Private from the start; the mode of the old file is copied before the rename.
        fd, _ = open_regular(temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as out:
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
                    kept.digests += digest_at(self.digests, index)
                    index += 1
                self._copy(out, self.starts[run_start], self.starts[index])
            kept.starts.append(out.tell())
            self._copy_to_the_end(out, self.starts[-1])
            out.flush()
            os.fsync(out.fileno())
            kept.inode = os.fstat(out.fileno()).st_ino
        kept.digests = bytes(kept.digests)
        return kept

    def _copy(self, out, start, end):
        """Copy bytes start..end (end None: to the end of the file) of the mailbox to out; return where it ended."""
        self.file.seek(start)
        while end is None or start < end:
            piece = self.file.read(READ_CHUNK if end is None else min(READ_CHUNK, end - start))
            if not piece:
                if end is None:
                    break
                raise OSError("mailbox shrank during the rewrite")
            out.write(piece)
            start += len(piece)
        return start

    def _copy_to_the_end(self, out, start):
        """Copy the mailbox from start to out up to its end as a fresh stat, by path and open, shows it.

        A file system shared by several machines (GlusterFS with its caches
        on) can end a read at a size cached before another machine's append,
        made and acknowledged under the same lock: the rename would drop that
        mail.  So the copy must reach the end that both stats give, and the
        path must still name the file copied; else OSError, and nothing is
        deleted (the client gets -ERR [SYS/TEMP]).
        """
        for _ in range(2):                       # once, and once more for what a late stat shows
            start = self._copy(out, start, None)
            by_path, opened = os.stat(self.path), os.fstat(self.file.fileno())
            if not os.path.samestat(by_path, opened):
                raise OSError(errno.ESTALE, "the mailbox was replaced during the rewrite", self.path)
            if start == by_path.st_size == opened.st_size:
                return
        raise OSError(errno.EIO, "the copy ended at byte %d, the mailbox's size is %d by path and %d open"
                      % (start, by_path.st_size, opened.st_size), self.path)

    def close(self):
        """Close the mailbox file (twice is harmless)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def lock_and_open(path):
    """Take the session lock of the maildrop at path, then open it: (lock, Maildrop), or None if it is taken.

    OSError if it cannot be opened; then nothing is held.
    """
    lock, maildrop = session_lock(path), Maildrop(path)
    if not lock.acquire(blocking=False):
        return None
    try:
        maildrop.open()
    except BaseException:
        maildrop.close()
        lock.release()
        raise
    return lock, maildrop


def _batches(lines):
    """The lines joined into pieces of about READ_CHUNK bytes."""
    batch, size = [], 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= READ_CHUNK:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


# --------------------------------------------------------------------------
# The protocol session
# --------------------------------------------------------------------------

class POP3Session(Session):
    """One client's POP3 dialogue: its state, its maildrop, one do_VERB method per command."""

    MAX_LINE = MAX_LINE
    SASL_CONTINUE = "+ "
    SASL_REPLIES = SASL_REPLIES

    def __init__(self, server, sock, address, listener):
        super().__init__(server, sock, address, listener)
        self.state = AUTHORIZATION
        self.user_name = None         # as given by USER, until PASS
        self.login = None
        self.lock = None              # the session lock of the maildrop
        self.maildrop = None
        self.deleted = None           # bytearray: 1 for each message marked by DELE
        self.commands = 0
        self.timestamp = fresh_timestamp(server.domain)

    def start(self):
        self.reply(Replies.GREETING % self.timestamp)

    def line_too_long(self):
        self.commands += 1
        self.reply(Replies.LINE_TOO_LONG)

    def forget(self):
        self.user_name = None         # RFC 2595 4: forget what was said before

    def too_many_failures(self, reply):
        self.reply(Replies.TOO_MANY_FAILURES % reply)

    def release(self):
        """Close the maildrop and give up its session lock; called again by finish, it does nothing."""
        if self.maildrop is not None:
            self.maildrop.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def summary(self, reason):
        return "%s: user %s, %d commands, %d failed logins, %s" % (
            self.peer, self.login or "-", self.commands, self.auth_failures, reason)

    # -- the wire

    def handle(self, line):
        """Check one command line and run the do_ method its keyword names, if the state allows it."""
        self.commands += 1
        if not line:
            return self.reply(Replies.LINE_TOO_LONG)
        if b"\0" in line:
            return self.reply(Replies.NUL_IN_COMMAND)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self.reply(Replies.NOT_UTF8)
        keyword, _, argument = text.partition(" ")
        keyword = keyword.upper()
        if self.verbose:
            self.log_command(keyword, text)
        if keyword not in ALL_COMMANDS:
            self.reply(Replies.UNKNOWN_COMMAND)
        elif keyword not in COMMANDS[self.state]:
            self.reply(Replies.AUTH_REQUIRED if self.state == AUTHORIZATION else Replies.AUTHENTICATED)
        else:
            try:
                getattr(self, "do_" + keyword)(argument)
            except OSError as exc:
                # Part of a reply may be out already, so the connection cannot go on.
                log.error("%s: mailbox of %s unreadable: %s", self.peer, self.login, exc)
                self.reply(Replies.CANNOT_READ)
                raise SessionEnd("mailbox error")

    def send_stored(self, status, pieces):
        """Send a status line, then stored bytes (lines already byte-stuffed) with CRLF ends, then '.'."""
        if self.verbose:
            log.info("%s S: %s", self.peer, status)
        self.wire.send(status.encode("ascii") + b"\r\n")
        for piece in pieces:
            self.wire.send(piece.replace(b"\n", b"\r\n"))
        self.wire.send(b".\r\n")

    def send_listing(self, values, value_format=b"%d"):
        """Send "n <value>" for each message not deleted, each value formatted by value_format, then '.'.

        Done in batches so a listing of a huge mailbox never sits whole in memory.
        """
        deleted, row = self.deleted, b"%d " + value_format + b"\r\n"
        for first in range(0, len(values), LISTING_BATCH):
            last = min(first + LISTING_BATCH, len(values))
            self.wire.send(b"".join(row % (i + 1, values[i]) for i in range(first, last) if not deleted[i]))
        self.wire.send(b".\r\n")

    def message_number(self, text):
        """The 0-based index of an existing, undeleted message, or None after an -ERR reply."""
        text = text.strip()
        if not NUMBER.match(text):
            self.reply(Replies.BAD_NUMBER)
            return None
        number = int(text)
        if not 1 <= number <= self.maildrop.count():
            self.reply(Replies.NO_SUCH_MESSAGE)
            return None
        if self.deleted[number - 1]:
            self.reply(Replies.ALREADY_DELETED % number)
            return None
        return number - 1

    # -- the login

    def plaintext_refused(self):
        """Refuse a password sent where it may not go, before STLS (True if refused): see password_refused."""
        if self.password_refused():
            self.reply(Replies.STARTTLS_FIRST)
            return True
        return False

    def open_maildrop(self, login):
        """Lock, index and open the maildrop of a user who has proved who they are (None: do nothing)."""
        if login is None:
            return
        try:
            opened = lock_and_open(self.server.users.mailbox_path(login))
        except OSError as exc:       # the log names the path: a symlink, a folder, a disk error
            log.error("cannot open the mailbox of %s: %s", login, exc)
            return self.reply(Replies.CANNOT_OPEN)
        if opened is None:
            return self.reply(Replies.IN_USE)
        self.login, (self.lock, self.maildrop) = login, opened
        self.deleted = bytearray(self.maildrop.count())
        self.state = TRANSACTION
        self.reply(Replies.LOGGED_IN % ((login,) + self.maildrop.stats(self.deleted)))

    # -- the commands of the AUTHORIZATION state

    def do_USER(self, argument):
        """Remember the user name; whether it exists is only told after PASS."""
        if self.plaintext_refused():
            return
        argument = argument.strip()
        if not argument or " " in argument:
            return self.reply(Replies.SYNTAX % "USER name")
        self.user_name = argument
        self.reply(Replies.USER_OK)

    def do_PASS(self, argument):
        """Check the password and, on success, lock and open the maildrop."""
        if self.plaintext_refused():
            return
        if self.user_name is None:
            return self.reply(Replies.USER_FIRST)
        name, self.user_name = self.user_name, None
        login = self.server.users.authenticate(name, argument.encode("utf-8"))
        self.open_maildrop(self.login_result("USER/PASS", name, login, Replies.AUTH_INVALID))

    def do_APOP(self, argument):
        """Log in with an MD5 digest of the greeting's timestamp and the password (RFC 1939 section 7)."""
        self.user_name = None
        answer = name_and_digest(argument)
        if answer is None:
            self.login_result("APOP", None, None, Replies.SYNTAX % "APOP name digest (32 hex digits)")
            return
        stamp = self.timestamp.encode("utf-8")
        login = self.server.users.authenticate_digest(
            answer[0], answer[1], lambda password: hashlib.md5(stamp + password).hexdigest())
        self.open_maildrop(self.login_result("APOP", answer[0], login, Replies.AUTH_INVALID))

    def do_AUTH(self, argument):
        """Log in with SASL (RFC 5034): PLAIN or CRAM-MD5."""
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if not mechanism or " " in initial:
            return self.reply(Replies.SYNTAX % "AUTH mechanism [initial-response]")
        if mechanism not in SASL_MECHANISMS:
            return self.reply(Replies.AUTH_MECHANISM)
        if mechanism == "PLAIN" and self.plaintext_refused():
            return
        self.user_name = None
        self.open_maildrop(self.sasl(mechanism, initial or None))

    def do_CAPA(self, argument):
        """List the capabilities (RFC 2449): only what the client may use now."""
        capabilities = list(CAPABILITIES)
        mechanisms = list(SASL_MECHANISMS)
        if self.password_refused():
            capabilities.remove("USER")
            mechanisms.remove("PLAIN")
        if self.state == AUTHORIZATION:
            capabilities.append("SASL " + " ".join(mechanisms))
        if self.server.tls and not self.tls_active and self.state == AUTHORIZATION:
            capabilities.append("STLS")
        self.reply(Replies.CAPABILITIES, *capabilities, ".")

    def do_STLS(self, argument):
        """Start TLS (RFC 2595); what the client sent before the handshake is discarded."""
        if self.server.tls is None:
            return self.reply(Replies.NOT_IMPLEMENTED)
        if self.tls_active:
            return self.reply(Replies.TLS_ACTIVE)
        if argument.strip():
            return self.reply(Replies.SYNTAX % "STLS")
        self.reply(Replies.READY_FOR_TLS)
        self.start_tls()

    def do_QUIT(self, argument):
        """End the session; in TRANSACTION state first remove the messages marked deleted."""
        if self.state == TRANSACTION and any(self.deleted):
            try:
                self.update()
            except OSError as exc:
                log.error("cannot update the mailbox of %s: %s", self.login, exc)
                self.release()
                self.reply(Replies.UPDATE_FAILED)
                raise SessionEnd("quit, update failed")
        # Unlock before the goodbye, so a client may log in again as soon as it reads it.
        self.release()
        self.reply(Replies.GOODBYE)
        raise SessionEnd("quit")

    def update(self):
        """The UPDATE state (RFC 1939 6): remove the messages marked deleted; OSError if none was."""
        with self.server.in_flight:         # from here on, a shutdown waits for the rewrite
            if self.server.stopping:        # and once it has begun, no rewrite starts
                raise OSError("server is shutting down")
            self.maildrop.commit(self.deleted)

    # -- the commands of the TRANSACTION state

    def do_NOOP(self, argument):
        """Do nothing; keeps the connection alive."""
        self.reply(Replies.OK)

    def do_STAT(self, argument):
        """Count and octets of the maildrop."""
        self.reply(Replies.DROP_LISTING % self.maildrop.stats(self.deleted))

    def do_LIST(self, argument):
        """Size of one message, or of every message not deleted."""
        if argument.strip():
            index = self.message_number(argument)
            if index is not None:
                self.reply(Replies.SCAN_LISTING % (index + 1, self.maildrop.sizes[index]))
            return
        self.reply(Replies.LISTING_FOLLOWS % self.maildrop.stats(self.deleted))
        self.send_listing(self.maildrop.sizes)

    def do_UIDL(self, argument):
        """Unique id of one message, or of every message not deleted."""
        if argument.strip():
            index = self.message_number(argument)
            if index is not None:
                self.reply(Replies.UNIQUE_ID % (index + 1, self.maildrop.uid(index)))
            return
        self.reply(Replies.UNIQUE_IDS_FOLLOW)
        self.send_listing(self.maildrop.serials, self.maildrop.uid_format().encode("ascii"))

    def do_RETR(self, argument):
        """Send a whole message, a piece at a time."""
        index = self.message_number(argument)
        if index is not None:
            maildrop = self.maildrop
            self.send_stored(Replies.MESSAGE_FOLLOWS % maildrop.sizes[index], maildrop.chunks(index))

    def do_TOP(self, argument):
        """Send the header block and the first n body lines of a message.

        The header block is what the mailbox format's header_block() says it
        is (with the blank line after it, in an RFC 5322 message), so TOP n 0
        sends just the headers, and TOP output is always a prefix of RETR's.
        """
        number, _, lines = argument.strip().partition(" ")
        lines = lines.strip()
        if not NUMBER.match(lines):
            return self.reply(Replies.SYNTAX % "TOP message non-negative-line-count")
        index = self.message_number(number)
        if index is not None:
            self.send_stored(Replies.TOP_FOLLOWS, self.maildrop.top(index, int(lines)))

    def do_DELE(self, argument):
        """Mark a message for removal at QUIT."""
        index = self.message_number(argument)
        if index is not None:
            self.deleted[index] = 1
            self.reply(Replies.DELETED % (index + 1))

    def do_RSET(self, argument):
        """Unmark every message marked by DELE in this session."""
        self.deleted = bytearray(self.maildrop.count())
        self.reply(Replies.RESET % self.maildrop.stats(self.deleted))


# --------------------------------------------------------------------------
# The server loop
# --------------------------------------------------------------------------

class POP3Server(Server):
    """The POP3 server: its sessions are POP3Sessions."""

    session_class = POP3Session
    replies = Replies

    def __init__(self, args):
        super().__init__(args)
        self.remove_leftovers()

    def remove_leftovers(self):
        """Remove what rewrites cut short by a crash left, in every maildrop no session holds."""
        for login in self.users.logins():
            path = self.users.mailbox_path(login)
            lock = session_lock(path)
            try:
                if not lock.acquire(blocking=False):
                    continue
            except OSError as exc:
                log.error("cannot lock the maildrop of %s: %s", login, exc)
                continue
            try:
                for name in (NEW_MAILBOX_NAME, NEW_INDEX_NAME):
                    remove_file(os.path.join(os.path.dirname(path), name))
            finally:
                lock.release()


# --------------------------------------------------------------------------
# Speed-ups
# --------------------------------------------------------------------------

def cached_index_holds(f, known, limit):
    """Whether the index file's part of a mailbox file is still right, checked by sampling.

    Then a login indexes only what was appended after it (measured: 0.04 s
    instead of 0.7 s for 100,000 messages).  Appends keep the known part; a
    file emptied in place and refilled (same inode) is caught because the
    sampled messages no longer hash the same.
    """
    count = len(known.sizes)
    if known.starts[-1] > limit:
        return False
    samples = set(range(0, count, max(1, count // CACHE_SAMPLES)))
    samples.add(count - 1)
    for index in sorted(samples):
        if index >= 0 and not _still_there(f, known.starts[index], known.starts[index + 1],
                                           digest_at(known.digests, index)):
            return False
    return True


def _still_there(f, start, end, digest):
    """Whether bytes start..end of f still hold the message indexed there (read in chunks).

    The content hash (of all but the '.' line) must match, and the last two
    bytes must be the '.' line.  It does not look for a message end inside,
    as message_end would: the index found the end there, and bytes with the
    same hash are the same bytes.  (Scanning as index_messages does made a
    login to 64 MB messages twice as slow.)
    """
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    f.seek(start)
    tail = b""                                   # the last two bytes read: the '.' line is not hashed
    while start < end:
        chunk = f.read(min(READ_CHUNK, end - start))
        if not chunk:
            return False
        start += len(chunk)
        data = tail + chunk
        with memoryview(data) as view:
            hasher.update(view[:-2])
        tail = data[-2:]
    return tail == b".\n" and hasher.digest() == digest


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main(argv=None):
    """Run the POP3 server until Ctrl-C or SIGTERM."""
    return run_server(POP3Server, parse_args(argv), "pop3")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""POP3 server of the course mail system: lets users read and delete the mail in their mailbox.

    python pop_server.py 1110 [--host ADDR] [--root DIR] [--timeout 600] ...

RFC 1939 with the RFC 2449 extensions TOP, UIDL, CAPA, RESP-CODES and
PIPELINING.  One thread serves each connection.  A session sees the mailbox
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
import signal
import socket
import sys
import threading
import time

from mailserver_smtp import MAILBOX_NAME, FileLock, UserTable, delivery_lock, is_valid_login

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

DEFAULT_HOST = "0.0.0.0"
DEFAULT_TIMEOUT = 600            # RFC 1939 section 3: autologout at least 10 minutes
DEFAULT_MAX_CONNECTIONS = 100

SESSION_LOCK_NAME = ".my_mailbox.pop.lock"   # held by the one POP3 session of a user
UIDL_NAME = ".my_mailbox.uidl"               # unique ids of the messages, written by POP3 only
NEW_MAILBOX_NAME = ".my_mailbox.new"         # the rewritten mailbox before it is renamed over
NEW_UIDL_NAME = ".my_mailbox.uidl.new"
UIDL_MAGIC = b"pop3-uidl 1"

MAX_LINE = 255                   # RFC 2449 section 4: a command is at most 255 octets with CRLF
MAX_NUMBER_DIGITS = 10           # longer message numbers cannot exist; keeps int() cheap
RECV_SIZE = 65536
READ_CHUNK = 1 << 20             # bytes read from a mailbox at a time
SEND_THRESHOLD = 256 * 1024      # buffered replies are sent once they reach this size
DIGEST_SIZE = 8                  # bytes of the content hash kept per message for UIDL

AUTH_DELAY_FROM = 3              # failed PASS number from which replies are slowed down
AUTH_DELAY_STEP = 0.2            # seconds added per further failure
MAX_AUTH_FAILURES = 5            # then the connection is closed
SHUTDOWN_GRACE = 30              # seconds a QUIT rewrite in progress gets to finish

GREETING = "+OK POP3 server is ready"
GOODBYE = "+OK Thanks for using POP3 server"
CAPABILITIES = ["USER", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "EXPIRE NEVER", "IMPLEMENTATION course-pop3"]

AUTHORIZATION, TRANSACTION = "AUTHORIZATION", "TRANSACTION"
COMMANDS = {
    AUTHORIZATION: {"USER", "PASS", "QUIT", "CAPA"},
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
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("PORT must be between 0 and 65535")
    if args.max_connections < 1 or args.timeout <= 0:
        parser.error("--max-connections and --timeout must be positive")
    if not os.path.isdir(args.root):
        parser.error("--root %s is not a directory" % args.root)
    return args


# --------------------------------------------------------------------------
# The mailbox: index, unique ids, the rewrite at QUIT
# --------------------------------------------------------------------------

def digest(data):
    """The content hash that recognises a message again in a later session."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def index_messages(f, limit, hash_from):
    """Scan f from its start up to offset limit for complete messages.

    Returns (starts, sizes, digests): starts holds the offset of each message
    and, last, the end of the last complete message (a torn message after it
    is left alone); sizes the octets each message has on the wire with CRLF
    and without byte-stuffing; digests the hash of each message that starts at
    or after hash_from, DIGEST_SIZE bytes each.
    """
    starts, sizes, digests = array.array("q"), array.array("q"), bytearray()
    buf, base, pos = b"", 0, 0           # base: file offset of buf[0]; pos: current message in buf
    remaining = limit
    while True:
        while True:
            if buf.startswith(b".\n", pos):          # a message with no lines at all
                end, following = pos, pos + 2
            else:
                found = buf.find(b"\n.\n", pos)
                if found < 0:
                    break
                end, following = found + 1, found + 3
            # Each stored line loses its \n and gains CRLF; a stuffed line loses its extra dot.
            size = (end - pos) + buf.count(b"\n", pos, end) - buf.count(b"\n.", pos, end)
            if buf.startswith(b".", pos) and end > pos:
                size -= 1
            starts.append(base + pos)
            sizes.append(size)
            if base + pos >= hash_from:
                digests += digest(memoryview(buf)[pos:end])
            pos = following
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
    return starts, sizes, digests


class UidTable:
    """The sidecar file that gives each message an id no other message will ever get.

    Ids are "<epoch>-<serial>": the epoch is random, made with the file, and
    serials only grow, so an id is never handed out twice even to two
    identical messages.  The file lists the ids and content hashes of the
    messages of the mailbox in order, for the mailbox file (inode) it
    describes; while a QUIT rewrite is in progress it also lists the old file.
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, UIDL_NAME)
        self.temp_path = os.path.join(folder, NEW_UIDL_NAME)
        self.epoch = None
        self.next_serial = 1
        self.sections = []    # [(inode, indexed_end, count, serials array, digests bytes)]

    def load(self):
        """Read the sidecar; a missing or damaged one just starts a new epoch."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            log.warning("cannot read %s: %s; starting new ids", self.path, exc)
            data = None
        if data is not None:
            try:
                self._parse(data)
                return
            except (ValueError, IndexError) as exc:
                log.warning("%s is damaged (%s); starting new ids", self.path, exc)
        self.epoch = os.urandom(6).hex()
        self.next_serial = 1
        self.sections = []

    def _parse(self, data):
        lines = data.split(b"\n")
        if lines[0] != UIDL_MAGIC:
            raise ValueError("unknown format")
        epoch, next_serial, sections = None, None, []
        for line in lines[1:]:
            key, _, value = line.partition(b" ")
            if key == b"epoch":
                epoch = value.decode("ascii")
            elif key == b"next":
                next_serial = int(value)
            elif key == b"file":
                inode, indexed_end, count = (int(v) for v in value.split())
                sections.append([inode, indexed_end, count, None, None])
            elif key == b"serials":
                sections[-1][3] = array.array("q", map(int, value.split()))
            elif key == b"digests":
                sections[-1][4] = bytes.fromhex(value.decode("ascii"))
        if not epoch or not re.match(r"[0-9a-f]{1,32}\Z", epoch) or next_serial is None:
            raise ValueError("missing epoch or counter")
        for inode, indexed_end, count, serials, digests in sections:
            if serials is None or digests is None or len(serials) != count \
                    or len(digests) != count * DIGEST_SIZE or max(serials, default=0) >= next_serial:
                raise ValueError("inconsistent section")
        self.epoch, self.next_serial = epoch, next_serial
        self.sections = [tuple(s) for s in sections]

    def section_for(self, inode):
        """The list recorded for the mailbox file with this inode, or None."""
        for section in self.sections:
            if inode and section[0] == inode:
                return section
        return None

    def save(self, sections):
        """Write the sidecar atomically with the given sections (the current file first)."""
        parts = [UIDL_MAGIC, b"epoch " + self.epoch.encode("ascii"),
                 b"next %d" % self.next_serial]
        for inode, indexed_end, count, serials, digests in sections:
            parts.append(b"file %d %d %d" % (inode, indexed_end, count))
            parts.append(b"serials " + " ".join(map(str, serials)).encode("ascii"))
            parts.append(b"digests " + bytes(digests).hex().encode("ascii"))
        write_atomically(self.temp_path, self.path, b"\n".join(parts) + b"\n")
        self.sections = [tuple(s) for s in sections]


def write_atomically(temp_path, path, data):
    """Replace path by data so that a crash leaves either the old or the new file."""
    try:
        with open(temp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        remove_quietly(temp_path)
        raise
    fsync_directory(os.path.dirname(path))


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def fsync_directory(folder):
    """Make a rename in folder durable, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                       # Windows cannot open a directory; NTFS journals renames
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        self.uids = UidTable(self.folder)

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
        self.uids.load()
        known = self.uids.section_for(self.inode)
        if self.file is None:
            self._assign_ids(None)
            return
        # The known prefix of an unchanged file need not be hashed again: SMTP only appends.
        hash_from = known[1] if known and known[1] <= limit else 0
        self.starts, self.sizes, digests = index_messages(self.file, limit, hash_from)
        if hash_from and not (len(self.sizes) >= known[2] and self.starts[known[2]] == hash_from):
            log.warning("%s does not match its uid list; rehashing", self.path)
            known, hash_from = None, 0
            self.file.seek(0)
            self.starts, self.sizes, digests = index_messages(self.file, limit, 0)
        if hash_from:
            self.serials = array.array("q", known[3])
            self.digests = known[4] + bytes(digests)
            self._assign_ids(None)
        else:
            self.digests = bytes(digests)
            self._assign_ids(known or (self.uids.sections[0] if self.uids.sections else None))

    def _assign_ids(self, previous):
        """Match the messages to a previous id list in order; new messages get new ids."""
        count = len(self.sizes)
        if previous is not None:
            # Only deletions remove messages and SMTP only appends, so an in-order match holds.
            old_serials, old_digests = previous[3], previous[4]
            self.serials = array.array("q")
            j = 0
            for i in range(count):
                mine = self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
                while j < len(old_serials) and \
                        old_digests[j * DIGEST_SIZE:(j + 1) * DIGEST_SIZE] != mine:
                    j += 1
                if j == len(old_serials):
                    break
                self.serials.append(old_serials[j])
                j += 1
        recorded = self.uids.sections[0] if self.uids.sections else None
        changed = recorded is None or len(self.uids.sections) > 1 or recorded[0] != self.inode \
            or recorded[1] != self.starts[-1] or recorded[2] != count
        while len(self.serials) < count:
            self.serials.append(self.uids.next_serial)
            self.uids.next_serial += 1
        if changed:
            try:
                self.uids.save([(self.inode, self.starts[-1], count, self.serials, self.digests)])
            except OSError as exc:
                log.warning("cannot write %s: %s; ids may change", self.uids.path, exc)

    def count(self):
        return len(self.sizes)

    def uid(self, index):
        return "%s-%d" % (self.uids.epoch, self.serials[index])

    def read(self, index, limit=None):
        """The stored bytes of a message (dot-stuffed, LF line ends), at most limit of them."""
        start, end = self.starts[index], self.starts[index + 1] - 2
        if limit is not None:
            end = min(end, start + limit)
        self.file.seek(start)
        return self.file.read(end - start)

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
        with delivery_lock(self.path):
            try:
                kept_serials = array.array("q")
                kept_digests = bytearray()
                with open(temp_path, "wb") as out:
                    index, count = 0, len(self.sizes)
                    while index < count:
                        if deleted[index]:
                            index += 1
                            continue
                        run_start = index
                        while index < count and not deleted[index]:
                            kept_serials.append(self.serials[index])
                            kept_digests += self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]
                            index += 1
                        self._copy(out, self.starts[run_start], self.starts[index])
                    kept_end = out.tell()
                    self._copy(out, self.starts[-1], None)
                    out.flush()
                    os.fsync(out.fileno())
                    new_inode = os.fstat(out.fileno()).st_ino
                # The old list stays in the sidecar until the rename is done, so a crash in
                # between still finds the right ids for whichever file survives.
                self.uids.save([(new_inode, kept_end, len(kept_serials), kept_serials, kept_digests),
                                (self.inode, self.starts[-1], len(self.sizes), self.serials, self.digests)])
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
            log.info("%s: user %s, %d commands, %s", self.peer, self.login or "-",
                     self.commands, self.outcome)

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

    def drop_stats(self):
        """Count and octets of the messages not marked deleted."""
        count, octets = 0, 0
        for size, gone in zip(self.mailbox.sizes, self.deleted):
            if not gone:
                count += 1
                octets += size
        return count, octets

    # -- AUTHORIZATION --------------------------------------------------------

    def do_USER(self, argument):
        """Remember the user name; whether it exists is only told after PASS."""
        argument = argument.strip()
        if not argument or " " in argument:
            self.reply("-ERR usage: USER name")
            return
        self.user_name = argument
        self.reply("+OK send PASS")

    def do_PASS(self, argument):
        """Check the password and, on success, lock and open the maildrop."""
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
        if self.state == TRANSACTION:
            try:
                self.server.commit(self.mailbox, self.deleted)
            except OSError as exc:
                log.error("cannot update the mailbox of %s: %s", self.login, exc)
                self.reply("-ERR [SYS/TEMP] some deleted messages not removed")
                self.outcome = "quit, update failed"
                raise Disconnect()
        self.reply(GOODBYE)
        self.outcome = "quit"
        raise Disconnect()

    def do_CAPA(self, argument):
        """List the capabilities (RFC 2449)."""
        self.reply("+OK Capability list follows", CAPABILITIES)

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
        if argument:
            index = self.message_number(argument)
            if index is not None:
                self.reply("+OK %d %d" % (index + 1, self.mailbox.sizes[index]))
            return
        count, octets = self.drop_stats()
        lines = ["%d %d" % (i + 1, size)
                 for i, (size, gone) in enumerate(zip(self.mailbox.sizes, self.deleted)) if not gone]
        self.reply("+OK %d messages (%d octets)" % (count, octets), lines)

    def do_UIDL(self, argument):
        """Unique id of one message, or of every message not deleted."""
        if argument:
            index = self.message_number(argument)
            if index is not None:
                self.reply("+OK %d %s" % (index + 1, self.mailbox.uid(index)))
            return
        lines = ["%d %s" % (i + 1, self.mailbox.uid(i))
                 for i in range(self.mailbox.count()) if not self.deleted[i]]
        self.reply("+OK unique-id listing follows", lines)

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

    def end(self):
        """Close the mailbox, the lock and the socket; nothing is deleted here."""
        if self.mailbox is not None:
            self.mailbox.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
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
        self.users = UserTable(args.root)
        self.slots = threading.BoundedSemaphore(args.max_connections)
        self.updates = threading.Condition()
        self.updating = 0               # QUIT rewrites in progress
        self.stopping = False
        self.listener = None

    def listen(self):
        family, kind, proto, _, address = socket.getaddrinfo(
            self.host, self.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        self.listener = socket.socket(family, kind, proto)
        if os.name != "nt":            # on Windows SO_REUSEADDR would allow port stealing
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(address)
        self.listener.listen(128)
        log.info("listening on %s port %d", self.host, self.listener.getsockname()[1])

    def serve_forever(self):
        """Accept connections until interrupted."""
        while True:
            sock, address = self.listener.accept()
            peer = "[%s]:%d" % address[:2] if ":" in address[0] else "%s:%d" % address[:2]
            if not self.slots.acquire(blocking=False):
                self.refuse(sock, peer)
                continue
            sock.settimeout(self.timeout)
            session = Session(self, sock, peer)
            threading.Thread(target=self.run_session, args=(session,), daemon=True).start()

    def refuse(self, sock, peer):
        try:
            sock.settimeout(1)
            sock.sendall(b"-ERR [SYS/TEMP] too many connections, try again later\r\n")
        except OSError:
            pass
        finally:
            sock.close()
        log.warning("%s: refused, too many connections", peer)

    def run_session(self, session):
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

    def shutdown(self):
        """Stop accepting and let QUIT rewrites in progress finish."""
        if self.listener is not None:
            self.listener.close()
        with self.updates:
            self.stopping = True
            self.updates.wait_for(lambda: self.updating == 0, SHUTDOWN_GRACE)


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Run the POP3 server until Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s pop3 %(levelname)s %(message)s")
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, on_sigterm)
    server = Server(args)
    try:
        try:
            server.listen()
        except OSError as exc:
            log.error("cannot listen on %s port %d: %s", args.host, args.port, exc)
            return 1
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Interactive mail client of the course mail system: sends mail by SMTP, reads it by POP3.

    python mail_client.py SERVER_IP [--smtp-port 2525] [--pop-port 1110] [--tls]

Both protocols are spoken over plain sockets.  Given --tls, --cafile or
--insecure, the client makes them private with STARTTLS (SMTP) or STLS (POP3)
whenever the server offers it; without those options it speaks exactly the
plain dialogue of the course contract (HELO first, no capability probes).  The client talks to the course
servers (which also accept the assignment's MAIL_FROM:/RCPT_TO: spellings) and
to any standard SMTP or POP3 server.
"""

import argparse
import datetime
import getpass
import os
import re
import socket
import ssl
import sys
from email.header import Header, decode_header, make_header
from email.utils import formatdate, make_msgid, parseaddr, parsedate_to_datetime

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

DEFAULT_SMTP_PORT = 2525
DEFAULT_POP_PORT = 1110
DEFAULT_TIMEOUT = 30.0       # seconds for connecting and for every reply
MAX_TIMEOUT = 86400          # a day: beyond that a typo, and sockets overflow near inf
QUIT_TIMEOUT = 2.0           # a goodbye to a server we are leaving must not hang us
RECV_SIZE = 65536
MAX_REPLY_LINE = 1024 * 1024  # longer is a broken or hostile server, not mail

MAX_SUBJECT = 150            # contract section 1
MAX_TEXT_LINE = 998          # RFC 5322 2.1.1: the server refuses longer lines anyway
MAX_ADDRESS = 254            # RFC 5321 4.5.3.1.3 path minus the brackets
MAX_LOCAL_PART = 64          # RFC 5321 4.5.3.1.1

INCORRECT_FORMAT = "This is an incorrect format"
SENT_OK = "Mail sent successfully"
END_OF_MESSAGE = "."
CRLF = b"\r\n"
WIRE_ENCODING = "utf-8"
NOT_KNOWN = "-"

USERNAME_PROMPT = "Username: "
PASSWORD_PROMPT = "Password: "
CHOICE_PROMPT = "Your choice: "
COMMAND_PROMPT = "Command: "
MENU_HINT = "Please choose a, b or c (or 1, 2, 3)."
GOODBYE = "Goodbye."
EMPTY_MAILBOX = "The mailbox is empty."
NO_MATCH = "No message matches."

# The assignment's own spellings, which the course server accepts; a standard
# server answers 500/502 and gets the RFC 5321 spellings instead.
COURSE_MAIL_FROM = "MAIL_FROM: <%s>"
COURSE_RCPT_TO = "RCPT_TO: <%s>"
STANDARD_MAIL_FROM = "MAIL FROM:<%s>"
STANDARD_RCPT_TO = "RCPT TO:<%s>"
UNKNOWN_COMMAND = (500, 502)

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
ADDRESS = re.compile(r"(%s(?:\.%s)*)@(%s(?:\.%s)*)\Z" % (_ATOM, _ATOM, _LABEL, _LABEL))
COURSE_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})\s*:\s*(\d{1,2})\s*:\s*(\d{1,2})")
HEADER_LINE = re.compile(r"[!-9;-~]+:")   # the header rule: a name of printable ASCII but ":"
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

MENU = """
Menu:
  a) Mail Sending
  b) Mail Management
  c) Exit"""
MENU_CHOICES = {
    "a": "send", "1": "send", "mail sending": "send", "sending": "send", "send": "send",
    "send mail": "send",
    "b": "manage", "2": "manage", "mail management": "manage", "management": "manage",
    "manage": "manage",
    "c": "exit", "3": "exit", "exit": "exit", "quit": "exit", "q": "exit",
}
COMPOSE_HELP = """Type the mail: a From: line, a To: line (several addresses separated by commas),
a Subject: line, then the body. End with a line holding only "."."""
MANAGE_HINT = "Commands: STAT, LIST, RETR n, DELE n, RSET, SEARCH ..., HELP, QUIT"
MANAGE_HELP = """Commands (any case):
  STAT                    number of messages and their total size
  LIST [n]                size of every message (or of message n)
  RETR n                  show message n
  DELE n                  mark message n for deletion (done when you QUIT)
  RSET                    unmark all messages marked for deletion
  SEARCH words...         messages whose subject or body holds all the words
  SEARCH FROM address     messages from that sender (a part of it is enough)
  SEARCH DATE YYYY-MM-DD  messages received on that day
  HELP                    this list
  QUIT                    delete the marked messages, log out and end the program"""


def parse_args(argv=None):
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Mail client: sends mail by SMTP and manages a mailbox by POP3.")
    parser.add_argument("server", metavar="SERVER_IP",
                        help="address or host name of the mail server (IPv6 works too)")
    parser.add_argument("--smtp-port", type=int, default=DEFAULT_SMTP_PORT,
                        help="SMTP port (default: %d)" % DEFAULT_SMTP_PORT)
    parser.add_argument("--pop-port", type=int, default=DEFAULT_POP_PORT,
                        help="POP3 port (default: %d)" % DEFAULT_POP_PORT)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for a server (default: %g)" % DEFAULT_TIMEOUT)
    parser.add_argument("--tls", action="store_true",
                        help="refuse to talk to a server that does not offer STARTTLS/STLS")
    parser.add_argument("--cafile", metavar="FILE",
                        help="trust the certificates in FILE (e.g. a server's self-signed one)")
    parser.add_argument("--insecure", action="store_true",
                        help="use TLS without checking the server's certificate (not private!)")
    args = parser.parse_args(argv)
    for name in ("smtp_port", "pop_port"):
        if not 1 <= getattr(args, name) <= 65535:
            parser.error("--%s must be between 1 and 65535" % name.replace("_", "-"))
    if not 0 < args.timeout <= MAX_TIMEOUT:
        parser.error("--timeout must be between 0 and %d seconds" % MAX_TIMEOUT)
    # "[::1]" is how people write an IPv6 address next to a port; sockets want it bare.
    if args.server.startswith("[") and args.server.endswith("]"):
        args.server = args.server[1:-1]
    try:
        args.tls_policy = TLSPolicy(args.tls, args.cafile, args.insecure)
    except (OSError, ssl.SSLError) as exc:
        parser.error("cannot read --cafile %s: %s" % (args.cafile, describe(exc)))
    return args


class TLSPolicy:
    """How the client uses TLS: when asked for, whenever a server offers it; only with it under --tls."""

    def __init__(self, required=False, cafile=None, insecure=False):
        self.required = required
        self.wanted = bool(required or cafile or insecure)
        self.context = None
        if insecure:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        elif self.wanted:
            self.context = ssl.create_default_context(cafile=cafile)


# --------------------------------------------------------------------------
# Composing mail and checking its format (pure functions)
# --------------------------------------------------------------------------

class FormatError(ValueError):
    """A typed mail that breaks the format; the text says which line and what is wrong."""


class Message:
    """A mail that passed the format check, ready to send."""

    def __init__(self, sender, recipients, subject, body):
        self.sender = sender
        self.recipients = recipients
        self.subject = subject
        self.body = body

    def data_lines(self, standard=False):
        """The lines sent after DATA, body dot-stuffed, without the final '.'.

        The course server stores exactly From, To, Subject and the body; a
        standard server gets an RFC 5322 message (Date, Message-ID, MIME
        labels for 8-bit text, a blank line before the body).
        """
        subject = self.subject
        if standard and not _is_ascii(subject):
            subject = Header(subject, "utf-8").encode()
        lines = ["From: " + self.sender,
                 "To: " + ", ".join(self.recipients),
                 "Subject: " + subject]
        if standard:
            lines.append("Date: " + formatdate(localtime=True))
            # The sender's domain, so make_msgid does not wait for a DNS lookup of ours.
            lines.append("Message-ID: " + make_msgid(domain=self.sender.rpartition("@")[2]))
            if not _is_ascii("\n".join(self.body)):
                lines.extend(["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                              "Content-Transfer-Encoding: 8bit"])
            lines.append("")
        # A body line starting with "." gets one more, so it cannot end DATA early.
        lines.extend("." + line if line.startswith(".") else line for line in self.body)
        return lines


def valid_address(text):
    """True for a plain user@domain address an SMTP server can route."""
    match = ADDRESS.match(text)
    return bool(match) and len(text) <= MAX_ADDRESS and len(match.group(1)) <= MAX_LOCAL_PART


def _header_value(lines, index, name):
    """The text after 'Name:' on line index (0-based), or FormatError naming the line."""
    number = index + 1
    if index >= len(lines):
        raise FormatError('line %d is missing: it must be the "%s:" line' % (number, name))
    field, colon, value = lines[index].partition(":")
    if not colon or field.strip().lower() != name.lower():
        raise FormatError('line %d must start with "%s:" but is %r' % (number, name, lines[index]))
    return value.strip()


def _address(text, number, role):
    """One address of line number, checked; <> around it are allowed and dropped."""
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        raise FormatError("line %d: the %s address is empty" % (number, role))
    if not valid_address(text):
        raise FormatError("line %d: %r is not a valid %s address (expected user@domain)"
                          % (number, text, role))
    return text


def parse_message(lines):
    """Check a typed mail (the lines before the final '.') and return it as a Message."""
    for number, line in enumerate(lines, 1):
        if CONTROL_CHARS.search(line):
            raise FormatError("line %d contains a control character" % number)
        if len(line.encode(WIRE_ENCODING, "surrogateescape")) > MAX_TEXT_LINE:
            raise FormatError("line %d is longer than %d characters" % (number, MAX_TEXT_LINE))

    sender_text = _header_value(lines, 0, "From")
    if "," in sender_text:
        raise FormatError("line 1: a mail has exactly one sender address")
    sender = _address(sender_text, 1, "sender")

    to_text = _header_value(lines, 1, "To")
    if not to_text:
        raise FormatError("line 2: there is no recipient address")
    recipients = []
    for part in to_text.split(","):
        address = _address(part.strip(), 2, "recipient")
        if address.lower() not in (known.lower() for known in recipients):
            recipients.append(address)

    subject = _header_value(lines, 2, "Subject")
    if len(subject) > MAX_SUBJECT:
        raise FormatError("line 3: the subject is %d characters long; at most %d are allowed"
                          % (len(subject), MAX_SUBJECT))

    body = lines[3:]
    if not body:
        raise FormatError('the mail has no body: type at least one line before the final "."')
    return Message(sender, recipients, subject, body)


# --------------------------------------------------------------------------
# Reading stored mail (pure functions)
# --------------------------------------------------------------------------

class Summary:
    """What the mailbox listing shows of one message."""

    def __init__(self, number, sender, received, subject):
        self.number = number
        self.sender = sender
        self.received = received
        self.subject = subject


def decode_text(raw):
    """Text of a line from a server: UTF-8, or Latin-1 for older 8-bit mail."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def header_bounds(lines):
    """(header lines, index of the first body line) of message lines, by the header rule.

    A header line is 'name:' with a name of printable ASCII but ':'; a continuation
    line starts with a space or a tab and is never the first line.  In the leading
    run of such lines, a run followed by an empty line is an RFC 5322 header block
    (the empty line belongs to neither part).  Otherwise the message is in the
    course form (headers, then the body at once) and the header block ends before
    the first continuation-looking line, which starts the body.  No headers at all:
    everything is body.
    """
    run, first_fold = 0, None
    while run < len(lines):
        line = lines[run]
        if run and line[:1] in (" ", "\t"):
            if first_fold is None:
                first_fold = run
        elif not HEADER_LINE.match(line):
            break
        run += 1
    if run and run < len(lines) and lines[run] == "":
        return run, run + 1
    end = run if first_fold is None else first_fold
    return end, end


def split_message(lines):
    """Split message lines (text) into ([(name, value)], body lines) by the header rule."""
    count, body_start = header_bounds(lines)
    headers = []
    for line in lines[:count]:
        if line[:1] in (" ", "\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
        else:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    return headers, lines[body_start:]


def header(headers, name):
    """The first value of a header (case-insensitive name), or None."""
    for field, value in headers:
        if field.lower() == name.lower():
            return value
    return None


def decode_words(value):
    """A header value with RFC 2047 encoded words (=?utf-8?...?=) made readable."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def received_time(headers):
    """When the message arrived, as 'YYYY-MM-DD : HH : MM', from Received: (or Date:)."""
    value = header(headers, "Received")
    if value:
        match = COURSE_DATE.search(value)
        if match:
            return "%s : %02d : %02d" % (match.group(1), int(match.group(2)), int(match.group(3)))
        # A standard Received: header ends with "; <RFC 5322 date>".
        stamp = _parse_date(value.rpartition(";")[2])
        if stamp:
            return stamp
    return _parse_date(header(headers, "Date") or "") or NOT_KNOWN


def _parse_date(text):
    """An RFC 5322 date as 'YYYY-MM-DD : HH : MM' local time, or None."""
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is not None:
        when = when.astimezone()  # listing times are local, like the course server's
    return when.strftime("%Y-%m-%d : %H : %M")


def summarize(number, lines):
    """The listing entry of message number from its (header) lines."""
    headers, _ = split_message(lines)
    sender = parseaddr(decode_words(header(headers, "From") or ""))[1] or NOT_KNOWN
    subject = decode_words(header(headers, "Subject") or "")
    return Summary(number, sender, received_time(headers), subject)


def format_listing(summaries):
    """The listing table: a title row, then 'No. sender received subject' rows, keyed by number."""
    title = ("No.", "From", "Received", "Subject")
    rows = [(str(s.number), s.sender, s.received, s.subject or "(no subject)") for s in summaries]
    widths = [max(len(row[column]) for row in [title] + rows) for column in range(3)]

    def line(row):
        return ("%*s  %-*s  %-*s  %s" % (widths[0], row[0], widths[1], row[1],
                                         widths[2], row[2], row[3])).rstrip()
    return line(title), {s.number: line(row) for s, row in zip(summaries, rows)}


def matches_words(words, subject, body):
    """True when every word occurs, ignoring case, in the subject or the body."""
    text = "\n".join([subject] + body).casefold()
    return all(word.casefold() in text for word in words)


def matches_sender(query, sender):
    """True when sender is the address queried, or (without '@') contains the text."""
    query, sender = query.strip("<>").lower(), sender.lower()
    return query == sender if "@" in query else query in sender


# --------------------------------------------------------------------------
# Protocol code
# --------------------------------------------------------------------------

class ClientError(Exception):
    """A problem shown to the user as one line; the program goes on."""


class ServerError(ClientError):
    """The server refused a command; the text holds its reply."""


class LineReader:
    """Buffered reader of lines (CRLF, or a bare LF from lenient servers) from a socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.scanned = 0  # no newline before this offset: long replies are not rescanned

    def readline(self):
        """The next line as bytes without its line end; ClientError if the server left."""
        while True:
            end = self.buffer.find(b"\n", self.scanned)
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                self.scanned = 0
                return line[:-1] if line.endswith(b"\r") else line
            self.scanned = len(self.buffer)
            if self.scanned > MAX_REPLY_LINE:
                raise ClientError("the server sent a line longer than %d bytes" % MAX_REPLY_LINE)
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                raise ClientError("the server closed the connection")
            self.buffer += chunk


class Connection:
    """A socket to one server with a timeout on everything and one-line errors."""

    PROTOCOL = "TCP"

    def __init__(self, host, port, timeout, tls_policy):
        self.host = host
        self.where = "%s server %s port %d" % (self.PROTOCOL, host, port)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except (OSError, UnicodeError) as exc:
            raise ClientError("cannot connect to the %s: %s" % (self.where, describe(exc)))
        self.reader = LineReader(self.sock)
        try:
            self.greet_and_secure(tls_policy)
        except ClientError:
            self.close()
            raise

    def greet_and_secure(self, tls_policy):
        """Read the server's greeting, then start TLS as the policy asks."""
        raise NotImplementedError

    def send_lines(self, lines):
        """Send text lines, each ended with CRLF, in one write."""
        data = b"".join(line.encode(WIRE_ENCODING, "surrogateescape") + CRLF for line in lines)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ClientError("lost the connection to the %s: %s" % (self.where, describe(exc)))

    def readline(self):
        """The next line from the server, as bytes."""
        try:
            return self.reader.readline()
        except socket.timeout:
            raise ClientError("the %s did not answer in time" % self.where)
        except OSError as exc:
            raise ClientError("lost the connection to the %s: %s" % (self.where, describe(exc)))
        except ClientError as exc:
            raise ClientError("%s (%s)" % (exc, self.where))

    def start_tls(self, policy):
        """Run the TLS handshake on the connection; anything read before it is dropped."""
        try:
            self.sock = policy.context.wrap_socket(self.sock, server_hostname=self.host)
        except (OSError, ssl.CertificateError) as exc:
            self.close()
            raise ClientError("TLS with the %s failed: %s" % (self.where, describe(exc)))
        self.reader = LineReader(self.sock)

    def no_tls(self, policy, command):
        """The server offers no TLS: fine, unless --tls asked for it."""
        if policy.required:
            self.close()
            raise ClientError("the %s does not offer %s, and --tls forbids going on without it"
                              % (self.where, command))

    def close(self):
        """Drop the connection (twice is harmless)."""
        try:
            self.sock.close()
        except OSError:
            pass


def describe(exc):
    """A short human reason for a socket error."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "unknown host (%s)" % (exc.strerror or exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc) or exc.__class__.__name__


class SMTPConnection(Connection):
    """An SMTP session (RFC 5321) that sends one message at a time."""

    PROTOCOL = "SMTP"

    def __init__(self, host, port, timeout, tls_policy):
        self.local_name = socket.gethostname() or "localhost"
        self.extensions = {}
        super().__init__(host, port, timeout, tls_policy)

    def greet_and_secure(self, tls_policy):
        code, lines = self.reply()
        if code != 220:
            raise refusal("the connection", lines)
        self.secure(tls_policy)

    def secure(self, policy):
        """STARTTLS (RFC 3207) if the server's EHLO offers it; afterwards greet again."""
        if not policy.wanted:
            return
        code, lines = self.command("EHLO " + self.local_name)
        if code != 250 or "STARTTLS" not in (line[4:].strip().upper() for line in lines[1:]):
            return self.no_tls(policy, "STARTTLS")
        self.expect("STARTTLS", (220,), "STARTTLS")
        self.start_tls(policy)

    def reply(self):
        """Read one reply, continuation lines ('250-') included; return (code, lines)."""
        lines = []
        while True:
            line = decode_text(self.readline())
            code = line[:3]
            if not code.isdigit() or line[3:4] not in ("-", " ", ""):
                raise ClientError("the %s sent a malformed reply: %r" % (self.where, line))
            lines.append(line)
            if line[3:4] != "-":
                return int(code), lines

    def command(self, line):
        """Send one command and return its reply (code, lines)."""
        self.send_lines([line])
        return self.reply()

    def expect(self, line, codes, what):
        """Send a command; ServerError naming what was refused unless the code is in codes."""
        code, lines = self.command(line)
        if code not in codes:
            raise refusal(what, lines)
        return code, lines

    def greet(self):
        """HELO, or EHLO for a server that only knows that."""
        code, lines = self.command("HELO " + self.local_name)
        if code in UNKNOWN_COMMAND:
            self.ehlo_or_helo()
        elif code != 250:
            raise refusal("HELO", lines)

    def ehlo_or_helo(self):
        """Greet the standard way: EHLO (learning the extensions), HELO if EHLO is unknown."""
        code, lines = self.command("EHLO " + self.local_name)
        if code == 250:
            self.extensions = {}
            for item in lines[1:]:
                keyword, _, params = item[4:].partition(" ")
                self.extensions[keyword.upper()] = params
            return
        self.expect("HELO " + self.local_name, (250,), "HELO")

    def send_message(self, message):
        """Run one mail transaction; ServerError (with the reply) on any refusal."""
        self.greet()
        code, lines = self.command(COURSE_MAIL_FROM % message.sender)
        rcpt_to = COURSE_RCPT_TO
        standard = code in UNKNOWN_COMMAND
        if standard:
            # EHLO also resets whatever state the refused command left behind.
            self.ehlo_or_helo()
            parameters = ""
            if "8BITMIME" in self.extensions and not _is_ascii("\n".join(message.body)):
                parameters = " BODY=8BITMIME"
            self.expect(STANDARD_MAIL_FROM % message.sender + parameters, (250,),
                        "the sender %s" % message.sender)
            rcpt_to = STANDARD_RCPT_TO
        elif code != 250:
            raise refusal("the sender " + message.sender, lines)
        for recipient in message.recipients:
            self.expect(rcpt_to % recipient, (250, 251), "the recipient %s" % recipient)
        self.expect("DATA", (354,), "DATA")
        self.send_lines(message.data_lines(standard) + [END_OF_MESSAGE])
        code, lines = self.reply()
        if code != 250:
            raise refusal("the mail", lines)

    def quit(self):
        """Say goodbye and close; the mail is already sent or refused, so errors do not matter."""
        try:
            self.sock.settimeout(QUIT_TIMEOUT)
            self.command("QUIT")
        except (ClientError, OSError):
            pass
        self.close()


def refusal(what, lines):
    """The error for a refused SMTP command, quoting the whole reply on one line."""
    return ServerError("the server refused %s: %s" % (what, " ".join(lines)))


def _is_ascii(text):
    """True when text needs no 8-bit transport."""
    try:
        text.encode("ascii")
        return True
    except UnicodeEncodeError:
        return False


class POP3Connection(Connection):
    """A POP3 session (RFC 1939): login, then commands with +OK/-ERR replies."""

    PROTOCOL = "POP3"

    def greet_and_secure(self, tls_policy):
        self.greeting = self.status()
        self.secure(tls_policy)

    def secure(self, policy):
        """STLS (RFC 2595) if the server's CAPA lists it."""
        if not policy.wanted:
            return
        try:
            capabilities = self.long_command("CAPA")[1]
        except ServerError:
            capabilities = []           # CAPA is optional (RFC 2449): no TLS then
        if "STLS" not in (line.strip().upper() for line in capabilities):
            return self.no_tls(policy, "STLS")
        self.command("STLS")
        self.start_tls(policy)

    def status(self):
        """Read a status line; return it if +OK, raise ServerError if -ERR."""
        line = decode_text(self.readline())
        if line.startswith("+OK"):
            return line
        if line.startswith("-ERR"):
            raise ServerError(line)
        raise ClientError("the %s sent a malformed reply: %r" % (self.where, line))

    def command(self, line):
        """Send one command and return its +OK status line."""
        self.send_lines([line])
        return self.status()

    def multiline(self):
        """The lines of a multi-line reply up to the '.' line, byte-stuffing removed."""
        lines = []
        while True:
            line = self.readline()
            if line == b".":
                return lines
            lines.append(line[1:] if line.startswith(b".") else line)

    def long_command(self, line):
        """Send a command with a multi-line answer; return (status line, lines as text)."""
        status = self.command(line)
        return status, [decode_text(raw) for raw in self.multiline()]

    def login(self, user, password):
        """USER and PASS; ServerError with the -ERR line when refused."""
        self.command("USER " + user)
        return self.command("PASS " + password)

    def stat(self):
        """(message count, total octets)."""
        fields = self.command("STAT").split()
        try:
            return int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            raise ClientError("the %s sent a malformed STAT reply" % self.where)

    def scan_listing(self, lines):
        """[(number, octets)] from LIST lines."""
        result = []
        for line in lines:
            fields = line.split()
            try:
                result.append((int(fields[0]), int(fields[1])))
            except (IndexError, ValueError):
                raise ClientError("the %s sent a malformed LIST line: %r" % (self.where, line))
        return result

    def quit(self):
        """End the session (the server deletes the marked messages); return its goodbye."""
        try:
            return self.command("QUIT")
        finally:
            self.close()

    def abandon(self):
        """Leave without deleting anything the user marked: RSET, then QUIT, errors ignored."""
        try:
            self.sock.settimeout(QUIT_TIMEOUT)
            self.command("RSET")
            self.command("QUIT")
        except (ClientError, OSError):
            pass
        self.close()


# --------------------------------------------------------------------------
# The interactive part
# --------------------------------------------------------------------------

def ask(prompt):
    """One line typed by the user (EOFError at end of input)."""
    if sys.stdin is not None and sys.stdin.isatty():
        return input(prompt)
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    if prompt:
        # Nobody echoes piped input: end the prompt's line so each reply starts its own.
        print()
    return line.rstrip("\r\n")


def ask_password(prompt=PASSWORD_PROMPT):
    """The password, not echoed on a terminal; a plain line from a pipe."""
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass(prompt)
    return ask(prompt)


def error(text):
    """Show a one-line error and go on."""
    print("Error: " + text)


class Mailbox:
    """The mail management commands on a logged-in POP3 session, one do_ method each."""

    def __init__(self, pop):
        self.pop = pop
        self.summaries = []
        self.title = ""
        self.lines = {}        # number -> listing line
        self.messages = {}     # number -> text lines, so SEARCH reads each message once
        self.deleted = set()   # marked in this session; the server forgets them on RSET
        self.use_top = True

    def load_listing(self):
        """Read every message's headers (TOP n 0, RETR where TOP is missing)."""
        _, lines = self.pop.long_command("LIST")
        self.summaries = []
        for number, _ in self.pop.scan_listing(lines):
            self.summaries.append(summarize(number, self.headers_of(number)))
        self.title, self.lines = format_listing(self.summaries)

    def headers_of(self, number):
        """The header lines of a message (or all of it, where TOP is missing)."""
        if self.use_top:
            try:
                return self.pop.long_command("TOP %d 0" % number)[1]
            except ServerError:
                self.use_top = False  # RFC 1939 makes TOP optional
        return self.message(number)

    def message(self, number):
        """The lines of message number (read once per session)."""
        if number not in self.messages:
            self.messages[number] = self.pop.long_command("RETR %d" % number)[1]
        return self.messages[number]

    def show(self, numbers):
        """Print the listing lines of these messages under the title row."""
        print(self.title)
        for number in numbers:
            print(self.lines[number])

    def show_listing(self):
        """Print the whole listing."""
        if not self.summaries:
            print(EMPTY_MAILBOX)
        else:
            self.show([s.number for s in self.summaries])

    def run(self):
        """Read commands until QUIT; True when the program should end."""
        print(MANAGE_HINT)
        while True:
            words = ask(COMMAND_PROMPT).split()
            if not words:
                continue
            verb = words[0].upper()
            handler = getattr(self, "do_" + verb, None) if verb.isalpha() else None
            if handler is None:
                error("unknown command %r; type HELP for the list" % words[0])
                continue
            try:
                if handler(words[1:]):
                    return True
            except ServerError as exc:
                error(str(exc))

    def _number(self, args, usage):
        """The one message number in args, or None after printing the usage."""
        if len(args) == 1 and args[0].isdigit() and int(args[0]) > 0:
            return int(args[0])
        error("usage: " + usage)
        return None

    def do_HELP(self, args):
        """HELP: list the commands."""
        print(MANAGE_HELP)

    def do_STAT(self, args):
        """STAT: message count and total size."""
        count, octets = self.pop.stat()
        print("%d message%s, %d octets" % (count, "" if count == 1 else "s", octets))

    def do_LIST(self, args):
        """LIST [n]: the size of every message, or of one."""
        if args:
            number = self._number(args, "LIST [n]")
            if number is not None:
                fields = self.pop.command("LIST %d" % number).split()
                size = fields[2] if len(fields) > 2 else "?"
                print("Message %d: %s octets" % (number, size))
            return
        status, lines = self.pop.long_command("LIST")
        listing = self.pop.scan_listing(lines)
        if not listing:
            print("No messages.")
            return
        width = max(len("No."), max(len(str(number)) for number, _ in listing))
        print("%*s  %s" % (width, "No.", "Size"))
        for number, octets in listing:
            print("%*d  %d octets" % (width, number, octets))

    def do_RETR(self, args):
        """RETR n: show a whole message."""
        number = self._number(args, "RETR n")
        if number is None:
            return
        status, lines = self.pop.long_command("RETR %d" % number)
        self.messages[number] = lines
        print("----- Message %d -----" % number)
        for line in lines:
            print(line)
        print("----- End of message %d -----" % number)

    def do_DELE(self, args):
        """DELE n: mark a message; the server removes it at QUIT."""
        number = self._number(args, "DELE n")
        if number is not None:
            print(self.pop.command("DELE %d" % number))
            self.deleted.add(number)

    def do_RSET(self, args):
        """RSET: unmark every message marked in this session."""
        print(self.pop.command("RSET"))
        self.deleted.clear()

    def do_SEARCH(self, args):
        """SEARCH words... | FROM address | DATE YYYY-MM-DD: print the matching listing lines."""
        usage = "SEARCH words... | SEARCH FROM address | SEARCH DATE YYYY-MM-DD"
        kind = args[0].upper() if args else ""
        live = [s for s in self.summaries if s.number not in self.deleted]
        if not args:
            error("usage: " + usage)
            return
        if kind == "FROM" and len(args) == 2:
            found = [s for s in live if matches_sender(args[1], s.sender)]
        elif kind == "DATE" and len(args) == 2:
            try:
                day = datetime.datetime.strptime(args[1], "%Y-%m-%d").strftime("%Y-%m-%d")
            except ValueError:
                error("%r is not a date; write it as YYYY-MM-DD" % args[1])
                return
            found = [s for s in live if s.received.startswith(day + " ")]
        else:
            found = []
            for s in live:
                _, body = split_message(self.message(s.number))
                if matches_words(args, s.subject, body):
                    found.append(s)
        if found:
            self.show([s.number for s in found])
        else:
            print(NO_MATCH)

    def do_QUIT(self, args):
        """QUIT: commit the deletions, print the server's goodbye, end the program."""
        try:
            print(self.pop.quit())
        except ServerError as exc:
            # RFC 1939: -ERR here means some marked messages could not be removed.
            error(str(exc))
        return True


class MailClient:
    """The menu: asks who the user is, then sends mail or manages the mailbox."""

    def __init__(self, args):
        self.args = args
        self.username = ""
        self.password = ""
        self.pop = None

    def run(self):
        """The whole program; returns the exit code."""
        self.ask_credentials()
        while True:
            print(MENU)
            choice = " ".join(ask(CHOICE_PROMPT).lower().split()).rstrip(").")
            action = MENU_CHOICES.get(choice)
            if action == "send":
                self.send_mail()
            elif action == "manage":
                if self.manage_mail():
                    return 0
            elif action == "exit":
                print(GOODBYE)
                return 0
            else:
                print(MENU_HINT)

    def ask_credentials(self):
        """Ask for the username (not empty) and the password."""
        self.username = ""
        while not self.username:
            self.username = ask(USERNAME_PROMPT).strip()
        self.password = ask_password()

    def send_mail(self):
        """Read a mail from the user, check it and send it by SMTP."""
        print(COMPOSE_HELP)
        lines = []
        while True:
            line = ask("")
            if line == END_OF_MESSAGE:
                break
            lines.append(line)
        try:
            message = parse_message(lines)
        except FormatError as exc:
            print(INCORRECT_FORMAT)
            print("  " + str(exc))
            return
        try:
            smtp = SMTPConnection(self.args.server, self.args.smtp_port, self.args.timeout,
                                  self.args.tls_policy)
        except ClientError as exc:
            error(str(exc))
            return
        try:
            smtp.send_message(message)
        except ClientError as exc:
            error(str(exc))
            smtp.quit()
            return
        smtp.quit()
        print(SENT_OK)

    def manage_mail(self):
        """Log in by POP3 and run the mailbox commands; True when the user QUIT."""
        try:
            self.pop = self.login()
            print(self.pop.greeting)
            mailbox = Mailbox(self.pop)
            mailbox.load_listing()
            mailbox.show_listing()
            done = mailbox.run()
            self.pop = None
            return done
        except ClientError as exc:
            error(str(exc))
        self.close()
        return False

    def login(self):
        """A logged-in POP3 session; wrong credentials are asked for again."""
        pop = None
        while True:
            fresh = pop is None
            if fresh:
                pop = POP3Connection(self.args.server, self.args.pop_port, self.args.timeout,
                                     self.args.tls_policy)
            try:
                pop.login(self.username, self.password)
                return pop
            except ServerError as exc:
                error("login failed: %s" % exc)
            except ClientError:
                pop.close()
                if fresh:
                    raise
                # Some servers hang up after a failed login; try again on a new connection.
                pop = None
                continue
            try:
                self.ask_credentials()
            except BaseException:
                pop.close()
                raise

    def close(self):
        """Leave an open POP3 session without deleting anything."""
        if self.pop is not None:
            self.pop.abandon()
            self.pop = None


def main(argv=None):
    """Run the client; return the exit code (0, or 130 after Ctrl-C)."""
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # Show what the server sent even when the console cannot encode it, and
        # keep prompts and replies in order when the output is a pipe.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace", line_buffering=True)
    if hasattr(sys.stdin, "reconfigure"):
        # Typed bytes that are not valid text still go out unchanged, not as a crash.
        sys.stdin.reconfigure(errors="surrogateescape")
    if args.insecure:
        print("Warning: --insecure: the server's certificate is not checked, so anyone on the "
              "way can read and change what you send.")
    client = MailClient(args)
    try:
        return client.run()
    except EOFError:
        print()
        return 0
    except KeyboardInterrupt:
        print()
        return 130
    except BrokenPipeError:
        # Nobody reads our output any more; keep the interpreter's final flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())

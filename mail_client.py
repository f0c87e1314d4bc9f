#!/usr/bin/env python3
"""Interactive mail client of the course mail system: sends mail by SMTP, reads it by POP3.

    python mail_client.py SERVER_IP [--smtp-port 2525] [--pop-port 1110] [--tls]
                          [--cafile FILE] [--insecure] [--implicit-tls] [--auth]

Both protocols are spoken over plain sockets.  Given --tls, --cafile or
--insecure, the client makes them private with STARTTLS (SMTP) or STLS (POP3)
whenever the server offers it; without those options it speaks exactly the
plain dialogue of the course contract (HELO first, no capability probes).
--implicit-tls speaks TLS from the first byte instead (RFC 8314).

The client talks to the course servers (which also accept the assignment's
MAIL_FROM:/RCPT_TO: spellings) and to any standard SMTP or POP3 server: one
that refuses or hangs up on MAIL_FROM: (Postfix does) gets the mail again on a
new connection in the RFC 5321 spelling, and one that answers 530 gets SMTP
AUTH with the login and password given at the start.  Mail is read the way
mail programs read it: MIME decoded, attachments listed and saved safely.
"""

import argparse
import base64
import binascii
import codecs
import datetime
import email.errors
import email.utils
import getpass
import hashlib
import hmac
import html
import html.parser
import mimetypes
import os
import re
import shutil
import socket
import ssl
import sys
import unicodedata
from email.header import Header, decode_header, make_header
from email.utils import formataddr, formatdate, make_msgid, parseaddr, parsedate_to_datetime

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

DEFAULT_SMTP_PORT = 2525
DEFAULT_POP_PORT = 1110
DEFAULT_TIMEOUT = 30.0       # seconds for connecting and for every reply
MAX_TIMEOUT = 86400          # a day: beyond that a typo, and sockets overflow near inf
QUIT_TIMEOUT = 2.0           # a goodbye to a server we are leaving must not hang us
RECV_SIZE = 65536
X509_NAME_MISMATCH = (62, 64)  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
MAX_REPLY_LINE = 1024 * 1024  # longer is a broken or hostile server, not mail

MAX_SUBJECT = 150            # contract section 1
MAX_TEXT_LINE = 1000         # RFC 5321 4.5.3.1.6, CRLF included, as the SMTP server counts it
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
SEND_AGAIN_PROMPT = "Send it again? [y/N] "
YES, NO = ("y", "yes"), ("", "n", "no")   # another answer is taken as the next menu choice
LOGIN_CHECK_TIMEOUT = 5.0    # seconds: the check at start must not hold up Mail Sending
LOGIN_UNCHECKED = "Warning: the password was not checked (%s); Mail Sending may still work."
LOGIN_REFUSED = "login failed: %s"
# -ERR codes (RFC 2449, 3206) that say the login is fine but the mailbox is not to be had now.
NOT_THE_PASSWORD = ("[IN-USE]", "[SYS/", "[LOGIN-DELAY]")
EMPTY_MAILBOX = "The mailbox is empty."
NO_MATCH = "No message matches."

# The assignment's own spellings, which the course server accepts; a standard
# server answers 500/502 and gets the RFC 5321 spellings instead.
COURSE_MAIL_FROM = "MAIL_FROM: <%s>"
COURSE_RCPT_TO = "RCPT_TO: <%s>"
STANDARD_MAIL_FROM = "MAIL FROM:<%s>"
STANDARD_RCPT_TO = "RCPT TO:<%s>"
UNKNOWN_COMMAND = (500, 502)
# Postfix takes "MAIL_FROM:" for a mail header sent as a command, answers 221 and hangs up.
RECONNECT_CODES = UNKNOWN_COMMAND + (221,)

# SMTP AUTH (RFC 4954).
AUTH_OK, AUTH_CONTINUE, AUTH_REQUIRED, AUTH_FAILED = 235, 334, 530, 535
CLEAR_MECHANISMS = ("PLAIN", "LOGIN")                  # the password itself goes over the wire
MECHANISMS_IN_CLEAR = ("CRAM-MD5", "PLAIN", "LOGIN")   # PLAIN/LOGIN only with --insecure
MECHANISMS_IN_TLS = ("PLAIN", "LOGIN", "CRAM-MD5")
CLEAR_PASSWORD_REFUSED = ("the %s offers only %s without TLS, which would send your "
                          "password readable by anyone on the way; use TLS (--cafile, --tls or "
                          "--implicit-tls) or, to send it anyway, --insecure")
CLEAR_PASSWORD_WARNING = ("Warning: --insecure: sending your password without TLS (AUTH %s) "
                          "to the %s; anyone on the way can read it.")

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
ADDRESS = re.compile(r"(%s(?:\.%s)*)@(%s(?:\.%s)*)\Z" % (_ATOM, _ATOM, _LABEL, _LABEL))
COURSE_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})\s*:\s*(\d{1,2})\s*:\s*(\d{1,2})")
HEADER_LINE = re.compile(r"[!-9;-~]+:")   # the header rule: a name of printable ASCII but ":"
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A display name before <address> (RFC 5322 3.2.5): a quoted string, or words without these
# specials ("." is allowed, as obs-phrase and every mail program take "J. Smith").
QUOTED_NAME = re.compile(r'"((?:[^"\\]|\\.)*)"\Z')
NAME_SPECIALS = '()<>[]:;@\\,"'

# Reading MIME mail.
MIME_HEADERS = ("mime-version", "content-type", "content-transfer-encoding")
SHOWN_HEADERS = ("From", "To", "Cc", "Date", "Subject")
SHOWN_HEADER_NAMES = tuple(name.lower() for name in SHOWN_HEADERS)
AUTH_RESULT_PART = re.compile(r'(?:"(?:\\.|[^"\\])*"|[^;"])+')   # RFC 8601 2.2: ";" outside quoted strings
KNOWN_TRANSFER_ENCODINGS = ("7bit", "8bit", "binary", "quoted-printable", "base64",
                            "x-uuencode", "uuencode", "uue", "x-uue")
BASE64_DEFECTS = {"InvalidBase64CharactersDefect", "InvalidBase64PaddingDefect",
                  "InvalidBase64LengthDefect"}
DISPLAY_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # tab and line end are fine
REPLACEMENT = "\ufffd"
NO_TEXT = "(this message has no text)"
NO_NAME = "(no name)"
HTML_HIDDEN = {"script", "style", "title", "template", "noscript"}
HTML_BLOCKS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5",
               "h6", "blockquote", "pre", "hr", "section", "article", "header", "footer", "dt",
               "dd", "address"}
HTML_BULLET = "* "

# Saving attachments.
MAX_FILENAME_BYTES = 120     # far below every file system's 255, room left for "-999"
MAX_EXTENSION_BYTES = 16
MAX_NAME_TRIES = 1000
NEW_FILE_MODE = 0o666        # as any program creates a file: the umask decides
O_BINARY = getattr(os, "O_BINARY", 0)   # Windows would otherwise translate line ends
FILENAME_UNSAFE = re.compile(r'[<>:"/\\|?*]')   # not allowed in Windows file names
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {"%s%d" % (d, n) for d in ("COM", "LPT")
                                                  for n in range(1, 10)}

# Replying.
REPLY_PREFIX = "Re: "
REPLY_PREFIXES = re.compile(r"\A(?:re(?:\[\d+\])?\s*:\s*)+", re.IGNORECASE)
RECIPIENT_HEADERS = ("To", "Cc", "Delivered-To", "X-Original-To")
MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}>")   # longer ids could not fit a header line
MAX_REFERENCES = 20

# The listing on a terminal.
ELLIPSIS = "\u2026"

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
COMPOSE_HELP = """Type the mail: a From: line, a To: line (several addresses separated by commas;
Name <address> works too), a Subject: line, then the body. End with a line holding only "."."""
MANAGE_HINT = "Commands: STAT, LIST, RETR, RAW, SAVE, REPLY, DELE, RSET, SEARCH, HELP, QUIT"
MANAGE_HELP = """Commands (any case):
  STAT                    number of messages and their total size
  LIST [n]                size of every message (or of message n)
  RETR n                  show message n readably: headers, text, attachments
  RAW n                   show message n exactly as the server sent it
  SAVE n [k|all] [DIR]    save attachment k (or all) of message n to DIR or here
  REPLY n                 answer message n: type the body, then a "." line
  DELE n                  mark message n for deletion (done when you QUIT)
  RSET                    unmark all messages marked for deletion
  SEARCH words...         messages whose subject or text holds all the words
  SEARCH FROM address     messages from that sender (a part of it is enough)
  SEARCH DATE YYYY-MM-DD  messages received on that day
  HELP                    this list
  QUIT                    delete the marked messages, log out, end the program"""
REPLY_HELP = 'Reply to message %d: type the body, end with a line holding only ".".'
RETRIED = "sent again on a new connection, because %s"


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
                        help="use TLS without checking the server's certificate, and allow AUTH "
                             "PLAIN/LOGIN without TLS (not private!)")
    parser.add_argument("--implicit-tls", action="store_true",
                        help="TLS from the first byte on both connections (RFC 8314; ports "
                             "465 and 995 by convention), no STARTTLS/STLS")
    parser.add_argument("--auth", action="store_true",
                        help="log in to the SMTP server (AUTH) with the username and password "
                             "before sending; without it, only when the server asks (530)")
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
        args.tls_policy = TLSPolicy(args.tls, args.cafile, args.insecure, args.implicit_tls)
    except (OSError, ssl.SSLError) as exc:
        parser.error("cannot read --cafile %s: %s" % (args.cafile, describe(exc)))
    return args


class TLSPolicy:
    """How the client uses TLS: from the first byte under --implicit-tls; else when asked for,
    whenever a server offers it (STARTTLS/STLS), and only with it under --tls."""

    def __init__(self, required=False, cafile=None, insecure=False, implicit=False):
        self.required = required
        self.implicit = implicit
        self.cafile = cafile
        self.wanted = bool(required or cafile or insecure) and not implicit
        self.context = None
        if insecure:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        elif self.wanted or implicit:
            self.context = ssl.create_default_context(cafile=cafile)


# --------------------------------------------------------------------------
# Composing mail and checking its format (pure functions)
# --------------------------------------------------------------------------

class FormatError(ValueError):
    """A typed mail that breaks the format; reasons holds every problem, each naming its line."""

    def __init__(self, reasons):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


class Message:
    """A mail that passed the format check, ready to send.

    sender and recipients are the bare addresses (the envelope); typed holds the
    From and To values as typed (display names kept), mailboxes their (name,
    address) pairs, for servers that need the names encoded.
    """

    def __init__(self, sender, recipients, subject, body, typed, mailboxes):
        self.sender = sender
        self.recipients = recipients
        self.subject = subject
        self.body = body
        self.typed = typed
        self.mailboxes = mailboxes
        self.extra_headers = []   # [(name, [words])], for standard servers

    def address_field(self, name, standard):
        """The From or To value: as typed, but RFC 2047-encoded names for a standard server."""
        if not standard or _is_ascii(self.typed[name]):
            return self.typed[name]
        return ", ".join(formataddr(pair, "utf-8") for pair in self.mailboxes[name])

    def data_lines(self, standard=False):
        """The lines sent after DATA, body dot-stuffed, without the final '.'.

        The course server stores exactly From, To, Subject and the body; a
        standard server gets an RFC 5322 message (Date, Message-ID, MIME
        labels for 8-bit text, a blank line before the body).
        """
        subject = self.subject
        if standard and not _is_ascii(subject):
            subject = Header(subject, "utf-8").encode()
        lines = ["From: " + self.address_field("From", standard),
                 "To: " + self.address_field("To", standard),
                 "Subject: " + subject]
        if standard:
            lines.append("Date: " + formatdate(localtime=True))
            # The sender's domain, so make_msgid does not wait for a DNS lookup of ours.
            lines.append("Message-ID: " + make_msgid(domain=self.sender.rpartition("@")[2]))
            for name, words in self.extra_headers:
                # One word a line (folded), so no header line grows past the limit.
                lines.append("%s: %s" % (name, words[0]))
                lines.extend(" " + word for word in words[1:])
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


def _header_value(lines, index, name, problems):
    """The text after 'Name:' on line index (0-based), or None after noting what is wrong."""
    number = index + 1
    if index >= len(lines):
        problems.append((number, 'line %d is missing: it must be the "%s:" line' % (number, name)))
        return None
    field, colon, value = lines[index].partition(":")
    if not colon or field.strip().lower() != name.lower():
        problems.append((number, 'line %d must start with "%s:" but is %r'
                         % (number, name, lines[index])))
        return None
    return value.strip()


def split_address_list(text):
    """The items of a comma-separated address list; a comma in quotes or in <> does not split."""
    items, start, quoted, angle, escaped = [], 0, False, False, False
    for index, c in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            escaped, quoted = c == "\\", c != '"'
        elif c == '"':
            quoted = True
        elif c in "<>":
            angle = c == "<"
        elif c == "," and not angle:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return items


def display_name(text):
    """The name before '<address>', unquoted (RFC 5322 3.2.5 phrase); FormatError if malformed."""
    if text.startswith('"'):
        match = QUOTED_NAME.match(text)
        if not match:
            raise FormatError(["the name %s is not a closed quoted name" % text])
        return re.sub(r"\\(.)", r"\1", match.group(1))
    bad = sorted(set(NAME_SPECIALS) & set(text))
    if bad:
        raise FormatError(['the name %r holds %s: put it in double quotes ("%s")'
                           % (text, " ".join(bad), text.replace("\\", "\\\\").replace('"', '\\"'))])
    return text


def parse_mailbox(text, role):
    """(name, address) of 'user@domain', '<user@domain>' or 'Name <user@domain>'.

    FormatError (one reason, without its line number) when it is none of them.
    """
    text = text.strip()
    name = ""
    if text.endswith(">") and "<" in text:
        start = text.rindex("<")     # no address holds '<': the last one opens it
        name = display_name(text[:start].strip())
        text = text[start + 1:-1].strip()
    elif "<" in text or ">" in text:
        raise FormatError(["%r is not an address: write Name <user@domain>, nothing after '>'"
                           % text])
    if not text:
        raise FormatError(["the %s address is empty" % role])
    if not valid_address(text):
        raise FormatError(["%r is not a valid %s address (expected user@domain)" % (text, role)])
    return name, text


def _mailboxes(value, number, role, problems):
    """The (name, address) pairs of an address list on line number; problems get the rest."""
    found = []
    for item in split_address_list(value):
        try:
            found.append(parse_mailbox(item, role))
        except FormatError as exc:
            problems.extend((number, "line %d: %s" % (number, reason)) for reason in exc.reasons)
    return found


def _line_problems(lines):
    """(line number, what is wrong) for single lines: control characters, RFC 5321 lengths."""
    problems = []
    for number, line in enumerate(lines, 1):
        if CONTROL_CHARS.search(line):
            problems.append((number, "line %d contains a control character" % number))
        if len(line.encode(WIRE_ENCODING, "surrogateescape")) + len(CRLF) > MAX_TEXT_LINE:
            problems.append((number, "line %d is longer than %d characters"
                             % (number, MAX_TEXT_LINE - len(CRLF))))
    return problems


def parse_message(lines):
    """Check a typed mail (the lines before the final '.') and return it as a Message.

    FormatError lists every problem found, each with its line, not only the first.
    """
    problems = _line_problems(lines)
    senders = []
    sender_text = _header_value(lines, 0, "From", problems)
    if sender_text is not None and len(split_address_list(sender_text)) > 1:
        problems.append((1, 'line 1: a mail has exactly one sender address (a name with a comma '
                            'goes in double quotes: "Liddell, Alice" <alice@example.org>)'))
    elif sender_text is not None:
        senders = _mailboxes(sender_text, 1, "sender", problems)
    recipients = []
    to_text = _header_value(lines, 1, "To", problems)
    if to_text == "":
        problems.append((2, "line 2: there is no recipient address"))
    elif to_text is not None:
        recipients = _mailboxes(to_text, 2, "recipient", problems)
    subject = _header_value(lines, 2, "Subject", problems)
    if subject is not None and len(subject) > MAX_SUBJECT:
        problems.append((3, "line 3: the subject is %d characters long; at most %d are allowed"
                            % (len(subject), MAX_SUBJECT)))
    body = lines[3:]
    if not body:
        problems.append((4, 'the mail has no body: type at least one line before the final "."'))
    if problems:   # in the order of the lines they are about
        raise FormatError([text for _, text in sorted(problems, key=lambda problem: problem[0])])
    envelope = []
    for _, address in recipients:
        if address.lower() not in (known.lower() for known in envelope):
            envelope.append(address)
    return Message(senders[0][1], envelope, subject, body, {"From": sender_text, "To": to_text},
                   {"From": senders, "To": recipients})


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
    the first continuation-looking line, which starts the body.  A message that
    starts with an empty line has an empty header block.
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
    if run < len(lines) and lines[run] == "":
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


def sender_checks(headers):
    """'Sender checks: SPF pass, DKIM pass (example.com), DMARC pass' from the first Authentication-Results
    field (RFC 8601), the one the server puts on top; None for a message without one."""
    value = header(headers, "Authentication-Results")
    if value is None:
        return None
    results, dkim = {}, []
    for method in AUTH_RESULT_PART.findall(value)[1:]:      # the authserv-id first
        words = method.split()
        name, _, result = words[0].partition("=") if words else ("", "", "")
        name = name.lower()
        if name == "dkim":
            domain = next((word[9:].strip('"') for word in words if word.lower().startswith("header.d=")), "")
            dkim.append("%s (%s)" % (result, domain) if domain else result)
        elif name in ("spf", "dmarc"):
            results.setdefault(name, result)
    return printable("Sender checks: SPF %s, DKIM %s, DMARC %s" % (
        results.get("spf", "none"), ", ".join(dkim) or "none", results.get("dmarc", "none")))


def decode_words(value):
    """A header value with RFC 2047 encoded words (=?utf-8?...?=) made readable."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.MessageError):
        # e.g. CharsetError for a charset name with a non-ASCII byte: show the words as sent
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


def format_listing(summaries, width=None):
    """The listing table: a title row, then 'No. sender received subject' rows, keyed by number.

    Given a width (a terminal's), a longer subject is cut with an ellipsis, not wrapped.
    """
    title = ("No.", "From", "Received", "Subject")
    rows = [(str(s.number), s.sender, s.received, s.subject or "(no subject)") for s in summaries]
    widths = [max(len(row[column]) for row in [title] + rows) for column in range(3)]

    def line(row):
        start = "%*s  %-*s  %-*s  " % (widths[0], row[0], widths[1], row[1], widths[2], row[2])
        subject = row[3] if width is None else cut_to_width(row[3], width - columns(start))
        return (start + subject).rstrip()
    return line(title), {s.number: line(row) for s, row in zip(summaries, rows)}


def columns(text):
    """How many terminal columns text fills: wide (East Asian) characters two, combining none."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def cut_to_width(text, width):
    """Text cut to fit width columns, ending with an ellipsis when cut (at least the ellipsis)."""
    if columns(text) <= width:
        return text
    kept, used = [], 0
    for c in text:
        used += columns(c)
        if used > width - 1:
            break
        kept.append(c)
    return "".join(kept) + ELLIPSIS


def matches_words(words, subject, body):
    """True when every word occurs, ignoring case, in the subject or the body."""
    text = "\n".join([subject] + body).casefold()
    return all(word.casefold() in text for word in words)


def matches_sender(query, sender):
    """True when sender is the address queried, or (without '@') contains the text."""
    query, sender = query.strip("<>").lower(), sender.lower()
    return query == sender if "@" in query else query in sender


# --------------------------------------------------------------------------
# Reading real-world (MIME) mail (pure functions)
# --------------------------------------------------------------------------

class HTMLText(html.parser.HTMLParser):
    """The text of an HTML document: no tags, entities decoded, a link's address after its text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces = []
        self.hidden = 0        # inside <script>, <style>...: nothing shown
        self.preformatted = 0  # inside <pre>: spaces and line ends kept
        self.links = []        # open <a>: (address, where its text starts in pieces)

    def handle_starttag(self, tag, attrs):
        """A tag opens: maybe a line break, a bullet, hidden text or a link."""
        if tag in HTML_HIDDEN:
            self.hidden += 1
        elif tag in HTML_BLOCKS:
            self.pieces.append("\n")
        if tag == "li":
            self.pieces.append(HTML_BULLET)
        elif tag == "pre":
            self.preformatted += 1
        elif tag == "a":
            self.links.append((dict(attrs).get("href") or "", len(self.pieces)))

    def handle_endtag(self, tag):
        """A tag closes: maybe a line break, or a link's address after its text."""
        if tag in HTML_HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in HTML_BLOCKS:
            self.pieces.append("\n")
        if tag == "pre":
            self.preformatted = max(0, self.preformatted - 1)
        elif tag == "a" and self.links:
            address, start = self.links.pop()
            if address.lower().startswith("mailto:"):
                address = address[len("mailto:"):]
            text = "".join(self.pieces[start:]).strip()
            # An address that says no more than the text (or a jump within the page) is noise.
            if address and not address.startswith("#") and address != text:
                self.pieces.append(" [%s]" % address)

    def handle_data(self, data):
        """Text between tags, its spaces collapsed outside <pre>."""
        if self.hidden:
            return
        if not self.preformatted:
            data = re.sub(r"\s+", " ", data)
        self.pieces.append(data)

    def lines(self):
        """The collected text as lines: no runs of blank lines, none at either end."""
        lines = []
        for line in "".join(self.pieces).split("\n"):
            line = line.rstrip() if self.preformatted else line.strip()
            if line or (lines and lines[-1]):
                lines.append(line)
        while lines and not lines[-1]:
            lines.pop()
        return lines


def html_to_text(markup):
    """The text lines of an HTML document (html.parser; a regex at worst, it never raises)."""
    parser = HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # older html.parser versions raise on some broken markup
        text = html.unescape(re.sub(r"<[^>]*>", " ", markup))
        return [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    return parser.lines()


def printable(text):
    """Text with the control characters that could steer a terminal made visible as U+FFFD."""
    return DISPLAY_CONTROL.sub(REPLACEMENT, text)


def is_mime(headers):
    """True for a message that needs decoding: MIME headers, or RFC 2047 words in a shown header."""
    for name, value in headers:
        name = name.lower()
        if name in MIME_HEADERS or (name in SHOWN_HEADER_NAMES and "=?" in value):
            return True
    return False


def parse_email(raw_lines, text_lines):
    """The message as an email.message.EmailMessage, its header block cut by the header rule.

    text_lines: the same lines decoded (decode_text), which the rule reads.
    """
    # Imported here: email.policy takes longer to load than the rest of the client, and only
    # MIME messages need it.
    import email.parser
    import email.policy
    count, body_start = header_bounds(text_lines)
    data = b"\n".join(raw_lines[:count]) + b"\n\n" + b"\n".join(raw_lines[body_start:]) + b"\n"
    return email.parser.BytesParser(policy=email.policy.default).parsebytes(data)


def header_text(message, name):
    """A header of a parsed message, decoded and on one line, or None."""
    try:
        value = message.get(name)
        return None if value is None else " ".join(str(value).split())
    except Exception:  # the email package has raised on hostile headers: decode the raw value
        for field, value in message.raw_items():
            if field.lower() == name.lower():
                return decode_words(" ".join(str(value).split()))
        return None


def content_parts(part, parents=()):
    """(part, its multipart ancestors) for every part that holds content, in message order."""
    if part.get_content_maintype() == "multipart" and part.is_multipart():
        for child in part.iter_parts():
            yield from content_parts(child, parents + (part,))
    else:
        yield part, parents


def decoded_payload(part, what, problems):
    """The bytes of a part, decoded from its transfer encoding; what went wrong goes to problems."""
    encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if encoding not in KNOWN_TRANSFER_ENCODINGS:
        problems.append("%s: unknown transfer encoding %r; shown as it came" % (what, encoding))
    seen = len(part.defects)
    try:
        data = part.get_payload(decode=True)
    except Exception:  # the email package's decoders are not all proof against garbage
        problems.append("%s: could not be decoded" % what)
        return b""
    damage = {type(defect).__name__ for defect in part.defects[seen:]}
    if "InvalidBase64LengthDefect" in damage:
        problems.append("%s: the base64 could not be decoded; shown as it came" % what)
    elif damage & BASE64_DEFECTS:
        problems.append("%s: the base64 is damaged; decoded as far as possible" % what)
    return data or b""


def decode_charset(data, charset, what, problems):
    """Bytes of a text part as text in its charset; an unknown or wrong charset gets a note."""
    charset = (charset or "us-ascii").strip().lower()
    try:
        codecs.lookup(charset)
    except LookupError:
        problems.append("%s: unknown charset %r; shown as UTF-8 (or Latin-1)" % (what, charset))
        return guessed_text(data)
    try:
        return data.decode(charset)
    except UnicodeDecodeError:
        if charset in ("us-ascii", "ascii"):
            # Mail labelled ASCII that holds 8-bit text is nearly always UTF-8 or Latin-1.
            return guessed_text(data)
    except Exception:  # codecs that are no text codecs ("zlib_codec") or fail their own way
        problems.append("%s: %r is not a text charset; shown as UTF-8 (or Latin-1)" % (what, charset))
        return guessed_text(data)
    problems.append("%s: not valid %s; the bad bytes are shown as %s" % (what, charset, REPLACEMENT))
    try:
        return data.decode(charset, "replace")
    except Exception:  # a codec that knows no "replace" (e.g. "idna")
        return guessed_text(data)


def guessed_text(data):
    """Bytes of unknown charset as text, line by line UTF-8 or else Latin-1 (never fails)."""
    return "\n".join(decode_text(line) for line in data.split(b"\n"))


def part_text_lines(part, what, problems):
    """The text lines of a text/plain or text/html part."""
    text = decode_charset(decoded_payload(part, what, problems), part.get_content_charset(),
                          what, problems)
    if part.get_content_subtype() == "html":
        return html_to_text(text)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


class Attachment:
    """A part of a message shown as an attachment: its number, name as sent, type and bytes."""

    def __init__(self, number, name, content_type, data):
        self.number = number
        self.name = name
        self.content_type = content_type
        self.data = data

    def safe_name(self):
        """The name SAVE writes it under."""
        return safe_filename(self.name, self.number, self.content_type)

    def describe(self):
        """One line of the attachment list."""
        shown = printable(self.name) if self.name else NO_NAME
        text = "%2d. %s (%s, %d bytes" % (self.number, shown, self.content_type, len(self.data))
        if self.safe_name() != self.name:
            text += "; SAVE names it %s" % self.safe_name()
        return text + ")"


def part_filename(part):
    """The file name a part gives itself (RFC 2231 and 2047 decoded), or None."""
    try:
        name = part.get_filename() or part.get_param("name")
    except Exception:  # a hostile parameter the email package cannot take apart
        return None
    if isinstance(name, tuple):      # an RFC 2231 value the package left undecoded
        name = email.utils.collapse_rfc2231_value(name)
    return str(name) if name else None


def attachment_data(part, what, problems):
    """The bytes SAVE writes for a part: decoded content, or the whole message it forwards."""
    if part.get_content_maintype() == "message" and part.is_multipart():
        try:
            return part.get_payload(0).as_bytes()
        except Exception:  # a forwarded message too broken to write back
            problems.append("%s: the forwarded message could not be rebuilt" % what)
            return b""
    return decoded_payload(part, what, problems)


def find_body(message):
    """The part mail programs show as the text: text/plain, else text/html, or None."""
    try:
        return message.get_body(preferencelist=("plain", "html"))
    except Exception:  # a structure too broken for get_body: the parts are still listed
        return None


def is_inline_text(part):
    """True for a text/plain or text/html part meant to be read, not saved."""
    return (part.get_content_type() in ("text/plain", "text/html")
            and part.get_content_disposition() != "attachment" and not part_filename(part))


class ReadMail:
    """A retrieved message, parsed once, for RETR, SAVE, SEARCH and REPLY."""

    def __init__(self, raw_lines):
        self.raw_lines = raw_lines
        self.lines = [decode_text(line) for line in raw_lines]
        self.headers, self.body = split_message(self.lines)
        self.mime = is_mime(self.headers)
        self.message = None
        self.problems = []
        self.texts = []          # the text shown, a list of lines per part
        self.alternatives = []   # other renderings of that text: searched, not shown
        self.attachments = []
        if self.mime:
            try:
                self.message = parse_email(raw_lines, self.lines)
                self.collect_parts()
            except Exception as exc:  # never a traceback for a hostile message: show it raw
                self.mime, self.texts, self.alternatives, self.attachments = False, [], [], []
                self.problems.append("the MIME structure could not be read (%s); shown as it came"
                                     % exc.__class__.__name__)

    def collect_parts(self):
        """Sort the parts into the text shown, other renderings of it, and attachments."""
        parts = list(content_parts(self.message))
        body = find_body(self.message)
        body_parents = next((parents for part, parents in parts if part is body), ())
        shared = {id(p) for p in body_parents if p.get_content_type() == "multipart/alternative"}
        for part, parents in parts:
            if part is body:
                self.texts.append(part_text_lines(part, "the text part", self.problems))
            elif part.get_content_maintype() == "multipart":   # no boundary: nothing to split
                self.problems.append("a %s part has no boundary; shown as it came"
                                     % part.get_content_type())
                self.texts.append(decode_text(decoded_payload(part, "it", [])).splitlines())
            elif is_inline_text(part):
                alternative = any(id(p) in shared for p in parents)
                what = "a %s part" % part.get_content_type()
                (self.alternatives if alternative else self.texts).append(
                    part_text_lines(part, what, self.problems))
            else:
                self.add_attachment(part)

    def add_attachment(self, part):
        """Number a part that is not text to read, and decode it."""
        number = len(self.attachments) + 1
        name = part_filename(part)
        what = "attachment %d (%s)" % (number, name or part.get_content_type())
        data = attachment_data(part, what, self.problems)
        self.attachments.append(Attachment(number, name, part.get_content_type(), data))

    def field(self, name):
        """A header, decoded, or None."""
        if self.message is not None:
            return header_text(self.message, name)
        value = header(self.headers, name)
        return None if value is None else decode_words(value)

    def shown_lines(self):
        """What RETR prints: the stored lines of a plain message, the readable view of a MIME one.

        A message the server checked starts with one line of its results.
        """
        checks = sender_checks(self.headers)
        if not self.mime:
            return ([checks] if checks else []) + self.lines + self.notes()
        lines = [checks] if checks else []
        for name in SHOWN_HEADERS:
            value = self.field(name)
            if value is not None:
                lines.append("%s: %s" % (name, printable(value)))
        lines.append("")
        texts = [text for text in self.texts if text]
        for index, text in enumerate(texts):
            lines.extend([""] if index else [])
            lines.extend(printable(line) for line in text)
        if not texts:
            lines.append(NO_TEXT)
        if self.attachments:
            lines.extend(["", "Attachments:"] + ["  " + a.describe() for a in self.attachments])
        return lines + self.notes()

    def notes(self):
        """One 'Note:' line for each thing that could not be shown as it should."""
        return ["Note: " + printable(problem) for problem in self.problems]

    def searchable_lines(self):
        """The decoded text SEARCH looks in (besides the subject)."""
        if not self.mime:
            return self.body
        return [line for text in self.texts + self.alternatives for line in text]


# --------------------------------------------------------------------------
# Saving attachments (pure functions but the one that writes)
# --------------------------------------------------------------------------

def safe_filename(name, number, content_type):
    """A file name for an attachment that stays in its folder, is not hidden and has no controls."""
    name = unicodedata.normalize("NFC", name or "")
    name = re.split(r"[/\\]", name)[-1]            # no path parts, Windows ones included
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp"))
    name = FILENAME_UNSAFE.sub("_", name)
    name = name.strip().lstrip(".").rstrip(". ")     # no "..", not hidden, no Windows trailers
    name = shorten_filename(name)
    if name.split(".")[0].upper() in WINDOWS_RESERVED:
        name = "_" + name
    if not name:
        extension = mimetypes.guess_extension(content_type or "") or ".bin"
        name = "attachment-%d%s" % (number, extension)
    return name


def shorten_filename(name):
    """Name cut to MAX_FILENAME_BYTES (UTF-8), keeping a short extension."""
    stem, extension = os.path.splitext(name)
    if len(extension.encode("utf-8")) > MAX_EXTENSION_BYTES:
        stem, extension = name, ""
    while stem and len((stem + extension).encode("utf-8")) > MAX_FILENAME_BYTES:
        stem = stem[:-1]
    stem = stem.rstrip(". ")
    return stem + extension if stem else ""


def numbered_filename(name, attempt):
    """The name to try at attempt 0, 1, 2...: name, then name-1.ext, name-2.ext..."""
    if not attempt:
        return name
    stem, extension = os.path.splitext(name)
    return "%s-%d%s" % (stem, attempt, extension)


def write_new_file(folder, name, data):
    """Write data to a new file in folder, never over an existing one; return its path.

    O_EXCL makes the existence check and the creation one step, so a file (or a
    symlink) that appears meanwhile is not overwritten: the next name is tried.
    """
    for attempt in range(MAX_NAME_TRIES):
        path = os.path.join(folder, numbered_filename(name, attempt))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY, NEW_FILE_MODE)
        except FileExistsError:
            continue
        except PermissionError:
            if os.path.lexists(path):   # Windows says this for an existing folder of that name
                continue
            raise
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            os.remove(path)
            raise
        return path
    raise FileExistsError("%d files named like %s exist already" % (MAX_NAME_TRIES, name))


# --------------------------------------------------------------------------
# Replying (pure functions)
# --------------------------------------------------------------------------

class ReplyError(ValueError):
    """A message that cannot be answered; the text says why."""


def addresses_in(mail, names):
    """The valid addresses in these headers of mail, in order."""
    found = []
    for name in names:
        value = mail.field(name)
        if value:
            found.extend(a for _, a in email.utils.getaddresses([value]) if valid_address(a))
    return found


def reply_sender(mail, login):
    """The login at the domain the original was sent to (to the login's address if it is there)."""
    recipients = addresses_in(mail, RECIPIENT_HEADERS)
    for address in recipients:
        local, _, domain = address.rpartition("@")
        if local.lower() == login.lower():
            return "%s@%s" % (login, domain)
    if not recipients:
        raise ReplyError("it does not say which address it was sent to")
    return "%s@%s" % (login, recipients[0].rpartition("@")[2])


def reply_subject(subject):
    """'Re: ' and the subject without Re: prefixes of its own, within the subject limit."""
    subject = " ".join(DISPLAY_CONTROL.sub(" ", subject or "").split())
    return (REPLY_PREFIX + REPLY_PREFIXES.sub("", subject))[:MAX_SUBJECT].rstrip()


def threading_headers(mail):
    """In-Reply-To and References (RFC 5322 3.6.4) of a reply, or none without a Message-ID."""
    own = MESSAGE_ID.findall(mail.field("Message-ID") or "")
    if not own:
        return []
    earlier = MESSAGE_ID.findall(mail.field("References") or mail.field("In-Reply-To") or "")
    references = [i for i in earlier if i != own[0]][-(MAX_REFERENCES - 1):] + own[:1]
    return [("In-Reply-To", own[:1]), ("References", references)]


def reply_draft(mail, login):
    """(the From/To/Subject lines a reply starts with, its threading headers)."""
    to = addresses_in(mail, ("Reply-To",)) or addresses_in(mail, ("From",))
    if not to:
        raise ReplyError("it has no address to reply to")
    lines = ["From: " + reply_sender(mail, login), "To: " + ", ".join(to),
             "Subject: " + reply_subject(mail.field("Subject"))]
    return lines, threading_headers(mail)


# --------------------------------------------------------------------------
# Protocol code
# --------------------------------------------------------------------------

class ClientError(Exception):
    """A problem shown to the user as one line; the program goes on."""


class ServerError(ClientError):
    """The server refused a command; the text holds its reply."""


class ConnectionLost(ClientError):
    """The server closed the connection (or it broke) instead of answering."""


class StandardNeeded(ClientError):
    """The server refused the course spelling (500/502) or hung up on it (221): use RFC 5321."""


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
                raise ConnectionLost("the server closed the connection")
            self.buffer += chunk


class Connection:
    """A socket to one server with a timeout on everything and one-line errors."""

    PROTOCOL = "TCP"

    def __init__(self, host, port, timeout, tls_policy):
        self.host = host
        self.where = "%s server %s port %d" % (self.PROTOCOL, host, port)
        self.encrypted = False
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except (OSError, UnicodeError) as exc:
            raise ClientError("cannot connect to the %s: %s" % (self.where, describe(exc)))
        self.reader = LineReader(self.sock)
        try:
            if tls_policy.implicit:
                self.start_tls(tls_policy)   # RFC 8314: TLS from the first byte
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
            raise ConnectionLost("lost the connection to the %s: %s" % (self.where, describe(exc)))

    def readline(self):
        """The next line from the server, as bytes."""
        try:
            return self.reader.readline()
        except socket.timeout:
            raise ClientError("the %s did not answer in time" % self.where)
        except OSError as exc:
            raise ConnectionLost("lost the connection to the %s: %s" % (self.where, describe(exc)))
        except ClientError as exc:
            raise exc.__class__("%s (%s)" % (exc, self.where))

    def start_tls(self, policy):
        """Run the TLS handshake on the connection; anything read before it is dropped."""
        try:
            self.sock = policy.context.wrap_socket(self.sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise ClientError("TLS with the %s failed: %s" % (self.where, certificate_problem(
                exc, self.host, policy.cafile)))
        except OSError as exc:
            self.close()
            raise ClientError("TLS with the %s failed: %s" % (self.where, describe(exc)))
        self.reader = LineReader(self.sock)
        self.encrypted = True

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


def certificate_problem(exc, host, cafile):
    """Why a certificate was not trusted, and what to do about it, on one line."""
    reason = getattr(exc, "verify_message", None) or describe(exc)
    if getattr(exc, "verify_code", None) in X509_NAME_MISMATCH:
        return ("its certificate does not name %r (%s); connect by a name the certificate names"
                % (host, reason))
    if cafile:
        return ("its certificate could not be verified (%s), also not with --cafile %s: give "
                "the server's own certificate or the CA that signed it" % (reason, cafile))
    return ("its certificate could not be verified (%s); if it is self-signed or from a "
            "private CA, give it with --cafile FILE (the server's certificate or its CA)" % reason)


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

    def __init__(self, host, port, timeout, tls_policy, credentials):
        self.local_name = socket.gethostname() or "localhost"
        self.extensions = {}
        self.credentials = credentials
        self.authenticated = False
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
            self.extensions = parse_extensions(lines[1:])
            return
        self.expect("HELO " + self.local_name, (250,), "HELO")

    def send_message(self, message):
        """The course dialogue (HELO, MAIL_FROM:, RCPT_TO:, DATA); StandardNeeded when the
        server wants RFC 5321 on a new connection, ServerError (with the reply) on a refusal."""
        self.greet()
        try:
            code, lines = self.command(COURSE_MAIL_FROM % message.sender)
        except ConnectionLost:
            raise StandardNeeded("the server hung up on MAIL_FROM:")
        if code in RECONNECT_CODES:
            raise StandardNeeded("the server answered MAIL_FROM: with " + " ".join(lines))
        if code == AUTH_REQUIRED:
            # EHLO also resets whatever state the refused command left behind.
            self.ehlo_or_helo()
            self.authenticate(lines)
            return self.standard_transaction(message)
        if code != 250:
            raise refusal("the sender " + message.sender, lines)
        self.rest_of_transaction(message, COURSE_RCPT_TO, standard=False)

    def send_standard(self, message, authenticate=False):
        """The RFC 5321 dialogue: EHLO, AUTH when asked for (or on a 530), MAIL FROM:<a>..."""
        self.ehlo_or_helo()
        if authenticate:
            self.authenticate()
        self.standard_transaction(message)

    def standard_transaction(self, message):
        """MAIL FROM:<a> (AUTH first if the server answers 530), RCPT TO:<b>, DATA."""
        mail_from = STANDARD_MAIL_FROM % message.sender
        if "8BITMIME" in self.extensions and not _is_ascii("\n".join(message.body)):
            mail_from += " BODY=8BITMIME"
        code, lines = self.command(mail_from)
        if code == AUTH_REQUIRED and not self.authenticated:
            self.authenticate(lines)
            code, lines = self.command(mail_from)
        if code != 250:
            raise refusal("the sender " + message.sender, lines)
        self.rest_of_transaction(message, STANDARD_RCPT_TO, standard=True)

    def rest_of_transaction(self, message, rcpt_to, standard):
        """The recipients, then the message after DATA."""
        for recipient in message.recipients:
            self.expect(rcpt_to % recipient, (250, 251), "the recipient %s" % recipient)
        self.expect("DATA", (354,), "DATA")
        self.send_lines(message.data_lines(standard) + [END_OF_MESSAGE])
        code, lines = self.reply()
        if code != 250:
            raise refusal("the mail", lines)

    def authenticate(self, demand=None):
        """AUTH (RFC 4954) with the user's login and password, by the safest mechanism offered."""
        offered = self.extensions.get("AUTH", "").upper().split()
        if not offered:
            why = " (it answered %s)" % " ".join(demand) if demand else ""
            raise ClientError("the %s offers no AUTH, so the client cannot log in%s"
                              % (self.where, why))
        mechanism = choose_mechanism(offered, self.encrypted, self.credentials.insecure, self.where)
        if mechanism in CLEAR_MECHANISMS and not self.encrypted:
            print(CLEAR_PASSWORD_WARNING % (mechanism, self.where))
        login, password = self.credentials.login, self.credentials.password
        code, lines = getattr(self, "auth_" + mechanism.replace("-", "_"))(login, password)
        if code == AUTH_FAILED:
            raise ServerError("the %s did not accept the login %r with its password (AUTH %s): %s"
                              % (self.where, login, mechanism, " ".join(lines)))
        if code != AUTH_OK:
            raise refusal("AUTH " + mechanism, lines)
        self.authenticated = True

    def auth_PLAIN(self, login, password):
        """AUTH PLAIN (RFC 4616): the login and password in the initial response."""
        response = b64("\0%s\0%s" % (login, password))
        code, lines = self.command("AUTH PLAIN " + response)
        if code == AUTH_CONTINUE:      # a server that asks again for what it was given
            code, lines = self.command(response)
        return code, lines

    def auth_LOGIN(self, login, password):
        """AUTH LOGIN: the login, then the password, each asked for with a 334."""
        code, lines = self.command("AUTH LOGIN")
        for answer in (login, password):
            if code != AUTH_CONTINUE:
                return code, lines
            code, lines = self.command(b64(answer))
        return code, lines

    def auth_CRAM_MD5(self, login, password):
        """AUTH CRAM-MD5 (RFC 2195): an HMAC-MD5 of the server's challenge, no password sent."""
        code, lines = self.command("AUTH CRAM-MD5")
        if code != AUTH_CONTINUE:
            return code, lines
        try:
            challenge = base64.b64decode(lines[-1][4:].strip(), validate=True)
        except (binascii.Error, ValueError):
            self.command("*")          # RFC 4954 4: cancel the exchange
            raise ClientError("the %s sent a malformed CRAM-MD5 challenge" % self.where)
        digest = hmac.new(password.encode(WIRE_ENCODING, "surrogateescape"), challenge,
                          hashlib.md5).hexdigest()
        return self.command(b64("%s %s" % (login, digest)))

    def quit(self):
        """Say goodbye and close; the mail is already sent or refused, so errors do not matter."""
        try:
            self.sock.settimeout(QUIT_TIMEOUT)
            self.command("QUIT")
        except (ClientError, OSError):
            pass
        self.close()


class Credentials:
    """Who the user is, for SMTP AUTH, and whether a password may go out in clear (--insecure)."""

    def __init__(self, login, password, insecure=False):
        self.login = login
        self.password = password
        self.insecure = insecure


def parse_extensions(lines):
    """{KEYWORD: parameters} from the lines after the first of an EHLO reply."""
    extensions = {}
    for item in lines:
        keyword, _, params = item[4:].strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):      # the pre-RFC 4954 form some servers still send
            keyword, params = "AUTH", keyword[len("AUTH="):] + " " + params
        if keyword in extensions:
            params = extensions[keyword] + " " + params
        extensions[keyword] = params.strip()
    return extensions


def choose_mechanism(offered, encrypted, clear_allowed, where="SMTP server"):
    """The AUTH mechanism to use of those offered; ClientError when none may be used."""
    for mechanism in MECHANISMS_IN_TLS if encrypted else MECHANISMS_IN_CLEAR:
        if mechanism not in offered:
            continue
        if mechanism in CLEAR_MECHANISMS and not (encrypted or clear_allowed):
            raise ClientError(CLEAR_PASSWORD_REFUSED % (where, " and ".join(
                m for m in MECHANISMS_IN_CLEAR if m in offered)))
        return mechanism
    raise ClientError("the %s offers no login method this client knows (it offers AUTH %s)"
                      % (where, " ".join(offered)))


def b64(text):
    """Text as UTF-8 in base64, as SASL exchanges carry it."""
    return base64.b64encode(text.encode(WIRE_ENCODING, "surrogateescape")).decode("ascii")


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

    def retrieve(self, number):
        """RETR: the lines of message number as bytes, byte-stuffing removed."""
        self.command("RETR %d" % number)
        return self.multiline()

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


def read_typed_mail():
    """The lines the user types up to the line holding only '.'."""
    lines = []
    while True:
        line = ask("")
        if line == END_OF_MESSAGE:
            return lines
        lines.append(line)


def words_after(line, count):
    """What follows the first count words of a command line, inner spaces kept; quotes dropped."""
    match = re.match(r"\s*(?:\S+(?:\s+|\Z)){%d}(.*)\Z" % count, line)
    rest = match.group(1).strip() if match else ""
    if len(rest) > 1 and rest[0] == rest[-1] and rest[0] in "\"'":
        rest = rest[1:-1]
    return rest


def listing_width():
    """The columns a listing line may fill: the terminal's width but one, None for a pipe."""
    if sys.stdout is None or not sys.stdout.isatty():
        return None
    # One column spare: some terminals (Windows) wrap as soon as the last one is filled.
    return shutil.get_terminal_size().columns - 1


class MailManagement:
    """Mail Management: the commands on a logged-in POP3 session, one do_ method each."""

    def __init__(self, pop, login, send):
        self.pop = pop
        self.login = login
        self.send = send       # checks typed mail lines and sends them, as Mail Sending does
                               # (returns what was typed at its offer to send again, or None)
        self.summaries = []
        self.title = ""
        self.lines = {}        # number -> listing line
        self.messages = {}     # number -> ReadMail, so SEARCH reads each message once
        self.deleted = set()   # marked in this session; the server forgets them on RSET
        self.use_top = True
        self.command_line = ""
        self.typed = None      # a command typed already, at REPLY's "Send it again?" prompt

    def load_listing(self):
        """Read every message's headers (TOP n 0, RETR where TOP is missing)."""
        _, lines = self.pop.long_command("LIST")
        self.summaries = []
        for number, _ in self.pop.scan_listing(lines):
            self.summaries.append(summarize(number, self.headers_of(number)))
        self.title, self.lines = format_listing(self.summaries, listing_width())

    def headers_of(self, number):
        """The header lines of a message (or all of it, where TOP is missing)."""
        if self.use_top:
            try:
                return self.pop.long_command("TOP %d 0" % number)[1]
            except ServerError:
                self.use_top = False  # RFC 1939 makes TOP optional
        return self.mail(number).lines

    def retrieve(self, number):
        """Message number fetched anew with RETR, as a ReadMail (kept for SEARCH, SAVE, REPLY)."""
        self.messages[number] = ReadMail(self.pop.retrieve(number))
        return self.messages[number]

    def mail(self, number):
        """Message number as a ReadMail (fetched once per session)."""
        if number not in self.messages:
            self.retrieve(number)
        return self.messages[number]

    def live_mail(self, number):
        """Message number, or None after saying that it is marked for deletion."""
        if number in self.deleted:
            error("message %d is marked for deletion (RSET unmarks it)" % number)
            return None
        return self.mail(number)

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
            self.command_line = ask(COMMAND_PROMPT) if self.typed is None else self.typed
            self.typed = None
            words = self.command_line.split()
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
        """RETR n: show a message readably (a plain course message as it is stored)."""
        number = self._number(args, "RETR n")
        if number is not None:
            self.print_message(number, self.retrieve(number).shown_lines())

    def do_RAW(self, args):
        """RAW n: show a message exactly as the server sent it (byte-stuffing removed)."""
        number = self._number(args, "RAW n")
        if number is not None:
            self.print_message(number, self.retrieve(number).lines)

    def print_message(self, number, lines):
        """Print message lines between the start and end lines."""
        print("----- Message %d -----" % number)
        for line in lines:
            print(line)
        print("----- End of message %d -----" % number)

    def do_SAVE(self, args):
        """SAVE n [k|all] [DIR]: save attachment k (default: all) of message n into DIR."""
        if not args or not args[0].isdigit() or int(args[0]) < 1:
            return error("usage: SAVE n [k|all] [DIR]")
        number, which, used = int(args[0]), "all", 2
        if len(args) > 1 and (args[1].isdigit() or args[1].lower() == "all"):
            which, used = args[1].lower(), 3
        folder = os.path.expanduser(words_after(self.command_line, used) or os.curdir)
        if not os.path.isdir(folder):
            return error("there is no folder %r" % folder)
        mail = self.live_mail(number)
        for attachment in (mail and self.chosen_attachments(number, mail, which)) or ():
            self.save(attachment, folder)

    def chosen_attachments(self, number, mail, which):
        """The attachments SAVE asked for, or None after saying there are none such."""
        count = len(mail.attachments)
        if not count:
            return error("message %d has no attachments" % number)
        if which == "all":
            return mail.attachments
        if not 1 <= int(which) <= count:
            return error("message %d has %d attachment%s: choose 1 to %d or all"
                         % (number, count, "" if count == 1 else "s", count))
        return [mail.attachments[int(which) - 1]]

    def save(self, attachment, folder):
        """Write one attachment under its safe name and print the path."""
        try:
            path = write_new_file(folder, attachment.safe_name(), attachment.data)
        except OSError as exc:
            return error("could not save attachment %d in %s: %s"
                         % (attachment.number, folder, describe(exc)))
        print("Saved attachment %d to %s" % (attachment.number, printable(os.path.abspath(path))))

    def do_REPLY(self, args):
        """REPLY n: answer a message: type the body and the final '.', as in Mail Sending."""
        number = self._number(args, "REPLY n")
        mail = None if number is None else self.live_mail(number)
        if mail is None:
            return
        try:
            lines, threading = reply_draft(mail, self.login)
        except ReplyError as exc:
            return error("message %d cannot be answered: %s" % (number, exc))
        print(REPLY_HELP % number)
        for line in lines:
            print(line)
        self.typed = self.send(lines + read_typed_mail(), threading)

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
            found = [s for s in live
                     if matches_words(args, s.subject, self.mail(s.number).searchable_lines())]
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
        self.check_login()
        typed = None     # a menu choice typed already, at the "Send it again?" prompt
        while True:
            print(MENU)
            if typed is None:
                typed = ask(CHOICE_PROMPT)
            action = MENU_CHOICES.get(" ".join(typed.lower().split()).rstrip(")."))
            typed = None
            if action == "send":
                typed = self.send_mail()
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
        """Read a mail from the user, check it and send it by SMTP; return as check_and_send."""
        print(COMPOSE_HELP)
        return self.check_and_send(read_typed_mail())

    def check_and_send(self, lines, extra_headers=()):
        """Check typed mail lines and send them, or say everything that is wrong with them.

        A mail that could not be sent is kept and offered again until it is sent or the
        user says no.  Returns the answer to that offer when it was neither yes nor no
        (the caller takes it as the next choice or command, so "b" goes on to Mail
        Management as it did before the offer), else None.
        """
        try:
            message = parse_message(lines)
        except FormatError as exc:
            print(INCORRECT_FORMAT)
            for reason in exc.reasons:
                print("  " + reason)
            return None
        message.extra_headers = list(extra_headers)
        while True:
            try:
                self.transmit(message)
            except ClientError as exc:
                error(str(exc))
            else:
                print(SENT_OK)
                return None
            answer = ask(SEND_AGAIN_PROMPT).strip()
            if answer.lower() not in YES:
                return None if answer.lower() in NO else answer

    def transmit(self, message):
        """Send a checked mail: the course dialogue, then, if the server wants it, the RFC 5321
        one on a new connection (once, silently unless that fails too)."""
        smtp = self.connect_smtp()
        try:
            if self.args.auth:
                return smtp.send_standard(message, authenticate=True)
            return smtp.send_message(message)
        except StandardNeeded as exc:
            why = str(exc)
        finally:
            smtp.quit()
        try:
            smtp = self.connect_smtp()
        except ClientError as exc:
            raise ClientError("%s (%s)" % (exc, RETRIED % why))
        try:
            smtp.send_standard(message)
        except ClientError as exc:
            raise exc.__class__("%s (%s)" % (exc, RETRIED % why))
        finally:
            smtp.quit()

    def connect_smtp(self):
        """A new SMTP session with the server of the command line."""
        return SMTPConnection(self.args.server, self.args.smtp_port, self.args.timeout,
                              self.args.tls_policy,
                              Credentials(self.username, self.password, self.args.insecure))

    def manage_mail(self):
        """Log in by POP3 and run the mailbox commands; True when the user QUIT."""
        try:
            self.pop = self.login()
            print(self.pop.greeting)
            management = MailManagement(self.pop, self.username, self.check_and_send)
            management.load_listing()
            management.show_listing()
            done = management.run()
            self.pop = None
            return done
        except ClientError as exc:
            error(str(exc))
        self.close()
        return False

    def check_login(self):
        """Try the username and password on the POP3 server at once, asking again while it
        refuses them, as Mail Management does; a server that cannot be reached (or holds
        the mailbox for another session) gets one warning line, and the menu follows."""
        try:
            pop = self.login(min(self.args.timeout, LOGIN_CHECK_TIMEOUT))
        except ClientError as exc:
            print(LOGIN_UNCHECKED % exc)
            return
        pop.abandon()

    def login(self, timeout=None):
        """A logged-in POP3 session; wrong credentials are asked for again."""
        pop = None
        while True:
            fresh = pop is None
            if fresh:
                pop = POP3Connection(self.args.server, self.args.pop_port,
                                     timeout or self.args.timeout, self.args.tls_policy)
            try:
                pop.login(self.username, self.password)
                return pop
            except ServerError as exc:
                if any(code in str(exc) for code in NOT_THE_PASSWORD):
                    pop.close()
                    raise ServerError(LOGIN_REFUSED % exc)
                error(LOGIN_REFUSED % exc)
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

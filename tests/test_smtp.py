"""Tests of mailserver_smtp.py against CONTRACT.md sections 1 and 2, over real sockets."""

import io
import os
import re
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import (TLS_ARGS, client_tls_context, read_mailbox, send_message,  # noqa: E402
                     wait_for)

import mailserver_smtp  # noqa: E402

DOMAIN = "mail.test"
MAX_SIZE = 65536
RECEIVED = re.compile(rb"Received: (\d{4}-\d\d-\d\d) : (\d\d) : (\d\d)\n")


def unstuffed_body_lines(message):
    """The lines after the Received: header of a stored message, dot-stuffing undone."""
    lines = message.split(b"\n")[:-1]
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Received: ")) + 1
    return [line[1:] if line.startswith(b".") else line for line in lines[start:]]


class ServerTestCase(support.OneServerTestCase):
    """Starts one SMTP server in a fresh mail root for the whole class; each test starts with empty mailboxes."""

    server_args = ("--domain", DOMAIN, "--max-size", str(MAX_SIZE))

    def setUp(self):
        support.remove_mailboxes(self.root)

    def connect(self, helo=True):
        """A raw client past the 220 greeting and, when helo is true, HELO; closed after the test."""
        client = support.smtp_session(self.server, "client.test" if helo else None)
        self.addCleanup(client.close)
        return client


class ContractDialogueTest(ServerTestCase):
    """The dialogue of CONTRACT.md section 2, reply by reply."""

    def test_the_contract_dialogue_replies_exactly(self):
        """The dialogue of contract section 2 gets its replies word for word and stores the message."""
        client = self.server.connect()
        self.addCleanup(client.close)
        self.assertEqual(client.line(), "220 %s Service ready" % DOMAIN)
        self.assertEqual(client.cmd("HELO kuleuven.be")[1], ["250 OK Hello kuleuven.be"])
        self.assertEqual(client.cmd("MAIL_FROM: <cnlab@kuleuven.be>")[1],
                         ["250 <cnlab@kuleuven.be>... Sender ok"])
        self.assertEqual(client.cmd("RCPT_TO: <alice@kuleuven.be>")[1], ["250 alice... Recipient ok"])
        self.assertEqual(client.cmd("RCPT_TO: <nobody@kuleuven.be>")[1], ["550 No such user"])
        self.assertEqual(client.cmd("DATA")[1], ['354 Enter mail, end with "." on a line by itself'])
        client.send("From: cnlab@kuleuven.be\r\nTo: alice@kuleuven.be\r\nSubject: Lab\r\nHello\r\n.\r\n")
        self.assertEqual(client.reply()[1], ["250 OK Message accepted for delivery"])
        self.assertEqual(client.cmd("QUIT")[1], ["221 %s closing connection" % DOMAIN])
        self.assertTrue(client.closed())
        [message] = support.stored_messages(self.root, "alice")
        self.assertRegex(message, rb"\AFrom: cnlab@kuleuven.be\nTo: alice@kuleuven.be\nSubject: Lab\n"
                                  rb"Received: \d{4}-\d\d-\d\d : \d\d : \d\d\nHello\n\Z")

    def test_both_spellings_any_case_with_or_without_brackets(self):
        """MAIL_FROM:/RCPT_TO: and MAIL FROM:/RCPT TO: work in any case, with or without <>."""
        client = self.connect()
        spellings = [("MAIL_FROM:<a@x.org>", "RCPT_TO:<alice@x.org>"),
                     ("mail_from: a@x.org", "rcpt_to: alice@x.org"),
                     ("MAIL FROM:<a@x.org>", "RCPT TO:<alice@x.org>"),
                     ("Mail From: a@x.org", "Rcpt To: alice@x.org"),
                     ("MAIL FROM:<a@x.org> BODY=8BITMIME", "RCPT TO: <alice@x.org>")]
        for mail, rcpt in spellings:
            with self.subTest(mail=mail, rcpt=rcpt):
                code, lines = client.cmd(mail)
                self.assertEqual(lines, ["250 <a@x.org>... Sender ok"])
                self.assertEqual(client.cmd(rcpt)[1], ["250 alice... Recipient ok"])
                self.assertEqual(client.cmd("RSET")[0], 250)

    def test_null_reverse_path_is_accepted(self):
        """MAIL FROM:<> (a bounce's null sender) is accepted."""
        client = self.connect()
        self.assertEqual(client.cmd("MAIL FROM:<>")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<bob@x.org>")[0], 250)

    def test_ehlo_advertises_size_and_its_keywords(self):
        """EHLO answers with the domain and advertises SIZE <max>, 8BITMIME and PIPELINING."""
        client = self.connect(helo=False)
        code, lines = client.cmd("EHLO client.test")
        self.assertEqual(code, 250)
        self.assertEqual(lines[0], "250-%s Hello client.test" % DOMAIN)
        self.assertIn("250-SIZE %d" % MAX_SIZE, lines)
        self.assertIn("250-8BITMIME", lines)
        self.assertIn("250-PIPELINING", lines)
        self.assertTrue(lines[-1].startswith("250 "))

    def test_rset_noop_vrfy_help(self):
        """RSET ends the transaction; NOOP, VRFY and HELP answer as RFC 5321 says."""
        client = self.connect()
        self.assertEqual(client.cmd("NOOP")[0], 250)
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250)
        self.assertEqual(client.cmd("RSET")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 503, "RSET must end the transaction")
        self.assertEqual(client.cmd("VRFY alice")[0], 250)
        self.assertIn("alice", client.cmd("VRFY <alice@x.org>")[1][0])
        self.assertEqual(client.cmd("VRFY nobody")[0], 550)
        self.assertEqual(client.cmd("VRFY")[0], 501)
        code, lines = client.cmd("HELP")
        self.assertEqual(code, 214)
        self.assertIn("MAIL", " ".join(lines))

    def test_commands_out_of_order_get_503_and_keep_state(self):
        """Commands in the wrong order get 503 and leave the transaction as it was."""
        client = self.connect(helo=False)
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 503, "MAIL before HELO")
        self.assertEqual(client.cmd("HELO client.test")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 503, "RCPT before MAIL")
        self.assertEqual(client.cmd("DATA")[0], 503, "DATA before MAIL")
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250)
        self.assertEqual(client.cmd("DATA")[0], 503, "DATA before RCPT")
        self.assertEqual(client.cmd("MAIL FROM:<b@x.org>")[0], 503, "a second MAIL")
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 250, "the transaction survives a 503")
        reply = self.send_data(client, b"Subject: kept\r\nstill the first sender\r\n")
        self.assertEqual(reply[0], 250)
        [message] = support.stored_messages(self.root, "alice")
        self.assertTrue(message.startswith(b"From: a@x.org\n"), message)

    def send_data(self, client, body):
        """DATA, then body and the final '.'; return the reply to it."""
        self.assertEqual(client.cmd("DATA")[0], 354)
        client.send(body + b".\r\n")
        return client.reply()

    def test_bad_syntax_gets_501(self):
        """HELO/EHLO without a name and malformed MAIL, RCPT, DATA and RSET lines get 501."""
        client = self.connect(helo=False)
        self.assertEqual(client.cmd("HELO")[0], 501)
        self.assertEqual(client.cmd("EHLO")[0], 501)
        self.assertEqual(client.cmd("HELO client.test")[0], 250)
        for command in ["MAIL", "MAIL FROM", "MAIL TO:<a@x.org>", "MAIL FROM:<a b@x.org>",
                        "MAIL FROM:<a@x.org", "MAIL FROM:<@x.org>", "MAIL FROM:<a@>"]:
            with self.subTest(command=command):
                self.assertEqual(client.cmd(command)[0], 501)
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250)
        for command in ["RCPT TO:", "RCPT TO:<>", "RCPT FROM:<alice@x.org>", "RCPT"]:
            with self.subTest(command=command):
                self.assertEqual(client.cmd(command)[0], 501)
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 250)
        self.assertEqual(client.cmd("DATA now")[0], 501)
        self.assertEqual(client.cmd("RSET everything")[0], 501)

    def test_unknown_commands_get_500_and_unimplemented_502(self):
        """Unknown command words get 500, EXPN (known, not offered) 502."""
        client = self.connect()
        for command in ["FOO", "HELOX there", "MAILFROM:<a@x.org>", "DATA_", "", "   "]:
            with self.subTest(command=command):
                self.assertEqual(client.cmd(command)[0], 500)
        self.assertEqual(client.cmd("EXPN staff")[0], 502)
        self.assertEqual(client.cmd("NOOP")[0], 250)

    def test_a_new_helo_resets_the_transaction(self):
        """A second HELO ends the transaction in progress."""
        client = self.connect()
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 250)
        self.assertEqual(client.cmd("HELO again.test")[0], 250)
        self.assertEqual(client.cmd("DATA")[0], 503)
        self.assertEqual(client.cmd("MAIL FROM:<b@x.org>")[0], 250)

    def test_several_recipients_each_get_a_copy(self):
        """Each recipient of a message gets its own copy, once even when named twice; its To: names it alone."""
        client = self.connect()
        reply = send_message(client, b"Subject: both\r\nhi\r\n",
                                  recipients=("alice@x.org", "bob@y.org", "ALICE@x.org"))
        self.assertEqual(reply[0], 250)
        [for_alice] = support.stored_messages(self.root, "alice")
        [for_bob] = support.stored_messages(self.root, "bob")
        self.assertTrue(for_alice.startswith(b"From: carol@example.org\nTo: alice@x.org\nSubject: both\n"), for_alice)
        self.assertEqual(for_alice.replace(b"To: alice@x.org\n", b"To: bob@y.org\n"), for_bob)
        self.assertIn(b"hi\n", for_alice)

    def test_recipient_local_part_is_matched_without_case(self):
        """A recipient's login is matched in any case."""
        client = self.connect()
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<Bob@Example.ORG>")[0], 250)

    def test_pipelined_commands_get_their_replies_in_order(self):
        """Pipelined commands get their replies in order, one each."""
        client = self.connect(helo=False)
        client.send("EHLO p.test\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<alice@x.org>\r\n"
                    "RCPT TO:<nobody@x.org>\r\nDATA\r\n")
        self.assertEqual([client.reply()[0] for _ in range(5)], [250, 250, 250, 550, 354])
        client.send("Subject: piped\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual([client.reply()[0] for _ in range(2)], [250, 221])
        self.assertEqual(len(support.stored_messages(self.root, "alice")), 1)


class StorageTest(ServerTestCase):
    """What a delivery leaves in my_mailbox (CONTRACT.md section 1)."""

    def test_stored_form_and_received_line_in_local_time(self):
        """A message is stored in the section 1 form with LF line ends and a Received: line in local time."""
        client = self.connect()
        before = time.localtime()
        reply = send_message(client, b"From: carol@example.org\r\nTo: alice@example.org\r\n"
                                          b"Subject: Lunch\r\nbody line 1\r\nbody line 2\r\n")
        after = time.localtime()
        self.assertEqual(reply[0], 250)
        data = read_mailbox(self.root, "alice")
        self.assertNotIn(b"\r", data, "lines end with \\n in the file")
        found = RECEIVED.search(data)
        stamps = {time.strftime("%Y-%m-%d : %H : %M", t).encode() for t in (before, after)}
        self.assertIn(b"%s : %s : %s" % found.groups(), stamps)
        self.assertEqual(data, b"From: carol@example.org\nTo: alice@example.org\nSubject: Lunch\n"
                               + found.group(0) + b"body line 1\nbody line 2\n.\n")

    def test_full_rfc5322_headers_are_kept_and_received_follows_subject(self):
        """A message with full RFC 5322 headers keeps them all, with Received: right after Subject:."""
        smtp = smtplib.SMTP("127.0.0.1", self.server.port, timeout=support.DEADLINE)
        self.addCleanup(smtp.close)
        headers = (b"From: Carol <carol@example.org>\r\nTo: alice@example.org\r\n"
                   b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nSubject: Full\r\n"
                   b"Message-ID: <1@example.org>\r\nMIME-Version: 1.0\r\n\r\n")
        smtp.sendmail("carol@example.org", ["alice@example.org"], headers + b"Body\r\n")
        smtp.quit()
        [message] = support.stored_messages(self.root, "alice")
        lines = message.split(b"\n")
        self.assertEqual(lines[:4], [b"From: Carol <carol@example.org>", b"To: alice@example.org",
                                     b"Date: Sat, 28 Nov 2026 10:00:00 +0000", b"Subject: Full"])
        self.assertRegex(lines[4], rb"\AReceived: ")
        self.assertEqual(lines[5:], [b"Message-ID: <1@example.org>", b"MIME-Version: 1.0", b"",
                                     b"Body", b""])

    def test_received_ends_the_header_block_when_there_is_no_subject(self):
        """Without Subject: an empty one from the envelope and Received: end the header block."""
        client = self.connect()
        send_message(client, b"From: c@x.org\r\nTo: alice@x.org\r\nX-Tag: 1\r\n\r\nBody\r\n")
        [message] = support.stored_messages(self.root, "alice")
        # The missing Subject comes from the envelope, empty, and ends the header block before Received.
        self.assertRegex(message, rb"\AFrom: c@x.org\nTo: alice@x.org\nX-Tag: 1\nSubject: \n"
                                  rb"Received: [^\n]+\n\nBody\n\Z")

    def test_missing_headers_come_from_the_envelope(self):
        """A message without From/To/Subject gets them from the envelope, the subject empty."""
        client = self.connect()
        send_message(client, b"just a body\r\n", sender="carol@example.org",
                          recipients=("alice@example.org", "bob@example.org"))
        [message] = support.stored_messages(self.root, "alice")
        self.assertRegex(message, rb"\AFrom: carol@example.org\nTo: alice@example.org\n"
                                  rb"Subject: \nReceived: [^\n]+\njust a body\n\Z")
        [message] = support.stored_messages(self.root, "bob")
        self.assertRegex(message, rb"\AFrom: carol@example.org\nTo: bob@example.org\n"
                                  rb"Subject: \nReceived: [^\n]+\njust a body\n\Z")

    def test_dot_stuffing_round_trip_through_smtplib(self):
        """Body lines starting with '.' are stored with one more '.' and come back unstuffed."""
        body_lines = [b"before", b".", b"..", b".x", b"...", b"after"]
        smtp = smtplib.SMTP("127.0.0.1", self.server.port, timeout=support.DEADLINE)
        self.addCleanup(smtp.close)
        smtp.sendmail("c@x.org", ["alice@x.org"], b"Subject: dots\r\n" + b"\r\n".join(body_lines) + b"\r\n")
        smtp.quit()
        [message] = support.stored_messages(self.root, "alice")
        self.assertIn(b"\nbefore\n..\n...\n..x\n....\nafter\n", message)
        self.assertEqual(unstuffed_body_lines(message), body_lines)

    def test_eight_bit_body_is_kept_byte_for_byte(self):
        """8-bit and invalid UTF-8 body bytes are stored as received."""
        body = bytes(range(128, 256)) + b" \xff\xfe invalid utf-8 \xc3\x28 and \xe2\x82\xac"
        client = self.connect()
        self.assertEqual(send_message(client, b"Subject: bytes\r\n" + body + b"\r\n")[0], 250)
        [message] = support.stored_messages(self.root, "alice")
        self.assertEqual(unstuffed_body_lines(message), [body])

    def test_a_hand_typed_session_with_bare_lf_works(self):
        """A session typed by hand with bare LF line ends delivers a message."""
        client = self.server.connect()
        self.addCleanup(client.close)
        client.reply()
        for line, code in [("HELO nc", 250), ("MAIL FROM: a@x.org", 250), ("RCPT TO: alice@x.org", 250),
                           ("DATA", 354)]:
            client.send(line + "\n")
            self.assertEqual(client.reply()[0], code)
        client.send("Subject: typed\nhello\n.\n")
        self.assertEqual(client.reply()[0], 250)
        client.send("QUIT\n")
        self.assertEqual(client.reply()[0], 221)
        [message] = support.stored_messages(self.root, "alice")
        self.assertTrue(message.endswith(b"hello\n"))

    def test_a_crafted_body_cannot_smuggle_a_second_message(self):
        """In a CRLF session only CRLF.CRLF ends DATA, so a body cannot smuggle in a second message."""
        client = self.connect()
        smuggled = (b"Subject: one\r\nfirst\n.\nMAIL FROM:<evil@x.org>\r\nRCPT TO:<bob@x.org>\r\n"
                    b"DATA\r\nSubject: smuggled\r\n\r.\r\nstill body\r\n.\r\n")
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 250)
        self.assertEqual(client.cmd("DATA")[0], 354)
        client.send(smuggled)
        self.assertEqual(client.reply()[0], 250)
        self.assertEqual(client.cmd("NOOP")[0], 250, "exactly one reply for the whole DATA")
        self.assertEqual(read_mailbox(self.root, "bob"), b"")
        [message] = support.stored_messages(self.root, "alice")
        self.assertIn(b"smuggled", message)
        self.assertIn(b"still body", message)

    def test_a_client_that_disconnects_mid_data_leaves_no_trace(self):
        """A client that disconnects in the middle of DATA leaves nothing in any mailbox."""
        client = self.connect()
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 250)
        self.assertEqual(client.cmd("DATA")[0], 354)
        client.send(b"Subject: cut\r\nhalf a message\r\n")
        marker = "cut-%d" % id(client)
        client.close()
        # A later delivery on another connection proves the server has moved on.
        other = self.connect()
        send_message(other, b"Subject: " + marker.encode() + b"\r\nwhole\r\n")
        wait_for(lambda: self.server.output().count("closed") >= 1)
        [message] = support.stored_messages(self.root, "alice")
        self.assertIn(marker.encode(), message)
        self.assertNotIn(b"half a message", read_mailbox(self.root, "alice"))

    def test_a_torn_last_message_is_set_aside_before_the_next_is_appended(self):
        """A torn last message (an append cut short) moves to .my_mailbox.torn, logged, before the next append."""
        whole = b"From: a@x.org\nTo: alice@x.org\nSubject: whole\nReceived: 2026-01-01 : 00 : 00\nbody\n.\n"
        torn = b"From: a@x.org\nTo: alice@x.org\nSubject: torn\nReceived: 2026-01-01 : 00 : 00\nhalf"
        with open(support.mailbox_path(self.root, "alice"), "wb") as f:
            f.write(whole + torn)
        torn_path = os.path.join(self.root, "alice", ".my_mailbox.torn")
        self.addCleanup(support.remove_file, torn_path)
        client = self.connect()
        self.assertEqual(send_message(client, b"Subject: next\r\nwhole\r\n")[0], 250)
        first, second = support.stored_messages(self.root, "alice")
        self.assertEqual(first + b".\n", whole)
        self.assertTrue(second.startswith(b"From: carol@example.org\n"))
        with open(torn_path, "rb") as f:
            self.assertEqual(f.read(), torn)
        self.server.wait_for_output(r"my_mailbox ended in %d bytes of a message cut short" % len(torn))

    def test_a_message_for_several_mailboxes_is_in_all_or_none(self):
        """A message that cannot be written to one recipient's mailbox gets 451 and is stored for none."""
        os.mkdir(support.mailbox_path(self.root, "bob"))     # bob's mailbox cannot be written
        self.addCleanup(os.rmdir, support.mailbox_path(self.root, "bob"))
        client = self.connect()
        reply = send_message(client, b"Subject: both\r\nx\r\n", recipients=("alice@x.org", "bob@x.org"))
        self.assertEqual(reply[0], 451)
        self.assertEqual(read_mailbox(self.root, "alice"), b"")
        self.assertEqual(client.cmd("NOOP")[0], 250)


class ConcurrencyTest(ServerTestCase):
    """Many clients at once, one mailbox, nothing lost or mixed."""

    def test_twenty_threads_of_twenty_five_messages(self):
        """Twenty clients delivering to one mailbox at once lose, mix and double no message."""
        errors = []

        def sender(worker):
            try:
                with self.server.connect() as client:
                    client.reply()
                    client.cmd("HELO w%d" % worker)
                    for n in range(25):
                        tag = b"w%02d-m%02d" % (worker, n)
                        lines = b"".join(b"%s line %d\r\n" % (tag, i) for i in range(20))
                        reply = send_message(client, b"Subject: " + tag + b"\r\n" + lines)
                        if reply[0] != 250:
                            errors.append(reply)
            except Exception as exc:      # reported below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(w,)) for w in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        messages = support.stored_messages(self.root, "alice")
        self.assertEqual(len(messages), 500)
        seen = set()
        for message in messages:
            tag = re.search(rb"Subject: (w\d\d-m\d\d)\n", message).group(1)
            expected = b"".join(b"%s line %d\n" % (tag, i) for i in range(20))
            self.assertTrue(message.endswith(expected), message)
            seen.add(tag)
        self.assertEqual(len(seen), 500)


# Recipients crafted to reach outside the mail root, grouped by what RFC 5321 4.1.2 makes of them.
NO_USER_ADDRESSES = ["/etc/passwd@x.org", "userinfo.txt@x.org", "~root@x.org", "alice%00@x.org"]  # all atext
BACKSLASH_ADDRESS = "alice\\..\\bob@x.org"   # '\' is not atext
# A Dot-string neither starts with '.' nor has '..' in it:
BAD_DOT_ADDRESSES = ["../alice@x.org", "..@x.org", ".@x.org", "alice/../bob@x.org", "..%2Falice@x.org"]
TWO_AT_ADDRESS = "a@b@c"                    # "b@c" is no domain
CRAFTED_ADDRESSES = NO_USER_ADDRESSES + [BACKSLASH_ADDRESS] + BAD_DOT_ADDRESSES + [TWO_AT_ADDRESS]


class UsersAndPathsTest(ServerTestCase):
    """Who is a user, and that no address reaches outside the mail root."""

    @classmethod
    def setUpClass(cls):
        # The mail root sits alone in a folder of its own, so anything written
        # beside it shows, whatever other tests do in the temporary directory.
        cls.outer = tempfile.mkdtemp(prefix="outer-")
        cls.root = os.path.join(cls.outer, "root")
        os.rename(support.make_mail_root(), cls.root)
        cls.server = support.ServerProcess(support.SMTP_SCRIPT, cls.root, *cls.server_args)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        support.remove_mail_root(cls.outer)

    def rcpt(self, address):
        """The reply code RCPT TO:<address> gets in a fresh transaction."""
        return support.rcpt_code(self.server, address)

    def test_crafted_addresses_never_leave_the_mail_root(self):
        """No crafted recipient is taken (DATA gets 503), and nothing is written outside or beside the users."""
        # Which refusal each address gets is checked by the tests below; here, that it is refused.
        for address in CRAFTED_ADDRESSES:
            with self.subTest(address=address):
                self.assertEqual(support.data_code_after(self.server, address), 503, "no recipient was taken")
        self.assertEqual(os.listdir(self.outer), ["root"])
        self.assertEqual(sorted(os.listdir(self.root)), [".run", "alice", "bob", "userinfo.txt"])

    def test_a_well_formed_address_that_is_no_login_gets_550(self):
        """A well-formed address that names no user gets 550, whatever its characters."""
        for address in NO_USER_ADDRESSES:
            with self.subTest(address=address):
                self.assertEqual(self.rcpt(address), 550)

    def test_an_address_with_a_backslash_gets_501(self):
        """An address with a backslash (no atext) is bad syntax: 501."""
        self.assertEqual(self.rcpt(BACKSLASH_ADDRESS), 501)

    def test_an_address_with_a_leading_or_double_dot_gets_501(self):
        """A local part that starts with '.' or has '..' is no Dot-string: 501."""
        for address in BAD_DOT_ADDRESSES:
            self.assertEqual(self.rcpt(address), 501, address)

    def test_an_address_with_two_at_signs_gets_501(self):
        """An address with two '@' is bad syntax: 501."""
        self.assertEqual(self.rcpt(TWO_AT_ADDRESS), 501)

    def test_a_user_needs_a_line_in_userinfo_and_a_folder(self):
        """A folder without a userinfo.txt line, or no folder at all, is no user: 550."""
        os.mkdir(os.path.join(self.root, "nofile"))          # folder but no line
        self.addCleanup(os.rmdir, os.path.join(self.root, "nofile"))
        self.assertEqual(self.rcpt("nofile@x.org"), 550)
        self.assertEqual(self.rcpt("nobody@x.org"), 550)

    def test_userinfo_is_read_again_when_it_changes(self):
        """A changed userinfo.txt is read again; each malformed line is reported once with its number."""
        path = os.path.join(self.root, "userinfo.txt")
        with open(path) as f:
            original = f.read()
        self.addCleanup(self._restore_userinfo, original)
        self.assertEqual(self.rcpt("carol@x.org"), 550)
        with open(path, "a") as f:
            f.write("\n# a comment\n\ncarol\tsecret\nlonelyword\nbad/login pw\n")
        os.mkdir(os.path.join(self.root, "carol"))
        wait_for(lambda: self.rcpt("carol@x.org") == 250)
        self.server.wait_for_output(r"userinfo\.txt line 8 ")
        self.assertEqual(support.reported_lines(self.server), [7, 8],
                         "each malformed line is reported once, with its number")
        self.assertEqual(self.rcpt("alice@x.org"), 250, "well-formed lines still count")

    def _restore_userinfo(self, original):
        with open(os.path.join(self.root, "userinfo.txt"), "w") as f:
            f.write(original)
        os.rmdir(os.path.join(self.root, "carol"))


class LimitsTest(ServerTestCase):
    """RFC 5321 4.5.3.1 limits, size limits, and bad input."""

    def test_too_long_command_line_gets_500_and_the_session_goes_on(self):
        """A command line over 512 octets gets "500 Line too long" and the session goes on."""
        client = self.connect()
        self.assertEqual(client.cmd("NOOP " + "x" * 600)[1], ["500 Line too long"])
        self.assertEqual(client.cmd("HELO " + "y" * 100000)[0], 500)
        self.assertEqual(client.cmd("NOOP")[0], 250)

    def test_too_long_text_line_gets_500_and_nothing_is_stored(self):
        """A text line over 1000 octets gets 500 and the message is not stored; 998 octets pass."""
        client = self.connect()
        reply = send_message(client, b"Subject: long\r\n" + b"z" * 1200 + b"\r\n")
        self.assertEqual(reply[0], 500)
        self.assertEqual(read_mailbox(self.root, "alice"), b"")
        self.assertEqual(send_message(client, b"Subject: ok\r\n" + b"z" * 998 + b"\r\n")[0], 250)

    def test_a_text_line_of_998_octets_is_taken_its_stuffing_dot_not_counted(self):
        """998 octets before CRLF, plus a stuffing dot on the wire: 250, stored whole; 999 get 500."""
        client = self.connect()
        line = "." + "z" * 997
        self.assertEqual(send_message(client, b"Subject: long\r\n." + line.encode() + b"\r\n")[0], 250)
        [message] = support.stored_messages(self.root, "alice")
        self.assertEqual(unstuffed_body_lines(message)[-1], line.encode())
        self.assertEqual(send_message(client, b"Subject: longer\r\n.." + line.encode() + b"\r\n")[1],
                         ["500 Line too long"])

    def test_a_message_over_the_size_limit_gets_552_and_is_not_stored(self):
        """A message larger than SIZE gets 552 and is not stored; so does MAIL with a larger SIZE=."""
        client = self.connect()
        big = (b"y" * 70 + b"\r\n") * (MAX_SIZE // 72 + 10)
        self.assertEqual(send_message(client, big), (552, [mailserver_smtp.PLAIN_REPLIES.MESSAGE_TOO_LARGE]))
        self.assertEqual(read_mailbox(self.root, "alice"), b"")
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org> SIZE=%d" % (MAX_SIZE + 1))[0], 552)
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org> SIZE=100")[0], 250)

    def test_garbage_nul_and_invalid_utf8_get_protocol_errors(self):
        """NUL, 8-bit and TLS/HTTP junk get 500, and neither the session nor the server breaks."""
        client = self.connect()
        # None of these starts with a command word (NUL is not a space), so each is an unknown command.
        for junk in [b"\x00\x00\x00", b"\xff\xfe\xfd", b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1",
                     b"MAIL\x00FROM:<a@x.org>"]:
            with self.subTest(junk=junk):
                client.send(junk + b"\r\n")
                self.assertEqual(client.reply()[0], 500)
        client.send(b"HELO \xc3\x28\r\n")     # its reply code: the test below
        client.reply()
        self.assertEqual(client.cmd("NOOP")[0], 250)
        self.assertTrue(self.server.alive())
        self.assertNotIn("Traceback", self.server.output())

    def test_helo_with_a_name_that_is_not_utf8_gets_501(self):
        """HELO with a name that is not even UTF-8 (so no domain) is bad syntax: 501."""
        client = self.connect(helo=False)
        client.send(b"HELO \xc3\x28\r\n")
        self.assertEqual(client.reply()[0], 501)

    def test_ten_bad_commands_in_a_row_get_421_and_close(self):
        """Ten bad commands in a row get 421 and the connection is closed; a good one resets the count."""
        client = self.connect()
        for _ in range(9):
            self.assertEqual(client.cmd("BOGUS")[0], 500)
        self.assertEqual(client.cmd("NOOP")[0], 250, "a good command resets the count")
        for _ in range(9):
            self.assertEqual(client.cmd("BOGUS")[0], 500)
        client.send("BOGUS\r\n")
        self.assertEqual([client.reply()[0], client.reply()[0]], [500, 421])
        self.assertTrue(client.closed())


class ConfiguredServerTest(unittest.TestCase):
    """Behaviour that needs a server of its own: connection limit, idle timeout, shutdown, CLI."""

    def start(self, *args, host="127.0.0.1"):
        """Start an SMTP server with args in a mail root of its own; return both, removed after the test."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = support.ServerProcess(support.SMTP_SCRIPT, root, "--domain", DOMAIN, *args, host=host)
        self.addCleanup(server.close)
        return server, root

    def test_one_connection_over_the_limit_gets_421(self):
        """One connection over --max-connections gets 421; a freed place goes to the next client."""
        server, _ = self.start("--max-connections", "2", "--max-per-client", "2")
        first, second = server.connect(), server.connect()
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        self.assertEqual(first.reply()[0], 220)
        self.assertEqual(second.reply()[0], 220)
        with server.connect() as third:
            self.assertEqual(third.reply()[0], 421)
            self.assertTrue(third.closed())
        first.cmd("QUIT")
        first.close()
        wait_for(lambda: "closed" in server.output())
        with server.connect() as fourth:
            self.assertEqual(fourth.reply()[0], 220, "a freed place is given to the next client")

    def test_an_idle_client_gets_421_after_the_timeout(self):
        """An idle client gets 421 after --timeout and is disconnected."""
        server, _ = self.start("--timeout", "0.3")
        with server.connect() as client:
            self.assertEqual(client.reply()[0], 220)
            started = time.monotonic()
            self.assertEqual(client.reply(), (421, ["421 %s Timeout, closing connection" % DOMAIN]))
            self.assertGreaterEqual(time.monotonic() - started, 0.25)
            self.assertTrue(client.closed())

    def test_sigterm_lets_a_delivery_in_flight_finish(self):
        """SIGTERM stops new connections but lets a delivery in flight finish and be stored."""
        server, root = self.start()
        with server.connect() as client:
            client.reply()
            client.cmd("HELO t")
            client.cmd("MAIL FROM:<a@x.org>")
            client.cmd("RCPT TO:<alice@x.org>")
            self.assertEqual(client.cmd("DATA")[0], 354)
            client.send("Subject: in flight\r\nfirst half\r\n")
            server.proc.terminate()
            server.wait_for_output("shutting down")
            with self.assertRaises(OSError):
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            client.send("second half\r\n.\r\n")
            self.assertEqual(client.reply()[0], 250)
        self.assertEqual(server.proc.wait(support.DEADLINE), 0)
        self.assertNotIn("Traceback", server.output())
        self.assertIn(b"first half\nsecond half\n.\n", read_mailbox(root, "alice"))

    def test_a_second_sigterm_stops_at_once_and_stores_nothing_partial(self):
        """A second SIGTERM stops the server at once, and nothing partial is stored."""
        server, root = self.start()
        with server.connect() as client:
            client.reply()
            for command in ("HELO t", "MAIL FROM:<a@x.org>", "RCPT TO:<alice@x.org>", "DATA"):
                client.cmd(command)
            client.send("Subject: never finished\r\nhalf\r\n")
            server.proc.terminate()
            server.wait_for_output("shutting down")
            server.proc.terminate()
            self.assertEqual(server.proc.wait(support.DEADLINE), 0)
        self.assertNotIn("Traceback", server.output())
        self.assertEqual(read_mailbox(root, "alice"), b"")

    def test_ctrl_c_exits_cleanly(self):
        """Ctrl-C (SIGINT) ends the server with exit code 0 and no traceback."""
        server, _ = self.start()
        server.proc.send_signal(2)
        self.assertEqual(server.proc.wait(support.DEADLINE), 0)
        self.assertNotIn("Traceback", server.output())

    def test_verbose_prints_every_command_and_reply_and_logs_deliveries(self):
        """--verbose prints every command and reply and logs each delivery."""
        server, _ = self.start("--verbose")
        smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=support.DEADLINE)
        smtp.sendmail("a@x.org", ["bob@x.org"], b"Subject: v\r\n\r\nhi\r\n")
        smtp.quit()
        server.wait_for_output(r"connection from \S+ closed")
        output = server.output()
        for text in ["C: ehlo", "S: 250-SIZE", "C: mail from:<a@x.org>", "S: 354 Enter mail",
                     "delivered", "S: 221 2.0.0 %s closing connection" % DOMAIN]:
            self.assertIn(text.lower(), output.lower())     # smtplib's case varies by version

    def test_quiet_server_logs_a_line_per_connection_and_per_message(self):
        """Without --verbose the server logs each delivery, but no command."""
        server, _ = self.start()
        smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=support.DEADLINE)
        smtp.sendmail("a@x.org", ["bob@x.org"], b"Subject: 1\r\n\r\nhi\r\n")
        smtp.sendmail("a@x.org", ["alice@x.org"], b"Subject: 2\r\n\r\nhi\r\n")
        smtp.quit()
        server.wait_for_output(r"connection from \S+ closed")
        output = server.output()
        self.assertEqual(len(re.findall(r"delivered \d+ bytes from <a@x.org> to", output)), 2)
        self.assertNotIn("MAIL", output.upper().replace("MAILROOT", ""))

    @support.skip_unless_ipv6
    def test_ipv6_loopback(self):
        """The server listens on ::1 and delivers there."""
        server, root = self.start(host="::1")
        smtp = smtplib.SMTP("::1", server.port, timeout=support.DEADLINE)
        smtp.sendmail("a@x.org", ["alice@x.org"], b"Subject: six\r\n\r\nhi\r\n")
        smtp.quit()
        self.assertIn(b"Subject: six\n", read_mailbox(root, "alice"))

    def test_help_and_bad_command_lines(self):
        """--help lists the options; bad command lines exit with 2, a busy port with 1, no traceback."""
        run = lambda *args: subprocess.run([sys.executable, support.SMTP_SCRIPT] + list(args),
                                           capture_output=True, text=True, timeout=support.DEADLINE)
        helped = run("--help")
        self.assertEqual(helped.returncode, 0)
        for option in ["--host", "--domain", "--root", "--max-size", "--timeout", "--max-connections",
                       "--verbose"]:
            self.assertIn(option, helped.stdout)
        for command in ["--hash-password", "--queue", "--flush"]:     # the other commands main() runs
            self.assertIn("python3 mailserver_smtp.py %s " % command, helped.stdout)
        for args in [(), ("notaport",), ("70000",), ("25", "--max-size", "0"), ("25", "--tls-cert", "x"),
                     ("25", "--require-tls"), ("25", "--tls-cert", "/nonexistent", "--tls-key", "/nonexistent")]:
            with self.subTest(args=args):
                result = run(*args)
                self.assertEqual(result.returncode, 2)
                self.assertNotIn("Traceback", result.stderr)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        result = run(str(busy.getsockname()[1]), "--host", "127.0.0.1")
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot listen", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class StartTLSTest(ServerTestCase):
    """STARTTLS (RFC 3207) with --tls-cert/--tls-key."""

    server_args = ServerTestCase.server_args + TLS_ARGS

    def test_smtplib_delivers_over_starttls(self):
        """smtplib delivers over STARTTLS, which is offered outside TLS only."""
        smtp = smtplib.SMTP("127.0.0.1", self.server.port, timeout=support.DEADLINE)
        self.addCleanup(smtp.close)
        smtp.ehlo()
        self.assertTrue(smtp.has_extn("starttls"))
        self.assertEqual(smtp.starttls(context=client_tls_context())[0], 220)
        smtp.ehlo()
        self.assertFalse(smtp.has_extn("starttls"), "not offered again inside TLS")
        smtp.sendmail("carol@example.org", ["alice@example.org"], b"Subject: secret\r\n\r\nhidden\r\n")
        self.assertEqual(smtp.docmd("STARTTLS")[0], 503)
        smtp.quit()
        self.assertIn(b"hidden\n", read_mailbox(self.root, "alice"))

    def test_commands_pipelined_behind_starttls_are_never_executed(self):
        """Commands sent behind STARTTLS before the handshake are thrown away, and the session starts over."""
        client = self.connect(helo=False)
        client.cmd("EHLO x")
        client.send("STARTTLS\r\nMAIL FROM:<evil@x.org>\r\nRCPT TO:<alice@x.org>\r\n")
        self.assertEqual(client.reply()[0], 220)
        client.wrap_tls()
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 503, "state is reset: EHLO first")
        self.assertEqual(client.cmd("EHLO again")[0], 250)
        self.assertEqual(client.cmd("RCPT TO:<alice@x.org>")[0], 503, "the injected MAIL never ran")
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 250, "nor did a second one")

    def test_garbage_instead_of_a_handshake_ends_only_that_connection(self):
        """Junk instead of a TLS handshake closes that connection only."""
        client = self.connect()
        self.assertEqual(client.cmd("STARTTLS")[0], 220)
        client.send(b"this is not TLS\r\n" * 20)
        self.assertTrue(client.closed())
        other = self.connect()
        self.assertEqual(other.cmd("NOOP")[0], 250)

    def test_starttls_takes_no_argument(self):
        """STARTTLS with an argument gets 501."""
        client = self.connect()
        self.assertEqual(client.cmd("STARTTLS now")[0], 501)


class RequireTLSTest(ServerTestCase):
    """--require-tls: no mail transaction before STARTTLS."""

    server_args = StartTLSTest.server_args + ("--require-tls",)

    def test_mail_is_refused_until_starttls(self):
        """Under --require-tls MAIL gets 530 until STARTTLS; inside TLS mail is taken."""
        client = self.connect()
        self.assertEqual(client.cmd("MAIL FROM:<a@x.org>")[0], 530)
        smtp = smtplib.SMTP("127.0.0.1", self.server.port, timeout=support.DEADLINE)
        self.addCleanup(smtp.close)
        smtp.starttls(context=client_tls_context())
        smtp.sendmail("a@x.org", ["bob@x.org"], b"Subject: ok\r\n\r\nfine\r\n")
        smtp.quit()
        self.assertIn(b"fine\n", read_mailbox(self.root, "bob"))


class PlainServerTest(ServerTestCase):
    """Without a certificate there is no STARTTLS."""

    def test_starttls_is_neither_offered_nor_accepted(self):
        """Without a certificate EHLO offers no STARTTLS and STARTTLS gets 502."""
        client = self.connect(helo=False)
        self.assertNotIn("250-STARTTLS", client.cmd("EHLO x")[1])
        self.assertEqual(client.cmd("STARTTLS")[0], 502)


def stored_message(body, sender, recipients, received):
    """The stored form the server appends for a stored body held in memory."""
    header = mailserver_smtp.Header(io.BytesIO(body))
    layout = mailserver_smtp.stored_layout(header, len(body), sender, recipients, received)
    return b"".join(mailserver_smtp.StoredMessage(memoryview(body), layout).pieces())


class MessageFormTest(unittest.TestCase):
    """The pure functions that turn DATA into the stored form."""

    def test_bare_lf_pieces_in_a_crlf_session_can_never_end_a_stored_message(self):
        """Bare-LF pieces of a CRLF session's body are stored so that they never end a message."""
        body, _ = mailserver_smtp.stored_lines(b"a\r\n.\nb\r\nc\n.\r\nd\n..e\r\n", strict=True)
        self.assertNotIn(b"\n.\n", b"\n" + body)
        self.assertEqual(body, b"a\n\nb\nc\n..\nd\n...e\n")

    def test_folded_subject_keeps_its_continuation_before_received(self):
        """A folded Subject: keeps its continuation line before Received:."""
        message = stored_message(b"Subject: a\n  b\n\nbody\n", b"s@x", [b"r@x"], b"T")
        self.assertEqual(message, b"From: s@x\nTo: r@x\nSubject: a\n  b\nReceived: T\n\nbody\n.\n")

    def test_an_indented_first_body_line_of_the_course_format_stays_body(self):
        """In the course format an indented first body line stays body, not a Subject: continuation."""
        message = stored_message(b"Subject: a\n  indented\nbody\n", b"s@x", [b"r@x"], b"T")
        self.assertEqual(message, b"From: s@x\nTo: r@x\nSubject: a\nReceived: T\n  indented\nbody\n.\n")

    def test_message_size_counts_crlf_but_not_stuffing_dots(self):
        """A message's size counts CRLF line ends but not stuffing dots (RFC 1870)."""
        self.assertEqual(mailserver_smtp.wire_size(b"ab\n..\n...x\n"), len(b"ab\r\n.\r\n..x\r\n"))
        self.assertEqual(mailserver_smtp.wire_size(b""), 0)

    def test_parse_path(self):
        """parse_path takes paths, parameters and source routes, and refuses malformed ones."""
        parse = mailserver_smtp.parse_path
        self.assertEqual(parse("<a@b.c>"), ("a@b.c", []))
        self.assertEqual(parse(" <a@b.c> SIZE=10"), ("a@b.c", ["SIZE=10"]))
        self.assertEqual(parse("<@relay.org:a@b.c>"), ("a@b.c", []))
        self.assertEqual(parse("<>"), ("", []))
        for bad in ["<a@b.c", "<a b@c>", "<@b.c>", "<a@>", '<"a"@b>', "<%s@b>" % ("x" * 300)]:
            self.assertIsNone(parse(bad), bad)


class ConnectionThreadsTest(unittest.TestCase):
    """The bare threads that serve connections are still counted, listed and joined, and their failures logged."""

    def test_threads_are_counted_listed_and_joined(self):
        """Each thread counts and names its peer from its start to its end; join waits for all of them."""
        threads, release = mailserver_smtp.ConnectionThreads(), threading.Event()
        for peer in ("192.0.2.1:1", "192.0.2.2:2"):
            threads.start(peer, release.wait, support.DEADLINE)
        self.assertEqual(len(threads), 2)                  # from the start, before they run
        self.assertEqual(sorted(threads.peers()), ["192.0.2.1:1", "192.0.2.2:2"])
        self.assertFalse(threads.join(0.05), "still running")
        release.set()
        self.assertTrue(threads.join(support.DEADLINE))
        self.assertEqual((len(threads), threads.peers()), (0, []))

    def test_what_escapes_a_thread_is_logged_with_its_peer(self):
        """An exception, SystemExit too, that leaves a thread is logged with its traceback; the thread is gone."""
        threads = mailserver_smtp.ConnectionThreads()
        for error in (ValueError, SystemExit):
            with self.assertLogs("mail", "ERROR") as logged:
                threads.start("192.0.2.9:25", self.raise_, error)
                self.assertTrue(threads.join(support.DEADLINE))
            self.assertEqual([r.getMessage() for r in logged.records], ["the thread serving 192.0.2.9:25 failed"])
            self.assertIs(logged.records[0].exc_info[0], error)
            self.assertEqual(len(threads), 0)

    @staticmethod
    def raise_(error):
        raise error("injected")

    def test_shutdown_counts_the_connections_and_joins_their_threads(self):
        """The shutdown log counts the open connections; when it returns, every session's thread has ended."""
        root = support.make_mail_root()
        self.addCleanup(support.remove_mail_root, root)
        server = mailserver_smtp.SMTPServer(mailserver_smtp.parse_args(["0", "--host", "127.0.0.1", "--root", root]))
        listener = server.listeners[0]
        self.addCleanup(listener.socket.close)
        clients = []
        for _ in range(2):
            clients.append(socket.create_connection(listener.address, timeout=support.DEADLINE))
            self.addCleanup(clients[-1].close)
            server.start_session(*listener.socket.accept(), listener)
        for client in clients:
            self.assertTrue(client.recv(100).startswith(b"220 "))
        self.assertEqual(sorted(server.threads.peers()),
                         sorted("127.0.0.1:%d" % client.getsockname()[1] for client in clients))
        with self.assertLogs("mail", "INFO") as logged:
            server.shutdown(type("NoSecondSignal", (), {"hurried": False})())
        self.assertIn("shutting down, 2 connections open", [r.getMessage() for r in logged.records])
        self.assertEqual(len(server.threads), 0)
        for client in clients:
            self.assertTrue(client.recv(100).startswith(b"421 "))


if __name__ == "__main__":
    unittest.main()

"""The SMTP extensions: ENHANCEDSTATUSCODES, SMTPUTF8, CHUNKING (BDAT), and mailbox quotas."""

import email.message
import os
import smtplib
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import read_mailbox  # noqa: E402

DOMAIN = "mail.test"


class EnhancedStatusCodesTest(support.OneServerTestCase):
    """After EHLO every reply carries its RFC 3463 code; after HELO the course's words, without."""

    server_args = ("--domain", DOMAIN)

    # command, the reply after HELO (CONTRACT.md section 2), the reply after EHLO (RFC 2034/3463)
    DIALOGUE = [
        ("MAIL_FROM: <cnlab@kuleuven.be>", "250 <cnlab@kuleuven.be>... Sender ok",
         "250 2.1.0 <cnlab@kuleuven.be>... Sender ok"),
        ("RCPT_TO: <nobody@kuleuven.be>", "550 No such user", "550 5.1.1 No such user"),
        ("RCPT_TO: <bob@kuleuven.be>", "250 bob... Recipient ok", "250 2.1.5 bob... Recipient ok"),
        ("MAIL FROM:<again@example.org>", "503 Sender already given", "503 5.5.1 Sender already given"),
        ("RCPT TO:<bob", "501 Syntax: RCPT TO:<address>", "501 5.5.4 Syntax: RCPT TO:<address>"),
        ("XYZZY", "500 Command not recognized", "500 5.5.2 Command not recognized"),
        ("NOOP", "250 OK", "250 2.0.0 OK"),
        ("DATA", '354 Enter mail, end with "." on a line by itself',
         '354 Enter mail, end with "." on a line by itself'),
        ("Subject: both\r\n\r\nhi\r\n.", "250 OK Message accepted for delivery",
         "250 2.0.0 OK Message accepted for delivery"),
        ("RSET", "250 OK", "250 2.0.0 OK"),
        ("QUIT", "221 %s closing connection" % DOMAIN, "221 2.0.0 %s closing connection" % DOMAIN),
    ]

    def dialogue(self, greeting):
        """The replies to DIALOGUE after greeting (HELO or EHLO)."""
        client = support.smtp_session(self.server, helo=None)
        self.addCleanup(client.close)
        code, lines = client.cmd(greeting + " kuleuven.be")
        self.assertEqual(code, 250)
        self.assertEqual("250-ENHANCEDSTATUSCODES" in lines, greeting == "EHLO")
        return [client.cmd(command)[1][-1] for command, _, _ in self.DIALOGUE]

    def test_a_helo_session_keeps_the_course_dialogue_word_for_word(self):
        """After HELO the replies are exactly the course's, without enhanced codes."""
        self.assertEqual(self.dialogue("HELO"), [plain for _, plain, _ in self.DIALOGUE])

    def test_an_ehlo_session_gets_the_enhanced_code_of_every_reply(self):
        """After EHLO, every 2xx, 4xx and 5xx reply carries its code; 354 none (RFC 2034 4)."""
        self.assertEqual(self.dialogue("EHLO"), [coded for _, _, coded in self.DIALOGUE])

    def test_ehlo_then_helo_goes_back_to_the_plain_words(self):
        """The latest greeting counts: HELO after EHLO gives replies without codes again."""
        client = support.smtp_session(self.server, helo="x", ehlo=True)
        self.addCleanup(client.close)
        self.assertEqual(client.cmd("NOOP")[1], ["250 2.0.0 OK"])
        client.cmd_expecting("HELO x", 250)
        self.assertEqual(client.cmd("NOOP")[1], ["250 OK"])


class SMTPUTF8Test(support.BothServersTestCase):
    """SMTPUTF8 (RFC 6531): UTF-8 senders and headers when asked for, 553 5.6.7 when not."""

    def test_smtplib_sends_a_utf8_sender_and_headers_kept_byte_for_byte(self):
        """smtplib with SMTPUTF8: the UTF-8 sender and headers are stored unchanged and served by POP3."""
        smtp, pop = self.servers
        message = email.message.EmailMessage()
        message["From"] = "Jürgen <jürgen@bücher.example>"
        message["To"] = "bob@example.org"
        message["Subject"] = "Grüße aus Köln"
        message.set_content("Käsekuchen für alle.\n")
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=support.DEADLINE) as client:
            client.ehlo()
            self.assertIn("smtputf8", client.esmtp_features)
            client.send_message(message, mail_options=["SMTPUTF8"])
        [mail] = support.stored_messages(self.root, "bob")
        self.assertIn("From: Jürgen <jürgen@bücher.example>\n".encode("utf-8"), mail)
        self.assertIn("Subject: Grüße aus Köln\n".encode("utf-8"), mail)
        self.assertIn("Käsekuchen für alle.".encode("utf-8"), mail)
        with support.PopClient(pop, "bob", "builder") as client:
            self.assertIn("Subject: Grüße aus Köln\r\n".encode("utf-8"), client.multi("RETR 1")[1])
            client.cmd("DELE 1")
            client.cmd("QUIT")

    def test_a_utf8_address_without_smtputf8_gets_553_5_6_7(self):
        """Without SMTPUTF8 a non-ASCII address in MAIL or RCPT gets 553 5.6.7 (after HELO: 553)."""
        smtp, _ = self.servers
        with support.smtp_session(smtp, ehlo=True) as client:
            self.assertEqual(client.cmd("MAIL FROM:<用户@例子.广告>")[1][0][:10], "553 5.6.7 ")
            client.cmd_expecting("MAIL FROM:<carol@example.org>", 250)
            self.assertEqual(client.cmd("RCPT TO:<jürgen@example.org>")[1][0][:10], "553 5.6.7 ")
        with support.smtp_session(smtp) as client:
            reply = client.cmd("MAIL FROM:<用户@例子.广告>")[1][0]
            self.assertRegex(reply, r"^553 [^0-9]")

    def test_with_smtputf8_a_utf8_recipient_is_no_user(self):
        """Logins are ASCII: with SMTPUTF8 a UTF-8 local part gets 550 5.1.1, the sender is taken."""
        smtp, _ = self.servers
        with support.smtp_session(smtp, ehlo=True) as client:
            client.cmd_expecting("MAIL FROM:<用户@例子.广告> SMTPUTF8", 250)
            self.assertEqual(client.cmd("RCPT TO:<jürgen@example.org>")[1], ["550 5.1.1 No such user"])


class ChunkingTest(support.OneServerTestCase):
    """CHUNKING (RFC 3030): BDAT n [LAST] takes exactly n octets; the message is stored as DATA's is."""

    server_args = ("--max-size", "100000")

    def transaction(self):
        """A raw EHLO session with MAIL and RCPT done."""
        client = support.smtp_session(self.server, ehlo=True)
        self.addCleanup(client.close)
        client.cmd_expecting("MAIL FROM:<carol@example.org>", 250)
        client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
        return client

    def bdat(self, client, data, last=False):
        """Send one chunk; return its reply lines."""
        client.send(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)
        return client.reply()[1]

    def tearDown(self):
        support.remove_mailboxes(self.root)

    def test_chunks_cut_anywhere_are_stored_like_data(self):
        """Three chunks, one ending inside a CRLF: stored dot-stuffed with Received, as DATA stores it."""
        client = self.transaction()
        self.assertEqual(self.bdat(client, b"Subject: chunks\r\n\r\nfirst\r"), ["250 2.0.0 25 octets received"])
        self.assertEqual(self.bdat(client, b"\n.starts with a dot\r\n.\r\n"), ["250 2.0.0 24 octets received"])
        self.assertEqual(self.bdat(client, b"last line\r\n", last=True),
                         ["250 2.0.0 OK Message accepted for delivery"])
        [mail] = support.stored_messages(self.root, "alice")
        self.assertRegex(mail, rb"^From: carol@example.org\nTo: alice@example.org\nSubject: chunks\n"
                               rb"Received: [^\n]+\n\nfirst\n\.\.starts with a dot\n\.\.\nlast line\n$")
        self.assertEqual(client.cmd("QUIT")[0], 221)

    def test_bdat_0_last_ends_an_empty_message(self):
        """BDAT 0 LAST ends the message; an empty one is stored with its one empty body line."""
        client = self.transaction()
        self.assertEqual(self.bdat(client, b"", last=True), ["250 2.0.0 OK Message accepted for delivery"])
        [mail] = support.stored_messages(self.root, "alice")
        self.assertRegex(mail, rb"^From: [^\n]+\nTo: [^\n]+\nSubject: \nReceived: [^\n]+\n\n$")

    def test_bdat_before_rcpt_and_data_after_bdat_get_503(self):
        """BDAT before RCPT gets 503 5.5.1 (its octets read away); DATA after a BDAT gets 503 5.5.1."""
        client = support.smtp_session(self.server, ehlo=True)
        self.addCleanup(client.close)
        client.cmd_expecting("MAIL FROM:<carol@example.org>", 250)
        self.assertEqual(self.bdat(client, b"RSET\r\n")[0][:10], "503 5.5.1 ")
        client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
        self.assertEqual(self.bdat(client, b"Subject: x\r\n"), ["250 2.0.0 12 octets received"])
        self.assertEqual(client.cmd("DATA")[1][0][:10], "503 5.5.1 ")
        self.assertEqual(self.bdat(client, b"body\r\n", last=True)[0][:4], "250 ")

    def test_a_bad_bdat_line_gets_501_and_the_session_stays_in_step(self):
        """No count or a bad one: 501; a good count with junk after it: its octets read away, then 501."""
        client = self.transaction()
        self.assertEqual(client.cmd("BDAT")[1][0][:10], "501 5.5.4 ")
        self.assertEqual(client.cmd("BDAT twelve")[1][0][:10], "501 5.5.4 ")
        self.assertEqual(self.bdat(client, b"NOOP\r\nQUIT\r\n")[0][:4], "250 ")     # data, not commands
        client.send(b"BDAT 12 LASTX\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(client.reply()[1][0][:10], "501 5.5.4 ")
        self.assertEqual(client.cmd("NOOP")[1], ["250 2.0.0 OK"])

    def test_a_message_over_the_size_limit_fails_and_rset_starts_clean(self):
        """A chunk past --max-size gets 552 5.3.4; later chunks 503 until RSET; nothing is stored."""
        client = self.transaction()
        self.assertEqual(self.bdat(client, (b"y" * 98 + b"\r\n") * 1100)[0][:10], "552 5.3.4 ")
        self.assertEqual(self.bdat(client, b"more\r\n", last=True)[0][:10], "503 5.5.1 ")
        self.assertEqual(client.cmd("RSET")[1], ["250 2.0.0 OK"])
        self.assertEqual(read_mailbox(self.root, "alice"), b"")
        client.cmd_expecting("MAIL FROM:<carol@example.org>", 250)
        client.cmd_expecting("RCPT TO:<alice@example.org>", 250)
        self.assertEqual(self.bdat(client, b"Subject: small\r\n\r\nok\r\n", last=True)[0][:4], "250 ")
        self.assertEqual(len(support.stored_messages(self.root, "alice")), 1)

    def test_a_large_message_in_chunks_comes_out_of_the_spool_whole(self):
        """Chunks adding up to more than the in-memory part are stored byte for byte."""
        client = self.transaction()
        line = b"0123456789" * 9 + b"\r\n"
        for _ in range(8):
            self.assertEqual(self.bdat(client, line * 100)[0][:4], "250 ")
        self.assertEqual(self.bdat(client, b"", last=True)[0][:4], "250 ")
        [mail] = support.stored_messages(self.root, "alice")
        self.assertTrue(mail.endswith(b"Subject: \n" + mail[mail.index(b"Received"):].split(b"\n")[0] +
                                      b"\n" + line.replace(b"\r\n", b"\n") * 800))


class QuotaTest(support.BothServersTestCase):
    """--quota: a full mailbox refuses with 4.2.2 for its recipient only; nothing is half stored."""

    QUOTA = 2000

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root()
        cls.servers = [support.ServerProcess(support.SMTP_SCRIPT, cls.root, "--quota", str(cls.QUOTA)),
                       support.ServerProcess(support.POP_SCRIPT, cls.root)]

    def tearDown(self):
        support.remove_mailboxes(self.root)

    def fill(self, login, size):
        """Give login's mailbox one stored message of about size bytes."""
        with open(support.mailbox_path(self.root, login), "wb") as f:
            f.write(b"From: a@x\nTo: b@x\nSubject: filler\nReceived: r\n" + b"f" * (size - 45) + b"\n.\n")

    def test_a_full_mailbox_gets_452_4_2_2_and_the_other_recipient_goes_on(self):
        """alice's mailbox is at its quota: RCPT alice gets 452 4.2.2, bob gets his copy."""
        smtp, _ = self.servers
        self.fill("alice", self.QUOTA)
        with support.smtp_session(smtp, ehlo=True) as client:
            client.cmd_expecting("MAIL FROM:<carol@example.org>", 250)
            self.assertEqual(client.cmd("RCPT TO:<alice@example.org>")[1], ["452 4.2.2 Mailbox full"])
            client.cmd_expecting("RCPT TO:<bob@example.org>", 250)
            client.cmd_expecting("DATA", 354)
            client.send(b"Subject: for bob\r\n\r\nhi\r\n.\r\n")
            self.assertEqual(client.reply()[0], 250)
        self.assertEqual(len(support.stored_messages(self.root, "bob")), 1)
        self.assertEqual(len(support.stored_messages(self.root, "alice")), 1)

    def test_a_declared_size_decides_at_rcpt(self):
        """SIZE= that would pass the quota gets 452 4.2.2; one larger than the quota itself 552 5.2.2."""
        smtp, _ = self.servers
        self.fill("alice", 1500)
        with support.smtp_session(smtp, ehlo=True) as client:
            client.cmd_expecting("MAIL FROM:<carol@example.org> SIZE=600", 250)
            self.assertEqual(client.cmd("RCPT TO:<alice@example.org>")[1], ["452 4.2.2 Mailbox full"])
            client.cmd_expecting("RSET", 250)
            client.cmd_expecting("MAIL FROM:<carol@example.org> SIZE=%d" % (self.QUOTA + 1), 250)
            self.assertEqual(client.cmd("RCPT TO:<bob@example.org>")[1][0][:10], "552 5.2.2 ")

    def test_after_the_data_a_message_too_big_for_one_mailbox_is_stored_for_nobody(self):
        """Undeclared, the message passes alice's quota: 452 4.2.2 to the whole, bob gets nothing either."""
        smtp, _ = self.servers
        self.fill("alice", 1500)
        body = b"Subject: big\r\n\r\n" + b"b" * 98 + b"\r\n" + (b"c" * 98 + b"\r\n") * 6
        with support.smtp_session(smtp, ehlo=True) as client:
            reply = support.send_message(client, body, recipients=("alice@example.org", "bob@example.org"))
        self.assertEqual(reply[1], ["452 4.2.2 Mailbox full"])
        self.assertEqual(read_mailbox(self.root, "bob"), b"")
        self.assertEqual(len(support.stored_messages(self.root, "alice")), 1)

    def test_after_the_data_a_message_larger_than_the_quota_gets_552_5_2_2(self):
        """Undeclared, the message alone is larger than the quota: 552 5.2.2, stored for nobody."""
        smtp, _ = self.servers
        body = b"Subject: huge\r\n\r\n" + (b"h" * 98 + b"\r\n") * (self.QUOTA // 100 + 1)
        with support.smtp_session(smtp, ehlo=True) as client:
            reply = support.send_message(client, body, recipients=("alice@example.org", "bob@example.org"))
        self.assertEqual(reply[1], [support.mailserver_smtp.Replies.OVER_QUOTA])
        self.assertEqual((read_mailbox(self.root, "alice"), read_mailbox(self.root, "bob")), (b"", b""))

    def test_deleting_mail_frees_the_room_at_once(self):
        """After POP3 deletes the message that filled the mailbox, the next RCPT is taken."""
        smtp, pop = self.servers
        self.fill("alice", self.QUOTA)
        self.assertEqual(support.rcpt_code(smtp, "alice@example.org"), 452)
        with support.PopClient(pop, "alice", "wonderland") as client:
            client.cmd("DELE 1")
            self.assertTrue(client.cmd("QUIT").startswith("+OK"))
        self.assertEqual(support.rcpt_code(smtp, "alice@example.org"), 250)


if __name__ == "__main__":
    unittest.main()

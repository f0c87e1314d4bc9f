"""Aliases, catch-all and plus-addressing (CONTRACT.md section 11, issue 24), and SRS for what aliases forward.

The servers read ROOT/aliases.txt; the remote for forwarded mail is a
scripted stand-in (support.RemoteSMTPServer) on loopback, the MX of
example.net in a DNS responder on loopback (--dns-server, --mx-port).
"""

import base64
import hashlib
import hmac
import os
import re
import shutil
import tempfile
import unittest

import support
from support import SMTP_SCRIPT, wait_for

import mailserver_smtp

USERS = {"alice": "wonderland", "bob": "builder", "carol": "singer"}
SUBJECT = b"Subject: %s\r\n\r\nhello\r\n"


def plain(login, password):
    """An AUTH PLAIN initial response."""
    return base64.b64encode(("\0%s\0%s" % (login, password)).encode()).decode()


def write_aliases(root, text):
    """Put a new aliases.txt in place at once (a new file renamed over the old, as an editor saves)."""
    temp = os.path.join(root, "aliases.txt.new")
    with open(temp, "w") as f:
        f.write(text)
    os.replace(temp, os.path.join(root, "aliases.txt"))


def reported_alias_lines(server):
    """The aliases.txt line numbers a server has reported, in order."""
    return [int(n) for n in re.findall(r"aliases\.txt line (\d+) ", server.output())]


def rcpt_reply(server, address, sender="sender@example.org"):
    """The last reply line RCPT TO:<address> gets in a fresh EHLO transaction."""
    with support.smtp_session(server, ehlo=True) as client:
        client.cmd_expecting("MAIL FROM:<%s>" % sender, 250)
        return client.cmd("RCPT TO:<%s>" % address)[1][-1]


def server_domain(server):
    """The name a server gives itself (its greeting's), as bytes."""
    with server.connect() as client:
        return client.line().split()[1].encode()


def count_of(root, login, text):
    """How many stored messages of login's mailbox hold text."""
    return sum(text in m for m in support.stored_messages(root, login))


CHAIN_10 = "".join("a%d: a%d\n" % (n, n + 1) for n in range(1, 10)) + "a10: alice\n"
CHAIN_11 = "".join("b%d: b%d\n" % (n, n + 1) for n in range(1, 11)) + "b11: alice\n"

ALIASES = """\
# the site's aliases
info: alice, bob
Sales : bob
team: alice, info, bob, BOB, carol
both: alice, carol@example.net
far: gone@example.net
ring1: ring2
ring2: ring1
self: self
@example.org: carol
postmaster: bob
stale: nobody-here
""" + CHAIN_10 + CHAIN_11


class AliasCase(support.OneServerTestCase):
    """A server with --local-domains example.org (and lab.example), aliases.txt as ALIASES, a remote on loopback."""

    users = USERS
    aliases = ALIASES
    dkim_domain = None       # a domain to give a DKIM key (ed25519) before the server starts

    @classmethod
    def setUpClass(cls):
        cls.remote = support.RemoteSMTPServer()
        cls.responder = support.DNSResponder({("example.net", "MX"): [(10, "mx.example.net")],
                                              ("mx.example.net", "A"): ["127.0.0.1"]})
        cls.server_args = ("--local-domains", "example.org,lab.example", "--domain", "mx.example.org",
                           "--mx-port", str(cls.remote.port), "--retry-base", "0.3", "--relay-timeout", "2",
                           "--dns-server", "%s:%d" % cls.responder.address)
        cls.root = support.make_mail_root(USERS)
        write_aliases(cls.root, cls.aliases)
        if cls.dkim_domain:
            support.run_queue_command(cls.root, "--dkim-keygen", cls.dkim_domain, "--key-type", "ed25519")
        try:
            cls.server = support.ServerProcess(SMTP_SCRIPT, cls.root, *cls.server_args)
        except BaseException:
            cls.remote.close()
            cls.responder.close()
            support.remove_mail_root(cls.root)
            raise

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.remote.release.set()
        cls.remote.close()
        cls.responder.close()

    def tearDown(self):
        support.remove_mailboxes(self.root, tuple(USERS))

    def send(self, recipients, subject, sender="dave@example.org"):
        """Send a message with subject to recipients; the reply to its end."""
        with support.smtp_session(self.server, ehlo=True) as client:
            return support.send_message(client, SUBJECT % subject, sender, recipients)


class AliasDeliveryTest(AliasCase):
    """Who gets what an alias, a +tag or the catch-all is sent."""

    def test_an_alias_of_two_users_gets_250_and_a_copy_each(self):
        """info: alice, bob. RCPT answers as for a user; both get the message."""
        self.assertEqual(rcpt_reply(self.server, "info@example.org"), "250 2.1.5 info... Recipient ok")
        self.assertEqual(self.send(["INFO@example.org"], b"for info")[0], 250)
        self.assertEqual([count_of(self.root, u, b"for info") for u in USERS], [1, 1, 0])

    def test_names_compare_in_any_case(self):
        """'Sales ' in the file (a space before the colon, capitals) is sales@ and SALES@."""
        self.assertEqual(self.send(["sAlEs@example.org"], b"for sales")[0], 250)
        self.assertEqual(count_of(self.root, "bob", b"for sales"), 1)

    def test_a_target_reached_twice_gets_one_copy(self):
        """team: alice, info (alice, bob), bob, BOB, carol; and bob named once more in the envelope: one copy each."""
        self.assertEqual(self.send(["team@example.org", "bob@example.org"], b"for the team")[0], 250)
        self.assertEqual([count_of(self.root, u, b"for the team") for u in USERS], [1, 1, 1])

    def test_a_tag_goes_where_its_name_goes_and_stays_in_the_recipient(self):
        """alice+news, info+x and nobody+y (the catch-all): each delivered, the added To: keeps the tag."""
        for address, login in (("alice+news@example.org", "alice"), ("info+x@example.org", "bob"),
                               ("nobody+y@example.org", "carol")):
            self.assertEqual(self.send([address], b"tagged " + address.encode())[0], 250)
            stored = [m for m in support.stored_messages(self.root, login) if address.encode() in m]
            self.assertIn(b"To: " + address.encode() + b"\n", stored[0])
            self.assertIn(b"\n\tfor <" + address.encode() + b">;\n", stored[0])   # the trace field's recipient

    def test_the_catch_all_takes_only_what_no_user_or_alias_takes(self):
        """@example.org: carol. alice@ stays alice's, info@ the alias's, anything else carol's; not lab.example."""
        self.assertEqual(self.send(["alice@example.org", "info@example.org", "whoever@example.org"],
                                   b"catch all")[0], 250)
        self.assertEqual([count_of(self.root, u, b"catch all") for u in USERS], [1, 1, 1])
        self.assertEqual(rcpt_reply(self.server, "whoever@lab.example"), "550 5.1.1 No such user")

    def test_postmaster_goes_where_aliases_txt_says(self):
        """postmaster: bob overrides section 5's first user (alice), in any case and with a tag."""
        self.assertEqual(self.send(["PostMaster@example.org", "postmaster+x@lab.example"], b"for pm")[0], 250)
        self.assertEqual([count_of(self.root, u, b"for pm") for u in USERS], [0, 1, 0])

    def test_a_loop_of_two_and_a_chain_of_eleven_get_550_5_4_6(self):
        """ring1 -> ring2 -> ring1, self -> self, and b1 .. b11 -> alice; a chain of ten (a1 .. a10) is fine."""
        for address in ("ring1@example.org", "self@example.org", "b1@example.org"):
            self.assertEqual(rcpt_reply(self.server, address), "550 5.4.6 Alias loop or chain too deep")
        self.assertEqual(self.send(["a1@example.org"], b"ten deep")[0], 250)
        self.assertEqual(count_of(self.root, "alice", b"ten deep"), 1)

    def test_the_course_dialogue_keeps_its_words_for_an_alias(self):
        """HELO, MAIL_FROM:, RCPT_TO: an alias: byte for byte the replies of section 2."""
        with support.smtp_session(self.server) as client:
            client.send("MAIL_FROM: <cnlab@kuleuven.be>\r\n")
            self.assertEqual(client.raw_line(), b"250 <cnlab@kuleuven.be>... Sender ok\r\n")
            client.send("RCPT_TO: <info@example.org>\r\n")
            self.assertEqual(client.raw_line(), b"250 info... Recipient ok\r\n")
            client.send("RCPT_TO: <ring1@example.org>\r\n")
            self.assertEqual(client.raw_line(), b"550 Alias loop or chain too deep\r\n")
            client.send("DATA\r\n")
            self.assertEqual(client.raw_line(), b'354 Enter mail, end with "." on a line by itself\r\n')
            client.send("Subject: course\r\n\r\nhi\r\n.\r\n")
            self.assertEqual(client.raw_line(), b"250 OK Message accepted for delivery\r\n")

    def test_a_target_that_is_nothing_is_skipped_and_logged_once(self):
        """stale: nobody-here (no user, no alias): the alias has nothing left, 550 5.1.1, one log line."""
        self.assertEqual(rcpt_reply(self.server, "stale@example.org"), "550 5.1.1 No such user")
        self.assertEqual(rcpt_reply(self.server, "stale@example.org"), "550 5.1.1 No such user")
        self.server.wait_for_output("alias 'stale' leads to 'nobody-here', no user or alias: skipped")
        self.assertEqual(self.server.output().count("leads to 'nobody-here'"), 1)


class AliasSenderTest(AliasCase):
    """Section 5: a logged-in user may send as an alias that leads to the login, and as no other."""

    def mail_from(self, login, sender):
        with support.smtp_session(self.server, ehlo=True) as client:
            client.cmd_expecting("AUTH PLAIN " + plain(login, USERS[login]), 235)
            return client.cmd("MAIL FROM:<%s>" % sender)[1][-1]

    def test_an_alias_that_leads_to_the_login_is_its_own(self):
        """alice may send as info@ (alice, bob), team@ (through info) and info+x@; not as sales@ (bob's)."""
        for sender in ("info@example.org", "team@example.org", "info+x@example.org"):
            self.assertTrue(self.mail_from("alice", sender).startswith("250 "), sender)
        self.assertEqual(self.mail_from("alice", "sales@example.org"),
                         "553 5.7.1 Sender <sales@example.org> is not an address of alice")

    def test_the_catch_all_is_no_ones_own(self):
        """carol takes whoever@ (the catch-all), but may not send as it; nor as an alias in another domain."""
        self.assertTrue(self.mail_from("carol", "whoever@example.org").startswith("553 "))
        self.assertTrue(self.mail_from("alice", "info@elsewhere.example").startswith("553 "))


class ForwardingTest(AliasCase):
    """An alias with a target in another domain: the copy goes out with an SRS sender, bounces come back."""

    dkim_domain = "example.net"

    def test_the_forwarded_copy_has_an_srs_sender_its_from_unchanged_and_no_signature(self):
        """both: alice, carol@example.net; and direct@example.net in the same message, from a relay network.
        alice's copy is stored; carol's goes with SRS0=HHHH=TT=example.net=dave and unsigned, direct's
        with dave@example.net and signed (the From: domain has a key)."""
        body = b"From: Dave <dave@example.net>\r\n" + SUBJECT % b"forwarded"
        with support.smtp_session(self.server, ehlo=True) as client:
            reply = support.send_message(client, body, "dave@example.net", ["both@example.org", "direct@example.net"])
        self.assertEqual(reply[0], 250)
        self.assertEqual(count_of(self.root, "alice", b"forwarded"), 1)

        def both_sent():
            got = [m for m in self.remote.messages if b"forwarded" in m["data"]]
            return got if len(got) == 2 else None
        forwarded, direct = sorted(wait_for(both_sent), key=lambda m: m["recipients"] != ["carol@example.net"])
        self.assertEqual(forwarded["recipients"], ["carol@example.net"])
        self.assertRegex(forwarded["sender"], r"^SRS0=[A-Za-z0-9+/]{4}=[A-Z2-7]{2}=example\.net=dave@mx\.example\.org$")
        self.assertNotIn(b"DKIM-Signature", forwarded["data"])
        self.assertTrue(forwarded["data"].endswith(body))
        self.assertEqual((direct["recipients"], direct["sender"]), (["direct@example.net"], "dave@example.net"))
        self.assertIn(b"DKIM-Signature: v=1; a=ed25519-sha256", direct["data"])

    def test_mail_from_the_null_sender_is_forwarded_from_it(self):
        """<> stays <>."""
        self.assertEqual(self.send(["both@example.org"], b"from nobody", sender="")[0], 250)
        got = wait_for(lambda: [m for m in self.remote.messages if b"from nobody" in m["data"]])[0]
        self.assertEqual(got["sender"], "")

    def test_a_remote_that_fails_bounces_to_the_original_sender_and_the_local_copy_stays(self):
        """both: alice, gone@ (550 there): alice keeps her copy; the sender bob (local) gets the bounce, not SRS."""
        self.remote.rcpt["gone@example.net"] = "550 5.1.1 no such user"
        reply = self.send(["both@example.org", "far@example.org"], b"half lost", sender="bob@example.org")
        self.assertEqual(reply[0], 250)
        self.assertEqual(count_of(self.root, "alice", b"half lost"), 1)
        bounce = wait_for(lambda: [m for m in support.stored_messages(self.root, "bob")
                                   if b"multipart/report" in m and b"half lost" in m])[0]
        self.assertIn(b"To: <bob@example.org>", bounce)
        self.assertIn(b"Final-Recipient: rfc822; gone@example.net", bounce)
        del self.remote.rcpt["gone@example.net"]

    def test_a_bounce_to_an_srs_address_goes_back_to_the_original_sender(self):
        """The remote's own bounce, RCPT TO:<SRS0...@mx.example.org>, is relayed to the sender it stands for."""
        srs = mailserver_smtp.SRS.of_root(self.root, "mx.example.org")
        address = srs.forward("erin@example.net")
        self.assertEqual(self.send([address], b"bounce back", sender="")[0], 250)
        got = wait_for(lambda: [m for m in self.remote.messages if b"bounce back" in m["data"]])[0]
        self.assertEqual(got["recipients"], ["erin@example.net"])
        self.assertEqual(got["sender"], "")

    def test_a_forged_or_malformed_srs_address_gets_550_5_1_1(self):
        """A wrong hash, a wrong timestamp, a missing field: 550 5.1.1, nothing relayed."""
        srs = mailserver_smtp.SRS.of_root(self.root, "mx.example.org")
        good = srs.forward("erin@example.net")
        hash_ = good.split("=")[1]
        forged = good.replace(hash_, "AAAA" if hash_ != "AAAA" else "BBBB", 1)
        for address in (forged, "SRS0=AAAA=AA=example.net@mx.example.org", "SRS1=AAAA=x.example==b@mx.example.org",
                        "SRS0=%s@mx.example.org" % "=".join(good.partition("@")[0].split("=")[1:4])):
            self.assertEqual(rcpt_reply(self.server, address), "550 5.1.1 No such user", address)

    def test_the_secret_is_made_once_with_mode_0600(self):
        """ROOT/.srs-secret: at least 16 bytes, private, the same at the next start."""
        path = os.path.join(self.root, ".srs-secret")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path, "rb") as f:
            secret = f.read().strip()
        self.assertGreaterEqual(len(secret), 16)
        self.assertEqual(mailserver_smtp.read_or_make_secret(path), secret)


class AliasFileTest(unittest.TestCase):
    """aliases.txt malformed, missing, a symlink, changed while mail arrives; each server started for the test."""

    def setUp(self):
        self.root = support.make_mail_root(USERS)
        self.addCleanup(support.remove_mail_root, self.root)

    def start(self, *args, env=None):
        server = support.ServerProcess(SMTP_SCRIPT, self.root, *args, env=env)
        self.addCleanup(server.close)
        return server

    def test_every_malformed_line_is_reported_once_with_its_number_and_skipped(self):
        write_aliases(self.root, "\n".join([
            "good: bob",                  # 1
            "no colon here",              # 2
            ": bob",                      # 3 no name
            "empty:",                     # 4 no target
            "bad name!: bob",             # 5
            "pipe: |/bin/sh",             # 6
            "file: /etc/passwd",          # 7
            "alice: bob",                 # 8 a user's own name
            "GOOD: carol",                # 9 repeated
            "  # an indented comment",    # 10
            "",                           # 11
            "dots.: bob",                 # 12
            "@: bob",                     # 13
            "latin\xe9: bob",             # 14 not a plain name
            "wide: bob, , carol",         # 15 fine: empty targets between commas are nothing
        ]) + "\n")
        server = self.start()
        server.wait_for_output(r"aliases\.txt line 14 ")
        self.assertEqual(reported_alias_lines(server), [2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14])
        self.assertEqual(support.deliver(server, SUBJECT % b"x", recipients=("good@example.org", "wide@example.org",
                                                                                "alice@example.org")), 250)
        self.assertEqual([len(support.stored_messages(self.root, u)) for u in USERS], [1, 1, 1])
        self.assertEqual(support.rcpt_code(server, "pipe@example.org"), 550)
        self.assertEqual(reported_alias_lines(server), [2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14])   # once

    def test_the_course_dialogue_is_unchanged_by_aliases_byte_for_byte(self):
        """Section 2 in the course mode (no flags): an alias and a +tag get the words a user gets."""
        write_aliases(self.root, "cn: alice, bob\n")
        server = self.start()
        with support.smtp_session(server, helo=None) as client:
            for line, reply in (("HELO kuleuven.be", b"250 OK Hello kuleuven.be\r\n"),
                                ("MAIL_FROM: <cnlab@kuleuven.be>", b"250 <cnlab@kuleuven.be>... Sender ok\r\n"),
                                ("RCPT_TO: <cn@kuleuven.be>", b"250 cn... Recipient ok\r\n"),
                                ("RCPT_TO: <alice+lab@kuleuven.be>", b"250 alice+lab... Recipient ok\r\n"),
                                ("RCPT_TO: <nobody@kuleuven.be>", b"550 No such user\r\n"),
                                ("DATA", b'354 Enter mail, end with "." on a line by itself\r\n'),
                                ("Subject: lab\r\n\r\nhi\r\n.", b"250 OK Message accepted for delivery\r\n"),
                                ("QUIT", b"221 %s closing connection\r\n" % server_domain(server))):
                client.send(line + "\r\n")
                self.assertEqual(client.raw_line(), reply, line)
        self.assertEqual([count_of(self.root, u, b"Subject: lab") for u in USERS], [1, 1, 0])

    def test_a_missing_file_means_no_aliases(self):
        server = self.start()
        self.assertEqual(support.rcpt_code(server, "info@example.org"), 550)
        self.assertEqual(support.rcpt_code(server, "alice+x@example.org"), 250)

    def test_a_symlink_is_not_followed_and_alias_mail_waits_with_451(self):
        """aliases.txt as a symlink (to a good file): never read; aliases get 451 4.3.0, users their mail."""
        elsewhere = tempfile.mkdtemp(prefix="aliases-")
        self.addCleanup(shutil.rmtree, elsewhere)
        with open(os.path.join(elsewhere, "real.txt"), "w") as f:
            f.write("info: bob\n")
        os.symlink(os.path.join(elsewhere, "real.txt"), os.path.join(self.root, "aliases.txt"))
        server = self.start()
        self.assertEqual(rcpt_reply(server, "info@example.org"),
                         "451 4.3.0 Requested action aborted: local error in processing")
        self.assertEqual(support.rcpt_code(server, "alice@example.org"), 250)
        server.wait_for_output(r"cannot read .*aliases\.txt")

    def test_a_file_changed_while_mail_arrives_is_read_again(self):
        """A transaction holds what RCPT found; the next RCPT sees the new file, without a restart."""
        write_aliases(self.root, "info: alice\n")
        server = self.start()
        with support.smtp_session(server) as client:
            client.cmd_expecting("MAIL FROM:<dave@example.org>", 250)
            client.cmd_expecting("RCPT TO:<info@example.org>", 250)
            write_aliases(self.root, "info: bob\nnew: carol\n")
            client.cmd_expecting("DATA", 354)
            client.send(SUBJECT % b"during the change" + b".\r\n")
            self.assertEqual(client.reply()[0], 250)
        self.assertEqual(count_of(self.root, "alice", b"during the change"), 1)
        self.assertEqual(support.deliver(server, SUBJECT % b"after", recipients=("info@example.org",
                                                                                 "new@example.org")), 250)
        self.assertEqual([count_of(self.root, u, b"after") for u in USERS], [0, 1, 1])
        os.remove(os.path.join(self.root, "aliases.txt"))
        self.assertEqual(support.rcpt_code(server, "info@example.org"), 550)

    def test_kill_9_during_delivery_to_three_local_targets_stores_all_or_none(self):
        """three: alice, bob, carol. The server dies at its second mailbox write: no one keeps a copy."""
        write_aliases(self.root, "three: alice, bob, carol\n")
        hooks = tempfile.mkdtemp(prefix="hooks-")
        self.addCleanup(support.remove_mail_root, hooks)
        server = self.start(env=support.killed_at_write_env(hooks, 2))
        with support.smtp_session(server) as client:
            for line in ("MAIL FROM:<dave@example.org>", "RCPT TO:<three@example.org>", "DATA"):
                client.cmd(line)
            client.send(SUBJECT % b"all or none" + b".\r\n")
            self.assertTrue(client.closed(), "the server died before any reply")
        self.assertEqual(server.proc.wait(support.DEADLINE), -9)
        again = self.start()
        self.assertEqual(support.deliver(again, SUBJECT % b"second try", recipients=("three@example.org",)), 250)
        for login in USERS:
            self.assertEqual(count_of(self.root, login, b"all or none"), 0, login)
            self.assertEqual(count_of(self.root, login, b"second try"), 1, login)


class SRSTest(unittest.TestCase):
    """The rewriting itself, with a clock the test sets: the libsrs2 form, SRS1, age, hash, case."""

    NOW = 1765000000.0

    def srs(self, now=NOW, domain="fwd.example"):
        return mailserver_smtp.SRS(b"0123456789abcdef-test", domain, clock=lambda: now)

    def test_round_trip(self):
        address = self.srs().forward("User.Name@Example.NET")
        self.assertRegex(address, r"^SRS0=[A-Za-z0-9+/]{4}=[A-Z2-7]{2}=Example\.NET=User\.Name@fwd\.example$")
        self.assertEqual(self.srs().reverse(address), "User.Name@Example.NET")
        self.assertEqual(self.srs().reverse(address.upper().replace("FWD.EXAMPLE", "fwd.example")),
                         "USER.NAME@EXAMPLE.NET")      # compared in any case, as libsrs2 does

    def test_the_timestamp_is_days_in_base32_modulo_1024(self):
        days = int(self.NOW // 86400) % 1024
        stamp = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[days >> 5] + "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[days & 31]
        self.assertEqual(self.srs().forward("a@b.example").split("=")[2], stamp)

    def test_the_hash_is_hmac_sha1_of_the_lower_cased_fields_in_four_base64_characters(self):
        address = self.srs().forward("Joe@B.Example")
        _, given, stamp, domain, local = address.partition("@")[0].split("=")
        digest = hmac.new(b"0123456789abcdef-test", (stamp + domain + local).lower().encode(), hashlib.sha1).digest()
        self.assertEqual(given, base64.b64encode(digest).decode()[:4])

    def test_21_days_old_is_good_22_is_expired_and_a_future_stamp_is_old(self):
        address = self.srs().forward("a@b.example")
        self.assertEqual(self.srs(self.NOW + 21 * 86400).reverse(address), "a@b.example")
        for later in (22, -1, 1023):
            with self.assertRaises(mailserver_smtp.SRSError):
                self.srs(self.NOW + later * 86400).reverse(address)

    def test_a_forged_hash_is_refused(self):
        address = self.srs().forward("a@b.example")
        other = mailserver_smtp.SRS(b"another secret of sixteen", "fwd.example", clock=lambda: self.NOW)
        with self.assertRaises(mailserver_smtp.SRSError):
            other.reverse(address)
        with self.assertRaises(mailserver_smtp.SRSError):
            self.srs().reverse(address.replace("=a@", "=b@"))

    def test_the_null_sender_and_our_own_addresses_are_not_rewritten(self):
        self.assertEqual(self.srs().forward(""), "")
        self.assertEqual(self.srs().forward("someone@FWD.example"), "someone@FWD.example")
        self.assertIsNone(self.srs().reverse("someone@fwd.example"))
        self.assertIsNone(self.srs().reverse("SRS0=xxxx=AA=b.example=a@other.example"))   # not ours

    def test_an_srs0_original_becomes_srs1_and_goes_back_to_its_forwarder(self):
        """Sender SRS0 of first.example: we write SRS1=HHHH=first.example==HHHH=TT=d=u and reverse it to that."""
        first = self.srs(domain="first.example").forward("u@d.example")
        second = self.srs().forward(first)
        self.assertRegex(second, r"^SRS1=[A-Za-z0-9+/]{4}=first\.example==[A-Za-z0-9+/]{4}=[A-Z2-7]{2}"
                                 r"=d\.example=u@fwd\.example$")
        self.assertEqual(self.srs().reverse(second), first)
        self.assertEqual(self.srs(domain="first.example").reverse(first), "u@d.example")
        third = self.srs(domain="third.example").forward(second)     # SRS1 again: still back to the first
        self.assertTrue(third.startswith("SRS1=") and "=first.example==" in third)
        self.assertEqual(self.srs(domain="third.example").reverse(third), first)


if __name__ == "__main__":
    unittest.main()

"""Tests of authentication, TLS and the mail a server must take (CONTRACT.md section 5, issue 10).

SMTP AUTH and submission (--require-auth, the sender checks), POP3 AUTH and
APOP, the penalty for failed logins, --implicit-tls and close_notify,
postmaster and --local-domains, hashed passwords and --hash-password, and
logs that never hold a secret; the client against the real servers.
"""

import base64
import hashlib
import hmac
import io
import logging
import os
import poplib
import re
import smtplib
import socket
import subprocess
import sys
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402
from support import (DEADLINE, SENT, TLS_ARGS, TLS_CERT, client_tls_context, closed_port, mail,  # noqa: E402
                     read_mailbox, run_client)

import mailserver_smtp  # noqa: E402

PLAIN_USERS = {"alice": "wonderland", "bob": "builder", "cn": "lab"}
HASHED = {"carol": ("pbkdf2-sha256", "carol's pass"), "dave": ("scrypt", "dave's pass")}
USERS = dict(PLAIN_USERS)     # + the hashed fields, made by --hash-password in setUpModule
PENALTY_STEP = 0.2            # contract: from the 3rd failure each reply waits >= 0.2 s more


def hash_password_command(password, *options):
    """Run mailserver_smtp.py --hash-password with password piped in; return the CompletedProcess."""
    return subprocess.run([sys.executable, support.SMTP_SCRIPT, "--hash-password"] + list(options),
                          input=password, capture_output=True, timeout=DEADLINE)


def setUpModule():
    for login, (scheme, password) in HASHED.items():
        done = hash_password_command(password.encode() + b"\n", "--scheme", scheme)
        if done.returncode != 0:
            raise AssertionError(done.stderr)
        USERS[login] = done.stdout.decode().strip()


def b64(data):
    """Text or bytes in base64, as SASL carries it."""
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(login, password):
    """An AUTH PLAIN response (RFC 4616) without an authorization identity."""
    return b64("\0%s\0%s" % (login, password))


def cram_answer(challenge_line, login, password):
    """The CRAM-MD5 response (RFC 2195) to a '334 <base64>' or '+ <base64>' line."""
    challenge = base64.b64decode(challenge_line.split(" ", 1)[1])
    return b64("%s %s" % (login, hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()))


def apop_digest(greeting, password):
    """The APOP digest (RFC 1939 7) for the timestamp of a greeting."""
    stamp = re.search(r"<[^<>]*>", greeting).group(0)
    return hashlib.md5((stamp + password).encode()).hexdigest()


def local_port(client):
    """The client's own port: how its lines are found in the server's log."""
    return client.sock.getsockname()[1]


def log_lines(server, port, text="authentication"):
    """The lines the server logged about the connection from local port that hold text."""
    return [line for line in server.output().splitlines() if ":%d" % port in line and text in line]


def timed(command):
    """Run command(); return (its result, the seconds it took)."""
    started = time.monotonic()
    result = command()
    return result, time.monotonic() - started


def tls_client(server):
    """A raw client speaking TLS from the first byte; a close without close_notify fails its reads."""
    client = server.connect()
    try:
        client.wrap_tls(strict_eof=True)
    except BaseException:
        client.close()
        raise
    return client


def read_to_eof(client):
    """Read until the server closes; SSLEOFError (a failure) if it closed without a close_notify."""
    return client.file.read()


def wait_closed(client):
    """Read until the server closes the connection; a reset counts as closed, a timeout fails."""
    try:
        client.file.read()
    except socket.timeout:
        raise AssertionError("the server did not close the connection")
    except OSError:
        pass


def name_of(server):
    """The script a server runs, for subTest."""
    return os.path.basename(server.proc.args[1])


class AuthServerCase(support.OneServerTestCase):
    """A real server in a mail root of plain and hashed users; helpers for raw sessions."""

    users = USERS

    def ehlo(self, helo="EHLO client.test"):
        """A raw SMTP session past the greeting and EHLO."""
        client = support.smtp_session(self.server, helo=None)
        self.addCleanup(client.close)
        client.cmd_expecting(helo, 250)
        return client

    def assertOnlyOwnStored(self, client, refused, sender, accepted, accepted_sender, recipient):
        """Each {name: header lines} sent by client gets 553 5.7.1, the accepted message (Subject: own) 250;
        only the accepted one is in the recipient's mailbox (a refused one's Subject is refused-NAME)."""
        for name, head in refused.items():
            with self.subTest(name):
                body = head + b"Subject: refused-" + name.encode() + b"\r\n\r\nno\r\n"
                code, lines = support.send_message(client, body, sender, [recipient])
                self.assertEqual((code, lines[0][:10]), (553, "553 5.7.1 "), lines)
        self.assertEqual(support.send_message(client, accepted, accepted_sender, [recipient])[0], 250)
        stored = read_mailbox(self.root, recipient.partition("@")[0])
        self.assertIn(b"Subject: own\n", stored)
        self.assertNotIn(b"refused-", stored, "nothing refused is stored")

    def pop(self):
        """A raw POP3 session past the greeting; ended at cleanup once the server has given its maildrop back."""
        client = support.PopClient(self.server)
        self.addCleanup(self.end_pop, client)
        return client

    @staticmethod
    def end_pop(client):
        """QUIT, and wait for the server's close: it gives the session lock back before it closes, so the next
        test's login of the same user never meets this session's lock."""
        try:
            client.send("QUIT\r\n")
            support.wait_for(client.closed)
        except (OSError, EOFError):
            pass
        client.close()

    def smtp_login(self, mechanism, login, password):
        """smtplib logged in with one mechanism only; return the client."""
        smtp = smtplib.SMTP("127.0.0.1", self.server.port, timeout=DEADLINE)
        self.addCleanup(smtp.close)
        smtp.ehlo()
        smtp.esmtp_features["auth"] = mechanism      # login() then uses this one
        smtp.login(login, password)
        return smtp

    def mail_postmaster(self, client, sender, addresses, subject):
        """One mail from sender to every one of the postmaster addresses, each of which must be taken."""
        client.cmd_expecting("MAIL FROM:<%s>" % sender, 250)
        for address in addresses:
            self.assertEqual(client.cmd("RCPT TO:<%s>" % address)[0], 250, address)
        client.cmd_expecting("DATA", 354)
        client.send("From: %s\r\nSubject: %s\r\n\r\nhi\r\n.\r\n" % (sender, subject))
        self.assertEqual(client.reply()[0], 250)

    def assertPenalty(self, seconds, closed):
        """Replies 1-2 come at once, 3-5 each >= 0.2 s later than the one before; the 5th closes."""
        self.assertEqual(len(seconds), 5, seconds)
        for number, took in enumerate(seconds, 1):
            if number < 3:
                self.assertLess(took, PENALTY_STEP, "failure %d is not slowed" % number)
            else:
                self.assertGreaterEqual(took, PENALTY_STEP * (number - 2), "failure %d" % number)
        self.assertTrue(closed(), "the 5th failure closes the connection")


# --------------------------------------------------------------------------
# SMTP AUTH (RFC 4954), without --require-auth
# --------------------------------------------------------------------------

class SMTPAuthTest(AuthServerCase):
    """AUTH PLAIN, LOGIN and CRAM-MD5 on a receiving server (STARTTLS offered, nothing required)."""

    server_args = ("--verbose",) + TLS_ARGS

    def test_ehlo_advertises_the_three_mechanisms(self):
        """EHLO advertises AUTH PLAIN LOGIN CRAM-MD5 (as well as STARTTLS)."""
        lines = self.ehlo().cmd("EHLO again")[1]
        self.assertIn("250-AUTH PLAIN LOGIN CRAM-MD5", lines)

    def test_smtplib_login_with_each_mechanism_then_sends_as_itself(self):
        """smtplib's login() works with PLAIN, LOGIN and CRAM-MD5 (235 2.7.0), then sends as the login."""
        for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
            with self.subTest(mechanism=mechanism):
                smtp = smtplib.SMTP("127.0.0.1", self.server.port, timeout=DEADLINE)
                self.addCleanup(smtp.close)
                smtp.ehlo()
                smtp.esmtp_features["auth"] = mechanism
                code, text = smtp.login("alice", "wonderland")
                self.assertEqual((code, text[:5]), (235, b"2.7.0"))
                smtp.sendmail("ALICE@example.org", ["bob@example.org"],
                              "From: Alice Liddell <Alice@Lab.Example>\r\nSubject: via %s\r\n\r\nhi\r\n"
                              % mechanism)
                smtp.quit()
                self.assertIn(("Subject: via %s\n" % mechanism).encode(), read_mailbox(self.root, "bob"))

    def test_plain_without_an_initial_response_is_asked_for_with_334(self):
        """AUTH PLAIN alone gets '334 ' and takes the response on the next line."""
        client = self.ehlo()
        self.assertEqual(client.cmd("AUTH PLAIN")[1], ["334 "])
        self.assertEqual(client.cmd(plain("bob", "builder"))[1], ["235 2.7.0 Authentication successful"])

    def test_a_cram_md5_challenge_is_new_every_time(self):
        """Each CRAM-MD5 exchange gets a challenge of its own."""
        challenges = set()
        for _ in range(3):
            client = self.ehlo()
            code, lines = client.cmd("AUTH CRAM-MD5")
            self.assertEqual(code, 334)
            challenges.add(lines[0])
            client.cmd("*")
        self.assertEqual(len(challenges), 3)

    def test_wrong_credentials_get_535_with_every_mechanism(self):
        """A wrong password, an unknown user or another's authzid gets 535 5.7.8."""
        for mechanism, login, password in [("PLAIN", "alice", "builder"), ("LOGIN", "alice", "x"),
                                           ("CRAM-MD5", "alice", "wonder"), ("PLAIN", "nobody", "x")]:
            with self.subTest(mechanism=mechanism, login=login):
                with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                    self.smtp_login(mechanism, login, password)
                self.assertEqual(caught.exception.smtp_code, 535)
                self.assertTrue(caught.exception.smtp_error.startswith(b"5.7.8 "))
        client = self.ehlo()
        self.assertEqual(client.cmd("AUTH PLAIN " + b64("bob\0alice\0wonderland"))[0], 535)

    def test_cancel_and_bad_base64_get_501(self):
        """'*' cancels an exchange and undecodable base64 is refused: both 501."""
        client = self.ehlo()
        self.assertEqual(client.cmd("AUTH LOGIN")[0], 334)
        self.assertEqual(client.cmd("*")[1], ["501 5.7.0 Authentication cancelled"])
        self.assertEqual(client.cmd("AUTH PLAIN !!not-base64!!")[0], 501)
        self.assertEqual(client.cmd("NOOP")[0], 250)
        other = self.ehlo()
        self.assertEqual(other.cmd("AUTH PLAIN")[0], 334)
        self.assertEqual(other.cmd("YWxp Y2U=")[1], ["501 5.5.2 Cannot decode the response (base64 expected)"])
        for connection, failures in ((client, 2), (other, 1)):     # each counts as a failure
            port = local_port(connection)
            support.wait_for(lambda: len(log_lines(self.server, port, "authentication failed")) == failures)

    def test_503_504_and_501_for_misplaced_or_malformed_auth(self):
        """AUTH before EHLO, twice, or in a transaction gets 503; an unknown mechanism 504; no mechanism 501."""
        client = support.smtp_session(self.server, helo=None)
        self.addCleanup(client.close)
        self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[0], 503)
        client.cmd_expecting("EHLO client.test", 250)
        self.assertEqual(client.cmd("AUTH")[0], 501)
        self.assertEqual(client.cmd("AUTH PLAIN two words")[0], 501)
        self.assertEqual(client.cmd("AUTH GSSAPI")[0], 504)
        self.assertEqual(client.cmd("AUTH cram-md5 " + b64("x"))[0], 501, "CRAM-MD5: the server speaks first")
        client.cmd_expecting("MAIL FROM:<carol@example.org>", 250)
        self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[0], 503)
        client.cmd_expecting("RSET", 250)
        client.cmd_expecting("AUTH PLAIN " + plain("alice", "wonderland"), 235)
        self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[0], 503)

    def test_failures_are_slowed_from_the_third_and_the_fifth_closes(self):
        """Failures by any mechanism, a cancel and bad base64 count; from the 3rd slower; the 5th: 421, closed."""
        client = self.ehlo()
        attempts = [lambda: client.cmd("AUTH PLAIN " + plain("alice", "wrong")),
                    lambda: client.cmd("AUTH PLAIN !!!"),
                    lambda: (client.cmd("AUTH LOGIN"), client.cmd("*"))[1],
                    lambda: client.cmd(cram_answer(client.cmd("AUTH CRAM-MD5")[1][0], "alice", "no")),
                    lambda: (client.cmd("AUTH LOGIN " + b64("alice")), client.cmd(b64("wrong")))[1]]
        seconds, replies = [], []
        for attempt in attempts:
            reply, took = timed(attempt)
            replies.append(reply[0])
            seconds.append(took)
        self.assertEqual(replies, [535, 501, 501, 535, 535])
        self.assertTrue(client.line().startswith("421 4.7.0 "))
        self.assertPenalty(seconds, client.closed)

    def test_bad_sasl_input_gets_a_protocol_error_never_a_traceback(self):
        """An overlong SASL line gets 500 5.5.6; a client vanishing mid-exchange leaves the server working."""
        client = self.ehlo()
        self.assertEqual(client.cmd("AUTH PLAIN")[0], 334)
        client.send("A" * 20000 + "\r\n")
        self.assertEqual(client.reply()[1], ["500 5.5.6 Authentication exchange line is too long"])
        self.assertEqual(client.cmd("NOOP")[0], 250)
        self.assertEqual(client.cmd("AUTH PLAIN")[0], 334)
        self.assertEqual(client.cmd("A" * 12287)[0], 500, "12289 octets with CRLF: too long")
        # RFC 4954 4: a response of 12288 octets with its CRLF is read (and this one is no base64).
        client = self.ehlo()
        self.assertEqual(client.cmd("AUTH PLAIN")[0], 334)
        self.assertEqual(client.cmd("A" * 12286)[0], 501)
        self.assertEqual(client.cmd("AUTH PLAIN")[0], 334)
        self.assertEqual(client.cmd("A" * 12282 + "==")[0], 535)
        for data in (b"AUTH LOGIN\r\n", b"AUTH LOGIN\r\n" + b64("alice").encode() + b"\r\n",
                     b"AUTH CRAM-MD5\r\nYWxp", b"AUTH PLAIN " + b"\xff" * 50 + b"\r\n"):
            vanishing = self.ehlo()
            vanishing.send(data)
            vanishing.close()
        self.assertEqual(self.ehlo().cmd("NOOP")[0], 250)
        self.assertNotIn("Traceback", self.server.output())

    def test_sender_and_from_must_be_the_logins_own_in_an_authenticated_session(self):
        """After AUTH, MAIL FROM, every From: and Sender: address must be the login's, else 553 5.7.1."""
        client = self.ehlo()
        client.cmd_expecting("AUTH PLAIN " + plain("alice", "wonderland"), 235)
        self.assertEqual(client.cmd("MAIL FROM:<bob@example.org>")[1],
                         ["553 5.7.1 Sender <bob@example.org> is not an address of alice"])
        self.assertEqual(client.cmd("MAIL_FROM: <alice@example.org>")[0], 250, "course spelling, own address")
        client.cmd_expecting("RSET", 250)
        refused = {
            "from-bob": b"From: Alice <bob@example.org>\r\n",
            "sender-bob": b"From: alice@example.org\r\nSender: bob@example.org\r\n",
            "two-from": b"From: alice@example.org, bob@example.org\r\n",
            "folded": b"From: alice@example.org,\r\n bob@example.org\r\nSubject: x\r\n\r\n",
            "group": b"From: friends:;\r\n",
        }
        accepted = b"From: \"Bob Builder\" <ALICE@other.example>\r\nSender: alice\r\nSubject: own\r\n\r\nok\r\n"
        self.assertOnlyOwnStored(client, refused, "alice@example.org", accepted, "Alice@x.example",
                                 "bob@example.org")

    def test_without_auth_mail_for_local_users_is_taken_from_anyone(self):
        """Without --require-auth an unauthenticated client sends as anyone to a local user."""
        code = support.deliver(self.server, b"From: bob@example.org\r\nSubject: anyone\r\n\r\nhi\r\n",
                               sender="stranger@elsewhere.example", recipients=("alice@example.org",))
        self.assertEqual(code, 250)
        self.assertIn(b"Subject: anyone\n", read_mailbox(self.root, "alice"))

    def test_starttls_forgets_the_login_and_what_was_pipelined_behind_it(self):
        """A login before STARTTLS is forgotten, and an AUTH pipelined behind STARTTLS never runs."""
        client = self.ehlo()
        client.cmd_expecting("AUTH PLAIN " + plain("alice", "wonderland"), 235)
        client.send("STARTTLS\r\nAUTH PLAIN %s\r\n" % plain("bob", "builder"))
        self.assertEqual(client.reply()[0], 220)
        client.wrap_tls()
        client.cmd_expecting("EHLO again", 250)
        self.assertEqual(client.cmd("MAIL FROM:<bob@example.org>")[0], 250, "alice is forgotten, bob never ran")
        client.cmd_expecting("RSET", 250)
        self.assertEqual(client.cmd("AUTH PLAIN " + plain("bob", "builder"))[0], 235, "no 503: not logged in")
        port = local_port(client)
        support.wait_for(lambda: log_lines(self.server, port, "succeeded for login bob"))
        self.assertEqual(len(log_lines(self.server, port, "authentication succeeded")), 2)

    def test_hashed_users_log_in_with_plain_and_login_but_not_cram_md5(self):
        """PBKDF2 and scrypt users log in with PLAIN or LOGIN; CRAM-MD5 fails for them with 535."""
        for (login, (_, password)), mechanism in zip(sorted(HASHED.items()), ("PLAIN", "LOGIN")):
            with self.subTest(login=login, mechanism=mechanism):
                self.smtp_login(mechanism, login, password).quit()
            with self.subTest(login=login, mechanism="CRAM-MD5"):
                with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                    self.smtp_login("CRAM-MD5", login, password)
                self.assertEqual(caught.exception.smtp_code, 535)

    def test_the_verbose_log_never_holds_a_secret(self):
        """--verbose logs one line per authentication, but no password, SASL data or digest."""
        client = self.ehlo()
        port = local_port(client)
        secrets = ["wonderland", plain("alice", "wonderland"), b64("wonderland"),
                   plain("alice", "wrong"), b64("wrong")]
        client.cmd_expecting("AUTH PLAIN " + plain("alice", "wrong"), 535)
        client.cmd_expecting("AUTH LOGIN " + b64("alice"), 334)
        client.cmd_expecting(b64("wrong"), 535)
        client.cmd_expecting("AUTH PLAIN", 334)
        client.cmd_expecting(plain("alice", "wrong"), 535)
        challenge = client.cmd_expecting("AUTH CRAM-MD5", 334)[1][0]
        answer = cram_answer(challenge, "alice", "wonderland")
        secrets += [answer, base64.b64decode(answer).decode().split()[1]]
        client.cmd_expecting(answer, 235)
        client.cmd("QUIT")
        self.server.wait_for_output(r"connection from 127.0.0.1:%d closed" % port)
        output = self.server.output()
        for secret in secrets:
            self.assertNotIn(secret, output)
        self.assertIn("127.0.0.1:%d C: AUTH PLAIN ****" % port, output)
        self.assertEqual([line.split(": authentication ", 1)[1] for line in log_lines(self.server, port)],
                         ["failed for login 'alice', mechanism PLAIN, from 127.0.0.1",
                          "failed for login 'alice', mechanism LOGIN, from 127.0.0.1",
                          "failed for login 'alice', mechanism PLAIN, from 127.0.0.1",
                          "succeeded for login alice, mechanism CRAM-MD5, from 127.0.0.1"])

    def test_postmaster_in_any_case_goes_to_the_first_user(self):
        """postmaster, bare or at any domain (all are local here), in any case, goes to the first user."""
        client = support.smtp_session(self.server)
        self.addCleanup(client.close)
        self.mail_postmaster(client, "someone@elsewhere.example",
                             ("postmaster", "PostMaster", "POSTMASTER@anything.example"), "for the postmaster")
        self.assertIn(b"Subject: for the postmaster\n", read_mailbox(self.root, "alice"))

    def test_without_local_domains_every_domain_is_local(self):
        """Without --local-domains the course's cn@kuleuven.be is a recipient like any user at any domain."""
        client = support.smtp_session(self.server, helo="kuleuven.be")
        self.addCleanup(client.close)
        client.cmd_expecting("MAIL_FROM: <cnlab@kuleuven.be>", 250)
        self.assertEqual(client.cmd("RCPT_TO: <cn@kuleuven.be>")[1], ["250 cn... Recipient ok"])
        self.assertEqual(client.cmd("RCPT_TO: <alice@anything.example>")[0], 250)


# --------------------------------------------------------------------------
# Submission: --require-auth, --local-domains, --postmaster
# --------------------------------------------------------------------------

class SubmissionTest(AuthServerCase):
    """A submission server: --require-auth, two local domains, postmaster mail for bob."""

    server_args = ("--require-auth", "--local-domains", "example.org,Lab.Example",
                   "--postmaster", "bob") + TLS_ARGS

    def logged_in(self, login="alice", password="wonderland"):
        """A raw session past EHLO and a successful AUTH PLAIN."""
        client = self.ehlo()
        client.cmd_expecting("AUTH PLAIN " + plain(login, password), 235)
        return client

    def test_mail_gets_530_until_auth(self):
        """MAIL (either spelling) gets '530 5.7.0 Authentication required' until AUTH has succeeded."""
        client = support.smtp_session(self.server, helo="kuleuven.be", ehlo=True)
        self.addCleanup(client.close)
        self.assertEqual(client.cmd("MAIL_FROM: <alice@example.org>")[1], ["530 5.7.0 Authentication required"])
        self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[0], 530)
        client.cmd_expecting("AUTH PLAIN " + plain("alice", "wonderland"), 235)
        self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[0], 250)

    def test_after_helo_530_comes_without_its_code_and_auth_needs_ehlo(self):
        """A HELO session gets '530 Authentication required' (no enhanced codes) and 503 to AUTH."""
        client = support.smtp_session(self.server, helo="kuleuven.be")
        self.addCleanup(client.close)
        self.assertEqual(client.cmd("MAIL_FROM: <alice@example.org>")[1], ["530 Authentication required"])
        self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[1], ["503 Send EHLO first"])

    def test_the_envelope_sender_must_be_the_logins(self):
        """In a --require-auth session too, another user's MAIL FROM gets 553 5.7.1."""
        client = self.logged_in("bob", "builder")
        self.assertTrue(client.cmd("MAIL FROM:<alice@example.org>")[1][0].startswith("553 5.7.1 "))
        self.assertEqual(client.cmd("MAIL FROM:<BOB@example.org>")[0], 250)

    def test_the_client_answers_530_with_auth_and_sends(self):
        """mail_client.py gets 530 to MAIL_FROM:, logs in (CRAM-MD5: no TLS) and sends on."""
        result = run_client(support.ALICE + mail(subject="through submission") + "c\n",
                            self.server.port, closed_port())
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(SENT, result.lines, result.stdout)
        self.assertIn(b"Subject: through submission\n", read_mailbox(self.root, "bob"))
        self.server.wait_for_output("authentication succeeded for login alice, mechanism CRAM-MD5")

    def test_the_client_with_a_wrong_password_prints_535_and_the_menu_comes_back(self):
        """A wrong password: the client prints the 535 5.7.8 refusal, sends nothing, shows the menu again."""
        result = run_client("alice\nwrong\n" + mail(subject="never sent") + "c\n", self.server.port,
                            closed_port())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(SENT, result.lines)
        self.assertRegex(result.stdout, r"Error: .*535 5\.7\.8 ")
        self.assertEqual(result.stdout.count("a) Mail Sending"), 2)
        self.assertNotIn(b"never sent", read_mailbox(self.root, "bob"))

    def test_local_domains_in_any_case_and_other_domains_for_a_logged_in_client(self):
        """Listed domains in any case are local; others, subdomains and literals included, are taken for the queue.

        (Refusals of clients that may not relay: test_queue.py.)
        """
        client = self.logged_in()
        client.cmd_expecting("MAIL FROM:<alice@example.org>", 250)
        for address in ("alice@example.org", "alice@EXAMPLE.ORG", "bob@lab.example"):
            self.assertEqual(client.cmd("RCPT TO:<%s>" % address)[0], 250, address)
        self.assertEqual(client.cmd("RCPT TO:<nobody@example.org>")[1], ["550 5.1.1 No such user"])
        for address in ("alice@sub.example.org", "alice@other.example", "postmaster@other.example",
                        "alice@[127.0.0.1]"):
            self.assertEqual(client.cmd("RCPT TO:<%s>" % address)[1], ["250 2.1.5 %s... Recipient ok"
                                                                      % address.partition("@")[0]], address)

    def test_postmaster_bare_or_at_a_local_domain_goes_to_the_postmaster_user(self):
        """postmaster and postmaster@<local domain> (any case) are taken and delivered to --postmaster."""
        self.mail_postmaster(self.logged_in(), "alice@example.org",
                             ("postmaster", "Postmaster@Lab.Example", "POSTMASTER@example.org"), "dear postmaster")
        self.assertEqual(read_mailbox(self.root, "bob").count(b"Subject: dear postmaster\n"), 1)
        self.assertNotIn(b"dear postmaster", read_mailbox(self.root, "alice"))

    def test_starttls_forgets_the_login(self):
        """After STARTTLS the login made before it is gone: MAIL gets 530 again."""
        client = self.logged_in()
        client.cmd_expecting("STARTTLS", 220)
        client.wrap_tls()
        client.cmd_expecting("EHLO again", 250)
        self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[0], 530)
        client.cmd_expecting("AUTH PLAIN " + plain("alice", "wonderland"), 235)
        self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[0], 250)


class RequireTLSAuthTest(AuthServerCase):
    """--require-tls: AUTH is offered and taken only inside TLS."""

    server_args = ("--require-tls",) + TLS_ARGS

    def test_auth_only_inside_tls(self):
        """Before STARTTLS, EHLO offers no AUTH and AUTH gets 538 5.7.11; inside TLS smtplib logs in."""
        client = self.ehlo()
        self.assertFalse(any("AUTH" in line for line in client.cmd("EHLO again")[1]))
        reply = client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[1]
        self.assertTrue(reply[0].startswith("538 5.7.11 "), reply)
        smtp = smtplib.SMTP("127.0.0.1", self.server.port, timeout=DEADLINE)
        self.addCleanup(smtp.close)
        smtp.starttls(context=client_tls_context())
        smtp.ehlo()
        self.assertEqual(smtp.esmtp_features["auth"].split(), ["PLAIN", "LOGIN", "CRAM-MD5"])
        self.assertEqual(smtp.login("alice", "wonderland")[0], 235)
        smtp.quit()


# --------------------------------------------------------------------------
# POP3 AUTH (RFC 5034) and APOP (RFC 1939 section 7)
# --------------------------------------------------------------------------

class POP3AuthTest(AuthServerCase):
    """AUTH PLAIN, AUTH CRAM-MD5 and APOP, with STLS offered."""

    script = support.POP_SCRIPT
    server_args = ("--verbose",) + TLS_ARGS

    def test_greeting_timestamp_and_poplib_apop(self):
        """The greeting ends in <timestamp@domain>, and poplib's apop() logs in with it."""
        pop = poplib.POP3("127.0.0.1", self.server.port, timeout=DEADLINE)
        self.addCleanup(pop.close)
        self.assertRegex(pop.getwelcome(), rb"\A\+OK POP3 server is ready <[^<>@ ]+@[^<>@ ]+>\Z")
        self.assertTrue(pop.apop("alice", "wonderland").startswith(b"+OK"))
        self.assertEqual(pop.stat()[0], len(pop.list()[1]))
        pop.quit()

    def test_capa_lists_sasl_plain_and_cram_md5(self):
        """CAPA lists 'SASL PLAIN CRAM-MD5' before login."""
        first, body = self.pop().multi("CAPA")
        self.assertIn(b"\r\nSASL PLAIN CRAM-MD5\r\n", body)

    def test_auth_plain_with_and_without_an_initial_response(self):
        """AUTH PLAIN logs in with the response on the command line or after '+ '."""
        pop = self.pop()
        self.assertTrue(pop.cmd("AUTH PLAIN " + plain("alice", "wonderland")).startswith("+OK alice's maildrop"))
        pop.cmd("QUIT")
        pop = self.pop()
        self.assertEqual(pop.cmd("AUTH PLAIN"), "+ ")
        self.assertTrue(pop.cmd(plain("bob", "builder")).startswith("+OK bob's maildrop"))
        self.assertTrue(pop.cmd("STAT").startswith("+OK "))

    def test_auth_cram_md5(self):
        """AUTH CRAM-MD5 logs in with the HMAC of its challenge; a wrong one gets -ERR [AUTH]."""
        pop = self.pop()
        challenge = pop.cmd("AUTH CRAM-MD5")
        self.assertTrue(pop.cmd(cram_answer(challenge, "bob", "wrong")).startswith("-ERR [AUTH] "))
        challenge = pop.cmd("AUTH CRAM-MD5")
        self.assertTrue(pop.cmd(cram_answer(challenge, "bob", "builder")).startswith("+OK bob's maildrop"))

    def test_a_second_login_by_any_method_gets_in_use(self):
        """While alice's maildrop is open, USER/PASS, APOP, AUTH PLAIN and CRAM-MD5 all get -ERR [IN-USE]."""
        holder = support.PopClient(self.server, "alice", "wonderland")
        self.addCleanup(self.end_pop, holder)
        pop = self.pop()
        self.assertTrue(pop.cmd("USER alice").startswith("+OK"))
        attempts = {
            "USER/PASS": lambda: pop.cmd("PASS wonderland"),
            "APOP": lambda: pop.cmd("APOP alice " + apop_digest(pop.greeting, "wonderland")),
            "AUTH PLAIN": lambda: pop.cmd("AUTH PLAIN " + plain("alice", "wonderland")),
            "CRAM-MD5": lambda: pop.cmd(cram_answer(pop.cmd("AUTH CRAM-MD5"), "alice", "wonderland")),
        }
        for method, attempt in attempts.items():
            with self.subTest(method):
                self.assertTrue(attempt().startswith("-ERR [IN-USE] "))
        holder.cmd("QUIT")
        self.assertTrue(pop.cmd("AUTH PLAIN " + plain("alice", "wonderland")).startswith("+OK"))

    def test_failures_by_any_method_are_slowed_then_the_fifth_closes(self):
        """USER/PASS, AUTH PLAIN, APOP, CRAM-MD5 and a cancel count together: 3rd on slower, 5th closes."""
        pop = self.pop()
        attempts = [lambda: (pop.cmd("USER alice"), pop.cmd("PASS wrong"))[1],
                    lambda: pop.cmd("AUTH PLAIN " + plain("alice", "wrong")),
                    lambda: pop.cmd("APOP alice " + apop_digest(pop.greeting, "wrong")),
                    lambda: pop.cmd(cram_answer(pop.cmd("AUTH CRAM-MD5"), "alice", "wrong")),
                    lambda: (pop.cmd("AUTH PLAIN"), pop.cmd("*"))[1]]
        seconds, replies = [], []
        for attempt in attempts:
            reply, took = timed(attempt)
            replies.append(reply)
            seconds.append(took)
        self.assertTrue(all(reply.startswith("-ERR") for reply in replies), replies)
        self.assertTrue(replies[-1].endswith("; closing"), replies)
        self.assertPenalty(seconds, pop.closed)

    def test_bad_input_gets_err_never_a_traceback(self):
        """AUTH without or with an unknown mechanism, bad base64, an overlong line, a bad APOP: -ERR."""
        pop = self.pop()
        for command in ("AUTH", "AUTH KERBEROS_V4", "AUTH PLAIN a b"):
            self.assertTrue(pop.cmd(command).startswith("-ERR "), command)
        self.assertTrue(pop.cmd("AUTH PLAIN %%%").startswith("-ERR [AUTH] cannot decode"))
        self.assertEqual(pop.cmd("AUTH PLAIN"), "+ ")
        self.assertTrue(pop.cmd("A" * 20000).startswith("-ERR [AUTH] authentication line too long"))
        self.assertEqual(pop.cmd("NOOP"), "-ERR log in first with USER and PASS")
        pop = self.pop()
        for number, command in enumerate(("APOP", "APOP alice xyz", "APOP alice " + "g" * 32,
                                           "APOP " + "0" * 32)):
            pop = self.pop() if number % 2 else pop     # two failures a connection: no penalty waits
            self.assertTrue(pop.cmd(command).startswith("-ERR usage: APOP name digest"), command)
        for data in (b"AUTH PLAIN\r\n", b"AUTH CRAM-MD5\r\nYWxp", b"APOP alice 0123"):
            vanishing = self.pop()
            vanishing.send(data)
            vanishing.close()
        self.assertTrue(self.pop().cmd("AUTH PLAIN " + plain("bob", "builder")).startswith("+OK"))
        self.assertNotIn("Traceback", self.server.output())

    def test_hashed_users_log_in_by_password_but_not_by_digest(self):
        """Hashed users log in with USER/PASS and AUTH PLAIN; APOP and CRAM-MD5 fail as a wrong password."""
        for (login, (_, password)), by_user in zip(sorted(HASHED.items()), (True, False)):
            with self.subTest(login=login):
                pop = self.pop()
                self.assertEqual(pop.cmd("APOP %s %s" % (login, apop_digest(pop.greeting, password))),
                                 "-ERR [AUTH] invalid user name or password")
                self.assertEqual(pop.cmd(cram_answer(pop.cmd("AUTH CRAM-MD5"), login, password)),
                                 "-ERR [AUTH] invalid user name or password")
                if by_user:
                    pop.cmd("USER " + login)
                    self.assertTrue(pop.cmd("PASS " + password).startswith("+OK"))
                else:
                    self.assertTrue(pop.cmd("AUTH PLAIN " + plain(login, password)).startswith("+OK"))
                pop.cmd("QUIT")

    def test_stls_forgets_user_and_drops_what_was_pipelined(self):
        """STLS forgets an earlier USER; an AUTH pipelined behind STLS is never run."""
        pop = self.pop()
        pop.cmd("USER alice")
        pop.send("STLS\r\nAUTH PLAIN %s\r\n" % plain("alice", "wonderland"))
        self.assertTrue(pop.line().startswith("+OK"))
        pop.client.wrap_tls()
        self.assertEqual(pop.cmd("PASS wonderland"), "-ERR send USER first")
        self.assertEqual(pop.cmd("STAT"), "-ERR log in first with USER and PASS")

    def test_quit_inside_stls_sends_close_notify(self):
        """After QUIT inside STLS the server ends TLS with a close_notify."""
        pop = self.pop()
        pop.cmd("STLS")
        pop.client.wrap_tls(strict_eof=True)
        pop.cmd("QUIT")
        self.assertEqual(read_to_eof(pop.client), b"")

    def test_the_verbose_log_never_holds_a_password_or_digest(self):
        """--verbose masks PASS, AUTH's initial response, SASL lines and the APOP digest; one line a login."""
        pop = self.pop()
        port = local_port(pop.client)
        digest = apop_digest(pop.greeting, "wonderland")
        answer = cram_answer(pop.cmd("AUTH CRAM-MD5"), "alice", "wonder")
        secrets = ["wonderland", "wonder", plain("alice", "wonderland"), b64("wonderland"), digest, answer,
                   base64.b64decode(answer).decode().split()[1]]
        self.assertTrue(pop.cmd(answer).startswith("-ERR"))
        pop.cmd("USER alice")
        self.assertTrue(pop.cmd("PASS wonder").startswith("-ERR"))
        self.assertTrue(pop.cmd("AUTH PLAIN " + plain("alice", "wonderland")).startswith("+OK"))
        pop.cmd("QUIT")
        pop = self.pop()
        self.assertTrue(pop.cmd("APOP alice " + digest).startswith("-ERR"), "another greeting's timestamp")
        pop.cmd("QUIT")
        self.server.wait_for_output(r"127.0.0.1:%d: user -, \d+ commands" % local_port(pop.client))
        output = self.server.output()
        for secret in secrets:
            self.assertNotIn(secret, output)
        for shown in ("C: PASS ****", "C: AUTH PLAIN ****", "C: APOP alice ****"):
            self.assertIn(shown, output)
        self.assertEqual([line.split(": authentication ", 1)[1] for line in log_lines(self.server, port)],
                         ["failed for login 'alice', mechanism CRAM-MD5, from 127.0.0.1",
                          "failed for login 'alice', mechanism USER/PASS, from 127.0.0.1",
                          "succeeded for login alice, mechanism PLAIN, from 127.0.0.1"])


class POP3RequireTLSTest(AuthServerCase):
    """--require-tls on POP3: what carries the password waits for STLS; digests may go before."""

    script = support.POP_SCRIPT
    server_args = ("--require-tls",) + TLS_ARGS

    def test_password_methods_wait_for_stls_digest_methods_do_not(self):
        """Before STLS USER and AUTH PLAIN are refused, APOP and CRAM-MD5 work; STLS brings PLAIN back."""
        pop = self.pop()
        self.assertIn(b"\r\nSASL CRAM-MD5\r\n", pop.multi("CAPA")[1])
        self.assertTrue(pop.cmd("USER alice").startswith("-ERR [AUTH] use STLS first"))
        self.assertTrue(pop.cmd("AUTH PLAIN " + plain("alice", "wonderland")).startswith("-ERR [AUTH] use STLS"))
        self.assertTrue(pop.cmd("APOP alice " + apop_digest(pop.greeting, "wonderland")).startswith("+OK"))
        pop.cmd("QUIT")
        pop = self.pop()
        self.assertTrue(pop.cmd(cram_answer(pop.cmd("AUTH CRAM-MD5"), "bob", "builder")).startswith("+OK"))
        pop.cmd("QUIT")
        pop = self.pop()
        pop.cmd("STLS")
        pop.client.wrap_tls()
        self.assertIn(b"\r\nSASL PLAIN CRAM-MD5\r\n", pop.multi("CAPA")[1])
        self.assertTrue(pop.cmd("AUTH PLAIN " + plain("alice", "wonderland")).startswith("+OK"))


# --------------------------------------------------------------------------
# Implicit TLS (RFC 8314) and close_notify, on both servers, with the client
# --------------------------------------------------------------------------

class ImplicitTLSTest(unittest.TestCase):
    """Both servers with --implicit-tls (and a short --timeout) in one mail root."""

    TIMEOUT = 1.0

    @classmethod
    def setUpClass(cls):
        cls.root = support.make_mail_root(USERS)
        args = ("--implicit-tls", "--timeout", str(cls.TIMEOUT)) + TLS_ARGS
        cls.smtp = cls.pop = None
        try:
            cls.smtp = support.ServerProcess(support.SMTP_SCRIPT, cls.root, *args)
            cls.pop = support.ServerProcess(support.POP_SCRIPT, cls.root, *args)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for server in (cls.smtp, cls.pop):
            if server is not None:
                server.close()
        support.remove_mail_root(cls.root)

    def client(self, server):
        """A TLS client of server past the greeting, whose reads fail on a close without close_notify."""
        client = tls_client(server)
        self.addCleanup(client.close)
        client.line()
        return client

    def test_smtplib_smtp_ssl_logs_in_and_sends_and_no_starttls_is_offered(self):
        """smtplib.SMTP_SSL logs in and sends; EHLO offers no STARTTLS, which gets 503."""
        smtp = smtplib.SMTP_SSL("127.0.0.1", self.smtp.port, context=client_tls_context(), timeout=DEADLINE)
        self.addCleanup(smtp.close)
        smtp.ehlo()
        self.assertFalse(smtp.has_extn("starttls"))
        self.assertEqual(smtp.docmd("STARTTLS")[0], 503)
        smtp.login("alice", "wonderland")
        smtp.sendmail("alice@example.org", ["bob@example.org"], "Subject: smtps\r\n\r\nsecret\r\n")
        smtp.quit()
        self.assertIn(b"Subject: smtps\n", read_mailbox(self.root, "bob"))

    def test_poplib_pop3_ssl_and_no_stls(self):
        """poplib.POP3_SSL logs in with APOP; CAPA offers no STLS, which gets -ERR."""
        pop = poplib.POP3_SSL("127.0.0.1", self.pop.port, context=client_tls_context(), timeout=DEADLINE)
        self.addCleanup(pop.close)
        self.assertNotIn("STLS", pop.capa())
        with self.assertRaises(poplib.error_proto):
            pop._shortcmd("STLS")
        pop.apop("bob", "builder")
        pop.quit()

    def test_quit_ends_tls_with_close_notify_on_both_servers(self):
        """After QUIT each server sends a close_notify: reading to EOF sees a clean end of TLS."""
        for server, goodbye in ((self.smtp, "221 "), (self.pop, "+OK Thanks")):
            with self.subTest(server=name_of(server)):
                client = self.client(server)
                client.send("QUIT\r\n")
                self.assertTrue(client.line().startswith(goodbye))
                self.assertEqual(read_to_eof(client), b"")

    def test_quit_close_notify_lets_the_client_unwrap(self):
        """After QUIT the client's SSLSocket.unwrap() succeeds: both sides said close_notify."""
        for server in (self.smtp, self.pop):
            with self.subTest(server=name_of(server)):
                client = self.client(server)
                client.send("QUIT\r\n")
                client.line()
                client.sock.unwrap().close()

    def test_421_for_too_many_errors_sends_close_notify(self):
        """The 421 after too many bad commands is followed by a close_notify."""
        client = self.client(self.smtp)
        for _ in range(mailserver_smtp.MAX_BAD_COMMANDS - 1):
            client.cmd("BOGUS")
        self.assertEqual(client.cmd("BOGUS")[0], 500)
        self.assertTrue(client.line().startswith("421 "))
        self.assertEqual(read_to_eof(client), b"")

    def test_a_garbage_handshake_ends_only_that_connection(self):
        """Junk instead of a TLS handshake closes that connection; the next client is served."""
        for server in (self.smtp, self.pop):
            with self.subTest(server=name_of(server)):
                garbage = server.connect()
                self.addCleanup(garbage.close)
                garbage.send(b"EHLO not-tls\r\n" * 20)
                wait_closed(garbage)
                other = self.client(server)
                other.send("NOOP\r\n")
                self.assertTrue(other.line().startswith(("250", "-ERR")))
        self.assertNotIn("Traceback", self.smtp.output() + self.pop.output())

    def test_stalled_handshakes_and_idle_clients_are_closed_within_the_timeout(self):
        """A silent handshake ends that connection within --timeout, while others are served; an idle
        TLS client gets its close (SMTP after 421) with a close_notify."""
        started = time.monotonic()
        stalled = [server.connect() for server in (self.smtp, self.pop)]
        idle = [self.client(server) for server in (self.smtp, self.pop)]
        for client in stalled:
            self.addCleanup(client.close)
        busy = self.client(self.smtp)                # served while the others wait
        self.assertEqual(busy.cmd("NOOP")[0], 250)
        self.assertEqual(idle[0].reply()[0], 421)
        for client in idle:
            self.assertEqual(read_to_eof(client), b"")
        for client in stalled:
            wait_closed(client)
        self.assertLess(time.monotonic() - started, self.TIMEOUT + 2)

    def test_the_client_sends_and_reads_with_implicit_tls(self):
        """mail_client.py --implicit-tls --auth sends by SMTPS (AUTH PLAIN inside TLS) and reads by POP3S."""
        result = run_client(support.ALICE + mail(to="alice@example.org", subject="both implicit",
                                                 body=("over TLS",)) + "b\nRETR 1\nQUIT\n",
                            self.smtp.port, self.pop.port, "127.0.0.1",
                            "--implicit-tls", "--auth", "--cafile", TLS_CERT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(SENT, result.lines, result.stdout)
        self.assertIn("over TLS", result.lines)
        self.smtp.wait_for_output("authentication succeeded for login alice, mechanism PLAIN")


class ShutdownCloseNotifyTest(unittest.TestCase):
    """A shutdown ends every open session with a goodbye and, inside TLS, a close_notify."""

    def test_sigterm_says_goodbye_to_idle_sessions(self):
        """On SIGTERM an idle SMTPS client gets 421 then close_notify, a POP3S client close_notify."""
        root = support.make_mail_root(PLAIN_USERS)
        self.addCleanup(support.remove_mail_root, root)
        clients = []
        for script in (support.SMTP_SCRIPT, support.POP_SCRIPT):
            server = support.ServerProcess(script, root, "--implicit-tls", *TLS_ARGS)
            self.addCleanup(server.close)
            client = tls_client(server)
            self.addCleanup(client.close)
            client.line()
            clients.append((server, client))
        for server, _ in clients:
            server.proc.terminate()
        (smtp, smtp_client), (pop, pop_client) = clients
        self.assertTrue(smtp_client.line().startswith("421 "))
        self.assertEqual(read_to_eof(smtp_client), b"")
        self.assertEqual(read_to_eof(pop_client), b"")
        for server, _ in clients:
            self.assertEqual(server.proc.wait(DEADLINE), 0)
            self.assertNotIn("Traceback", server.output())


# --------------------------------------------------------------------------
# Hashed passwords, --hash-password, and the pure parts
# --------------------------------------------------------------------------

class PasswordTest(unittest.TestCase):
    """{SCHEME} password fields, the users table, and --hash-password."""

    def table(self, lines):
        """A UserTable of a new mail root with these userinfo.txt lines (folders for alice, bob, carol)."""
        root = support.make_mail_root({}, extra_lines="".join(line + "\n" for line in lines))
        self.addCleanup(support.remove_mail_root, root)
        for login in ("alice", "bob", "carol"):
            os.mkdir(os.path.join(root, login))
        return mailserver_smtp.UserTable(root)

    def test_fields_name_scheme_cost_salt_and_hash(self):
        """PBKDF2-SHA256 with 600,000 iterations by default, or scrypt; a new salt every time."""
        field = mailserver_smtp.hash_password(b"pw")
        self.assertRegex(field, r"\A\{PBKDF2-SHA256\}i=600000\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}\Z")
        self.assertNotEqual(field, mailserver_smtp.hash_password(b"pw"))
        self.assertRegex(mailserver_smtp.hash_password(b"pw", "SCRYPT"), r"\A\{SCRYPT\}n=16384,r=8,p=5\$")
        for command_line in (USERS["carol"], USERS["dave"]):
            self.assertRegex(command_line, r"\A\{(PBKDF2-SHA256|SCRYPT)\}")

    def test_hashed_and_plain_fields_side_by_side(self):
        """A hashed field checks its password; plain fields work as before, also one starting with '{'."""
        users = self.table(["alice " + mailserver_smtp.hash_password(b"se cret", "SCRYPT"),
                            "bob {not-a-scheme}pw", "carol " + USERS["carol"]])
        self.assertEqual(users.authenticate("alice", b"se cret"), "alice")
        self.assertIsNone(users.authenticate("alice", b"se cre"))
        self.assertEqual(users.authenticate("bob", b"{not-a-scheme}pw"), "bob")
        self.assertIsNone(users.authenticate("nobody", b"se cret"))
        always = lambda password: "0" * 32   # a digest "matching" any password still cannot open a hash
        self.assertIsNone(users.authenticate_digest("alice", "0" * 32, always))
        self.assertEqual(users.authenticate_digest("bob", "0" * 32, always), "bob")

    def test_a_malformed_hash_is_reported_with_its_line_and_skipped(self):
        """A {SCHEME} field that does not parse is reported once with its line number; the user is skipped."""
        users = self.table(["# users", "alice {SCRYPT}n=16384,r=8,p=5$bad",
                            "bob {PBKDF2-SHA256}i=0$%s$%s" % (b64(b"s" * 16), b64(b"h" * 32)),
                            "carol plain"])
        with self.assertLogs("mail", logging.WARNING) as logged:
            self.assertIsNone(users.canonical("alice"))
        self.assertIsNone(users.canonical("bob"))
        self.assertEqual(users.authenticate("carol", b"plain"), "carol")
        self.assertEqual([re.search(r"line (\d+)", line).group(1) for line in logged.output], ["2", "3"])
        self.assertNotIn("bad", "".join(logged.output))

    def test_every_login_hashes_again_and_strangers_cost_the_same(self):
        """No result is cached: each check hashes anew, an unknown user against a decoy hash."""
        users = self.table(["carol " + USERS["carol"]])
        calls = []
        real = mailserver_smtp.PASSWORD_SCHEMES["PBKDF2-SHA256"]
        counting = (real[0], lambda *args: calls.append(1) or real[1](*args))
        with mock.patch.dict(mailserver_smtp.PASSWORD_SCHEMES, {"PBKDF2-SHA256": counting}):
            for _ in range(2):
                self.assertEqual(users.authenticate("carol", HASHED["carol"][1].encode()), "carol")
            self.assertIsNone(users.authenticate("stranger", b"x"))
        self.assertEqual(len(calls), 3)

    def test_hash_password_reads_a_pipe_and_prints_the_field(self):
        """--hash-password reads one line from a pipe and prints only the field; no input is an error."""
        done = hash_password_command(b"from a pipe\r\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        field = done.stdout.decode()
        self.assertRegex(field, r"\A\{PBKDF2-SHA256\}i=600000\$\S+\n\Z")
        self.assertTrue(mailserver_smtp.parse_password(field.strip().encode()).matches(b"from a pipe"))
        for bad in (b"", b"\n", b" padded \n"):
            with self.subTest(bad=bad):
                done = hash_password_command(bad)
                self.assertEqual(done.returncode, 1)
                self.assertEqual(done.stdout, b"")
                self.assertNotIn(b"Traceback", done.stderr)


class CommandLineTest(unittest.TestCase):
    """The new options are checked at start: a bad one exits with 2 and a message, no traceback."""

    def test_bad_new_options(self):
        """--implicit-tls without a certificate, an empty --local-domains entry, a --postmaster path."""
        for script, args in ((support.SMTP_SCRIPT, ["--implicit-tls"]), (support.POP_SCRIPT, ["--implicit-tls"]),
                             (support.SMTP_SCRIPT, ["--local-domains", "a.example,,b.example"]),
                             (support.SMTP_SCRIPT, ["--postmaster", "../alice"])):
            with self.subTest(args=args):
                done = subprocess.run([sys.executable, script, "0"] + args, capture_output=True, text=True,
                                      timeout=DEADLINE)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(args[0], done.stderr)
                self.assertNotIn("Traceback", done.stderr)


class SASLPartsTest(unittest.TestCase):
    """The SASL decoding both servers share, and the From:/Sender: rule."""

    def test_decode_sasl(self):
        """Base64 decodes, '=' is empty, '*' cancels, anything else is malformed."""
        self.assertEqual(mailserver_smtp.decode_sasl(" YWxpY2U= "), b"alice")
        self.assertEqual(mailserver_smtp.decode_sasl("="), b"")
        for text, why in (("*", "cancelled"), ("YWxp Y2U=", "malformed"), ("YQ", "malformed"),
                          ("\u00e9", "malformed")):
            with self.assertRaises(mailserver_smtp.SASLError) as caught:
                mailserver_smtp.decode_sasl(text)
            self.assertEqual(str(caught.exception), why)

    def test_plain_credentials(self):
        """PLAIN: [authzid] NUL authcid NUL password; an authzid of another user is refused."""
        credentials = mailserver_smtp.plain_credentials
        self.assertEqual(credentials(b"\0alice\0pw\0x"), (None, b""))
        self.assertEqual(credentials(b"\0alice\0p w"), ("alice", b"p w"))
        self.assertEqual(credentials(b"Alice\0alice\0pw"), ("alice", b"pw"))
        self.assertEqual(credentials(b"bob\0alice\0pw"), (None, b""))
        self.assertEqual(credentials(b"alice pw"), (None, b""))

    def test_foreign_sender(self):
        """Every From: and Sender: address must be the login's own: its local part the login, in any case."""
        def foreign(head, login="alice"):
            def is_own(address):
                return address.rpartition("@")[0 if "@" in address else 2].lower() == login
            return mailserver_smtp.foreign_sender(mailserver_smtp.Header(io.BytesIO(head + b"body\n")), is_own)
        self.assertIsNone(foreign(b"From: Bob <ALICE@x.example>\nSender: alice\n"))
        self.assertIsNone(foreign(b"Subject: no From at all\n"))
        self.assertEqual(foreign(b"From: alice@x, bob@y\n"), "bob@y")
        self.assertEqual(foreign(b"From: a@x\nSender: bob@y\n", "a"), "bob@y")
        self.assertEqual(foreign(b"From: alice@x,\n bob@y\n\n"), "bob@y", "RFC 5322: folded")
        self.assertIsNone(foreign(b"From: alice@x\n bob@y\n"), "course format: an indented line is body")
        self.assertEqual(foreign(b"From: undisclosed:;\n"), "")
        self.assertEqual(foreign(b'From: "alice@x"@evil.example\n'), '"alice@x"@evil.example')



class SenderOwnershipWithDomainsTest(AuthServerCase):
    """'... the login's own: its local part is the login (or the login plus a +tag) and, with --local-domains, its domain is a local domain.'"""

    server_args = ("--local-domains", "a.test,lab.a.test", "--relay-networks", "192.0.2.0/24")

    def logged_in(self):
        client = self.ehlo()
        client.cmd_expecting("AUTH PLAIN " + plain("alice", "wonderland"), 235)
        return client

    def test_the_envelope_sender_must_be_the_logins_in_a_local_domain(self):
        """MAIL FROM: another domain, another login's +tag, or a bare name: 553 5.7.1; the own +tag: 250."""
        client = self.logged_in()
        for sender in ("alice@b.test", "alice@paypal.com", "bob+alice@a.test", "alice", "alice@[127.0.0.1]",
                       "alice@sub.a.test"):
            with self.subTest(sender=sender):
                self.assertEqual(client.cmd("MAIL FROM:<%s>" % sender)[1],
                                 ["553 5.7.1 Sender <%s> is not an address of alice" % sender])
        for sender in ("alice+news@a.test", "ALICE@A.Test.", "alice@lab.a.test"):
            with self.subTest(sender=sender):
                self.assertEqual(client.cmd("MAIL FROM:<%s>" % sender)[0], 250)
                client.cmd_expecting("RSET", 250)

    def test_from_and_sender_must_be_the_logins_in_a_local_domain(self):
        """From: and Sender: in another domain, behind a display name, or another's +tag: 553 5.7.1, nothing stored."""
        client = self.logged_in()
        refused = {
            "display-name": b"From: PayPal <alice@paypal.com>\r\n",
            "domain": b"From: alice@b.test\r\n",
            "name-looks-own": b"From: \"alice@a.test\" <bob@a.test>\r\n",
            "plus-tag": b"From: bob+alice@a.test\r\n",
            "sender-domain": b"From: alice@a.test\r\nSender: Alice <alice+x@b.test>\r\n",
        }
        accepted = b"From: Alice Liddell <alice+news@A.TEST>\r\nSender: alice@lab.a.test\r\nSubject: own\r\n\r\nok\r\n"
        self.assertOnlyOwnStored(client, refused, "alice@a.test", accepted, "alice+news@a.test", "bob@a.test")


# --------------------------------------------------------------------------
# No password in clear (CONTRACT.md section 5, as amended)
# --------------------------------------------------------------------------

def proxy_v1(source, port=40000, server_port=25):
    """A PROXY protocol v1 header naming a client at source (how a test connects from any address)."""
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if family == "TCP6" else "127.0.0.1"
    return ("PROXY %s %s %s %d %d\r\n" % (family, source, destination, port, server_port)).encode("ascii")


class NoPasswordInClearSMTPTest(AuthServerCase):
    """'A server with a certificate takes no password in clear: before TLS, AUTH PLAIN/LOGIN get 538 5.7.11.'"""

    server_args = ("--proxy-from", "127.0.0.1", "--local-domains", "example.org") + TLS_ARGS

    def client(self, source):
        """A client at source (through a PROXY header), greeted and past EHLO."""
        client = self.server.connect()
        self.addCleanup(client.close)
        client.send(proxy_v1(source))
        self.assertEqual(client.reply()[0], 220)
        return client, client.cmd_expecting("EHLO client.test", 250)[1]

    def test_plain_and_login_are_refused_and_not_offered_in_clear_from_the_network(self):
        """From 192.0.2.7 and 2001:db8::7, before STARTTLS: AUTH offers CRAM-MD5 only; PLAIN and LOGIN get 538."""
        for source in ("192.0.2.7", "2001:db8::7"):
            with self.subTest(source=source):
                client, lines = self.client(source)
                self.assertIn("250-AUTH CRAM-MD5", lines)
                self.assertIn("250-STARTTLS", lines)
                self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[1],
                                 ["538 5.7.11 Encryption required for requested authentication mechanism"])
                self.assertEqual(client.cmd("AUTH LOGIN")[1][0][:10], "538 5.7.11")
                self.assertEqual(client.cmd("MAIL FROM:<alice@example.org>")[0], 250)
                self.assertEqual(client.cmd("RCPT TO:<someone@elsewhere.example>")[0], 550, "not logged in")

    def test_cram_md5_stays_in_clear(self):
        """CRAM-MD5 sends no password: it works before TLS from anywhere."""
        client, _ = self.client("192.0.2.8")
        challenge = client.cmd("AUTH CRAM-MD5")[1][0]
        self.assertEqual(client.cmd(cram_answer(challenge, "alice", "wonderland"))[0], 235)

    def test_after_starttls_plain_works(self):
        """Inside TLS every mechanism is offered and PLAIN logs in."""
        client, _ = self.client("192.0.2.9")
        client.cmd_expecting("STARTTLS", 220)
        client.wrap_tls()
        lines = client.cmd_expecting("EHLO client.test", 250)[1]
        self.assertIn("250-AUTH PLAIN LOGIN CRAM-MD5", lines)
        self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[0], 235)

    def test_a_loopback_client_is_exempt(self):
        """A client the PROXY header says is loopback (127.0.0.1, ::1) may use PLAIN in clear."""
        for source in ("127.0.0.1", "::1"):
            with self.subTest(source=source):
                client, lines = self.client(source)
                self.assertIn("250-AUTH PLAIN LOGIN CRAM-MD5", lines)
                self.assertEqual(client.cmd("AUTH PLAIN " + plain("alice", "wonderland"))[0], 235)


class NoPasswordInClearPOP3Test(AuthServerCase):
    """'USER/PASS, AUTH PLAIN (POP3) get -ERR [AUTH] and are not advertised, except from loopback.'"""

    script = support.POP_SCRIPT
    server_args = ("--proxy-from", "127.0.0.1") + TLS_ARGS

    def client(self, source):
        """A POP3 client at source (through a PROXY header), past the greeting."""
        client = self.server.connect()
        self.addCleanup(client.close)
        client.send(proxy_v1(source, server_port=110))
        greeting = client.line()
        self.assertTrue(greeting.startswith("+OK"), greeting)
        return client, greeting

    def capabilities(self, client):
        client.send("CAPA\r\n")
        self.assertTrue(client.line().startswith("+OK"))
        lines = []
        while lines[-1:] != ["."]:
            lines.append(client.line())
        return lines[:-1]

    def test_user_pass_and_plain_are_refused_and_not_offered_in_clear_from_the_network(self):
        """From 192.0.2.7 before STLS: CAPA lists neither USER nor SASL PLAIN; USER, PASS, AUTH PLAIN get -ERR [AUTH]."""
        client, _ = self.client("192.0.2.7")
        capabilities = self.capabilities(client)
        self.assertNotIn("USER", capabilities)
        self.assertIn("SASL CRAM-MD5", capabilities)
        self.assertIn("STLS", capabilities)
        for command in ("USER alice", "PASS wonderland", "AUTH PLAIN " + plain("alice", "wonderland")):
            with self.subTest(command=command.split()[0]):
                client.send(command + "\r\n")
                self.assertTrue(client.line().startswith("-ERR [AUTH] "))

    def test_apop_stays_in_clear(self):
        """APOP sends a digest, not the password: it logs in before TLS from anywhere."""
        client, greeting = self.client("192.0.2.8")
        # bob: alice's maildrop may still be held by the session of another test, closing as this one starts
        client.send("APOP bob %s\r\n" % apop_digest(greeting, "builder"))
        self.assertTrue(client.line().startswith("+OK"))

    def test_a_loopback_client_is_exempt(self):
        """A client the PROXY header says is ::1 may log in with USER/PASS in clear."""
        client, _ = self.client("::1")
        self.assertIn("USER", self.capabilities(client))
        client.send("USER alice\r\nPASS wonderland\r\n")
        self.assertEqual([client.line()[:3], client.line()[:3]], ["+OK", "+OK"])


if __name__ == "__main__":
    unittest.main()

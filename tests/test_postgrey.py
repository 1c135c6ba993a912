"""Side by side with a real postgrey (Debian's package, 1.37): the same
stream of policy requests to a postgrey started here, on a private port
with a private database directory, and to the policy service configured
by the README's postgrey block ("Moving from postgrey"), with the same
whitelist files; both must answer alike.

Time: postgrey takes a request's ``policy_test_time`` attribute (its
policy-test script's) as its clock, and the service's handler here reads
the same attribute (PolicyHandler.now(), a hook): hours of greylisting
pass in no time, with the same clock on both sides."""

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

import smtpproxy
from conftest import ROOT, free_port, wait_until

POSTGREY = "/usr/sbin/postgrey"

# postgrey's --greylist-text, defer_reply's text: the seconds left and the
# recipient's domain.
TEXT = "4.7.1 Greylisted for %s seconds, see http://x/%r.html"

CLIENTS = """\
# postgrey's format
203.0.113.200
198.51.100
mail.pool.example
/^mx[0-9]+\\.regex\\.example$/
"""

RECIPIENTS = """\
postmaster@
abuse@example.org
whitelisted.example
/^login-[0-9]+@example\\.org$/
"""

# The .local files beside them (postgrey's /etc/postgrey/*.local).
CLIENTS_LOCAL = "mx.local-pool.example\n"

RECIPIENTS_LOCAL = "sales@example.org\n"


def readme_preset():
    """The configuration block of the README's "Moving from postgrey"."""
    with open(os.path.join(ROOT, "README.md")) as readme:
        text = readme.read()
    match = re.search(r"```\n(# postgrey's timings and keys\n.*?)```", text,
                      re.S)
    assert match, "the README's postgrey block"
    return match.group(1)


class Postgrey(object):
    """A real postgrey on 127.0.0.1:``port``, its database in a directory
    of its own; as root, it serves as nobody (it drops to its --user)."""

    def __init__(self, directory, clients, recipients, text):
        self.directory = directory
        self.port = free_port()
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            os.chown(directory, user.pw_uid, user.pw_gid)
        else:
            user = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(user.pw_gid).gr_name
        self.log = open(os.path.join(directory, "postgrey.log"), "wb")
        self.process = subprocess.Popen(
            [POSTGREY, "--inet=127.0.0.1:%d" % self.port,
             "--dbdir=" + directory, "--user=" + user.pw_name,
             "--group=" + group,
             # Named, its files are these only: the .local beside each
             # is read by default only (smtpproxy reads it always).
             "--whitelist-clients=" + clients,
             "--whitelist-clients=" + clients + ".local",
             "--whitelist-recipients=" + recipients,
             "--whitelist-recipients=" + recipients + ".local",
             "--greylist-text=" + text],
            stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        wait_until(self.ready, 20, "postgrey listening")

    def ready(self):
        assert self.process.poll() is None, self.output()
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
        except OSError:
            return False
        # Listening: its database is opened once bound, before it reads.
        return True

    def output(self):
        with open(self.log.name) as log:
            return log.read()

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


class PolicyTestTime(smtpproxy.PolicyHandler):
    """The service's handler, its clock the request's policy_test_time
    (postgrey's own test attribute)."""

    def answer(self, request):
        self.test_time = float(request["policy_test_time"])
        return smtpproxy.PolicyHandler.answer(self, request)

    def now(self):
        return self.test_time


class Asker(object):
    """One persistent connection, as a Postfix smtpd process keeps."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.sock.settimeout(10)
        self.buffer = b""

    def ask(self, request):
        self.sock.sendall(b"".join(("%s=%s\n" % item).encode()
                                   for item in request.items()) + b"\n")
        while b"\n\n" not in self.buffer:
            data = self.sock.recv(4096)
            assert data, "the connection closed without an answer"
            self.buffer += data
        answer, self.buffer = self.buffer.split(b"\n\n", 1)
        assert answer.startswith(b"action="), answer
        return answer[len(b"action="):].decode()

    def close(self):
        self.sock.close()


@pytest.fixture
def both(tmp_path):
    """``(postgrey, service)``: Askers of a real postgrey and of the
    policy service with the README's block, the same whitelist files and
    the same greylisting text."""
    clients = tmp_path / "whitelist_clients"
    clients.write_text(CLIENTS)
    (tmp_path / "whitelist_clients.local").write_text(CLIENTS_LOCAL)
    recipients = tmp_path / "whitelist_recipients"
    recipients.write_text(RECIPIENTS)
    (tmp_path / "whitelist_recipients.local").write_text(RECIPIENTS_LOCAL)
    # postgrey opens its database as nobody: not under pytest's 0700
    # directories.
    directory = tempfile.mkdtemp(prefix="postgrey-")
    os.chmod(directory, 0o755)
    postgrey = None
    server = None
    try:
        postgrey = Postgrey(directory, str(clients), str(recipients), TEXT)
        preset = tmp_path / "postgrey.conf"
        preset.write_text(readme_preset())
        values, warnings = smtpproxy.read_config_file(str(preset))
        assert warnings == []
        values.update(greylist_db=str(tmp_path / "greylist.db"),
                      whitelist_clients=str(clients),
                      whitelist_recipients=str(recipients),
                      defer_reply="451 " + TEXT)
        settings = type("Settings", (smtpproxy.GreyListingPolicy,), values)
        server = smtpproxy.PolicyServer(("127.0.0.1", 0), settings,
                                        PolicyTestTime)
        threading.Thread(target=server.serve_forever,
                         kwargs={"poll_interval": 0.05}, daemon=True).start()
        askers = (Asker(postgrey.port), Asker(server.server_address[1]))
        yield askers
        for asker in askers:
            asker.close()
    finally:
        if server is not None:
            server.shutdown()
            server.close_connections()
            server.server_close()
        if postgrey is not None:
            postgrey.stop()
        shutil.rmtree(directory, ignore_errors=True)


T0 = 1700000000

# (seconds after T0, client address, client name, sender, recipient): a
# stream of requests as Postfix sends them.
ALICE = ("192.0.2.7", "unknown", "alice@example.net", "user@example.org")
STREAM = [
    # A new triplet, retries before the delay, the retry that passes
    # (PREPEND: X-Greylist), the next (DUNNO).
    (0,) + ALICE, (100,) + ALICE, (299,) + ALICE, (300,) + ALICE,
    (400,) + ALICE,
    # The same /24 passes (--lookup-by-subnet); another /24 is new.
    (401, "192.0.2.8", "unknown", "alice@example.net", "user@example.org"),
    (402, "192.0.3.8", "unknown", "alice@example.net", "user@example.org"),
    # A pool retrying from another network is new there (keyed by
    # network, not by name).
    (410, "192.0.2.20", "mta1.out.pool.example", "gil@example.net",
     "user@example.org"),
    (800, "192.0.5.20", "mta2.out.pool.example", "gil@example.net",
     "user@example.org"),
    # Whitelisted clients: an address, a partial address, a name and its
    # subdomains, a regular expression; names that only look alike.
    (500, "203.0.113.200", "unknown", "a@example.net", "u@example.org"),
    (500, "203.0.113.201", "unknown", "a@example.net", "u@example.org"),
    (501, "198.51.100.9", "unknown", "a@example.net", "u@example.org"),
    (502, "203.0.113.9", "mail.pool.example", "a@example.net",
     "u@example.org"),
    (503, "203.0.113.10", "out.mail.pool.example", "a@example.net",
     "u@example.org"),
    (504, "203.0.113.11", "evilmail.pool.example", "a@example.net",
     "u@example.org"),
    (505, "203.0.113.12", "mx12.regex.example", "a@example.net",
     "u@example.org"),
    (506, "203.0.113.13", "mx12.regex.example.net", "a@example.net",
     "u@example.org"),
    # ... and of the .local file.
    (507, "203.0.113.14", "mx.local-pool.example", "a@example.net",
     "u@example.org"),
    # Whitelisted recipients, with +extensions; lookalikes.
    (600, "192.0.2.7", "unknown", "a@example.net", "postmaster+x@example.org"),
    (600, "192.0.2.7", "unknown", "a@example.net", "Postmaster@example.com"),
    (601, "192.0.2.7", "unknown", "a@example.net", "abuse+spam@example.org"),
    (602, "192.0.2.7", "unknown", "a@example.net", "abuse@example.com"),
    (603, "192.0.2.7", "unknown", "a@example.net", "abusex@example.org"),
    (604, "192.0.2.7", "unknown", "a@example.net", "x@mx.whitelisted.example"),
    (605, "192.0.2.7", "unknown", "a@example.net", "login-42@example.org"),
    (606, "192.0.2.7", "unknown", "a@example.net", "login-x@example.org"),
    (607, "192.0.2.7", "unknown", "a@example.net", "sales+x@example.org"),
    # Senders that keep one key across their tags: BATV, reversed BATV,
    # +extension, VERP digits; the null sender.
    (1000, "192.0.2.7", "unknown", "prvs=0123456789=bob@example.net",
     "user@example.org"),
    (1400, "192.0.2.7", "unknown", "prvs=1abcdef234=bob@example.net",
     "user@example.org"),
    (1000, "192.0.2.7", "unknown", "prvs=carol=0123456789@example.net",
     "user@example.org"),
    (1400, "192.0.2.7", "unknown", "prvs=carol=9876543210@example.net",
     "user@example.org"),
    (1000, "192.0.2.7", "unknown", "dave+list1@example.net",
     "user@example.org"),
    (1400, "192.0.2.7", "unknown", "dave+list2@example.net",
     "user@example.org"),
    (1000, "192.0.2.7", "unknown", "bounce-123@lists.example",
     "user@example.org"),
    (1400, "192.0.2.7", "unknown", "bounce-456@lists.example",
     "user@example.org"),
    (1000, "192.0.2.7", "unknown", "", "user@example.org"),
    (1400, "192.0.2.7", "unknown", "", "user@example.org"),
    # The recipient's extension is part of its key.
    (1500, "192.0.2.7", "unknown", "alice@example.net",
     "user+x@example.org"),
    # A retry two days later (--retry-window's) passes; past it the
    # clock starts again.
    (2000, "192.0.2.7", "unknown", "frank@example.net", "user@example.org"),
    (2000 + 172800, "192.0.2.7", "unknown", "frank@example.net",
     "user@example.org"),
    (2000, "192.0.2.7", "unknown", "erin@example.net", "user@example.org"),
    (2000 + 172801, "192.0.2.7", "unknown", "erin@example.net",
     "user@example.org"),
    (2000 + 172801 + 299, "192.0.2.7", "unknown", "erin@example.net",
     "user@example.org"),
    (2000 + 172801 + 300, "192.0.2.7", "unknown", "erin@example.net",
     "user@example.org"),
]

# The auto-whitelist: one address passing greylisting with five triplets,
# an hour apart, is trusted for its next new triplet.
AWL = []
for number, user in enumerate(["ann", "ben", "cat", "dan", "eve"]):
    start = 200000 + 4000 * number
    for delay in (0, 300):
        AWL.append((start + delay, "198.18.0.5", "unknown",
                    user + "@example.net", "user@example.org"))
AWL.append((230000, "198.18.0.5", "unknown", "new@example.net",
            "user@example.org"))


def kind(action):
    """The class of an answer (their X-Greylist texts differ)."""
    word = action.split()[0]
    return action if word == "DEFER_IF_PERMIT" else word


def test_postgrey_and_the_policy_service_answer_a_stream_alike(both):
    postgrey, service = both
    answers = []
    for number, (at, client, name, sender, recipient) in enumerate(
            STREAM + AWL):
        request = {"request": "smtpd_access_policy",
                   "protocol_state": "RCPT", "protocol_name": "ESMTP",
                   "client_address": client, "client_name": name,
                   "reverse_client_name": name,
                   "helo_name": "client.example.net", "sender": sender,
                   "recipient": recipient, "instance": "i%d" % number,
                   "policy_test_time": str(T0 + at)}
        theirs, ours = postgrey.ask(request), service.ask(request)
        answers.append((at, client, name, sender, recipient, kind(theirs),
                        kind(ours)))
    differ = [answer for answer in answers if answer[-2] != answer[-1]]
    assert differ == []
    # The stream means what it says: each class is met, with the text.
    kinds = [answer[-1] for answer in answers]
    assert kinds[:5] == ["DEFER_IF_PERMIT 4.7.1 Greylisted for %d seconds, "
                         "see http://x/example.org.html" % left
                         for left in (300, 200, 1)] + ["PREPEND", "DUNNO"]
    assert kinds[-1] == "DUNNO"                 # auto-whitelisted
    assert [answer[-1] for answer in answers
            if answer[2] == "mx.local-pool.example"
            or answer[4] == "sales+x@example.org"] == ["DUNNO", "DUNNO"]
    assert kinds.count("DUNNO") > 10 and kinds.count("PREPEND") > 8

"""The policy service: Postfix's SMTPD access policy delegation
(check_policy_service), answered by the proxy's greylisting engine and
store.  The protocol with raw sockets (persistent connections, every kind
of bad input, who may ask, a UNIX socket, limits); then a real Postfix
asking a real service process, alone or beside the SMTP proxy on one
store; and postgrey's files, loaded as they are."""

import logging
import os
import re
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import smtpproxy
from conftest import ROOT, ProxyProcess, RawClient, free_port, \
    wait_until

RCPT = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
        "protocol_name": "ESMTP", "client_address": "192.0.2.7",
        "client_name": "unknown", "reverse_client_name": "unknown",
        "helo_name": "client.example.net", "sender": "alice@example.net",
        "recipient": "user@example.org", "instance": "1a2b.5f3c.1",
        "queue_id": "", "size": "0"}
DEFER = "DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later"


def settings_class(tmp_path, **keys):
    keys.setdefault("allowed_domains", ["example.org"])
    keys.setdefault("allowed_senders", [])
    keys.setdefault("greylist_db", str(tmp_path / "policy.db"))
    keys.setdefault("client_key", "network")
    keys.setdefault("too_soon", 0)
    keys.setdefault("min_defer_time", 1)
    return type("Settings", (smtpproxy.GreyListingPolicy,), keys)


@pytest.fixture
def policy(tmp_path):
    """``policy(**keys)``: a PolicyServer on 127.0.0.1 (a free port)
    serving in a thread, greylisting example.org with ``keys``."""
    servers = []

    def start(server_class=smtpproxy.PolicyServer, address=None,
              handler_class=smtpproxy.PolicyHandler, server_keys=None,
              **keys):
        server = server_class(address or ("127.0.0.1", 0),
                              settings_class(tmp_path, **keys),
                              handler_class)
        for name, value in (server_keys or {}).items():
            setattr(server, name, value)
        threading.Thread(target=server.serve_forever,
                         kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.shutdown()
        server.close_connections()
        server.server_close()


class Clock(smtpproxy.PolicyHandler):
    """A handler whose clock the test moves on: greylisting's delay
    without a sleep."""
    offset = 0

    def now(self):
        return time.time() + Clock.offset


@pytest.fixture
def clock():
    Clock.offset = 0
    yield Clock
    Clock.offset = 0


class PolicyClient(object):
    """A raw connection to a policy service, as Postfix's."""

    def __init__(self, server, source=None):
        if isinstance(server.server_address, str):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(server.server_address)
        else:
            self.sock = socket.create_connection(
                server.server_address[:2], timeout=10,
                source_address=(source, 0) if source else None)
        self.sock.settimeout(10)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def ask(self, **changes):
        """Send RCPT (changed by ``changes``; None removes an attribute);
        return the action."""
        request = dict(RCPT)
        request.update(changes)
        self.send(b"".join(("%s=%s\n" % (name, value)).encode()
                           for name, value in request.items()
                           if value is not None) + b"\n")
        return self.answer()

    def answer(self):
        """The action of the next answer; None if the connection closed
        without one."""
        while b"\n\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buffer += data
        answer, self.buffer = self.buffer.split(b"\n\n", 1)
        assert answer.startswith(b"action="), answer
        assert b"\n" not in answer
        return answer[len(b"action="):].decode()

    def is_closed(self):
        """True if the service closed the connection: a request gets no
        answer (not merely policy_first_idle's end)."""
        try:
            return self.ask(protocol_state="DATA") is None
        except (BrokenPipeError, ConnectionResetError):
            return True

    def close(self):
        self.sock.close()


# -- the protocol ------------------------------------------------------------

def test_one_connection_many_requests(policy, clock):
    server = policy(handler_class=clock)
    client = PolicyClient(server)
    # Only RCPT is greylisted; a new triplet waits, the others too.
    for state in ("CONNECT", "EHLO", "HELO", "MAIL", "VRFY", "ETRN",
                  "DATA", "END-OF-MESSAGE"):
        assert client.ask(protocol_state=state) == "DUNNO"
    assert client.ask() == DEFER
    for number in range(20):
        assert client.ask(sender="s%s@example.net" % chr(97 + number)) \
            == DEFER
    clock.offset = 2                    # past min_defer_time: it passes
    assert client.ask() == "DUNNO"
    assert client.ask() == "DUNNO"
    client.close()
    assert server.counters["policy_dunno"] == 10
    assert server.counters["policy_defer_if_permit"] == 21


def test_unknown_attributes_are_ignored_and_order_is_free(policy):
    client = PolicyClient(policy())
    request = b"".join(b"%s=%s\n" % item for item in reversed([
        (b"request", b"smtpd_access_policy"), (b"protocol_state", b"RCPT"),
        (b"client_address", b"192.0.2.7"), (b"sender", b"a@example.net"),
        (b"recipient", b"b@example.org"), (b"ccert_subject", b""),
        (b"policy_context", b"x=y=z"), (b"a_future_attribute", b"1")]))
    client.send(request + b"\n")
    assert client.answer() == DEFER
    client.close()


def test_the_defer_text_is_defer_reply_without_its_code(policy):
    client = PolicyClient(policy(defer_reply="450 4.2.0 Try later, sorry"))
    assert client.ask() == "DEFER_IF_PERMIT 4.2.0 Try later, sorry"
    client.close()


def test_the_defer_text_says_the_seconds_left_and_the_recipients_domain(
        policy, clock):
    client = PolicyClient(policy(
        handler_class=clock, min_defer_time=300,
        defer_reply="451 4.7.1 Greylisted for %s seconds (see http://x/%r)"))
    assert client.ask() == ("DEFER_IF_PERMIT 4.7.1 Greylisted for 300 "
                            "seconds (see http://x/example.org)")
    clock.offset = 120
    answer = client.ask()
    # The service's clock is the wall clock's, plus the offset: a second
    # may have passed since the first try.
    assert answer in ["DEFER_IF_PERMIT 4.7.1 Greylisted for %d seconds "
                      "(see http://x/example.org)" % left
                      for left in (180, 179)], answer
    clock.offset = 300
    assert client.ask() == "DUNNO"
    client.close()


def test_x_greylist_is_prepended_once_per_message(policy, clock):
    client = PolicyClient(policy(handler_class=clock, x_greylist_header=True))
    assert client.ask() == DEFER
    assert client.ask(recipient="other@example.org") == DEFER
    clock.offset = 1.1                  # past min_defer_time (1)
    action = client.ask()
    assert action.startswith("PREPEND X-Greylist: delayed 1 seconds by "
                             "smtpproxy-"), action
    assert "(network:192.0.2.0/24)" in action
    # The second recipient of the same message passed after waiting too:
    # no second header.
    assert client.ask(recipient="other@example.org") == "DUNNO"
    # A passed triplet gets no header at all.
    assert client.ask(instance="next") == "DUNNO"
    client.close()


@pytest.mark.parametrize("changes", [
    {"client_address": "198.51.100.7"},          # allowed_sender_nets
    {"recipient": "user@elsewhere.example"},     # relay control: Postfix's
    {"client_address": "192.0.2.99"},            # whitelist_clients
    {"recipient": "postmaster@example.org"},     # whitelist_recipients
])
def test_what_greylisting_lets_through_is_dunno_at_once(policy, tmp_path,
                                                        changes):
    (tmp_path / "clients").write_text("192.0.2.99\n")
    (tmp_path / "recipients").write_text("postmaster@\n")
    client = PolicyClient(policy(
        allowed_sender_nets=["198.51.100.0/24"],
        whitelist_clients=str(tmp_path / "clients"),
        whitelist_recipients=str(tmp_path / "recipients")))
    assert client.ask(**changes) == "DUNNO"
    assert client.ask() == DEFER                # and the rest is greylisted
    client.close()


@pytest.mark.parametrize("recipient", [
    "user@example.org", "user@elsewhere.example", "postmaster",
    '"odd local"@elsewhere.example'])
def test_without_allowed_domains_every_recipient_is_greylisted(
        policy, clock, recipient):
    # What a postgrey user writes: Postfix did its relay control before
    # it asked, so the service greylists whatever it is asked about.
    client = PolicyClient(policy(handler_class=clock, allowed_domains=[]))
    assert client.ask(recipient=recipient) == DEFER
    clock.offset = 2                        # past min_defer_time (1)
    assert client.ask(recipient=recipient) == "DUNNO"
    client.close()


@pytest.mark.parametrize("recipient, action", [
    ("user@example.org", DEFER),
    ("user@EXAMPLE.ORG.", DEFER),
    # Whatever the local-part: Postfix judged it, and let it through.
    ('"odd local"@example.org', DEFER),
    ("user%other@example.org", DEFER),
    ("user@elsewhere.example", "DUNNO"),
    ("user@sub.example.org", "DUNNO"),
])
def test_allowed_domains_restricts_greylisting_to_its_domains(
        policy, recipient, action):
    client = PolicyClient(policy(allowed_domains=["example.org"]))
    assert client.ask(recipient=recipient) == action
    client.close()


def test_greylisted_recipient_is_the_hook_the_engine_asks(policy):
    engines = []

    class OnlySales(smtpproxy.PolicyHandler):
        def greylisted_recipient(self, recipient):
            return recipient.startswith("sales@")

        def greylister(self):
            engine = smtpproxy.PolicyHandler.greylister(self)
            engines.append(engine)
            return engine
    client = PolicyClient(policy(handler_class=OnlySales))
    assert client.ask(recipient="sales@example.org") == DEFER
    assert client.ask(recipient="user@example.org") == "DUNNO"
    client.close()
    # Given to the engine, not put on it in place of its method.
    assert "is_local_recipient" not in vars(engines[0])


def test_the_log_says_the_action_answered(policy, caplog):
    caplog.set_level("INFO", logger="smtpproxy")
    client = PolicyClient(policy(allowed_senders=["198.51.100.7"]))
    assert client.ask(recipient="user@elsewhere.example") == "DUNNO"
    assert client.ask(client_address="198.51.100.7") == "DUNNO"
    assert client.ask() == DEFER
    client.close()
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("policy ")]
    assert [line.split(";")[0] for line in lines] == [
        "policy dunno: outside allowed_domains (-)",
        "policy dunno: allowed_senders (-)",
        "policy defer_if_permit: network:192.0.2.0/24 (192.0.2.0/24 "
        "alice@example.net user@example.org)"]


class Lines(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def greylist_log():
    """The lines written to greylist_log (the transaction log)."""
    handler = Lines()
    logger = smtpproxy.transaction_log
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_each_decision_is_a_line_of_greylist_log_as_postgrey_writes_it(
        policy, clock, greylist_log):
    client = PolicyClient(policy(handler_class=clock,
                                 allowed_senders=["198.51.100.7"]))
    assert client.ask(queue_id="4XyZ") == DEFER
    assert client.ask(queue_id="") == DEFER
    clock.offset = 7                    # past min_defer_time (1)
    assert client.ask(queue_id="") == "DUNNO"
    assert client.ask(queue_id="") == "DUNNO"
    assert client.ask(client_address="198.51.100.7", queue_id="") == "DUNNO"
    assert client.ask(client_name="mx\u00e9.example.net", queue_id="",
                      sender="") == DEFER
    assert client.ask(protocol_state="DATA") == "DUNNO"   # no line
    client.close()
    triplet = ("client_name=unknown, client_address=192.0.2.7, "
               "sender=alice@example.net, recipient=user@example.org")
    assert [line.split(" ", 1)[1] for line in greylist_log] == [
        "4XyZ: action=greylist, reason=new, " + triplet,
        "action=greylist, reason=early-retry, " + triplet,
        "action=pass, reason=triplet found, delay=7, " + triplet,
        "action=pass, reason=triplet found, " + triplet,
        "action=pass, reason=allowed_senders, client_name=unknown, "
        "client_address=198.51.100.7, sender=alice@example.net, "
        "recipient=user@example.org",
        # Escaped; an empty sender left out, as postgrey does.
        "action=greylist, reason=new, client_name=mx\\xe9.example.net, "
        "client_address=192.0.2.7, recipient=user@example.org"]
    assert all(re.match(r"[0-9]{14}\.[0-9]{3} ", line)
               for line in greylist_log)


def test_postfix_client_name_is_the_clients_name(policy, clock):
    # Keyed by name: client_name (Postfix's forward-confirmed name) groups
    # the pool; "unknown" is no name.
    client = PolicyClient(policy(handler_class=clock, client_key="name"))
    assert client.ask(client_name="mx-a1.out.example.com") == DEFER
    clock.offset = 2                    # past min_defer_time (1)
    assert client.ask(client_address="198.51.100.9",
                      client_name="mx-b7.out.example.com") == "DUNNO"
    assert client.ask(client_address="198.51.100.9",
                      client_name="unknown") == DEFER
    client.close()


def test_an_unknown_client_address_is_greylisted_on_that_connection(
        policy, caplog):
    # "unknown" is Postfix's own word for a client whose address it does
    # not know: greylisted under that key, as the proxy does, never
    # trusted, and the connection goes on.
    caplog.set_level("INFO", logger="smtpproxy")
    server = policy()
    client = PolicyClient(server)
    assert client.ask(client_address="unknown") == DEFER
    assert client.ask(client_address="unknown") == DEFER   # not trusted
    assert client.ask() == DEFER
    client.close()
    assert "policy_bad_requests" not in server.counters
    assert "policy defer_if_permit: unknown-client (unknown " \
        "alice@example.net user@example.org); client unknown" in caplog.text


@pytest.mark.parametrize("address", ["Unknown", "unknown.example",
                                     "192.0.2.300", ""])
def test_a_client_address_that_is_neither_closes_the_connection(
        policy, caplog, address):
    client = PolicyClient(policy())
    assert client.ask(client_address=address) is None
    client.close()
    assert "client_address %s is not an address; connection closed" \
        % address in caplog.text


def test_a_store_that_fails_falls_back_to_the_fail_mode(policy, tmp_path,
                                                         caplog):
    client = PolicyClient(policy(
        greylist_db=str(tmp_path / "missing" / "dir" / "g.db"),
        greylist_fail_mode="defer"))
    assert client.ask() == DEFER
    assert client.ask(sender="b@example.net") == DEFER
    client.close()
    assert len([r for r in caplog.records
                if "decisions fall back to defer" in r.getMessage()]) == 1


def test_out_of_descriptors_closes_the_connection_unanswered(policy,
                                                              caplog):
    # Postfix retries, then applies its default_action: never DUNNO for
    # a shortage of the service's own.
    class Short(smtpproxy.Greylister):
        def decide(self, *args, **keywords):
            error = smtpproxy.ResourceShortage("greylisting store x: out "
                                               "of descriptors")
            return smtpproxy.Decision("unavailable", "store", "k",
                                      error=error)
    client = PolicyClient(policy(greylister_class=Short))
    assert client.ask(protocol_state="DATA") == "DUNNO"
    assert client.ask() is None
    client.close()
    assert "out of descriptors; policy connections are closed " \
        "unanswered" in caplog.text


BAD = [
    (b"request=smtpd_access_policy\nno equals sign\n\n",
     "a line without '=': no equals sign"),
    (b"request=smtpd_access_policy\nsender=a\x00b\n\n",
     "a control octet in sender=a\\x00b"),
    (b"request=smtpd_access_policy\r\nprotocol_state=RCPT\r\n\r\n",
     "a control octet in request=smtpd_access_policy\\x0d"),
    (b"request=smtpd_access_policy\nsender=\x1b[2J\n\n",
     "a control octet in sender=\\x1b[2J"),
    (b"request=smtpd_access_policy\nsender=" + b"a" * 5000 + b"\n\n",
     "a line over 4096 octets"),
    (b"request=smtpd_access_policy\n" + b"x=1\n" * 100 + b"\n",
     "over 100 attributes in a request"),
    (b"protocol_state=RCPT\nrequest=junk\n\n",
     "no request=smtpd_access_policy (request=junk)"),
    (b"protocol_state=RCPT\n\n", "no request=smtpd_access_policy"),
    (b"request=smtpd_access_policy\nprotocol_state=RCPT\n",
     "end of input inside a request"),
    (b"request=smtpd_access_policy\nprotocol_state=RC",
     "end of input inside a request"),
]


@pytest.mark.parametrize("data, logged", BAD)
def test_bad_input_is_logged_once_and_closes_that_connection_only(
        policy, caplog, data, logged):
    server = policy()
    other = PolicyClient(server)
    assert other.ask(protocol_state="DATA") == "DUNNO"
    client = PolicyClient(server)
    client.send(data)
    if data.endswith(b"\n\n") is False:
        client.sock.shutdown(socket.SHUT_WR)        # end of input
    assert client.answer() is None                  # closed, unanswered
    client.close()
    warnings = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("policy client")]
    assert len(warnings) == 1, warnings
    assert logged in warnings[0]
    assert warnings[0].endswith("; connection closed")
    assert "\x00" not in warnings[0] and "\x1b" not in warnings[0]
    assert other.ask(protocol_state="DATA") == "DUNNO"   # others go on
    other.close()
    assert server.counters["policy_bad_requests"] == 1


@pytest.fixture
def log_file(tmp_path):
    """The path of a file that gets the service's log, as log_file would,
    tracebacks included."""
    path = tmp_path / "service.log"
    handler = logging.FileHandler(str(path), encoding="utf-8")
    logger = logging.getLogger("smtpproxy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield path
    logger.removeHandler(handler)
    logger.setLevel(level)
    handler.close()


def raw_request(**changes):
    """RCPT as Postfix would write it, ``changes`` given as octets."""
    request = dict((name, value.encode()) for name, value in RCPT.items())
    request.update(changes)
    return b"".join(name.encode() + b"=" + value + b"\n"
                    for name, value in request.items()) + b"\n"


@pytest.mark.parametrize("changes, logged", [
    ({"sender": b"\xff\xfe@example.net"}, "sender <\\\\xff\\\\xfe@"),
    ({"recipient": b"user\xc3@example.org"}, "recipient <user\\\\xc3@"),
    # U+009B, the C1 control sequence introducer, as valid UTF-8.
    ({"recipient": "user\u009b[2J@example.org".encode()},
     "recipient <user\\x9b[2J@"),
    ({"sender": "\u009b".encode(), "recipient": b"\x9b@example.org"},
     "sender <\\x9b>"),
])
def test_octets_that_are_not_utf8_or_c1_controls_are_data_logged_escaped(
        policy, clock, log_file, changes, logged):
    client = PolicyClient(policy(handler_class=clock))
    client.send(raw_request(**changes))
    assert client.answer() == DEFER         # a clean answer: greylisted
    clock.offset = 2
    client.send(raw_request(**changes))
    assert client.answer() == "DUNNO"       # the same octets pass later
    client.close()
    data = log_file.read_bytes()
    # Printable ASCII lines: no C0 or C1 control, no raw 8-bit octet.
    assert all(0x20 <= octet <= 0x7e or octet == 0x0a for octet in data), \
        data
    assert b"Traceback" not in data
    # The service's lines (greylist_log's, escaped too, come with them).
    lines = [line for line in data.decode().splitlines()
             if line.startswith("policy ")]
    assert [line.split(":")[0] for line in lines] == [
        "policy defer_if_permit", "policy dunno"], lines
    assert logged in lines[0], lines[0]


def test_a_trickled_request_is_cut_at_its_deadline(policy, caplog):
    class Quick(smtpproxy.PolicyHandler):
        request_timeout = 0.5
    client = PolicyClient(policy(handler_class=Quick))
    began = time.monotonic()
    client.send(b"request=smtpd_access_policy\n")
    cut = False
    try:
        # A byte every 0.1 s: never idle, never complete; until the
        # service closes the connection (or the client's 10 s are over).
        while time.monotonic() - began < 10:
            client.send(b"x")
            time.sleep(0.1)
    except OSError:
        cut = True                              # closed by the service
    assert cut, "the service let a trickled request run on"
    assert client.answer() is None
    client.close()
    assert "request not complete within 0.5 s; connection closed" in \
        caplog.text


def test_an_idle_connection_is_closed_after_policy_max_idle(policy):
    client = PolicyClient(policy(server_keys={"policy_max_idle": 0.5}))
    assert client.ask(protocol_state="DATA") == "DUNNO"
    began = time.monotonic()
    assert client.answer() is None          # closed (the client waits 10 s)
    assert time.monotonic() - began > 0.4
    client.close()


def test_only_policy_clients_may_ask(policy, caplog):
    server = policy(server_keys={"policy_clients": ["127.0.0.2"]})
    refused = PolicyClient(server)
    assert refused.is_closed()
    refused.close()
    for _ in range(3):
        PolicyClient(server).close()
    allowed = PolicyClient(server, source="127.0.0.2")
    assert allowed.ask() == DEFER
    allowed.close()
    lines = [r.getMessage() for r in caplog.records
             if "connection refused" in r.getMessage()]
    assert lines == ["policy service: connection refused: 127.0.0.1 is "
                     "not in policy_clients (logged at most once a "
                     "minute)"]
    assert server.counters["policy_connections_refused"] == 4


def test_refused_addresses_cost_no_memory_and_one_line_a_minute(policy,
                                                                caplog):
    # A TCP policy port that scanners reach: every address refused, none
    # remembered, one line a minute whatever their number.
    server = policy()
    addresses = ["10.%d.%d.%d" % (n >> 16, (n >> 8) & 255, n & 255)
                 for n in range(5000)]
    for address in addresses:
        assert not server.verify_request(None, (address, 25))
    assert server.counters["policy_connections_refused"] == 5000
    assert not any(address in repr(vars(server)) for address in addresses)
    assert len(smtpproxy._log_times) == 1       # log_every's: the reason
    lines = [r.getMessage() for r in caplog.records
             if "connection refused" in r.getMessage()]
    assert lines == ["policy service: connection refused: 10.0.0.0 is not "
                     "in policy_clients (logged at most once a minute)"]
    # The other reasons have their own minute.
    server.policy_max_connections = 0
    assert not server.verify_request(None, ("127.0.0.1", 25))
    assert "policy_max_connections (0) connections open" in caplog.text


def test_policy_clients_default_to_the_loopback_addresses():
    assert smtpproxy.PolicyServer.policy_clients == ["127.0.0.1", "::1"]
    assert smtpproxy.PolicyServer.policy_max_idle == 300


def test_policy_max_connections(policy):
    server = policy(server_keys={"policy_max_connections": 2})
    first, second = PolicyClient(server), PolicyClient(server)
    assert first.ask(protocol_state="DATA") == "DUNNO"
    assert second.ask(protocol_state="DATA") == "DUNNO"
    third = PolicyClient(server)
    assert third.is_closed()
    first.close()
    wait_until(lambda: len(server.connections) < 2, what="a free slot")
    fourth = PolicyClient(server)
    assert fourth.ask(protocol_state="DATA") == "DUNNO"
    for client in (second, third, fourth):
        client.close()


def test_a_new_connection_must_ask_within_policy_first_idle(policy):
    server = policy(server_keys={"policy_first_idle": 0.3})
    silent = PolicyClient(server)
    # Closed by the service (the client's own timeout is 10 s).
    assert silent.answer() is None
    silent.close()
    # Postfix asks as it connects; between its requests, the longer
    # policy_max_idle applies.
    asking = PolicyClient(server)
    assert asking.ask(protocol_state="DATA") == "DUNNO"
    time.sleep(0.6)                         # twice policy_first_idle
    assert asking.ask(protocol_state="DATA") == "DUNNO"
    asking.close()


def test_policy_first_idle_and_the_shares_by_default():
    assert smtpproxy.PolicyServer.policy_first_idle == 5
    # One peer (one Postfix) may have five times Postfix's
    # default_process_limit of smtpd processes, each with its
    # connection; another as many again.
    assert smtpproxy.PolicyServer.policy_max_connections_per_peer == 500
    assert smtpproxy.PolicyServer.policy_max_connections == 1000
    assert smtpproxy.PolicyServer.policy_backlog == 1024


def test_five_hundred_connections_of_one_postfix_are_all_answered(policy):
    # A busy Postfix, its smtpd processes each keeping a connection, all
    # from one address: every one is answered, none closed.
    server = policy()
    clients = []
    try:
        for _ in range(500):
            client = PolicyClient(server)
            clients.append(client)
            assert client.ask(protocol_state="DATA") == "DUNNO"
        assert len(server.connections) == 500
        assert server.counters.get("policy_connections_refused", 0) == 0
    finally:
        for client in clients:
            client.close()


def listen_backlog(sock):
    """The backlog a listening TCP socket was given, as Linux tells it:
    tcp_info's tcpi_sacked is sk_max_ack_backlog for a listener."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 28)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="tcp_info of a listener: Linux")
def test_the_listen_backlog_is_policy_backlog(tmp_path):
    # Not socketserver's 5: Postfix's smtpd processes connecting at the
    # same instant would wait for SYN retransmissions (1 s, 3 s ...).
    with open("/proc/sys/net/core/somaxconn") as stream:
        somaxconn = int(stream.read())
    server = smtpproxy.PolicyServer(("127.0.0.1", 0),
                                    settings_class(tmp_path))
    try:
        assert listen_backlog(server.socket) == min(1024, somaxconn)
    finally:
        server.server_close()
    port = free_port()
    values = {"policy_listen": "127.0.0.1:%d" % port, "policy_backlog": 77}
    server = smtpproxy.open_policy_server(values, settings_class(tmp_path))
    try:
        assert listen_backlog(server.socket) == 77
        assert server.policy_backlog == 77
    finally:
        server.server_close()


def test_a_unix_policy_server_takes_policy_backlog(tmp_path):
    server = smtpproxy.UnixPolicyServer(str(tmp_path / "policy"),
                                        settings_class(tmp_path),
                                        backlog=33)
    try:
        assert server.request_queue_size == 33
    finally:
        server.server_close()


def test_a_tcp_peer_beyond_its_share_is_closed_others_are_served(
        policy, caplog):
    server = policy(server_keys={
        "policy_clients": ["127.0.0.1", "127.0.0.2"],
        "policy_max_connections_per_peer": 2})
    held = [PolicyClient(server), PolicyClient(server)]
    for client in held:
        assert client.ask(protocol_state="DATA") == "DUNNO"
    beyond = PolicyClient(server)
    assert beyond.is_closed()
    beyond.close()
    other = PolicyClient(server, source="127.0.0.2")
    assert other.ask() == DEFER
    other.close()
    assert "policy service: connection refused: 127.0.0.1 has " \
        "policy_max_connections_per_peer (2) connections open" in caplog.text
    held[0].close()
    wait_until(lambda: len(server.connections) < 2, what="a free slot")
    again = PolicyClient(server)
    assert again.ask(protocol_state="DATA") == "DUNNO"
    for client in held[1:] + [again]:
        client.close()


ASK_AS_NOBODY = """\
import os, socket, sys
os.setgid(65534)
os.setuid(65534)
client = socket.socket(socket.AF_UNIX)
client.settimeout(10)
client.connect(sys.argv[1].encode("latin-1").replace(b"@", b"\\0"))
client.sendall(b"request=smtpd_access_policy\\nprotocol_state=DATA\\n\\n")
answer = b""
while not answer.endswith(b"\\n\\n"):
    data = client.recv(4096)
    if not data:
        break
    answer += data
sys.stdout.write(answer.decode())
"""


def test_a_unix_peer_is_its_user_id(policy):
    assert os.geteuid() == 0, "the tests run as root, as CI does"
    # An abstract socket: no file whose mode keeps nobody out.
    name = "\0smtpproxy-test-%d" % os.getpid()
    server = policy(server_class=smtpproxy.UnixPolicyServer, address=name,
                    server_keys={"policy_max_connections_per_peer": 1})

    def connect():
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(name)
        return sock
    held = connect()                        # root's one connection
    held.sendall(b"request=smtpd_access_policy\nprotocol_state=DATA\n\n")
    assert held.recv(4096) == b"action=DUNNO\n\n"
    beyond = connect()                      # root's second: closed
    try:
        beyond.sendall(b"request=smtpd_access_policy\n"
                       b"protocol_state=DATA\n\n")
        assert beyond.recv(4096) == b""
    except (BrokenPipeError, ConnectionResetError):
        pass
    beyond.close()
    result = subprocess.run(
        [sys.executable, "-c", ASK_AS_NOBODY, name.replace("\0", "@")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "action=DUNNO\n\n"     # another user's
    held.close()


def test_a_unix_socket(policy, tmp_path):
    path = str(tmp_path / "policy.sock")
    server = policy(server_class=smtpproxy.UnixPolicyServer, address=path)
    client = PolicyClient(server)
    assert client.ask() == DEFER
    assert client.ask(protocol_state="DATA") == "DUNNO"
    client.close()


# -- postgrey's files ----------------------------------------------------------

POSTGREY_CLIENTS = """\
# postgrey whitelist for mail server clients
# --------------------------------------------
# put this file in /etc/postfix or specify its path
# with --whitelist-clients=xxx
#
# postgrey version: 1.37

# a comment, blank lines

# greylisting.org: southwest airlines (unique sender, no retry)
southwest.com
# a pool matched by a regular expression
/^mail[0-9]+\\.pool\\.example\\.com$/
# addresses, a partial address and networks
192.0.2.99
198.51.100
203.0.113.0/28
2001:db8:1::/48
"""

POSTGREY_RECIPIENTS = """\
# postgrey whitelist for mail recipients
# --------------------------------------
postmaster@
abuse@
/^otp-[0-9]+@example\\.org$/
lists.example.org
"""


@pytest.mark.parametrize("changes, action", [
    ({"client_name": "mx.southwest.com"}, "DUNNO"),
    ({"client_name": "mail17.pool.example.com"}, "DUNNO"),
    ({"client_name": "mail17.other.example.com"}, DEFER),
    ({"client_address": "192.0.2.99"}, "DUNNO"),
    ({"client_address": "198.51.100.200"}, "DUNNO"),
    ({"client_address": "203.0.113.15"}, "DUNNO"),
    ({"client_address": "203.0.113.16"}, DEFER),
    ({"client_address": "2001:db8:1::25"}, "DUNNO"),
    ({"recipient": "postmaster@example.org"}, "DUNNO"),
    ({"recipient": "abuse@example.org"}, "DUNNO"),
    ({"recipient": "otp-123@example.org"}, "DUNNO"),
    ({"recipient": "someone@lists.example.org"}, "DUNNO"),
    ({"recipient": "otp-x@example.org"}, DEFER),
])
def test_postgreys_files_load_unchanged(policy, tmp_path, changes, action):
    (tmp_path / "postgrey_whitelist_clients").write_text(POSTGREY_CLIENTS)
    (tmp_path / "postgrey_whitelist_recipients").write_text(
        POSTGREY_RECIPIENTS)
    client = PolicyClient(policy(
        allowed_domains=["example.org", "lists.example.org"],
        whitelist_clients=str(tmp_path / "postgrey_whitelist_clients"),
        whitelist_recipients=str(
            tmp_path / "postgrey_whitelist_recipients")))
    assert client.ask(**changes) == action
    client.close()


# -- the service, asked by a real Postfix ------------------------------------

SERVICE_CONFIG = """\
allowed_senders:
allowed_sender_nets:
    198.51.100.0/24
client_key = network
too_soon = 0
min_defer_time = 1
policy_listen = %s
"""


def listening(port):
    def check():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    return check


@pytest.fixture
def service(tmp_path, upstream):
    """``service(config, smtp=True)``: smtpproxy.py, greylisting
    example.org, with its policy service on a free port (``.policy``)."""
    started = []

    def start(config="", smtp=True, policy_listen=None,
              domains="example.org"):
        port = free_port()
        where = policy_listen or "127.0.0.1:%d" % port
        text = SERVICE_CONFIG % where + config
        if domains:
            text += "allowed_domains:\n    %s\n" % domains
        if not smtp:
            text += "smtp_proxy = no\n"
        directory = tmp_path / ("service%d" % len(started))
        directory.mkdir()
        process = ProxyProcess(
            directory, upstream.port, config=text, handler=None,
            ready=None if smtp else (
                listening(port) if policy_listen is None else
                lambda: os.path.exists(where[5:])))
        process.policy = port
        started.append(process)
        if smtp:
            upstream.forget_probe(process.probes)
        return process
    yield start
    for process in started:
        process.stop()


def through_postfix(postfix, address, sender="alice@example.net",
                    recipient="user@example.org", message=None):
    """A session through Postfix from client ``address`` (XCLIENT): the
    RCPT reply, and the reply to the message if there is one and RCPT
    passed."""
    smtp = smtplib.SMTP("127.0.0.1", postfix.port, timeout=20)
    try:
        smtp.ehlo("proxy.example")
        code, text = smtp.docmd("XCLIENT", "ADDR=%s NAME=[UNAVAILABLE] "
                                "HELO=client.example.net" % address)
        assert code == 220, text
        smtp.ehlo("client.example.net")
        assert smtp.mail(sender)[0] == 250
        reply = smtp.rcpt(recipient)
        if reply[0] == 250 and message is not None:
            code, _ = smtp.data(message)
            return reply, code
        return reply, None
    finally:
        smtp.close()


def asking_postfix(postfix_factory, upstream, port):
    return postfix_factory(upstream.port, settings={
        "smtpd_recipient_restrictions":
            "check_policy_service inet:127.0.0.1:%d" % port})


def test_postfix_greylists_through_the_service_alone(service, upstream,
                                                     postfix_factory):
    process = service("x_greylist_header = yes\n", smtp=False)
    postfix = asking_postfix(postfix_factory, upstream, process.policy)
    (code, text), _ = through_postfix(postfix, "192.0.2.7")
    assert code == 450
    assert text.endswith(b"Recipient address rejected: Greylisted, please "
                         b"try again later"), text
    assert text.startswith(b"4.7.1 ")
    time.sleep(1.1)                         # greylisting's delay
    (code, _), delivered = through_postfix(
        postfix, "192.0.2.7", message=b"Subject: hi\r\n\r\nhello\r\n")
    assert (code, delivered) == (250, 250)
    wait_until(lambda: upstream.messages, what="the message")
    content = upstream.messages[0].content
    # PREPEND: Postfix puts the header on top.
    assert content.startswith(b"X-Greylist: delayed 1 seconds by "
                              b"smtpproxy-"), content
    # An allowed client passes at once.
    (code, _), _ = through_postfix(postfix, "198.51.100.7",
                                   sender="bob@example.net")
    assert code == 250
    log = process.stderr_text()
    assert "answering policy requests on 127.0.0.1:%d" % process.policy \
        in log
    assert "listening on" not in log        # no SMTP listener


def test_postfix_greylists_every_recipient_without_allowed_domains(
        service, upstream, postfix_factory):
    # postgrey's configuration: no domains; Postfix's relay control
    # comes first, the service greylists what it is asked about.
    process = service(smtp=False, domains=None)
    postfix = asking_postfix(postfix_factory, upstream, process.policy)
    (code, _), _ = through_postfix(postfix, "192.0.2.7")
    assert code == 450
    time.sleep(1.1)                         # greylisting's delay
    (code, _), delivered = through_postfix(
        postfix, "192.0.2.7", message=b"Subject: hi\r\n\r\nhello\r\n")
    assert (code, delivered) == (250, 250)
    log = process.stderr_text()
    assert "policy defer_if_permit: network:192.0.2.0/24" in log
    assert "policy dunno: network:192.0.2.0/24" in log
    # No SMTP proxy, nothing refused: no warning saying so.
    assert "allowed_domains" not in log
    assert "refuse" not in log


@pytest.mark.parametrize("config, warning", [
    ("smtp_proxy = no\n", None),
    ("", "allowed_domains is empty: every recipient will be refused "
     "(550 5.7.1) by the SMTP proxy, but for clients of allowed_senders "
     "and allowed_sender_nets; the policy service greylists every "
     "recipient Postfix asks about"),
])
def test_the_start_warns_of_what_no_allowed_domains_does(tmp_path, config,
                                                        warning):
    (tmp_path / "p.conf").write_text(
        config + "policy_listen = unix:%s\ngreylist_db = %s\n"
        "run_as_root = yes\n" % (tmp_path / "p.sock", tmp_path / "g.db"))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"), "--config",
         str(tmp_path / "p.conf"), "--check-config", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=20)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines()
                if "allowed_domains" in line]
    assert warnings == ([] if warning is None
                        else ["smtpproxy: warning: " + warning])


@pytest.mark.parametrize("values, warned", [
    ({"policy_listen": "127.0.0.1:10023"}, True),
    ({"policy_listen": "10023"}, True),                 # 127.0.0.1
    ({"policy_listen": "localhost:10023"}, True),
    ({"policy_listen": "[::1]:10023"}, True),
    ({"policy_listen": "0.0.0.0:10023"}, True),         # loopback clients
    ({"policy_listen": "[::]:10023",
      "policy_clients": ["::1", "192.0.2.25"]}, True),
    ({"policy_listen": "0.0.0.0:10023",
      "policy_clients": ["192.0.2.0/24"]}, False),     # other hosts only
    ({"policy_listen": "192.0.2.1:10023"}, False),
    ({"policy_listen": "unix:/var/spool/postfix/private/smtpproxy"}, False),
    ({}, False),
])
def test_tcp_that_local_users_reach_is_warned_of(tmp_path, values, warned):
    warnings = [warning for warning in smtpproxy.configuration_warnings(
        settings_class(tmp_path), dict(values, smtp_proxy=False))]
    assert warnings == ([
        "policy_listen = %s is TCP on this host: every local user may "
        "connect, and policy_clients cannot tell one from Postfix; with "
        "Postfix on this host, use a UNIX socket: policy_listen = "
        "unix:/var/spool/postfix/private/smtpproxy and policy_socket_group "
        "= postfix" % values["policy_listen"]] if warned else [])


def test_the_proxy_and_the_service_share_one_store(service, upstream,
                                                   postfix_factory):
    process = service()
    postfix = asking_postfix(postfix_factory, upstream, process.policy)
    # Deferred through Postfix, passed through the proxy...
    assert through_postfix(postfix, "127.0.0.2")[0][0] == 450
    direct = RawClient(process.port, source="127.0.0.2")
    direct.cmd("EHLO client.example.net")
    direct.cmd("MAIL FROM:<carol@example.net>")
    assert direct.cmd("RCPT TO:<user@example.org>")[0] == 451
    time.sleep(1.1)
    direct.cmd("RSET")
    direct.cmd("MAIL FROM:<alice@example.net>")
    assert direct.cmd("RCPT TO:<user@example.org>")[0] == 250
    direct.close()
    # ... and the other way round.
    assert through_postfix(postfix, "127.0.0.2",
                           sender="carol@example.net")[0][0] == 250


def test_reload_counters_and_stop(service, upstream, tmp_path):
    process = service(smtp=False)
    client = socket.create_connection(("127.0.0.1", process.policy),
                                      timeout=10)

    def ask(sender):
        request = dict(RCPT, sender=sender)
        client.sendall(b"".join(("%s=%s\n" % item).encode()
                                for item in request.items()) + b"\n")
        return client.recv(4096)
    assert ask("a@example.net") == ("action=%s\n\n" % DEFER).encode()
    with open(process.config_path, "a") as config:
        config.write("defer_reply = 450 4.7.1 Come back later\n")
    process.process.send_signal(signal.SIGHUP)
    # workers = auto: the master, then each worker it passes SIGHUP on to.
    processes = 1 + process.probes if process.probes > 1 else 1
    wait_until(lambda: process.stderr_text().count(
        "reloaded the configuration") == processes, what="the reloads")
    assert ask("b@example.net") == \
        b"action=DEFER_IF_PERMIT 4.7.1 Come back later\n\n"
    process.process.send_signal(signal.SIGUSR1)
    # The worker that holds the connection counted both.
    wait_until(lambda: "policy_defer_if_permit=2" in process.stderr_text(),
               what="the counters")
    process.process.send_signal(signal.SIGTERM)
    # Closed at once: not after policy_max_idle (300 s), which would
    # have been the client's timeout (10 s) instead.
    assert client.recv(4096) == b""
    assert process.process.wait(10) == 0
    client.close()


def test_a_unix_socket_with_its_mode_and_group(service, tmp_path):
    import grp
    import stat
    path = str(tmp_path / "policy.sock")
    group = "nogroup" if os.geteuid() == 0 else grp.getgrgid(
        os.getgid()).gr_name
    stale = socket.socket(socket.AF_UNIX)   # left by a killed instance
    stale.bind(path)
    stale.close()
    process = service("policy_socket_mode = 0666\npolicy_socket_group = %s\n"
                      % group, smtp=False, policy_listen="unix:" + path)
    wait_until(lambda: "answering policy requests" in process.stderr_text(),
               what="the service")
    status = os.stat(path)
    assert stat.S_IMODE(status.st_mode) == 0o666
    assert grp.getgrgid(status.st_gid).gr_name == group
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.sendall(b"request=smtpd_access_policy\nprotocol_state=DATA\n\n")
    assert client.recv(4096) == b"action=DUNNO\n\n"
    client.close()
    # A second instance on the same socket is refused: it is in use.
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"), "--config",
         process.config_path], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True)
    assert result.returncode == 1
    assert "is in use: is another instance running?" in result.stderr


@pytest.mark.parametrize("config, handler, message", [
    ("policy_listen = 127.0.0.1:10023\n", "plainproxy.AcceptAll",
     "policy_listen: the policy service applies greylisting"),
    ("smtp_proxy = no\n", None, "smtp_proxy = no, and no policy_listen"),
    ("policy_listen = unix:relative/path\n", None,
     "expected unix:/ABSOLUTE/PATH"),
    ("policy_listen = unix:/tmp/x.sock\npolicy_socket_group = no-such-grp\n",
     None, "policy_socket_group no-such-grp: no such group"),
])
def test_check_config_refuses_what_the_service_would(tmp_path, config,
                                                     handler, message):
    (tmp_path / "p.conf").write_text(config + "run_as_root = yes\n")
    args = [sys.executable, os.path.join(ROOT, "smtpproxy.py"), "--config",
            str(tmp_path / "p.conf")]
    if handler:
        args += ["--class", handler]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    for extra in (["--check-config"], ["--listen", "127.0.0.1:%d"
                                       % free_port()]):
        result = subprocess.run(args + extra, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env,
                                universal_newlines=True, timeout=20)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr

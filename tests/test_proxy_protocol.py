"""The PROXY protocol (HAProxy's, versions 1 and 2) on the listening side
(issue 5): the client address a balancer reports is the one the policy,
the logs and the upstream see; a connection without a valid header is
closed without a word."""

import ipaddress
import logging
import os
import socket
import struct
import subprocess
import sys

import pytest

from conftest import HERE, ROOT, RawClient, free_port
import smtpproxy

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(source, source_port, destination="192.0.2.1", port=25,
       command=0x21, tlvs=b""):
    """A version 2 header for TCP over IPv4 or IPv6."""
    source = ipaddress.ip_address(source)
    destination = ipaddress.ip_address(destination)
    family = 0x11 if source.version == 4 else 0x21
    body = (source.packed + destination.packed
            + struct.pack("!HH", source_port, port) + tlvs)
    return V2_SIGNATURE + struct.pack("!BBH", command, family,
                                      len(body)) + body


def connect(port, header, source="127.0.0.1"):
    """Send ``header`` first, then read what the proxy says."""
    return RawClient(port, source=source, first=header, timeout=10)


def hello_address(client):
    """The client address the proxy names in its EHLO reply."""
    code, text = client.cmd("EHLO client.example.net")
    assert code == 250
    return text.split("\n")[0].rsplit("[", 1)[1].rstrip("]")


@pytest.fixture
def balanced(proxy):
    def start(mode="any", **attributes):
        return proxy(proxy_protocol=mode, **attributes)
    return start


@pytest.mark.parametrize("header, address", [
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 25\r\n", "203.0.113.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 25\r\n", "2001:db8::7"),
    # No client address: an unknown client, not the balancer.
    (b"PROXY UNKNOWN\r\n", "unknown"),
    (b"PROXY UNKNOWN ff:: 1.2.3.4 whatever\r\n", "unknown"),
    # The longest line of the specification: 107 octets with its CRLF.
    (b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", "unknown"),
])
def test_v1_header_gives_the_client_address(balanced, header, address):
    port = balanced("v1")
    client = connect(port, header)
    assert client.greeting[0] == 220
    assert hello_address(client) == address
    client.close()


@pytest.mark.parametrize("header, address", [
    (v2("203.0.113.7", 40001), "203.0.113.7"),
    (v2("2001:db8::7", 40001, "2001:db8::1"), "2001:db8::7"),
    (v2("::ffff:203.0.113.9", 40001, "::ffff:192.0.2.1"), "203.0.113.9"),
    # TLVs after the addresses (AWS, Azure) are skipped.
    (v2("198.51.100.4", 5, tlvs=b"\x04\x00\x03abc" * 20), "198.51.100.4"),
    # LOCAL (a health check), the UNSPEC family, UNIX stream sockets
    # (216 octets of paths): no client address, an unknown client.
    (v2("203.0.113.7", 40001, command=0x20), "unknown"),
    (V2_SIGNATURE + b"\x21\x00\x00\x00", "unknown"),
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"/" * 216, "unknown"),
])
def test_v2_header_gives_the_client_address(balanced, header, address):
    port = balanced("v2")
    client = connect(port, header)
    assert client.greeting[0] == 220
    assert hello_address(client) == address
    client.close()


def test_any_takes_either_version(balanced):
    port = balanced("any")
    for header in (b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 25\r\n",
                   v2("203.0.113.7", 40001)):
        client = connect(port, header)
        assert hello_address(client) == "203.0.113.7"
        client.close()


@pytest.mark.parametrize("mode, header", [
    ("any", b"EHLO client.example.net\r\n"),            # no header
    ("v1", v2("203.0.113.7", 1)),                        # the other one
    ("v2", b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 25\r\n"),
    ("v1", b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 25\n"),  # bare LF
    ("v1", b"PROXY TCP4 203.0.113.777 192.0.2.1 40001 25\r\n"),
    ("v1", b"PROXY TCP4 2001:db8::7 192.0.2.1 40001 25\r\n"),
    ("v1", b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 25\r\n"),
    ("v1", b"PROXY TCP4 203.0.113.7 192.0.2.1 040001 25\r\n"),
    ("v1", b"PROXY TCP4 203.0.113.7 192.0.2.1 40001\r\n"),
    ("v1", b"PROXY UDP4 203.0.113.7 192.0.2.1 40001 25\r\n"),
    ("v1", b"PROXY TCP4 203.0.113.7 " + b" " * 100 + b"\r\n"),
    ("v1", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"),     # 108 octets
    # An IPv6 zone, which Python 3.9 and later would take for an address.
    ("v1", b"PROXY TCP6 fe80::7%eth0 fe80::1 40001 25\r\n"),
    ("v2", V2_SIGNATURE[:-1] + b"X\x21\x11\x00\x0c" + b"\x00" * 12),
    ("v2", V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12),   # version 1
    ("v2", V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12),   # command 2
    ("v2", V2_SIGNATURE + b"\x21\x11\x00\x08" + b"\x00" * 8),    # short
    ("v2", V2_SIGNATURE + b"\x21\x11\x00\x0a" + b"\x00" * 10),   # no port
    # Families and transports the specification does not define.
    ("v2", V2_SIGNATURE + b"\x21\x13\x00\x0c" + b"\x00" * 12),
    ("v2", V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12),
    ("v2", V2_SIGNATURE + b"\x21\x10\x00\x0c" + b"\x00" * 12),
    ("v2", V2_SIGNATURE + b"\x21\x01\x00\x0c" + b"\x00" * 12),
    ("v2", V2_SIGNATURE + b"\x21\x11\xff\xff"),                   # huge
])
def test_a_connection_without_a_valid_header_is_dropped(
        balanced, upstream, mode, header, caplog):
    port = balanced(mode)
    client = connect(port, header)
    # Closed without a reply: not even a greeting.
    assert client.greeting == (None, "")
    client.close()
    assert any("PROXY protocol from 127.0.0.1:" in record.getMessage()
               for record in caplog.records)
    assert upstream.connections == 0


def test_a_header_cut_short_is_dropped(balanced):
    port = balanced("v2")
    sock = socket.create_connection(("127.0.0.1", port), 10)
    sock.sendall(v2("203.0.113.7", 1)[:20])
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(100) == b""
    sock.close()


def test_a_silent_connection_is_dropped_after_the_timeout(balanced):
    port = balanced("any", inactivity_timeout=1)
    sock = socket.create_connection(("127.0.0.1", port), 10)
    assert sock.recv(100) == b""
    sock.close()


def test_only_balancers_of_proxy_protocol_from(balanced, caplog):
    port = balanced("v1", proxy_protocol_from=["127.0.0.2", "10.0.0.0/8"])
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 25\r\n"
    client = connect(port, header, source="127.0.0.2")
    assert hello_address(client) == "203.0.113.7"
    client.close()
    client = connect(port, header, source="127.0.0.1")
    assert client.greeting == (None, "")
    client.close()
    assert any("127.0.0.1" in record.getMessage() and
               "proxy_protocol_from" in record.getMessage()
               for record in caplog.records)


def test_the_reported_address_is_the_policys_and_the_logs(proxy, upstream,
                                                          caplog):
    """GreyListingPolicy relays for allowed_senders: the reported address
    is what it checks, and what the transaction log records."""
    caplog.set_level(logging.INFO, logger="smtpproxy.transactions")
    port = proxy(handler=smtpproxy.GreyListingPolicy, proxy_protocol="v1",
                 allowed_senders=["198.51.100.20"], allowed_domains=[])
    outsider = connect(port, b"PROXY TCP4 203.0.113.7 192.0.2.1 4 25\r\n")
    outsider.cmd("HELO client.example.net")
    outsider.cmd("MAIL FROM:<a@example.net>")
    assert outsider.cmd("RCPT TO:<b@elsewhere.example>")[0] == 550
    outsider.cmd("QUIT")
    insider = connect(port, b"PROXY TCP4 198.51.100.20 192.0.2.1 4 25\r\n")
    insider.cmd("HELO client.example.net")
    insider.cmd("MAIL FROM:<a@example.net>")
    assert insider.cmd("RCPT TO:<b@elsewhere.example>")[0] == 250
    insider.cmd("QUIT")
    lines = [record.getMessage() for record in caplog.records
             if record.name == "smtpproxy.transactions"]
    assert " | 203.0.113.7 | " in lines[0]
    assert " | 198.51.100.20 | " in lines[1]


def test_per_ip_limit_with_the_proxy_protocol(proxy):
    port = proxy(proxy_protocol="v1")
    server = proxy.servers[-1]
    server.max_connections_per_ip = 1
    # All come from the balancer, 127.0.0.1: the limit counts the clients.
    first = connect(port, b"PROXY TCP4 203.0.113.7 192.0.2.1 1 25\r\n")
    other = connect(port, b"PROXY TCP4 203.0.113.8 192.0.2.1 1 25\r\n")
    assert first.greeting[0] == other.greeting[0] == 220
    again = connect(port, b"PROXY TCP4 203.0.113.7 192.0.2.1 2 25\r\n")
    assert again.greeting[0] == 421 and "4.7.0" in again.greeting[1]
    for client in (first, other, again):
        client.close()


def test_talking_before_the_greeting_is_seen_behind_the_header(balanced):
    port = balanced("v1", greet_pause=1)
    client = connect(port, b"PROXY TCP4 203.0.113.7 192.0.2.1 1 25\r\n"
                     b"EHLO eager.example.net\r\n")
    assert client.greeting[0] == 554
    client.close()


def test_the_service_needs_the_balancers_named(tmp_path):
    """From anyone, the header would let anyone claim 127.0.0.1, which
    may relay: the command line does not start so."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"),
         "--listen", "127.0.0.1:%d" % free_port(), "-o", "run_as_root=yes",
         "-o", "greylist_log=", "-o", "proxy_protocol=v1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, env=env, cwd=str(tmp_path), timeout=30)
    assert result.returncode == 2
    assert "proxy_protocol needs proxy_protocol_from" in result.stderr


# Headers that name no client, from a balancer at 127.0.0.1, which the
# default allowed_senders lets relay anywhere.
NO_CLIENT = {
    "v1 UNKNOWN": b"PROXY UNKNOWN\r\n",
    "v2 AF_UNSPEC": V2_SIGNATURE + b"\x21\x00\x00\x00",
    "v2 AF_UNIX": V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"/" * 216,
    "v2 LOCAL": v2("203.0.113.7", 40001, command=0x20),
}


class Clock(object):
    now = 1000000000.0


@pytest.fixture
def greylisting(proxy, tmp_path):
    """A GreyListingPolicy proxy behind a balancer, with the default
    allowed_senders (127.0.0.1) and its clock set by the test."""
    clock = Clock()

    def start(**attributes):
        attributes.setdefault("greylist_db", str(tmp_path / "grey.db"))
        attributes.setdefault("allowed_domains", ["example.org"])
        attributes["now"] = lambda self: clock.now
        return proxy(handler=smtpproxy.GreyListingPolicy,
                     proxy_protocol="any", **attributes), clock
    return start


def rcpt_through(port, header, recipient, sender="a@example.net"):
    client = connect(port, header)
    assert client.cmd("EHLO client.example.net")[0] == 250
    assert client.cmd("MAIL FROM:<%s>" % sender)[0] == 250
    reply = client.cmd("RCPT TO:<%s>" % recipient)
    client.cmd("QUIT")
    client.close()
    return reply


@pytest.mark.parametrize("kind", sorted(NO_CLIENT))
def test_a_client_the_header_does_not_name_may_not_relay(
        greylisting, upstream, caplog, kind):
    caplog.set_level(logging.DEBUG)
    port, _ = greylisting()
    assert smtpproxy.GreyListingPolicy.allowed_senders == ["127.0.0.1"]
    header = NO_CLIENT[kind]
    assert rcpt_through(port, header, "b@elsewhere.example") == (
        550, "5.7.1 Relaying denied")
    # Our domain: greylisted like any stranger, not whitelisted by the
    # balancer's address.
    assert rcpt_through(port, header, "b@example.org")[0] == 451
    assert upstream.connections == 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("PROXY %s through 127.0.0.1:" % kind in message
               and "an unknown client, trusted with nothing" in message
               for message in messages), messages
    assert any(" | unknown | <a@example.net> | <b@example.org> | "
               in message for message in messages), messages


def test_an_unknown_client_is_greylisted_and_never_auto_whitelisted(
        greylisting):
    port, clock = greylisting(auto_whitelist_clients=1, allowed_senders=[])
    header = NO_CLIENT["v1 UNKNOWN"]
    assert rcpt_through(port, header, "b@example.org")[0] == 451
    clock.now += 3600
    assert rcpt_through(port, header, "b@example.org")[0] == 250
    # Its passes count for nothing: a new triplet waits again.
    assert rcpt_through(port, header, "b@example.org",
                        sender="new@example.net")[0] == 451


def test_the_unknown_clients_key_is_no_network(tmp_path):
    # Network keys hold a "/", host-name keys a ".": no client shares it.
    class Policy(smtpproxy.GreyListingPolicy):
        allowed_domains = ["example.org"]
        greylist_db = str(tmp_path / "grey.db")
    engine = smtpproxy.Greylister(Policy)
    assert not engine.client_may_relay(smtpproxy.UNKNOWN_CLIENT)
    decision = engine.decide(smtpproxy.UNKNOWN_CLIENT, "a@example.net",
                             "b@example.org", 1000000000.0,
                             hostname=lambda: "mx.example.net")
    assert decision.rule == "unknown-client"
    assert decision.key.split(" ")[0] == "unknown"


def test_xclient_tells_the_upstream_the_client_is_unavailable(
        proxy, raw_upstream):
    port = proxy(proxy_protocol="v1", xclient=True,
                 smtp_port=raw_upstream.port)
    raw_upstream.ehlo = ["raw", "XCLIENT NAME ADDR PORT HELO PROTO"]
    client = connect(port, NO_CLIENT["v1 UNKNOWN"])
    client.cmd("EHLO client.example.net")
    client.cmd("MAIL FROM:<a@example.net>")
    client.cmd("RCPT TO:<b@example.org>")
    client.close()
    xclient = [command for command in raw_upstream.commands
               if command.startswith(b"XCLIENT ")]
    assert xclient and b" ADDR=[UNAVAILABLE] PORT=[UNAVAILABLE] " in (
        xclient[0])

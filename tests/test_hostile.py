"""Hostile clients and upstreams: every wait has a deadline, every discard
a bound, and no one can hold a session, a thread or a descriptor for ever.

Timeouts are deadlines: a command line (and each line of a message) must
be complete within ``inactivity_timeout`` seconds of its first octet, the
PROXY header and the TLS handshake within theirs, a whole session within
``max_session_time``; a client that does not read its replies is dropped
about ``inactivity_timeout`` after its writes block.  What is thrown away
(an overlong line, the rest of a refused message) counts against
``max_message_size``.  Under stress (open sessions at ``stress_threshold``
percent of ``max_connections``) idle waits shrink to ``stress_timeout``.
Per-client caps count IPv4 and IPv6 networks (``connection_ipv4_prefix``,
``connection_ipv6_prefix``).  Descriptors are neither leaked by the
greylisting store nor, once exhausted, a reason to spin or to let mail
through ungreylisted.  Each expiry is logged as ``timeout after PHASE
from ADDRESS:PORT: REASON``.

Slow clients are paced with sleeps (that is what they are); servers are
never slept for: the tests poll (``wait_until``) or block on a socket with
a timeout.  Every loop is bounded.
"""

import logging
import os
import re
import selectors
import smtplib
import socket
import ssl
import threading
import time

import pytest

from conftest import (ProxyProcess, RawClient, greeted, open_transaction,
                      wait_until)

# A slow client sends one octet this often.
TRICKLE = 0.4
MB = 1024 * 1024


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def trickle(sock, data, interval=TRICKLE, limit=5.0, first=b""):
    """Send ``first`` at once, then ``data`` one octet every ``interval``
    seconds, reading whatever comes back, until the peer closes the
    connection (end of input or reset) or ``limit`` seconds have passed.

    Return ``(received, closed_after)``: the octets received, and the
    seconds from the first octet sent to the close (None if the
    connection is still open after ``limit`` seconds).
    """
    received = b""
    start = time.monotonic()
    if first:
        sock.sendall(first)
        next_send = start + interval
    else:
        next_send = start
    position = 0
    while True:
        now = time.monotonic()
        if now - start > limit:
            return received, None
        if position < len(data) and now >= next_send:
            try:
                sock.send(data[position:position + 1])
            except OSError:                 # reset: closed
                return received, time.monotonic() - start
            position += 1
            next_send += interval
        until = next_send if position < len(data) else start + limit
        if readable(sock, max(0.0, until - time.monotonic())):
            try:
                chunk = sock.recv(65536)
            except OSError:
                return received, time.monotonic() - start
            if not chunk:
                return received, time.monotonic() - start
            received += chunk


def readable(sock, timeout):
    """True once ``sock`` has something to read (or its end), False after
    ``timeout`` seconds without."""
    selector = selectors.DefaultSelector()
    try:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout))
    finally:
        selector.close()


def reply_lines(received):
    """The reply lines in ``received``, as text."""
    return [line.decode("ascii", "replace")
            for line in received.split(b"\r\n") if line]


def closed(sock, timeout=5.0):
    """True if the peer closes ``sock`` (end of input or reset) within
    ``timeout`` seconds, whatever it sends before that."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except OSError:
            return True


def expiry_logged(caplog, phase, address, port, reason, timeout=5.0):
    """Wait until the proxy has logged, at INFO on logger "smtpproxy",
    ``timeout after PHASE from ADDRESS:PORT: REASON`` with the word
    ``reason`` in REASON; return the line."""
    pattern = re.compile(r"timeout after %s from %s:%d: (.*)"
                         % (re.escape(phase), re.escape(address), port))

    def find():
        for record in list(caplog.records):
            if record.name != "smtpproxy" or record.levelno != logging.INFO:
                continue
            match = pattern.search(record.getMessage())
            if match and re.search(r"\b%s\b" % reason, match.group(1)):
                return record.getMessage()
        return None
    try:
        return wait_until(find, timeout=timeout,
                          what="the %s expiry to be logged" % reason)
    except AssertionError:
        seen = [record.getMessage() for record in caplog.records
                if "timeout" in record.getMessage()]
        raise AssertionError("no 'timeout after %s from %s:%d: ...%s...' "
                             "logged; timeouts logged: %r"
                             % (phase, address, port, reason, seen))


def local_port(client):
    return client.sock.getsockname()[1]


def client_hello(certificates):
    """The octets of a TLS ClientHello, as the test authority's client
    would send it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = certificates.client_context().wrap_bio(
        incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16"             # a handshake record
    return hello


@pytest.fixture
def logs(caplog):
    """caplog, recording the proxy's log from INFO up."""
    caplog.set_level(logging.INFO, logger="smtpproxy")
    return caplog


# ---------------------------------------------------------------------------
# A line must be complete within inactivity_timeout of its first octet
# ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["command", "overlong-command", "data"])
def test_a_trickled_line_is_cut_at_its_deadline(proxy, upstream, logs,
                                                where):
    """A client sending one octet every 0.4 s, never ending its line, is
    told 421 4.4.2 ... timeout exceeded and closed once inactivity_timeout
    has passed since the line's first octet: each octet does not restart
    the clock (if it did, the line would be open after 5 s).  Also for a line of message text, and for an
    overlong command line, whose discarded octets count too."""
    timeout = 1
    client = RawClient(proxy(inactivity_timeout=timeout), timeout=10)
    assert client.greeting[0] == 220
    first = b""
    if where == "data":
        open_transaction(client)
        client.send(b"Subject: slow\r\n\r\n")    # whole lines: fine
        phase = "DATA"
    else:
        assert client.cmd("EHLO client.example.net")[0] == 250
        phase = "EHLO"
    if where == "overlong-command":
        # Past max_command_line: the proxy is discarding the line.
        first = b"NOOP " + b"x" * 595
    received, closed_after = trickle(client.sock, b"y" * 40, first=first)
    lines = reply_lines(received)
    assert closed_after is not None, "still open after 5 s: %r" % lines
    # Not before the deadline either: the line had its full second.
    assert closed_after >= timeout - 0.1, closed_after
    assert lines and re.match(r"421 4\.4\.2 .*timeout exceeded",
                              lines[-1]), lines
    expiry_logged(logs, phase, "127.0.0.1", local_port(client), "line")
    assert upstream.messages == []
    client.close()


@pytest.mark.timeout(30)
def test_the_upstreams_time_is_not_counted_against_a_pipelined_line(
        proxy, upstream):
    """A pipelined command line cut across two writes, whose first part
    arrived while the proxy waited for a slow upstream (2 s, longer than
    inactivity_timeout, within upstream_timeout) is read: its rest came at
    once, and the wait was the proxy's (found by contrib/fuzz.py)."""
    upstream.handler.delay["RCPT"] = 2
    client = RawClient(proxy(inactivity_timeout=1), timeout=10)
    assert client.cmd("EHLO client.example.net")[0] == 250
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
                b"DA")
    time.sleep(0.05)                # the rest of the line, a moment later
    client.send(b"TA\r\n")
    assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
    client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()


@pytest.mark.timeout(60)
def test_an_upstream_slow_to_read_a_message_is_not_the_clients_time(
        raw_proxy, raw_upstream):
    """While the proxy waits to write a message to an upstream that reads
    slowly (2 s after its 354), the client's lines are not timed: the
    message goes through (found by contrib/fuzz.py)."""
    raw_upstream.read_pause = 2
    client = RawClient(raw_proxy(inactivity_timeout=1), timeout=30)
    open_transaction(client)
    # More than the kernel's socket buffers hold: the proxy's writes to
    # the upstream block until it reads.
    body = b"".join(b"line %06d " % n + b"x" * 89 + b"\r\n"
                    for n in range(100000))
    sender = threading.Thread(target=client.sock.sendall,
                              args=(body + b".\r\n",))
    sender.start()
    assert client.reply()[0] == 250
    sender.join()
    assert len(raw_upstream.messages) == 1
    client.close()


# ---------------------------------------------------------------------------
# Slowloris at scale
# ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_two_hundred_tricklers_are_dropped_while_mail_flows(proxy, upstream):
    """200 clients (from 127.0.0.2 to 127.0.0.201), each trickling an
    octet every 0.4 s, are all dropped within inactivity_timeout + 1 s of
    their first octet; meanwhile a normal client delivers a message."""
    timeout = 2
    port = proxy(inactivity_timeout=timeout)
    tricklers = []
    try:
        for number in range(200):
            client = RawClient(port, source="127.0.0.%d" % (2 + number),
                               timeout=10)
            tricklers.append(client)
            assert client.greeting[0] == 220
        selector = selectors.DefaultSelector()
        for client in tricklers:
            selector.register(client.sock, selectors.EVENT_READ, client)
        first_octet, closed_at = {}, {}
        delivered = []

        def deliver():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.sendmail(
                        "a@example.net", ["b@example.org"],
                        b"Subject: during the attack\r\n\r\nhi\r\n")
                delivered.append(True)
            except (OSError, smtplib.SMTPException) as error:
                delivered.append(error)
        normal = threading.Thread(target=deliver)
        normal.daemon = True
        start = time.monotonic()
        next_send = start
        while len(closed_at) < len(tricklers):
            now = time.monotonic()
            if now - start > timeout + 5:
                break
            if now >= next_send:
                for client in tricklers:
                    if client in closed_at:
                        continue
                    try:
                        client.sock.send(b"x")
                    except OSError:
                        closed_at[client] = time.monotonic()
                        selector.unregister(client.sock)
                        continue
                    first_octet.setdefault(client, now)
                next_send += TRICKLE
                if normal.ident is None and now - start > 0.5:
                    normal.start()      # with the attack under way
            for key, _ in selector.select(max(0.0, next_send
                                              - time.monotonic())):
                client = key.data
                try:
                    data = client.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    closed_at[client] = time.monotonic()
                    selector.unregister(client.sock)
        selector.close()
        normal.join(15)
        still_open = len(tricklers) - len(closed_at)
        assert still_open == 0, "%d tricklers still open after %d s" % (
            still_open, timeout + 5)
        slowest = max(closed_at[client] - first_octet[client]
                      for client in tricklers)
        assert slowest <= timeout + 1, slowest
        assert delivered == [True], delivered
        [message] = upstream.messages
        assert b"Subject: during the attack" in message.content
    finally:
        for client in tricklers:
            client.close()


# ---------------------------------------------------------------------------
# What is discarded is bounded by max_message_size
# ---------------------------------------------------------------------------

class Flood(object):
    """Send ``total`` octets of "x" (no line end) on ``sock`` from a
    thread, 8 kB a millisecond or so, until done or the proxy breaks the
    connection; ``sent`` counts what the socket took."""

    def __init__(self, sock, total=5 * MB, chunk=8192):
        self.sock = sock
        self.total = total
        self.chunk = b"x" * chunk
        self.sent = 0
        self.error = None
        self.thread = threading.Thread(target=self.run)
        self.thread.daemon = True
        self.thread.start()

    def run(self):
        try:
            while self.sent < self.total:
                self.sock.sendall(self.chunk)
                self.sent += len(self.chunk)
                time.sleep(0.001)
        except OSError as error:           # EPIPE, ECONNRESET, timeout
            self.error = error

    def join(self):
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("where", ["data", "command"])
def test_an_endless_line_is_cut_after_max_message_size(proxy, upstream,
                                                       where):
    """A line without end (5 MB sent, no LF) is not read to its end: in a
    message, once max_message_size octets more than what was refused have
    gone by, the client gets 552 5.3.4 at once and is closed; as a command
    line, 500 5.5.6 and closed.  Long before the 5 MB were sent, and
    nothing reaches the upstream."""
    port = proxy(max_message_size=100000, inactivity_timeout=3)
    client = RawClient(port, timeout=10)
    if where == "data":
        open_transaction(client)
        client.send(b"Subject: endless\r\n\r\n")
        expected = r"552 5\.3\.4 "
    else:
        assert client.cmd("EHLO client.example.net")[0] == 250
        expected = r"500 5\.5\.6 "
    flood = Flood(client.sock)
    code, text = client.reply()
    sent_at_reply = flood.sent
    assert re.match(expected, "%s %s" % (code, text)), (code, text)
    assert closed(client.sock)
    flood.join()
    assert flood.error is not None, "all 5 MB were sent"
    assert sent_at_reply < 2.5 * MB, sent_at_reply
    assert flood.sent < 2.5 * MB, flood.sent
    assert upstream.messages == []
    client.close()


@pytest.mark.parametrize("body", [
    # 16 kB over a limit of 10 kB: refused, read to its end.
    pytest.param(b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 200,
                 id="over-the-size"),
    # One line of 50 kB: refused, read to its end.
    pytest.param(b"Subject: long\r\n\r\n" + b"y" * 50000 + b"\r\n",
                 id="overlong-line"),
])
def test_a_message_refused_within_the_bound_leaves_the_session_going(
        proxy, upstream, body):
    """(Unchanged.)  A message refused for its size or a long line, whose
    end comes within max_message_size more octets, gets its 552 at its
    end, and the session goes on."""
    limit = 10000 if len(body) < 20000 else 100000
    client = RawClient(proxy(max_message_size=limit), timeout=10)
    open_transaction(client)
    client.send(body + b".\r\n")
    code, text = client.reply()
    assert code == 552, (code, text)
    assert client.cmd("NOOP")[0] == 250
    assert client.cmd("QUIT")[0] == 221
    assert upstream.messages == []
    client.close()


# ---------------------------------------------------------------------------
# An upstream that hangs up in the middle of an overlong reply line
# ---------------------------------------------------------------------------

class HostileUpstream(object):
    """A mail server serving one session at a time, in one thread: normal
    (the proxy's EHLO and QUIT probe included) until RCPT, which it
    answers with "250-" and 2000 octets without a line end, then it
    hangs up."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(5)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.running = True
        self.rcpts = 0
        self.thread = threading.Thread(target=self.serve)
        self.thread.daemon = True
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                self.session(connection)
            except OSError:
                pass
            finally:
                connection.close()

    def session(self, connection):
        connection.settimeout(10)
        lines = connection.makefile("rb")
        connection.sendall(b"220 hostile ESMTP\r\n")
        for line in lines:
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                connection.sendall(b"250 hostile\r\n")
            elif verb == b"RCPT":
                self.rcpts += 1
                connection.sendall(b"250-" + b"r" * 2000)
                return
            elif verb == b"QUIT":
                connection.sendall(b"221 bye\r\n")
                return
            else:
                connection.sendall(b"250 ok\r\n")

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.listener.close()


@pytest.mark.timeout(40)
def test_an_upstream_gone_in_an_overlong_reply_line_is_lost_not_spun_on(
        proxy):
    """The upstream sends "250-" and 2000 octets without LF to RCPT and
    hangs up: the client gets 451 4.4.2 within a few seconds, and the
    session's thread ends its session once the client quits (no thread
    left spinning on the end of input)."""
    hostile = HostileUpstream()
    port = proxy(smtp_port=hostile.port, upstream_timeout=5)
    server = proxy.servers[-1]
    threads = threading.active_count()
    client = RawClient(port, timeout=8)
    try:
        assert client.cmd("EHLO client.example.net")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
        try:
            code, text = client.cmd("RCPT TO:<b@example.org>")
        except socket.timeout:
            pytest.fail("no reply to RCPT within 8 s")
        assert hostile.rcpts == 1
        assert (code, text[:6]) == (451, "4.4.2 "), (code, text)
        assert client.cmd("QUIT")[0] == 221
        client.close()
        # Its session over, the thread ends, or waits for the next client
        # if threads are reused: it is not spinning on the end of input.
        wait_until(lambda: not server.sessions and threading.active_count()
                   <= threads + server._session_threads.idle, timeout=5,
                   what="the session's thread to end its session")
    finally:
        client.close()
        # Never leave a thread spinning behind (for the tests that follow
        # when this one fails): its upstream socket closed, it ends.
        for handler in list(server.sessions.values()):
            upstream = getattr(handler, "upstream", None)
            if upstream is not None:
                upstream.sock.close()
        hostile.stop()


# ---------------------------------------------------------------------------
# A client that never reads
# ---------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_a_client_that_never_reads_is_dropped(proxy, logs):
    """A client pipelines NOOPs (8 MB of them) and never reads a reply:
    it is dropped about inactivity_timeout after the proxy's writes to it
    block, not later for every write that blocks again (today 2 to 3
    times that).  With socket buffers of 16 kB (the proxy's, inherited
    from its listening socket, and the client's) the writes block a
    fraction of a second into the burst: the session ends within
    inactivity_timeout + 1.5 s of its start."""
    timeout = 3
    port = proxy(inactivity_timeout=timeout)
    server = proxy.servers[-1]
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        server.socket.setsockopt(socket.SOL_SOCKET, option, 16384)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    assert sock.recv(1000).startswith(b"220 ")
    noops = b"NOOP\r\n" * 1000

    def burst():
        sent = 0
        try:
            while sent < 8 * MB:
                sock.sendall(noops)
                sent += len(noops)
        except OSError:
            pass
    sender = threading.Thread(target=burst)
    sender.daemon = True
    start = time.monotonic()
    sender.start()
    try:
        wait_until(lambda: not server.sessions, timeout=4 * timeout + 4,
                   what="the session to end")
        # One deadline for the blocked writes, not one for each write
        # that blocks again: only a clock tells them apart (the proxy
        # has no clock hook for its writes).
        ended = time.monotonic() - start
        assert ended <= timeout + 1.5, ended
        expiry_logged(logs, "NOOP", "127.0.0.1", sock.getsockname()[1],
                      "write")
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)         # wakes the sender
        except OSError:
            pass
        sender.join(10)
        sock.close()


# ---------------------------------------------------------------------------
# A ceiling on the whole session
# ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_max_session_time_ends_a_busy_session(proxy, logs):
    """A client that says NOOP every 0.3 s, never idle, is told 421 4.4.2
    and closed once max_session_time (2 s) has passed since it
    connected."""
    port = proxy(max_session_time=2)
    start = time.monotonic()
    client = RawClient(port, timeout=10)
    assert client.greeting[0] == 220
    assert client.cmd("EHLO client.example.net")[0] == 250
    replies = []
    ended = None
    while time.monotonic() - start < 8:
        try:
            client.send(b"NOOP\r\n")
            code, text = client.reply()
        except OSError:
            code, text = None, ""
        if code is None:
            ended = time.monotonic() - start
            break
        replies.append((code, text))
        if code != 250:
            assert client.is_closed()
            ended = time.monotonic() - start
            break
        time.sleep(0.3)
    assert ended is not None, "still served after 8 s"
    assert replies and replies[-1][0] == 421, replies[-3:]
    assert re.match(r"4\.4\.2 .*timeout exceeded", replies[-1][1]), replies
    assert ended >= 1.9, ended
    expiry_logged(logs, "NOOP", "127.0.0.1", local_port(client), "session")
    client.close()


# ---------------------------------------------------------------------------
# Per-client caps count networks
# ---------------------------------------------------------------------------

def test_per_ip_limit_counts_an_ipv6_64_behind_the_proxy_protocol(proxy):
    """max_connections_per_ip = 5: twenty clients whose PROXY headers
    report twenty addresses of one /64 are one client: five are greeted,
    the others get 421 4.7.0.  Another /64 is another client."""
    port = proxy(proxy_protocol="v1", proxy_protocol_from=["127.0.0.1"])
    server = proxy.servers[-1]
    server.max_connections_per_ip = 5
    clients = []
    try:
        codes = []
        for number in range(1, 21):
            header = ("PROXY TCP6 2001:db8:1:2::%d 2001:db8::1 40000 25\r\n"
                      % number).encode("ascii")
            client = RawClient(port, first=header, timeout=10)
            clients.append(client)
            code, text = client.greeting
            codes.append(code)
            if code != 220:
                assert (code, text[:6]) == (421, "4.7.0 "), (code, text)
        assert codes == [220] * 5 + [421] * 15, codes
        # The refused sessions gone, the balancer's address holds none.
        wait_until(lambda: len(server.sessions) == 5,
                   what="the refused sessions to end")
        other = RawClient(port, timeout=10, first=(
            b"PROXY TCP6 2001:db8:1:3::1 2001:db8::1 40000 25\r\n"))
        clients.append(other)
        assert other.greeting[0] == 220
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("prefix, greeted", [(24, 3), (32, 8)])
def test_per_ip_limit_counts_ipv4_networks_of_connection_ipv4_prefix(
        proxy, prefix, greeted):
    """max_connections_per_ip = 3, clients from 127.0.0.2 to 127.0.0.9:
    with connection_ipv4_prefix = 24 they are one client (three greeted,
    421 4.7.0 for the others); with the default, 32, eight clients (as
    before the key)."""
    port = proxy()
    server = proxy.servers[-1]
    server.max_connections_per_ip = 3
    if prefix != 32:
        server.connection_ipv4_prefix = prefix
    clients = []
    try:
        for number in range(2, 10):
            clients.append(RawClient(port, source="127.0.0.%d" % number,
                                     timeout=10))
        codes = [client.greeting[0] for client in clients]
        assert codes == [220] * greeted + [421] * (8 - greeted), codes
        for client in clients[greeted:]:
            assert client.greeting[1].startswith("4.7.0 ")
    finally:
        for client in clients:
            client.close()


def test_connection_ipv4_prefix_from_the_configuration(proxy_process):
    """The prefix keys are the service's configuration keys."""
    # One process: with workers, each has its share, rounded up.
    process = proxy_process(config="connection_ipv4_prefix = 24\n"
                                   "max_connections_per_ip = 1\n"
                                   "workers = 1\n")
    # The fixture's own probe (from 127.0.0.1) may not have left yet.
    first = wait_until(lambda: greeted(RawClient(process.port,
                                                 source="127.0.0.2")),
                       what="a session to be served")
    second = RawClient(process.port, source="127.0.0.3")
    assert second.greeting[0] == 421
    for client in (first, second):
        client.close()




# ---------------------------------------------------------------------------
# The PROXY header and the TLS handshake have whole deadlines
# ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_trickled_proxy_header_is_cut_at_its_deadline(proxy, logs):
    """A balancer sending its PROXY header an octet every 0.4 s (18 s for
    the whole header) is closed, without a word, once inactivity_timeout
    has passed since the first octet: within the 5 s the test trickles."""
    port = proxy(proxy_protocol="v1", proxy_protocol_from=["127.0.0.1"],
                 inactivity_timeout=1)
    sock = socket.create_connection(("127.0.0.1", port), 10)
    try:
        received, closed_after = trickle(
            sock, b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 25\r\n")
        assert closed_after is not None, "still open after 5 s"
        assert received == b""
        expiry_logged(logs, "PROXY", "127.0.0.1", sock.getsockname()[1],
                      "header")
    finally:
        sock.close()


@pytest.mark.timeout(30)
def test_a_trickled_tls_handshake_is_cut_at_its_deadline(tls_proxy,
                                                         certificates):
    """After STARTTLS, a client sending its ClientHello an octet every
    0.4 s is closed once inactivity_timeout (1 s) has passed: within the
    5 s the test trickles.  (The ssl module's
    handshake has always had a whole deadline: this one guards it.)"""
    client = RawClient(tls_proxy(inactivity_timeout=1), timeout=10)
    try:
        assert client.cmd("EHLO client.example.net")[0] == 250
        assert client.cmd("STARTTLS")[0] == 220
        received, closed_after = trickle(client.sock,
                                         client_hello(certificates))
        assert closed_after is not None, "still open after 5 s"
        # No SMTP reply in plain text after the 220.
        assert not received.startswith((b"2", b"4", b"5")), received
    finally:
        client.close()


# ---------------------------------------------------------------------------
# Every expiry is logged
# ---------------------------------------------------------------------------

def test_an_idle_client_expiry_is_logged(proxy, logs):
    """A client silent after the greeting: 421 4.4.2, and the log says
    timeout after CONNECT from ADDRESS:PORT: ... idle ..."""
    client = RawClient(proxy(inactivity_timeout=1), timeout=10)
    code, text = client.reply()
    assert (code, text[:6]) == (421, "4.4.2 ")
    expiry_logged(logs, "CONNECT", "127.0.0.1", local_port(client), "idle")
    client.close()


def test_a_stalled_tls_handshake_expiry_is_logged(tls_proxy, certificates,
                                                  logs):
    """A client that stops in the middle of its ClientHello: closed, and
    the log says timeout after STARTTLS from ADDRESS:PORT: ...
    handshake ..."""
    client = RawClient(tls_proxy(inactivity_timeout=1), timeout=10)
    assert client.cmd("EHLO client.example.net")[0] == 250
    assert client.cmd("STARTTLS")[0] == 220
    client.send(client_hello(certificates)[:5])
    assert closed(client.sock, timeout=5)
    expiry_logged(logs, "STARTTLS", "127.0.0.1", local_port(client),
                  "handshake")
    client.close()


# ---------------------------------------------------------------------------
# Stress mode
# ---------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_under_stress_idle_sessions_are_shed_and_a_transfer_is_not(
        proxy, upstream, logs):
    """max_connections = 10, stress_threshold = 50 (percent), stress_timeout
    = 1, inactivity_timeout = 30: with seven sessions open, six of them
    idle after the greeting, the idle ones get 421 4.4.2 within about
    2 s, while the one in DATA, sending a line every 0.2 s, goes on and
    delivers its message.  The log says "stress mode on", then, once the
    sessions are gone, "stress mode off"."""
    port = proxy(inactivity_timeout=30)
    server = proxy.servers[-1]
    server.max_connections = 10
    server.stress_threshold = 50
    server.stress_timeout = 1
    writer = RawClient(port, timeout=10)
    open_transaction(writer)
    writer.send(b"Subject: under stress\r\n\r\n")
    stop = threading.Event()
    written = []

    def write_lines():
        while not stop.is_set() and len(written) < 75:
            line = b"line %d\r\n" % len(written)
            writer.send(line)
            written.append(line)
            stop.wait(0.2)
    lines = threading.Thread(target=write_lines)
    lines.daemon = True
    lines.start()
    idle, greeted_at = [], []
    try:
        for number in range(6):
            client = RawClient(port, source="127.0.0.%d" % (2 + number),
                               timeout=6)
            idle.append(client)
            greeted_at.append(time.monotonic())
            assert client.greeting[0] == 220
        for client, since in zip(idle, greeted_at):
            try:
                code, text = client.reply()
            except socket.timeout:
                pytest.fail("an idle client still served after 6 s")
            waited = time.monotonic() - since
            assert (code, text[:6]) == (421, "4.4.2 "), (code, text)
            assert "timeout exceeded" in text
            assert waited >= 0.5, waited
            assert client.is_closed()
        expiry_logged(logs, "CONNECT", "127.0.0.2", local_port(idle[0]),
                      "stress")
    finally:
        stop.set()
        lines.join(5)
        for client in idle:
            client.close()
    writer.send(b".\r\n")
    code, text = writer.reply()
    assert code == 250, (code, text)
    writer.cmd("QUIT")
    writer.close()
    [message] = upstream.messages
    assert message.content == (b"Subject: under stress\r\n\r\n"
                               + b"".join(written))

    def said(words):
        return [number for number, record in enumerate(logs.records)
                if record.name == "smtpproxy"
                and words in record.getMessage()]
    assert said("stress mode on")
    wait_until(lambda: said("stress mode off"), timeout=5,
               what="stress mode off to be logged")
    assert said("stress mode on")[0] < said("stress mode off")[-1]


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------

def descriptors(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def cpu_seconds(pid):
    """User and system CPU time of process ``pid`` so far."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


GREYLISTING = ("allowed_domains:\n    example.org\n"
               "greylist_db = %s\n"
               "max_connections_per_ip = 0\n"
               "client_key = network\n")


def greylisted_session(port, number, timeout=10):
    """A session from 127.0.0.2 and up (not the allowed 127.0.0.1) to a
    local recipient never seen: EHLO, MAIL, RCPT, QUIT.  Return the RCPT
    reply ``(code, text)``, or ``(None, why)`` if the session did not get
    that far."""
    try:
        client = RawClient(port, source="127.0.0.%d" % (2 + number % 250),
                           timeout=timeout)
    except OSError as error:
        return None, "no greeting: %r" % (error,)
    try:
        if client.greeting[0] != 220:
            return None, "greeting %r" % (client.greeting,)
        if client.cmd("EHLO client%d.example.net" % number)[0] != 250:
            return None, "EHLO refused"
        if client.cmd("MAIL FROM:<s%d@example.net>" % number)[0] != 250:
            return None, "MAIL refused"
        reply = client.cmd("RCPT TO:<r%d@example.org>" % number)
        if reply[0] is not None and client.cmd("QUIT")[0] == 221:
            client.is_closed()      # the proxy's side is closed too
        return reply
    except OSError as error:
        return None, "session broken: %r" % (error,)
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_greylisted_sessions_leave_no_descriptors_behind(proxy_process,
                                                         tmp_path):
    """300 greylisted sessions, 20 at a time: within 2 s of their end the
    proxy holds the descriptors it held when idle, give or take 2 (the
    store keeps no connection per thread)."""
    process = proxy_process(handler=None, config=GREYLISTING
                            % (tmp_path / "g.db"))
    pid = process.process.pid
    # Once the store is in use: what it keeps open is part of the idle.
    assert greylisted_session(process.port, 0)[0] == 451
    baseline = descriptors(pid)
    replies = []

    def run(first):
        for number in range(first, 301, 20):
            replies.append(greylisted_session(process.port, number))
    workers = [threading.Thread(target=run, args=(first,))
               for first in range(1, 21)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(replies) == 300
    assert all(reply[0] == 451 and reply[1].startswith("4.7.1 ")
               for reply in replies), set(replies)
    try:
        wait_until(lambda: descriptors(pid) <= baseline + 2, timeout=2,
                   what="the descriptors to be closed")
    except AssertionError:
        raise AssertionError("%d descriptors after the load, %d before"
                             % (descriptors(pid), baseline))


@pytest.mark.timeout(60)
def test_out_of_descriptors_is_survived_and_never_fails_open(
        upstream, tmp_path):
    """With 64 descriptors at most and greylist_fail_mode = accept: idle
    connections held to the limit and past it, and greylisted clients
    trying all along: no RCPT is ever accepted (greylisting is not
    bypassed), the proxy does not spin while accepts fail, it says so in
    a handful of log lines, not thousands; once the idle connections are
    gone it serves and greylists again."""
    files = 64
    proxy = ProxyProcess(tmp_path, upstream.port, files=files, handler=None,
                         config=GREYLISTING % (tmp_path / "g.db")
                         + "inactivity_timeout = 30\n"
                         "greylist_fail_mode = accept\n"
                         # One process: the one whose descriptors run out.
                         "workers = 1\n")
    pid = proxy.process.pid
    idle, pending, replies = [], [], []
    number = [0]

    def try_greylisted(timeout):
        number[0] += 1
        replies.append(greylisted_session(proxy.port, number[0], timeout))
    try:
        try_greylisted(10)
        assert replies[0][0] == 451 and replies[0][1].startswith("4.7.1 ")
        # At the edge: idle connections leave 4, 3, 2, then 1 descriptor
        # free, and a greylisted client tries at each step.
        for free in (4, 3, 2, 1):
            while descriptors(pid) < files - free and len(idle) < 80:
                client = RawClient(proxy.port, timeout=2, greet=False)
                idle.append(client)
                client.sock.settimeout(2)
                try:
                    client.greeting = client.reply()
                except socket.timeout:
                    client.greeting = (None, "")
                if client.greeting[0] != 220:
                    break           # the proxy protects itself already
            try_greylisted(2)
        # Past the limit: connections the proxy cannot take.
        pending = [socket.create_connection(("127.0.0.1", proxy.port), 5)
                   for _ in range(20)]
        log_before = len(proxy.stderr_text())
        held = descriptors(pid)
        assert held >= files - 4, "not out of descriptors: %d open" % held
        cpu_before = cpu_seconds(pid)
        tries = threading.Thread(target=try_greylisted, args=(1.5,))
        tries.start()
        time.sleep(2)               # the exhaustion, measured
        cpu = cpu_seconds(pid) - cpu_before
        tries.join(10)
        assert cpu < 0.5, "%.2f s of CPU in 2 s out of descriptors" % cpu
        for client in idle:
            client.close()
        for sock in pending:
            sock.close()

        def greylists():
            try_greylisted(3)
            return replies[-1][0] == 451 and replies[-1][1].startswith(
                "4.7.1 ")
        wait_until(greylists, timeout=15,
                   what="a greylisted session once descriptors are free")
        accepted = [reply for reply in replies
                    if reply[0] is not None and 200 <= reply[0] < 300]
        assert not accepted, replies
        text = proxy.stderr_text()
        said = [line for line in text.splitlines()
                if re.search(r"too many open files|\bdescriptors?\b", line,
                             re.I)]
        assert said, "nothing logged about the descriptors: %s" % text[
            log_before:][-2000:]
        assert len(said) <= 10, said[:20]
    finally:
        for client in idle:
            client.close()
        for sock in pending:
            sock.close()
        proxy.stop()

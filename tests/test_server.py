"""SMTPProxyServer: address families, programmatic use, and what happens
when the disk the logs go to is full."""

import smtplib
import socket
import threading

import smtpproxy
from conftest import RawClient, wait_until
from plainproxy import AcceptAll

MESSAGE = b"Subject: t\r\n\r\nbody\r\n"


def serve(server):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.daemon = True
    thread.start()


def configured(upstream, **attributes):
    attributes.update(smtp_ip="127.0.0.1", smtp_port=upstream.port)
    return type("Configured", (AcceptAll,), attributes)


def test_programmatic_use_on_all_addresses(upstream):
    # The seed's use, in our terms: SMTPProxyServer(('', port), Handler).
    server = smtpproxy.SMTPProxyServer(("", 0), configured(upstream))
    serve(server)
    try:
        port = server.server_address[1]
        for host in ("127.0.0.1", "::1"):
            with smtplib.SMTP(host, port) as client:
                client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    finally:
        server.shutdown()
        server.server_close()
    assert len(upstream.messages) == 2


def test_peer_of_an_ipv4_client_on_a_dual_stack_socket_is_plain_ipv4(
        upstream):
    seen = []

    class Recording(configured(upstream)):
        def shouldWeAcceptRecipient(self, recipient):
            seen.append((self.peer, self.local))
            return True

    server = smtpproxy.SMTPProxyServer(("", 0), Recording)
    serve(server)
    try:
        client = RawClient(server.server_address[1])
        client.cmd("EHLO client.example.net")
        client.cmd("MAIL FROM:<a@example.net>")
        assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
        client.close()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("127.0.0.1", "127.0.0.1")]


def test_ipv6_only_address(upstream):
    server = smtpproxy.SMTPProxyServer(("::1", 0), configured(upstream))
    assert server.address_family == socket.AF_INET6
    serve(server)
    try:
        client = RawClient(server.server_address[1], host="::1")
        code, text = client.cmd("HELO client.example.net")
        assert (code, text) == (
            250, "mail.example.com Hello client.example.net ::1")
        client.close()
    finally:
        server.shutdown()
        server.server_close()


def test_upstream_reached_over_ipv6(upstream_v6):
    handler = type("V6", (AcceptAll,), {"smtp_ip": "::1",
                                        "smtp_port": upstream_v6.port})
    server = smtpproxy.SMTPProxyServer(("127.0.0.1", 0), handler)
    serve(server)
    try:
        with smtplib.SMTP("127.0.0.1", server.server_address[1]) as client:
            client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    finally:
        server.shutdown()
        server.server_close()
    assert [m.rcpt_tos for m in upstream_v6.messages] == [["b@example.org"]]


def test_listen_backlog_is_real():
    assert smtpproxy.SMTPProxyServer.request_queue_size >= 128
    assert smtpproxy.SMTPProxyServer.allow_reuse_address


def test_session_threads_do_not_hold_the_exit(upstream):
    # What daemon_threads said, asked of the thread a session runs in:
    # SMTPProxyServer starts its own (process_request is replaced).
    seen = []

    class Recording(configured(upstream)):
        def handleConnect(self):
            seen.append(threading.current_thread().daemon)
            super(Recording, self).handleConnect()

    server = smtpproxy.SMTPProxyServer(("127.0.0.1", 0), Recording)
    serve(server)
    try:
        client = RawClient(server.server_address[1])
        client.cmd("QUIT")
        client.close()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [True]


def test_full_disk_for_the_log_loses_no_mail(proxy_process, upstream):
    # /dev/full fails every write with ENOSPC, like a full disk.
    process = proxy_process(config="greylist_log = /dev/full\n")
    with smtplib.SMTP("127.0.0.1", process.port) as client:
        client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
        client.sendmail("a@example.net", ["c@example.org"], MESSAGE)
    assert [m.rcpt_tos for m in upstream.messages] == [
        ["b@example.org"], ["c@example.org"]]


# -- session threads are reused ----------------------------------------------

def pooled_server(upstream, **attributes):
    attributes.setdefault("spare_threads", 50)
    handler = type("Pooled", (AcceptAll,), {
        "smtp_ip": "127.0.0.1", "smtp_port": upstream.port,
        "inactivity_timeout": 10})
    server_class = type("PoolServer", (smtpproxy.SMTPProxyServer,),
                        attributes)
    server = server_class(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,),
                     daemon=True).start()
    return server


def session_threads():
    return [thread for thread in threading.enumerate()
            if thread.name == "smtpproxy session"]


def one_session(port):
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.sendmail("a@example.net", ["b@example.org"], b"Subject: x\r\n\r\nx")
    client.quit()


def test_session_threads_serve_client_after_client(upstream):
    server = pooled_server(upstream)
    port = server.server_address[1]
    before = set(session_threads())
    for _ in range(20):
        one_session(port)
        # The thread that served it waits for the next client.
        wait_until(lambda: server._session_threads.idle == 1)
    assert len(set(session_threads()) - before) == 1
    assert len(upstream.messages) == 20
    server.shutdown()
    server.server_close()
    wait_until(lambda: not set(session_threads()) - before)


def test_at_most_spare_threads_wait_and_idle_ones_end(upstream):
    server = pooled_server(upstream, spare_threads=3, thread_idle_time=0.5)
    port = server.server_address[1]
    before = set(session_threads())
    clients = [RawClient(port) for _ in range(8)]      # 8 at once
    wait_until(lambda: len(set(session_threads()) - before) == 8)
    for client in clients:
        client.cmd("QUIT")
        client.close()
    wait_until(lambda: len(set(session_threads()) - before) == 3)
    assert server._session_threads.idle == 3
    # Unused for thread_idle_time: they end too.
    wait_until(lambda: not set(session_threads()) - before)
    assert server._session_threads.idle == 0
    one_session(port)                   # and a client still gets a thread
    assert len(upstream.messages) == 1
    server.shutdown()
    server.server_close()


def test_a_thread_reused_after_misbehaving_clients_serves_the_next_afresh(
        upstream):
    """One spare thread serves, one after the other: a client that
    smuggles a second message behind a bare LF, one that sends a line too
    long in its data, one that vanishes in the middle of its data, one
    that goes silent until its deadline; then a well-behaved client on the
    same thread gets its own session: its name, its sender, its message
    alone, and nothing of the others reaches the upstream."""
    server = pooled_server(upstream, spare_threads=1)
    server.RequestHandlerClass.inactivity_timeout = 1
    port = server.server_address[1]
    before = set(session_threads())

    def hostile(helo, sender, then):
        client = RawClient(port)
        assert client.cmd("EHLO %s" % helo)[0] == 250
        assert client.cmd("MAIL FROM:<%s>" % sender)[0] == 250
        assert client.cmd("RCPT TO:<bad@example.org>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        then(client)
        client.close()
        wait_until(lambda: not server.sessions and
                   server._session_threads.idle == 1,
                   what="the thread to wait for the next client")

    def smuggles(client):
        client.send(b"Subject: one\r\n\r\nx\n.\r\nMAIL FROM:<s@evil>\r\n"
                    b"RCPT TO:<bad@example.org>\r\nDATA\r\nhidden\r\n"
                    b".\r\n")
        assert client.reply()[0] == 550

    def too_long(client):
        client.send(b"Subject: two\r\n\r\n" + b"x" * 2000 + b"\r\n.\r\n")
        assert client.reply()[0] == 552

    def vanishes(client):
        client.send(b"Subject: three\r\n\r\nhalf a mess")

    def silent(client):
        assert client.reply()[0] == 421     # its deadline

    for number, then in enumerate((smuggles, too_long, vanishes, silent)):
        hostile("evil%d.example" % number, "evil%d@example.net" % number,
                then)
    client = smtplib.SMTP("127.0.0.1", port, timeout=10,
                          local_hostname="good.example")
    client.sendmail("good@example.net", ["b@example.org"],
                    b"Subject: good\r\n\r\nfine\r\n")
    client.quit()
    wait_until(lambda: not server.sessions, what="the session to end")
    # One thread served them all.
    assert len(set(session_threads()) - before) == 1
    [message] = upstream.messages
    assert (message.mail_from, message.rcpt_tos) == (
        "good@example.net", ["b@example.org"])
    assert message.content.endswith(b"Subject: good\r\n\r\nfine\r\n")
    assert b"evil" not in message.content
    assert b"hidden" not in message.content
    server.shutdown()
    server.server_close()


def test_the_stop_ends_the_waiting_threads(upstream):
    server = pooled_server(upstream)
    before = set(session_threads())
    one_session(server.server_address[1])
    wait_until(lambda: server._session_threads.idle == 1)
    server.shutdown()
    assert server.stop(grace_period=1) == 0
    wait_until(lambda: not set(session_threads()) - before)

"""STARTTLS on both sides (issue 5): towards clients with tls_cert and
tls_key, towards the upstream per upstream_tls.  Certificates are made at
test time with the openssl command (conftest.Certificates)."""

import logging
import os
import pwd
import shutil
import smtplib
import ssl
import subprocess
import sys
import time

import pytest

from conftest import HERE, ROOT, ProxyFactory, RawClient, Upstream
import smtpproxy

MESSAGE = b"Subject: test\r\n\r\nbody\r\n"




def keywords(text):
    return [line.split(" ")[0] for line in text.split("\n")[1:]]


def tls_client(port, certificates, pipelined=b""):
    """A raw client that says EHLO, then STARTTLS (and ``pipelined`` in the
    same packet), and returns with the TLS socket in place."""
    client = RawClient(port)
    code, text = client.cmd("EHLO client.example.net")
    assert "STARTTLS" in keywords(text)
    client.send(b"STARTTLS\r\n" + pipelined)
    assert client.reply()[0] == 220
    client.sock = certificates.client_context().wrap_socket(
        client.sock, server_hostname="localhost")
    client.file = client.sock.makefile("rb")
    return client


def test_a_client_delivers_over_tls(tls_proxy, certificates, upstream):
    port = tls_proxy()
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example.net")
        assert client.has_extn("starttls")
        client.starttls(context=certificates.client_context())
        # RFC 3207: smtplib says EHLO again; STARTTLS is not offered twice.
        client.ehlo("client.example.net")
        assert not client.has_extn("starttls")
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    [message] = upstream.messages
    assert message.content == MESSAGE


def test_commands_pipelined_after_starttls_are_thrown_away(
        tls_proxy, certificates, upstream, caplog):
    port = tls_proxy()
    client = tls_client(port, certificates, pipelined=(
        b"EHLO evil.example\r\nMAIL FROM:<evil@example.net>\r\n"))
    # After the handshake: the injected EHLO and MAIL were not executed.
    assert client.cmd("EHLO client.example.net")[0] == 250
    code, text = client.cmd("RCPT TO:<b@example.org>")
    assert code == 503 and "Sender not yet given" in text
    client.close()
    assert upstream.handler.commands == []
    assert any("sent commands after STARTTLS" in record.getMessage()
               for record in caplog.records)


def test_the_session_begins_again_after_tls(tls_proxy, certificates):
    port = tls_proxy()
    client = tls_client(port, certificates)
    # HELO/EHLO from before TLS no longer counts.
    code, text = client.cmd("MAIL FROM:<a@example.net>")
    assert code == 503 and "hello first" in text
    code, text = client.cmd("EHLO client.example.net")
    assert code == 250 and "STARTTLS" not in keywords(text)
    assert client.cmd("STARTTLS")[0] == 503          # already TLS
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    client.close()


def test_starttls_refused_when_not_offered_or_in_a_transaction(
        tls_proxy, proxy):
    plain = RawClient(proxy())
    code, text = plain.cmd("EHLO client.example.net")
    assert "STARTTLS" not in keywords(text)
    assert plain.cmd("STARTTLS")[0] == 503
    plain.close()
    client = RawClient(tls_proxy())
    assert client.cmd("STARTTLS")[0] == 503          # no EHLO yet
    client.cmd("HELO client.example.net")
    code, text = client.cmd("STARTTLS")              # HELO offers nothing
    assert code == 503 and "not offered" in text
    client.cmd("EHLO client.example.net")
    assert client.cmd("STARTTLS now")[0] == 501
    client.cmd("MAIL FROM:<a@example.net>")
    assert client.cmd("STARTTLS")[0] == 503          # transaction open
    client.close()


def test_tls_required_refuses_mail_before_starttls(tls_proxy, certificates,
                                                   upstream):
    port = tls_proxy(tls_required=True)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    code, text = client.cmd("MAIL FROM:<a@example.net>")
    assert code == 530 and text.startswith("5.7.0 ")
    client.close()
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.starttls(context=certificates.client_context())
        client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    assert len(upstream.messages) == 1


def test_a_failed_handshake_closes_that_session_only(tls_proxy):
    port = tls_proxy()
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("STARTTLS")[0] == 220
    client.send(b"this is not a TLS client hello\r\n" * 10)
    # At most a TLS alert, then the end: no SMTP reply in plain text.
    received = b""
    try:
        while True:
            data = client.sock.recv(4096)
            if not data:
                break
            received += data
    except ConnectionResetError:
        pass
    assert not received.startswith((b"2", b"4", b"5"))
    client.close()
    other = RawClient(port)
    assert other.cmd("EHLO client.example.net")[0] == 250
    other.close()


def test_clients_cannot_renegotiate(certificates):
    context = smtpproxy.tls_server_context(certificates.cert,
                                           certificates.key)
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):         # Python 3.7 and later
        assert context.options & ssl.OP_NO_RENEGOTIATION


@pytest.mark.parametrize("make", ["server", "client"])
def test_tls_1_2_at_least_on_both_sides(certificates, make):
    if make == "server":
        context = smtpproxy.tls_server_context(certificates.cert,
                                               certificates.key)
    else:
        context = smtpproxy.tls_client_context()
    if hasattr(ssl, "TLSVersion"):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    else:
        assert context.options & ssl.OP_NO_TLSv1
        assert context.options & ssl.OP_NO_TLSv1_1


def test_a_tls_session_is_closed_with_421_when_the_server_stops(
        tls_proxy, certificates, proxy):
    port = tls_proxy()
    client = tls_client(port, certificates)
    assert client.cmd("EHLO client.example.net")[0] == 250
    server = proxy.servers[-1]
    server.shutdown()
    assert server.stop(grace_period=0) == 0
    code, text = client.reply()
    assert code == 421 and text.startswith("4.3.2 ")
    client.close()


def test_no_inactivity_timeout_still_waits_for_the_handshake(
        tls_proxy, certificates, upstream):
    # inactivity_timeout = 0 is no limit (a kernel timeout of 0), not a
    # non-blocking socket that gives up on a handshake not there yet.
    port = tls_proxy(inactivity_timeout=0)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("STARTTLS")[0] == 220
    time.sleep(0.3)             # a client slow to start its handshake
    client.sock = certificates.client_context().wrap_socket(
        client.sock, server_hostname="localhost")
    client.file = client.sock.makefile("rb")
    assert client.cmd("EHLO client.example.net")[0] == 250
    client.close()


def test_a_client_silent_in_the_handshake_is_dropped(tls_proxy):
    port = tls_proxy(inactivity_timeout=1)
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("STARTTLS")[0] == 220
    # No ClientHello: the handshake waits inactivity_timeout, not forever.
    assert client.sock.recv(100) == b""
    client.close()


def test_a_client_in_the_handshake_is_closed_when_the_server_stops(
        tls_proxy, proxy):
    port = tls_proxy()
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    assert client.cmd("STARTTLS")[0] == 220
    server = proxy.servers[-1]
    server.shutdown()
    assert server.stop(grace_period=0) == 0
    assert client.sock.recv(100) == b""
    client.close()


def test_a_silent_tls_client_times_out_with_421(tls_proxy, certificates):
    port = tls_proxy(inactivity_timeout=1)
    client = tls_client(port, certificates)
    code, text = client.reply()
    assert code == 421 and text.startswith("4.4.2 ")
    client.close()


def test_an_unusable_certificate_stops_the_start(tmp_path, certificates):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"),
         "--listen", "127.0.0.1:1", "-o", "run_as_root=yes",
         "-o", "greylist_log=", "--class", "smtpproxy.ConcreteMailHandler",
         "-o", "tls_cert=%s" % certificates.cert,
         "-o", "tls_key=%s" % certificates.path("ca.key")],     # not its key
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, env=env, cwd=str(tmp_path), timeout=30)
    assert result.returncode == 2
    assert "tls_cert %s" % certificates.cert in result.stderr


# -- towards the upstream ------------------------------------------------------

@pytest.fixture
def tls_upstream(certificates):
    server = Upstream(tls_context=certificates.server_context())
    yield server
    server.stop()


def first_rcpt(port):
    """The reply to a first RCPT, which opens the upstream session."""
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    client.cmd("MAIL FROM:<a@example.net>")
    reply = client.cmd("RCPT TO:<b@example.org>")
    client.close()
    return reply


def deliver(port):
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@example.net", ["b@example.org"], MESSAGE)


@pytest.fixture
def upstream_proxy(tls_upstream):
    factory = ProxyFactory(tls_upstream)
    yield factory
    factory.stop()


def test_opportunistic_tls_with_the_upstream_by_default(tls_upstream,
                                                        upstream_proxy):
    deliver(upstream_proxy())
    [message] = tls_upstream.messages
    assert message.tls


def test_upstream_tls_no_stays_plain(tls_upstream, upstream_proxy):
    deliver(upstream_proxy(upstream_tls="no"))
    [message] = tls_upstream.messages
    assert not message.tls


def test_upstream_tls_required_without_starttls_gives_451(proxy, upstream):
    code, text = first_rcpt(proxy(upstream_tls="required"))
    assert code == 451 and text.startswith("4.7.5 ")
    assert upstream.handler.commands == []


def test_verified_upstream_certificate(tls_upstream, upstream_proxy,
                                       certificates):
    deliver(upstream_proxy(upstream_tls="required", upstream_tls_verify=True,
                           upstream_tls_ca=certificates.ca))
    assert tls_upstream.messages[0].tls


def test_unverified_certificate_required_gives_451(
        tls_upstream, upstream_proxy, certificates):
    code, text = first_rcpt(upstream_proxy(
        upstream_tls="required", upstream_tls_verify=True,
        upstream_tls_ca=certificates.other_ca))
    assert code == 451 and text.startswith("4.7.5 ")
    assert tls_upstream.messages == []


def test_wrong_name_required_gives_451(tls_upstream, upstream_proxy,
                                       certificates):
    code, text = first_rcpt(upstream_proxy(
        upstream_tls="required", upstream_tls_verify=True,
        upstream_tls_ca=certificates.ca,
        upstream_tls_name="mail.example.com"))
    assert code == 451 and text.startswith("4.7.5 ")
    assert tls_upstream.messages == []


def test_the_relay_uses_the_context_of_the_upstream_tls_context_hook(
        tls_upstream, upstream_proxy, certificates):
    """upstream_tls_context() is a hook: its context, which here trusts
    another authority only, is the one the STARTTLS with the upstream
    uses, whatever upstream_tls_verify says."""
    code, text = first_rcpt(upstream_proxy(
        upstream_tls="required",
        upstream_tls_context=lambda self: smtpproxy.tls_client_context(
            True, certificates.other_ca)))
    assert code == 451 and text.startswith("4.7.5 ")
    assert tls_upstream.messages == []


def test_opportunistic_falls_back_to_plain_when_tls_fails(
        tls_upstream, upstream_proxy, certificates, caplog):
    caplog.set_level(logging.WARNING, logger="smtpproxy")
    deliver(upstream_proxy(upstream_tls_verify=True,
                           upstream_tls_ca=certificates.other_ca))
    [message] = tls_upstream.messages
    assert not message.tls
    assert any("going on without TLS" in record.getMessage()
               for record in caplog.records)


def test_no_upstream_timeout_with_tls(tls_upstream, upstream_proxy):
    # upstream_timeout = 0: no limit, for the connection and the handshake.
    deliver(upstream_proxy(upstream_timeout=0))
    [message] = tls_upstream.messages
    assert message.tls


def test_verification_without_required_is_warned_about(proxy_process,
                                                       tmp_path):
    service_log = tmp_path / "service.log"
    proxy_process(config="log_file = %s\nupstream_tls_verify = yes\n"
                  % service_log)
    with open(str(service_log)) as log_file:
        assert ("upstream_tls_verify without upstream_tls = required"
                in log_file.read())


def test_tls_both_sides(tls_upstream, upstream_proxy, certificates):
    port = upstream_proxy(tls_cert=certificates.cert,
                          tls_key=certificates.key)
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.starttls(context=certificates.client_context())
        client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    assert tls_upstream.messages[0].tls


def test_starttls_is_offered_as_keyword(tls_proxy):
    client = RawClient(tls_proxy())
    code, text = client.cmd("EHLO client.example.net")
    assert keywords(text)[-1] == "STARTTLS"
    client.close()
    # Nothing is offered by default.
    assert smtpproxy.ConcreteMailHandler.tls_cert == ""


def test_a_certificate_gone_after_ehlo_gives_454(tls_proxy, certificates,
                                                 tmp_path):
    cert = str(tmp_path / "cert.pem")
    shutil.copy(certificates.cert, cert)
    port = tls_proxy(tls_cert=cert)
    client = RawClient(port)
    code, text = client.cmd("EHLO client.example.net")
    assert "STARTTLS" in keywords(text)
    os.unlink(cert)
    code, text = client.cmd("STARTTLS")
    assert code == 454 and text.startswith("4.7.0 ")
    # Not offered any more, and the session goes on in plain text.
    code, text = client.cmd("EHLO client.example.net")
    assert code == 250 and "STARTTLS" not in keywords(text)
    client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="serving as nobody needs root")
def test_a_key_only_root_can_read_serves_after_the_switch_to_a_user(
        proxy_process, certificates, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)           # like /etc/ssl/private
    for name in ("server.pem", "server.key"):
        shutil.copy(certificates.path(name), str(private / name))
        os.chmod(str(private / name), 0o600)
    process = proxy_process(config="user = nobody\ntls_cert = %s\n"
                            "tls_key = %s\n" % (private / "server.pem",
                                                private / "server.key"))
    with open("/proc/%d/status" % process.process.pid) as status:
        assert "Uid:\t%d\t" % pwd.getpwnam("nobody").pw_uid in status.read()
    client = tls_client(process.port, certificates)
    assert client.cmd("EHLO client.example.net")[0] == 250
    client.close()

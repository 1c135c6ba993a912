"""Test fixtures: a real upstream SMTP server (aiosmtpd), the proxy, clients.

The upstream runs in an asyncio loop on a thread of its own; the proxy runs
in-process (SMTPProxyServer in a thread) or as a subprocess of the command
line.  Nothing sleeps to wait for a server: each fixture polls until ready.
After every test the process-wide registries are reset (fixture
``fresh_registries``): no test sees what another left behind.

A test goes in the file of the feature it specifies; tests/test_hostile.py
and tests/test_smuggling.py are the exceptions: their axis is the adversary.
"""

import asyncio
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest
from aiosmtpd.smtp import SMTP

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import smtpproxy  # noqa: E402
from helpers import free_port  # noqa: E402
from plainproxy import AcceptAll  # noqa: E402
from pg import PostgreSQL  # noqa: E402
# A private, real Postfix (fixture postfix_factory), as the upstream of the
# XCLIENT tests.
pytest_plugins = ["postfix"]

# The PostgreSQL drivers the store is tested with: both wherever they
# install (psycopg 3 needs Python 3.7).  CI installs them (tox.ini); one
# missing is an error of the tests that use it, never a skip.
PG_DRIVERS = ["psycopg2"] + (["psycopg"] if sys.version_info >= (3, 7)
                             else [])


@pytest.fixture(autouse=True)
def fresh_registries():
    """What a test left in the process is gone before the next one: the
    registries (stores closed, the networks' new triplets, list files,
    DNS list answers, TLS contexts, upstream capabilities, pooled upstream
    sessions, errors logged once: smtpproxy.reset_registries()), and the
    networks a lookup timed out for, which would otherwise stay without
    names for a minute (LookupThreads.silent())."""
    yield
    smtpproxy.reset_registries()
    smtpproxy.lookup_threads.forget_timeouts()


@pytest.fixture
def engine(tmp_path):
    """``engine(**keys)``: a Greylister of a GreyListingPolicy subclass
    with these keys, for example.org, on a store of its own."""
    def make(**keys):
        keys.setdefault("allowed_domains", ["example.org"])
        keys.setdefault("greylist_db", str(tmp_path / "engine.db"))
        settings = type("Settings", (smtpproxy.GreyListingPolicy,), keys)
        return smtpproxy.Greylister(settings)
    return make


@pytest.fixture(scope="session")
def postgresql():
    """A private PostgreSQL cluster (tests/pg.py), one for the session."""
    cluster = PostgreSQL()
    yield cluster
    cluster.close()


@pytest.fixture
def pg_uri(postgresql):
    """The URI of a new, empty database of the private cluster."""
    return postgresql.database()


def read(path):
    """The text of the file ``path``; "" if there is none (yet)."""
    try:
        with open(str(path)) as text:
            return text.read()
    except OSError:
        return ""


def processes_where(field, value, zombies=True):
    """The pids of the processes whose /proc/PID/stat field number
    ``field`` (after the command: 0 state, 1 parent, 3 session) is
    ``value``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IOError):
            continue                # gone meanwhile
        if int(fields[field]) == value and (zombies or fields[0] != "Z"):
            pids.append(int(name))
    return sorted(pids)


def rcpt_code(port, recipient="b@example.org", sender="a@example.net",
              helo="EHLO client.example.net"):
    """The reply code to RCPT of a new session that says ``helo`` and
    MAIL FROM ``sender``; the session is then closed."""
    client = RawClient(port)
    client.cmd(helo)
    client.cmd("MAIL FROM:<%s>" % sender)
    code = client.cmd("RCPT TO:<%s>" % recipient)[0]
    client.close()
    return code


def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.01)


class Message(object):
    def __init__(self, mail_from, rcpt_tos, content, mail_options,
                 tls=False):
        self.mail_from = mail_from
        self.rcpt_tos = rcpt_tos
        self.content = content
        self.mail_options = mail_options
        self.tls = tls              # it came over TLS


class RecordingHandler(object):
    """aiosmtpd handler recording what arrives, with knobs for failures.

    reject       recipient -> reply for its RCPT
    delay        command ("RCPT", "DATA" for the reply to the final dot)
                 -> seconds to wait before answering
    drop         command at which to close the connection instead of
                 answering ("RCPT", "DATA")
    data_reply   the reply to the final dot
    hide         EHLO keywords to leave out of its EHLO reply (aiosmtpd's,
                 and ENHANCEDSTATUSCODES, which this handler adds)
    """

    def __init__(self):
        self.messages = []
        self.commands = []
        self.reject = {}
        self.delay = {}
        self.drop = set()
        self.data_reply = "250 2.0.0 Ok: queued as TEST1"
        self.hide = set()
        self.ehlos = []

    async def handle_EHLO(self, server, session, envelope, hostname,
                          responses):
        session.host_name = hostname
        self.ehlos.append(hostname)
        # Its replies to MAIL, RCPT and the data have enhanced codes, as
        # Postfix's do: it says so, as Postfix does.
        lines = [line[4:] for line in responses + ["250 ENHANCEDSTATUSCODES"]
                 if line[4:].split(" ")[0].upper() not in self.hide]
        return ["250%s%s" % ("-" if number < len(lines) - 1 else " ", line)
                for number, line in enumerate(lines)]

    async def _maybe_wait(self, command):
        if self.delay.get(command):
            await asyncio.sleep(self.delay[command])

    async def handle_MAIL(self, server, session, envelope, address,
                          mail_options):
        self.commands.append(("MAIL", address, list(mail_options)))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address,
                          rcpt_options):
        self.commands.append(("RCPT", address))
        await self._maybe_wait("RCPT")
        if "RCPT" in self.drop:
            server.transport.close()
            return "421 dropped"
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        await self._maybe_wait("DATA")
        if "DATA" in self.drop:
            server.transport.close()
            return "421 dropped"
        self.messages.append(Message(envelope.mail_from,
                                     list(envelope.rcpt_tos),
                                     envelope.original_content,
                                     list(envelope.mail_options),
                                     tls=session.ssl is not None))
        return self.data_reply

    async def handle_RSET(self, server, session, envelope):
        self.commands.append(("RSET",))
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server, session, envelope):
        self.commands.append(("QUIT",))
        return "221 2.0.0 Bye"


class Upstream(object):
    """A real SMTP server (aiosmtpd) on 127.0.0.1, port chosen by the OS."""

    def __init__(self, handler=None, host="127.0.0.1", **smtp_options):
        self.handler = handler or RecordingHandler()
        self.connections = 0
        self.open_connections = 0
        smtp_options.setdefault("data_size_limit", None)
        self.loop = asyncio.new_event_loop()
        upstream = self

        class CountingSMTP(SMTP):
            def connection_made(self, transport):
                upstream.connections += 1
                upstream.open_connections += 1
                SMTP.connection_made(self, transport)

            def connection_lost(self, error):
                upstream.open_connections -= 1
                SMTP.connection_lost(self, error)

        def factory():
            return CountingSMTP(self.handler, loop=self.loop, **smtp_options)

        self.server = self.loop.run_until_complete(
            self.loop.create_server(factory, host, 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.daemon = True
        self.thread.start()

    @property
    def messages(self):
        return self.handler.messages

    def forget_probe(self, probes=0):
        """Once the sessions that asked for our extensions have ended,
        count from zero again: at least ``probes`` of them (one per
        serving process of a proxy: ProxyProcess.probes; an in-process
        proxy's may have failed before it was counted)."""
        wait_until(lambda: self.connections >= probes
                   and self.open_connections == 0,
                   what="the probe sessions to end")
        self.connections = 0
        del self.handler.commands[:]

    def stop(self):
        async def cancel_sessions():
            self.server.close()
            current = _current_task(self.loop)
            tasks = [task for task in _all_tasks(self.loop)
                     if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(cancel_sessions(),
                                         self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _all_tasks(loop):
    if hasattr(asyncio, "all_tasks"):
        return asyncio.all_tasks(loop)
    return asyncio.Task.all_tasks(loop)          # Python 3.6


def _current_task(loop):
    if hasattr(asyncio, "current_task"):
        return asyncio.current_task(loop)
    return asyncio.Task.current_task(loop)       # Python 3.6


class RawUpstream(socketserver.ThreadingTCPServer):
    """A minimal SMTP server that records the raw bytes of each DATA and
    reads its end the way a lax server does (Postfix before 3.9 with
    smtpd_forbid_bare_newline = no): any line "." ended by LF.

    ``raw`` collects every byte received after each 354; ``messages``
    holds every message the lax reading completed (smuggling succeeded if
    there is more than one, or one where none was expected); ``commands``
    every command line.  ``ehlo`` are the lines of its EHLO reply; it
    answers XCLIENT with ``xclient_reply``, and with ``tls_context`` it
    does STARTTLS (sending ``after_starttls`` right after its 220, in the
    same write: what a hostile server would inject).  ``data_reply``, if
    set, is its refusal of the DATA command; as Postfix, it then keeps the
    transaction open, and refuses a MAIL inside a transaction as nested.
    ``read_pause``: seconds it waits after its 354 before it reads the
    message (a server slow to read).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ehlo=("raw",), tls_context=None):
        self.raw = []
        self.messages = []
        self.commands = []
        self.ehlo = list(ehlo)        # the lines of its EHLO reply
        self.xclient_reply = b"220 raw ESMTP\r\n"
        self.tls_context = tls_context
        self.after_starttls = b""
        self.data_reply = None
        self.read_pause = 0         # seconds after its 354, before reading
        self.tls_sessions = 0
        socketserver.ThreadingTCPServer.__init__(
            self, ("127.0.0.1", 0), self.Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever,
                                       args=(0.05,))
        self.thread.daemon = True
        self.thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()

    def forget_probe(self, probes=1):
        """The probe sessions (EHLO, QUIT; one per serving process) are
        not the test's."""
        wait_until(lambda: self.commands[-1:] == [b"QUIT\r\n"] and
                   self.commands.count(b"QUIT\r\n") >= probes,
                   what="the probe sessions to end")
        del self.commands[:]

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            server = self.server
            self.wfile.write(b"220 raw ESMTP\r\n")
            in_data = False
            in_transaction = False
            message = []
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                if in_data:
                    server.raw.append(line)
                    if line.rstrip(b"\r\n") == b".":
                        server.messages.append(b"".join(message))
                        message = []
                        in_data = False
                        in_transaction = False
                        self.wfile.write(b"250 2.0.0 Ok: queued\r\n")
                    else:
                        message.append(line)
                    continue
                server.commands.append(line)
                verb = line.split(b" ")[0].strip().upper()
                if verb == b"DATA" and server.data_reply:
                    self.wfile.write(server.data_reply)
                elif verb == b"DATA":
                    in_data = True
                    self.wfile.write(b"354 go ahead\r\n")
                    time.sleep(server.read_pause)   # a server slow to read
                elif verb == b"MAIL" and in_transaction:
                    self.wfile.write(b"503 5.5.1 Error: nested MAIL "
                                     b"command\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                elif verb == b"EHLO":
                    in_transaction = False
                    lines = server.ehlo
                    self.wfile.write("".join(
                        "250%s%s\r\n" % ("-" if i < len(lines) - 1 else " ",
                                          line)
                        for i, line in enumerate(lines)).encode())
                elif verb == b"XCLIENT":
                    self.wfile.write(server.xclient_reply)
                elif verb == b"STARTTLS" and server.tls_context:
                    self.wfile.write(b"220 go ahead\r\n"
                                     + server.after_starttls)
                    self.connection = server.tls_context.wrap_socket(
                        self.connection, server_side=True)
                    server.tls_sessions += 1
                    self.rfile = self.connection.makefile("rb")
                    self.wfile = self.connection.makefile("wb", 0)
                else:
                    if verb == b"MAIL":
                        in_transaction = True
                    elif verb in (b"RSET", b"HELO"):
                        in_transaction = False
                    self.wfile.write(b"250 ok\r\n")


class Certificates(object):
    """A test authority and a server certificate it signed, for localhost
    and 127.0.0.1, made with the openssl command; and a second authority
    that signed nothing here."""

    def __init__(self, directory):
        self.directory = directory
        self.ca = self.path("ca.pem")
        self.other_ca = self.path("other-ca.pem")
        self.cert = self.path("server.pem")
        self.key = self.path("server.key")
        for name in ("ca", "other-ca"):
            self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
                         "ec_paramgen_curve:prime256v1", "-nodes",
                         "-keyout", self.path(name + ".key"),
                         "-out", self.path(name + ".pem"), "-days", "2",
                         "-subj", "/CN=smtpproxy test %s" % name,
                         "-addext", "basicConstraints=critical,CA:TRUE",
                         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                         "-addext", "subjectKeyIdentifier=hash")
        self.openssl("req", "-newkey", "ec", "-pkeyopt",
                     "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", self.key, "-out", self.path("server.csr"),
                     "-subj", "/CN=localhost")
        with open(self.path("server.ext"), "w") as extensions:
            extensions.write(
                "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
                "extendedKeyUsage = serverAuth\n"
                "keyUsage = critical, digitalSignature\n"
                "basicConstraints = critical, CA:FALSE\n"
                "subjectKeyIdentifier = hash\n"
                "authorityKeyIdentifier = keyid, issuer\n")
        self.openssl("x509", "-req", "-in", self.path("server.csr"),
                     "-CA", self.ca, "-CAkey", self.path("ca.key"),
                     "-CAcreateserial", "-out", self.cert, "-days", "2",
                     "-extfile", self.path("server.ext"))

    def path(self, name):
        return os.path.join(self.directory, name)

    def openssl(self, *args):
        result = subprocess.run(("openssl",) + args, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert result.returncode == 0, result.stdout.decode()

    def server_context(self):
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self):
        """What a client that trusts the test authority uses."""
        import ssl
        return ssl.create_default_context(cafile=self.ca)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    return Certificates(str(tmp_path_factory.mktemp("certificates")))


@pytest.fixture
def tls_proxy(proxy, certificates):
    """``port = tls_proxy(**attributes)``: a proxy offering STARTTLS."""
    def start(**attributes):
        attributes.setdefault("tls_cert", certificates.cert)
        attributes.setdefault("tls_key", certificates.key)
        return proxy(**attributes)
    return start


def greeted(client):
    """``client`` if it was greeted with 220, else None (closed)."""
    if client.greeting[0] == 220:
        return client
    client.close()
    return None


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture
def upstream_v6():
    server = Upstream(host="::1")
    yield server
    server.stop()


@pytest.fixture
def raw_upstream():
    server = RawUpstream()
    yield server
    server.stop()


class ProxyFactory(object):
    """Starts proxies in front of ``upstream`` (an Upstream or RawUpstream).

    Each proxy learns the upstream's extensions before it serves, as the
    command line's proxy does at its start; the upstream's counters and
    command list then start again from zero, so that a test sees only
    what its own sessions caused.
    """

    def __init__(self, upstream):
        self.upstream = upstream
        self.servers = []

    def __call__(self, handler=AcceptAll, host="127.0.0.1", **attributes):
        attributes.setdefault("smtp_ip", "127.0.0.1")
        attributes.setdefault("smtp_port", self.upstream.port)
        attributes.setdefault("inactivity_timeout", 10)
        attributes.setdefault("upstream_timeout", 10)
        handler_class = type("Test" + handler.__name__, (handler,),
                             attributes)
        if handler_class.smtp_port == self.upstream.port:
            # Warm sessions of the proxies started before (closed with
            # QUIT) would keep the probe from looking like the last one;
            # a session still ending would pool its own after the reset.
            self.wait_idle()
            smtpproxy.upstream_pool.reset()
            handler_class.learn_upstream()
            forget = getattr(self.upstream, "forget_probe", None)
            if forget is not None:
                forget()
        server = smtpproxy.SMTPProxyServer((host, 0), handler_class)
        thread = threading.Thread(target=server.serve_forever,
                                  args=(0.05,))
        thread.daemon = True
        thread.start()
        self.servers.append(server)
        return server.server_address[1]

    def wait_idle(self):
        """Wait until no session of these proxies is open: each session
        thread has written its lines and let go of its upstream session
        (closed it, or left it in the pool for the next client)."""
        wait_until(lambda: not any(server.sessions for server in self.servers),
                   what="the proxy's sessions to end")

    def stop(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def proxy(upstream):
    """Start a proxy in front of ``upstream``: ``port = proxy(**attrs)``."""
    factory = ProxyFactory(upstream)
    yield factory
    factory.stop()


@pytest.fixture
def raw_proxy(raw_upstream):
    """Start a proxy in front of ``raw_upstream``."""
    factory = ProxyFactory(raw_upstream)
    yield factory
    factory.stop()


class RawClient(object):
    """An SMTP client on a raw socket, for what smtplib will not send."""

    def __init__(self, port, host="127.0.0.1", timeout=15, greet=True,
                 source=None, first=b""):
        """Connect (from address ``source``, if given), send ``first`` (a
        PROXY protocol header, say) and read the greeting."""
        self.sock = socket.create_connection(
            (host, port), timeout,
            source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")
        if first:
            self.send(first)
        if greet:
            self.greeting = self.reply()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def reply(self):
        """Read one reply: ``(code, text)``, lines joined by newlines;
        ``(None, "")`` if the connection closed instead."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return None, "\n".join(lines)
            assert line.endswith(b"\r\n"), line
            match = re.match(br"([0-9]{3})([ -])(.*)\r\n", line)
            assert match, line
            lines.append(match.group(3).decode("ascii"))
            if match.group(2) == b" ":
                return int(match.group(1)), "\n".join(lines)

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def is_closed(self):
        """True if the server has closed the connection (EOF)."""
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.file.close()
        self.sock.close()


def open_transaction(client, sender="a@example.net",
                     recipients=("b@example.org",),
                     helo="client.example.net", data=True):
    """EHLO, MAIL and each RCPT, every one answered 250, then (with
    ``data``) DATA answered 354: the client is in the message."""
    assert client.cmd("EHLO " + helo)[0] == 250
    assert client.cmd("MAIL FROM:<%s>" % sender)[0] == 250
    for recipient in recipients:
        assert client.cmd("RCPT TO:<%s>" % recipient)[0] == 250
    if data:
        reply = client.cmd("DATA")
        assert reply[0] == 354, reply


@pytest.fixture
def client_factory():
    clients = []

    def connect(port, **kwargs):
        client = RawClient(port, **kwargs)
        clients.append(client)
        return client
    yield connect
    for client in clients:
        client.close()


def vm_value(pid, field):
    """A VmRSS/VmHWM figure of /proc/PID/status, in bytes."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class ProxyProcess(object):
    """smtpproxy.py run from its command line, as a subprocess."""

    def __init__(self, tmp_path, upstream_port, config="", args=(),
                 handler="plainproxy.AcceptAll", files=None, ready=None):
        """With ``files``, the process may open that many descriptors at
        most (its RLIMIT_NOFILE, set before smtpproxy.py runs).  It is
        ready when it answers SMTP, or when ``ready()`` is true."""
        self.port = free_port()
        # Each serving process asks the upstream for its extensions as it
        # starts (a worker of workers = auto, or N; the single process).
        workers = re.findall(r"(?m)^\s*workers\s*=\s*(\S+)", config)
        for flag, value in zip(args, list(args)[1:]):
            if flag == "--workers":
                workers.append(value)
            elif flag == "-o" and value.startswith("workers="):
                workers.append(value.split("=", 1)[1])
        value = workers[-1] if workers else "auto"
        self.probes = smtpproxy.worker_count(
            {"workers": value if value == "auto" else int(value)})
        self.config_path = str(tmp_path / "smtpproxy.conf")
        with open(self.config_path, "w") as config_file:
            config_file.write("greylist_log = %s\n"
                              % (tmp_path / "greylist.log"))
            config_file.write(config)
            if os.geteuid() == 0:
                # Tests run as root on the CI machines.
                config_file.write("\nrun_as_root = yes\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT])
        # A file, not a pipe that nobody reads: a proxy that logs much to
        # its standard error would block once the pipe is full.
        self.stderr_path = str(tmp_path / ("stderr-%d.txt" % self.port))
        self.stderr = open(self.stderr_path, "wb")
        python = [sys.executable]
        if files is not None:
            python += ["-c", "import os, resource, sys; "
                       "resource.setrlimit(resource.RLIMIT_NOFILE, "
                       "(%d, %d)); os.execv(sys.executable, "
                       "[sys.executable] + sys.argv[1:])" % (files, files)]
        self.process = subprocess.Popen(
            python + [os.path.join(ROOT, "smtpproxy.py"),
                      "--config", self.config_path,
                      "--listen", "127.0.0.1:%d" % self.port,
                      "--upstream", "127.0.0.1:%d" % upstream_port]
            + (["--class", handler] if handler else []) + list(args),
            env=env, stderr=self.stderr, cwd=str(tmp_path))
        wait_until(self._answers if ready is None else self._running(ready),
                   what="the proxy to listen")

    def _running(self, ready):
        def check():
            if self.process.poll() is not None:
                raise AssertionError("proxy exited: %s" % self.stderr_text())
            return ready()
        return check

    def _answers(self):
        if self.process.poll() is not None:
            raise AssertionError("proxy exited: %s" % self.stderr_text())
        try:
            probe = RawClient(self.port, timeout=5)
        except OSError:
            return False
        probe.cmd("QUIT")
        probe.close()
        return True

    def rss(self):
        """The resident memory now; the peak (peak_rss()) starts again
        from it, so that what the start-up took (compiling the module,
        more on older interpreters) is not counted against a test."""
        with open("/proc/%d/clear_refs" % self.process.pid, "w") as refs:
            refs.write("5")             # resets VmHWM (Linux 4.0)
        return vm_value(self.process.pid, "VmRSS")

    def peak_rss(self):
        return vm_value(self.process.pid, "VmHWM")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()

    def stderr_text(self):
        """What the proxy wrote to its standard error so far."""
        with open(self.stderr_path, "rb") as stderr:
            return stderr.read().decode("utf-8", "replace")


@pytest.fixture
def proxy_process(tmp_path, upstream):
    processes = []

    def start(**kwargs):
        kwargs.setdefault("upstream_port", upstream.port)
        process = ProxyProcess(tmp_path, **kwargs)
        processes.append(process)
        if kwargs["upstream_port"] == upstream.port:
            # It asked the upstream for its extensions as it started.
            upstream.forget_probe(process.probes)
        return process
    yield start
    for process in processes:
        process.stop()

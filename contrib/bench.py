#!/usr/bin/env python3
"""Throughput and memory benchmark for smtpproxy.

Usage (from the repository root)::

    python3 contrib/bench.py                 # full run (a minute or two)
    python3 contrib/bench.py --quick         # smoke run (some seconds)
    python3 contrib/bench.py --aiosmtpd-python /path/to/venv/bin/python

Requirements: Postfix's ``smtp-source`` (load generator) and ``smtp-sink``
(upstream server that discards mail), Debian package ``postfix``.  They are
looked up on PATH and in /usr/sbin.  Optional: aiosmtpd, installed for the
interpreter given by ``--aiosmtpd-python`` (default: the interpreter running
this script); without it the aiosmtpd comparison is reported as skipped.

All traffic stays on 127.0.0.1 (ports chosen by the kernel); every process
started is stopped at the end.  What is measured:

1. Throughput.  ``smtp-source`` sends ``--messages`` messages of ``--size``
   bytes over ``--sessions`` parallel SMTP sessions, in two columns: one
   message per connection (what an MX mostly sees), and many per
   connection (``smtp-source -d``); ``--mode one|many`` runs one column.
   Targets, each in front of the same ``smtp-sink``: (a) the sink itself
   (direct), (b) Postfix's before-queue proxy (a private Postfix instance,
   tests/postfix.py, whose smtpd has ``smtpd_proxy_filter`` pointing at
   the sink; as root only), (c) smtpproxy with its defaults, what an admin
   gets (``workers = auto``: one more than the CPUs, ``spare_threads``
   20, ``upstream_pool_size`` 10), (d) the same greylisting
   (GreyListingPolicy asking its sqlite store at every RCPT, the triplet
   passed beforehand), (e) and (f) the same two "tuned": the speed keys
   of the README turned up (``workers`` = ``--workers``, 4 by default,
   ``spare_threads`` 50, ``upstream_pool_size`` 20), (g) aiosmtpd's
   ``Proxy`` handler.  ``--targets direct,postfix,...`` runs some of them.
   Each target gets one untimed warm-up run, then ``--repeat`` timed runs;
   the best is printed with its share of direct and of Postfix, and the
   CPU time per message of the target's processes (smtpproxy's workers
   and Postfix's daemons included).  After every run the sink's own
   counters (``smtp-sink -c``) must show exactly the number of messages
   sent, so a proxy that drops mail cannot look fast.  Then a single
   session's latency per transaction (MAIL to the reply to the dot; p50,
   p99, and what the proxy adds to direct), and the greylisting store's
   decision latency under 50 sessions.

2. Memory of the smtpproxy process (VmRSS and VmHWM = peak RSS, from
   /proc/PID/status) on a fresh proxy: idle after start, after one 1 MB
   message, after one ``--big-size`` MB message (default 100, streamed by
   this script in 64 KB chunks of 76-character CRLF lines, so the client
   never holds the message), and while ``--idle-sessions`` (default 1000)
   concurrent sessions are open (banner read, EHLO answered, then held).
   The goal is a peak RSS independent of message size.

smtpproxy runs as a subprocess::

    PYTHON REPO/smtpproxy.py --listen 127.0.0.1:P --upstream 127.0.0.1:Q \\
        --class bench.AcceptAll --config TMPFILE

with PYTHONPATH=REPO/contrib:REPO and the temporary directory as working
directory (its transaction log, greylist.log, is written there).
``bench.AcceptAll`` (defined below) accepts every message; the temporary
config file sets ``max_message_size = 200000000`` and ``max_connections``
to more than the idle sessions opened (its default is 500).

3. STARTTLS: ``TLS_SESSIONS`` sessions one after the other, each EHLO,
   STARTTLS, EHLO, QUIT, against a proxy with a self-signed certificate
   (made with the ``openssl`` command), and the same without STARTTLS as
   the baseline.

4. The service, on a fresh proxy with ``max_connections`` set to
   ``--idle-sessions``: that many sessions are opened and held, then
   ``FLOOD_CONNECTIONS`` more connections are made one after the other;
   each must get ``421 4.7.0``.  Printed: refusals per second, the
   process's threads and peak RSS before and after the flood, whether the
   held sessions still answer; then SIGTERM, and the time until every
   held session got ``421 4.3.2`` and the process exited.

Exit status: 0 when every run completed (even if a goal is missed: this is
a benchmark, not a test); 1 when a run failed (messages lost, a server
died or refused a session); 2 when a tool is missing (smtp-source,
smtp-sink or REPO/smtpproxy.py).
"""

import argparse
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import resource
except ImportError:  # pragma: no cover - not on Linux
    resource = None

# The tests' free_port (tests/helpers.py of this checkout, whatever
# --repo names).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'tests'))
from helpers import free_port  # noqa: E402


def _smtpproxy_module():
    """Return the smtpproxy module, reusing it if it runs as __main__.

    smtpproxy.py started as a script lives in sys.modules as '__main__';
    importing it again as 'smtpproxy' would create a second copy of every
    class, so the already running copy is preferred.
    """
    main = sys.modules.get('__main__')
    main_file = getattr(main, '__file__', None) or ''
    if (os.path.basename(main_file) == 'smtpproxy.py'
            and hasattr(main, 'ConcreteMailHandler')):
        return main
    import smtpproxy
    return smtpproxy


if __name__ != '__main__':
    # Imported by smtpproxy (``--class bench.AcceptAll``): define the handler.
    # When bench.py runs as a script smtpproxy is neither needed nor
    # necessarily present, so nothing is imported then.
    try:
        _sp = _smtpproxy_module()
    except ImportError:
        _sp = None
    if _sp is not None:
        class AcceptAll(_sp.ConcreteMailHandler):
            """Handler forwarding every message (the default forwards none)."""

            def shouldWeAcceptMail(self):
                return True


HOST = '127.0.0.1'
MIB = 1024.0 * 1024.0
CHUNK_SIZE = 64 * 1024
LINE_LEN = 76
SMALL_MESSAGE = 1000 * 1000
PROXY_GOAL = 0.50
# max_connections: smtpproxy's default is 500 concurrent clients (50 from
# one address), fewer than the idle-session test opens from 127.0.0.1; both
# are raised to fit the test.  run_as_root: the bench may run as root.
PROXY_CONFIG = ('max_message_size = 200000000\n'
                'max_connections = %d\n'
                'max_connections_per_ip = 0\n'
                'run_as_root = yes\n')
# GreyListingPolicy consulting its store for every recipient: the client
# may not relay and is not auto-whitelisted; its triplet passed beforehand.
GREYLIST_CONFIG = ('allowed_senders:\n'
                   'allowed_domains:\n'
                   '    example.org\n'
                   'auto_whitelist_clients = 0\n'
                   'greylist_db = %s\n')
GREYLIST_KEY = '127.0.0.0/24 from@example.org to@example.org'
# The speed keys (README, "Speed") turned up from their defaults (workers
# = auto, spare_threads = 20, upstream_pool_size = 10).
TUNED_CONFIG = ('workers = %d\n'
                'spare_threads = 50\n'
                'upstream_pool_size = 20\n')
STORE_SESSIONS = 50
STORE_DECISIONS = 200          # per session
STORE_PAUSE = 0.05             # between a session's decisions, when paced
STORE_PACED_DECISIONS = 60     # per session, when paced
MODES = ('one', 'many')
LATENCY_TARGETS = (('direct', 'direct to smtp-sink'),
                   ('postfix', 'Postfix smtpd_proxy_filter'),
                   ('smtpproxy', 'smtpproxy'),
                   ('greylisting', 'smtpproxy greylisting'),
                   ('tuned', 'smtpproxy tuned'),
                   ('greylisting-tuned', 'smtpproxy tuned grey'))
MODE_NAMES = {'one': 'one message per connection',
              'many': 'many messages per connection'}
FLOOD_CONNECTIONS = 5000
TLS_SESSIONS = 500
BANNER_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SMTP_TIMEOUT = 300.0
SINK_SETTLE_TIMEOUT = 15.0

# Started with ``python -c`` to run aiosmtpd's own CLI with its Proxy handler.
# aiosmtpd.handlers.Proxy takes (remote_hostname, remote_port) but has no
# from_cli(), so ``python -m aiosmtpd -c aiosmtpd.handlers.Proxy HOST PORT``
# fails with "Handler class ... takes no arguments" (aiosmtpd 1.4); this adds
# the missing from_cli() and nothing else.
AIOSMTPD_LAUNCHER = '''\
import sys
from aiosmtpd.handlers import Proxy
from aiosmtpd.main import main
if not hasattr(Proxy, "from_cli"):
    Proxy.from_cli = classmethod(
        lambda cls, parser, host, port: cls(host, int(port)))
main(sys.argv[1:])
'''


class BenchError(Exception):
    """A run failed: the benchmark's figures would be meaningless."""


class ToolMissing(Exception):
    """A required program is not installed."""


# ---------------------------------------------------------------- helpers

def find_tool(name):
    path = shutil.which(name)
    if path is None:
        for directory in ('/usr/sbin', '/usr/local/sbin', '/sbin'):
            candidate = os.path.join(directory, name)
            if os.access(candidate, os.X_OK):
                path = candidate
                break
    if path is None:
        raise ToolMissing('%s not found (Debian/Ubuntu: apt-get install '
                          'postfix)' % name)
    return path


def read_reply(fileobj):
    """Read one (possibly multi-line) SMTP reply: (code, [lines])."""
    lines = []
    while True:
        line = fileobj.readline(4096)
        if not line:
            raise BenchError('connection closed while waiting for a reply '
                             '(got so far: %r)' % lines)
        line = line.rstrip(b'\r\n').decode('ascii', 'replace')
        lines.append(line)
        if len(line) < 4 or line[3] != '-':
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise BenchError('malformed SMTP reply: %r' % lines)
    return code, lines


def tail(path, limit=2000):
    try:
        with open(path, 'rb') as fileobj:
            fileobj.seek(0, os.SEEK_END)
            size = fileobj.tell()
            fileobj.seek(max(0, size - limit))
            return fileobj.read().decode('utf-8', 'replace')
    except OSError:
        return ''


class Server(object):
    """A server subprocess whose output goes to a log file."""

    def __init__(self, name, argv, port, logdir, env=None, cwd=None):
        self.name = name
        self.argv = argv
        self.port = port
        self.log = os.path.join(logdir, '%s.log' % name.replace(' ', '-'))
        self._logfile = open(self.log, 'wb')
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self._logfile,
                                     stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)

    @property
    def pid(self):
        return self.proc.pid

    def cpu(self):
        # With its children: smtpproxy's workers (the workers key).
        return tree_cpu_seconds(self.pid)

    def describe_failure(self, message):
        rc = self.proc.poll()
        status = 'running' if rc is None else 'exited with status %s' % rc
        return '%s: %s (%s)\n  command: %s\n  last output:\n%s' % (
            self.name, message, status, ' '.join(self.argv),
            _indent(tail(self.log)) or '    (none)')

    def wait_ready(self, timeout=BANNER_TIMEOUT):
        """Poll by connecting until the port answers with a 220 banner."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(self.describe_failure('did not start'))
            try:
                sock = socket.create_connection((HOST, self.port), timeout=5)
            except OSError as exc:
                last_error = exc
                time.sleep(0.05)   # port not open yet: poll again
                continue
            try:
                code, lines = read_reply(sock.makefile('rb'))
                if code == 220:
                    try:
                        sock.sendall(b'QUIT\r\n')
                    except OSError:
                        pass
                    return
                last_error = 'banner %r' % lines
            except (OSError, BenchError) as exc:
                last_error = exc
            finally:
                sock.close()
            time.sleep(0.05)
        raise BenchError(self.describe_failure(
            'no 220 banner on %s:%d within %ds (last: %s)'
            % (HOST, self.port, timeout, last_error)))

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError(self.describe_failure('died'))

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
            except OSError:
                pass
        self._logfile.close()


def _indent(text, prefix='    '):
    return '\n'.join(prefix + line for line in text.splitlines())


class Sink(Server):
    """smtp-sink with running counters (-c) written to its log file."""

    COUNTER = re.compile(r'mesg=(\d+)')

    def __init__(self, tool, logdir):
        argv = [tool, '-c', '-m', '4000']
        if os.geteuid() == 0:
            argv += ['-u', 'nobody']     # required when run as root
        port = free_port()
        argv += ['%s:%d' % (HOST, port), '1024']
        Server.__init__(self, 'smtp-sink', argv, port, logdir)

    def count(self):
        """Messages received so far ('.' seen), from the latest counters.

        smtp-sink rewrites one status line ending in CR whenever a session
        ends, QUIT is executed or '.' is received.
        """
        text = tail(self.log, 400)
        end = text.rfind('\r')
        matches = self.COUNTER.findall(text[:end]) if end >= 0 else []
        return int(matches[-1]) if matches else 0

    def wait_count(self, expected, timeout=SINK_SETTLE_TIMEOUT):
        """Wait until the counter reaches `expected`; return the last value.

        Returns early when it reaches `expected` and has stayed there a
        moment (so extra deliveries are seen too); gives up after `timeout`.
        """
        deadline = time.monotonic() + timeout
        value = self.count()
        while time.monotonic() < deadline:
            if value >= expected:
                time.sleep(0.1)
                again = self.count()
                if again == value:
                    return value
                value = again
                continue
            time.sleep(0.02)
            value = self.count()
        return value


def proc_status(pid):
    """VmRSS, VmHWM (MiB) and thread count of process `pid`."""
    result = {}
    with open('/proc/%d/status' % pid) as fileobj:
        for line in fileobj:
            key, _, value = line.partition(':')
            if key in ('VmRSS', 'VmHWM'):
                result[key] = int(value.split()[0]) / 1024.0
            elif key == 'Threads':
                result[key] = int(value)
    return result


def cpu_seconds(pid):
    """User plus system CPU time consumed so far by process `pid`."""
    with open('/proc/%d/stat' % pid) as fileobj:
        fields = fileobj.read().rpartition(')')[2].split()
    # fields[0] is field 3 (state) of proc(5); utime and stime are 14, 15.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / float(os.sysconf('SC_CLK_TCK'))


def tree_status(pid):
    """proc_status() of process ``pid`` and its descendants (smtpproxy's
    master and its workers), added up: VmHWM is the sum of each process's
    own peak."""
    total = {'VmRSS': 0.0, 'VmHWM': 0.0, 'Threads': 0}
    for member in sorted(process_tree(pid)):
        try:
            status = proc_status(member)
        except OSError:
            if member == pid:
                raise
            continue            # ended meanwhile
        for key in total:
            total[key] += status.get(key, 0)
    return total


def process_tree(pid, times=None):
    """The pids of process ``pid`` and its living descendants; with
    ``times`` (a dict), fill it with each one's CPU ticks (its own and its
    reaped children's)."""
    parents = {}
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as fileobj:
                fields = fileobj.read().rpartition(')')[2].split()
        except OSError:
            continue
        parents[int(name)] = int(fields[1])
        if times is not None:
            times[int(name)] = sum(int(value) for value in fields[11:15])
    tree, changed = {pid}, True
    while changed:
        changed = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                changed = True
    return tree


def tree_cpu_seconds(pid):
    """CPU time of process ``pid`` and all its descendants, living or
    reaped (cutime, cstime)."""
    times = {}
    tree = process_tree(pid, times)
    return sum(times.get(member, 0) for member in tree) / float(
        os.sysconf('SC_CLK_TCK'))


def postfix_missing():
    """Why Postfix's before-queue proxy cannot run here, or None."""
    if os.geteuid() != 0:
        return 'needs root (Postfix drops to its own user)'
    for tool in ('postfix', 'postconf'):
        if shutil.which(tool) is None and not os.path.exists(
                '/usr/sbin/' + tool):
            return 'Postfix is not installed (apt-get install postfix)'
    return None


class PostfixPeer(object):
    """A private Postfix instance (tests/postfix.py) whose smtpd passes
    each session live to the sink (smtpd_proxy_filter), as a target."""

    def __init__(self, instance):
        self.instance = instance
        self.port = instance.port
        self.pid = instance.process.pid     # its reaper, over master

    def cpu(self):
        return tree_cpu_seconds(self.pid)

    def check_alive(self):
        if self.instance.process is None or \
                self.instance.process.poll() is not None:
            raise BenchError('Postfix died:\n%s' % self.instance.log()[-2000:])

    def describe_failure(self, message):
        return 'Postfix: %s\n%s' % (message, _indent(
            self.instance.log()[-2000:]))

    def stop(self):
        self.instance.stop()


def postfix_settings(host, port):
    """main.cf for the peer: smtpd proxies to the sink before the queue;
    as little else as a site would run."""
    return {'smtpd_proxy_filter': '%s:%d' % (host, port),
            'smtpd_client_connection_count_limit': '0',
            'smtpd_client_connection_rate_limit': '0',
            'default_process_limit': '200'}


def raise_nofile(wanted):
    """Raise RLIMIT_NOFILE (inherited by the servers); return the limit."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return soft


# ---------------------------------------------------------------- clients

def body_chunk():
    """About 64 KB of 76-character CRLF lines (none starts with '.')."""
    alphabet = ('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
                '0123456789')
    lines = []
    size = 0
    index = 0
    while size + LINE_LEN + 2 <= CHUNK_SIZE:
        start = index % len(alphabet)
        text = (alphabet[start:] + alphabet * 2)[:LINE_LEN]
        lines.append(text.encode('ascii') + b'\r\n')
        size += LINE_LEN + 2
        index += 1
    return b''.join(lines)


def message_chunks(size, label):
    """Yield a message of about `size` bytes in chunks of about 64 KB."""
    header = ('From: <from@example.org>\r\n'
              'To: <to@example.org>\r\n'
              'Subject: smtpproxy bench, %s\r\n'
              'Message-ID: <bench.%d.%d@example.org>\r\n'
              '\r\n' % (label, os.getpid(), int(time.time() * 1e6)))
    header = header.encode('ascii')
    yield header
    chunk = body_chunk()
    remaining = size - len(header)
    while remaining >= len(chunk):
        yield chunk
        remaining -= len(chunk)
    whole_lines = remaining // (LINE_LEN + 2) * (LINE_LEN + 2)
    if whole_lines:
        yield chunk[:whole_lines]


def send_streamed(port, size, label):
    """Send one message of `size` bytes; return (bytes sent, seconds).

    The message is generated chunk by chunk, so this client's memory does
    not depend on the message size.
    """
    start = time.monotonic()
    sock = socket.create_connection((HOST, port), timeout=SMTP_TIMEOUT)
    try:
        reader = sock.makefile('rb')

        def command(line, expect):
            if line is not None:
                sock.sendall(line.encode('ascii') + b'\r\n')
            code, lines = read_reply(reader)
            if code != expect:
                raise BenchError('%s: %r answered %r'
                                 % (label, line, lines))
            return lines

        command(None, 220)
        ehlo = command('EHLO bench.example.org', 250)
        size_param = ''
        if any(line[4:].upper().startswith('SIZE') for line in ehlo):
            size_param = ' SIZE=%d' % size
        command('MAIL FROM:<from@example.org>%s' % size_param, 250)
        command('RCPT TO:<to@example.org>', 250)
        command('DATA', 354)
        sent = 0
        try:
            for chunk in message_chunks(size, label):
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b'.\r\n')
        except OSError as exc:
            # The server may have answered (e.g. 552) and closed.
            try:
                code, lines = read_reply(reader)
            except (OSError, BenchError):
                lines = ['(no reply)']
            raise BenchError('%s: sending failed after %d bytes '
                             '(%s); server said %r'
                             % (label, sent, exc, lines))
        command(None, 250)
        try:
            command('QUIT', 221)
        except (OSError, BenchError):
            pass
        return sent, time.monotonic() - start
    finally:
        sock.close()


def open_idle_sessions(port, count):
    """Open `count` sessions (banner read, EHLO answered) and keep them.

    Returns (sockets, error or None).
    """
    sockets = []
    for index in range(count):
        try:
            sock = socket.create_connection((HOST, port), timeout=30)
        except OSError as exc:
            return sockets, 'connect #%d: %s' % (index + 1, exc)
        error = None
        try:
            reader = sock.makefile('rb')
            code, lines = read_reply(reader)
            if code != 220:
                error = 'banner %r' % lines
            else:
                sock.sendall(b'EHLO idle%d.example.org\r\n' % index)
                code, lines = read_reply(reader)
                if code != 250:
                    error = 'EHLO answered %r' % lines
        except (OSError, BenchError) as exc:
            error = str(exc)
        if error is not None:
            sock.close()
            return sockets, 'session #%d: %s' % (index + 1, error)
        sockets.append(sock)
    return sockets, None


def close_all(sockets):
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- phases

def run_source(tool, port, args, count, one_per_session):
    """Run smtp-source once; return elapsed seconds."""
    argv = [tool, '-s', str(args.sessions), '-l', str(args.size),
            '-m', str(count), '-f', 'from@example.org',
            '-t', 'to@example.org', '-M', 'bench.example.org']
    if not one_per_session:
        argv.insert(1, '-d')
    argv.append('%s:%d' % (HOST, port))
    timeout = 60 + count * 0.05
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise BenchError('smtp-source did not finish within %ds\n'
                         '  command: %s\n%s'
                         % (timeout, ' '.join(argv),
                            _indent(output.decode('utf-8', 'replace'))))
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise BenchError('smtp-source exited with status %d\n  command: %s\n%s'
                         % (proc.returncode, ' '.join(argv),
                            _indent(output.decode('utf-8', 'replace'))))
    return elapsed


def measure_throughput(label, server, sink, tool, args, one_per_session):
    """Warm-up plus args.repeat timed runs; return a result dict."""
    result = {'label': label, 'rates': [], 'sent': 0, 'delivered': 0,
              'cpu': 0.0, 'wall': 0.0}
    warmup = max(args.sessions, min(200, args.messages))
    runs = [('warm-up', warmup)] + [('run', args.messages)] * args.repeat
    for kind, count in runs:
        before = sink.wait_count(0)
        cpu_before = server.cpu()
        try:
            elapsed = run_source(tool, server.port, args, count,
                                 one_per_session)
        except BenchError:
            sink.check_alive()
            server.check_alive()
            raise
        after = sink.wait_count(before + count)
        delivered = after - before
        if delivered != count:
            sink.check_alive()
            raise BenchError(
                '%s: %s of %d messages: smtp-sink received %d (%s)\n%s'
                % (label, kind, count, delivered,
                   'messages lost' if delivered < count else 'duplicates',
                   server.describe_failure('log tail')))
        if kind == 'run':
            result['cpu'] += server.cpu() - cpu_before
            result['wall'] += elapsed
            result['rates'].append(count / elapsed)
            result['sent'] += count
            result['delivered'] += delivered
        server.check_alive()
    result['best'] = max(result['rates'])
    result['median'] = statistics.median(result['rates'])
    return result


def transaction_latency(port, count):
    """One client, one session, ``count`` transactions one after the
    other (MAIL, RCPT, DATA, a 1 KB message), each timed from MAIL sent to
    the reply to its final dot; return the sorted seconds."""
    import smtplib
    message = ('From: from@example.org\r\nTo: to@example.org\r\n'
               'Subject: latency\r\n\r\n' + ('x' * 98 + '\r\n') * 10)
    client = smtplib.SMTP(HOST, port, timeout=SMTP_TIMEOUT)
    client.ehlo('bench.example.org')
    times = []
    try:
        for _ in range(count + 20):
            start = time.perf_counter()
            client.sendmail('from@example.org', ['to@example.org'], message)
            times.append(time.perf_counter() - start)
    finally:
        client.quit()
    return sorted(times[20:])           # the first 20 warm up


def percentile(values, share):
    return values[max(0, int(len(values) * share) - 1)]


def measure_memory(proxy, sink, args):
    """RSS figures of a fresh smtpproxy process.

    Returns (status when idle, [(label, status, client note)], [notes]).
    """
    rows = []
    notes = []

    def snapshot(label, extra=''):
        proxy.check_alive()
        status = tree_status(proxy.pid)
        rows.append((label, status, extra))
        return status

    idle = snapshot('idle after start')
    sizes = [('1 MB message', SMALL_MESSAGE)]
    if not args.skip_big:
        sizes.append(('%d MB message' % args.big_size,
                      args.big_size * 1000 * 1000))
    for label, size in sizes:
        before = sink.wait_count(0)
        sent, seconds = send_streamed(proxy.port, size, label)
        delivered = sink.wait_count(before + 1) - before
        if delivered != 1:
            raise BenchError('%s: smtp-sink received %d messages instead '
                             'of 1\n%s' % (label, delivered,
                                           proxy.describe_failure('log tail')))
        snapshot('after one %s' % label,
                 '%.1f s, %.0f MB/s' % (seconds, sent / 1e6 / seconds))

    if not args.skip_big:
        # Reference: the same big message straight to smtp-sink.
        before = sink.wait_count(0)
        sent, seconds = send_streamed(sink.port, sizes[-1][1], sizes[-1][0])
        sink.wait_count(before + 1)
        notes.append('%s straight to smtp-sink, for comparison: %.1f s, '
                     '%.0f MB/s' % (sizes[-1][0], seconds,
                                    sent / 1e6 / seconds))

    status_before = tree_status(proxy.pid)
    start = time.monotonic()
    sockets, error = open_idle_sessions(proxy.port, args.idle_sessions)
    opened = time.monotonic() - start
    try:
        held = snapshot('with %d idle sessions' % len(sockets),
                        'opened in %.1f s' % opened)
        per_session = ((held['VmRSS'] - status_before['VmRSS'])
                       * 1024.0 / max(1, len(sockets)))
        notes.append('RSS per idle session: %.1f KiB (VmRSS growth / %d '
                     'sessions)' % (per_session, len(sockets)))
    finally:
        close_all(sockets)
    if error is not None:
        raise BenchError('idle sessions: only %d of %d opened: %s\n%s'
                         % (len(sockets),
                            args.idle_sessions, error,
                            proxy.describe_failure('log tail')))
    return idle, rows, notes


# ---------------------------------------------------------------- report

def measure_store(repo, workdir, pause=0.0, decisions=STORE_DECISIONS,
                  sessions=STORE_SESSIONS, processes=1):
    """Greylisting decisions of GreylistStore with STORE_SESSIONS threads
    deciding at once; each session waits ``pause`` seconds between its
    decisions (as a session waits for its client between RCPTs).  With
    ``processes``, the sessions are shared among that many processes on
    the one file, as among smtpproxy's workers.  Returns (decisions per
    second, median ms, 99th percentile ms)."""
    path = os.path.join(workdir, 'store-%s-%d-%d.db'
                        % (pause, sessions, processes))
    if processes == 1:
        latencies, elapsed = store_sessions(repo, path, pause, decisions,
                                            range(sessions))
    else:
        children = []
        for number in range(processes):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                status = 1
                try:
                    mine = store_sessions(
                        repo, path, pause, decisions,
                        range(number, sessions, processes))
                    with os.fdopen(write_end, 'w') as pipe:
                        pipe.write(repr(mine))
                    status = 0
                finally:
                    os._exit(status)
            os.close(write_end)
            children.append((pid, read_end))
        latencies, elapsed = [], 0.0
        for pid, read_end in children:
            with os.fdopen(read_end) as pipe:
                text = pipe.read()
            os.waitpid(pid, 0)
            if not text:
                raise BenchError('a store process failed')
            theirs, their_time = eval(text, {})    # our own repr()
            latencies.extend(theirs)
            elapsed = max(elapsed, their_time)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return (len(latencies) / elapsed, 1000 * statistics.median(latencies),
            1000 * p99)


def store_sessions(repo, path, pause, decisions, numbers):
    """Sessions ``numbers`` deciding on the store ``path``, as threads of
    this process: ([latency, ...], seconds)."""
    import threading
    sys.path.insert(0, repo)
    import smtpproxy
    store = smtpproxy.GreylistStore(path)
    latencies = []
    lock = threading.Lock()
    now = time.time()

    def session(number):
        mine = []
        for decision in range(decisions):
            key = '192.0.2.0/24 s%d@example.net r%d@example.org' % (
                number, decision % 20)
            start = time.perf_counter()
            store.decide(key, now + decision)
            mine.append(time.perf_counter() - start)
            if pause:
                # The client's turn; sessions are not in step with each
                # other, so the pauses vary around ``pause``.
                time.sleep(random.uniform(0.5 * pause, 1.5 * pause))
        with lock:
            latencies.extend(mine)

    # The server's service_actions() checkpoints the store once a second,
    # off the decisions (stores.maintain()): the same here.
    done = threading.Event()

    def checkpoints():
        while not done.wait(0.25):
            store.checkpoint()

    threads = [threading.Thread(target=session, args=(n,))
               for n in numbers]
    checkpointer = threading.Thread(target=checkpoints)
    checkpointer.start()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    done.set()
    checkpointer.join()
    store.close()
    return latencies, elapsed


def make_certificate(workdir):
    """A self-signed certificate and key (openssl command) for STARTTLS."""
    cert = os.path.join(workdir, 'tls.pem')
    key = os.path.join(workdir, 'tls.key')
    subprocess.check_call(
        ['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
         'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key,
         '-out', cert, '-days', '2', '-subj', '/CN=localhost'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def tls_sessions(port, count, starttls):
    """``count`` sessions one after the other: EHLO, [STARTTLS, EHLO],
    QUIT; returns (sessions per second, TLS version, cipher)."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    version = cipher = None
    for _ in range(count):
        sock = socket.create_connection((HOST, port), timeout=30)
        reader = sock.makefile('rb')
        read_reply(reader)
        sock.sendall(b'EHLO bench.example.org\r\n')
        read_reply(reader)
        if starttls:
            sock.sendall(b'STARTTLS\r\n')
            if read_reply(reader)[0] != 220:
                raise BenchError('STARTTLS refused')
            sock = context.wrap_socket(sock, server_hostname='localhost')
            version, cipher = sock.version(), sock.cipher()[0]
            reader = sock.makefile('rb')
            sock.sendall(b'EHLO bench.example.org\r\n')
            read_reply(reader)
        sock.sendall(b'QUIT\r\n')
        read_reply(reader)
        sock.close()
    return count / (time.monotonic() - started), version, cipher


def measure_service(proxy, args):
    """Flood a proxy that holds ``--idle-sessions`` sessions, its
    max_connections; then stop it with SIGTERM.  Returns a dict."""
    figures = {}
    held = []
    deadline = time.monotonic() + BANNER_TIMEOUT
    # wait_ready's probe may not have left yet: a refusal is retried.
    while len(held) < args.idle_sessions:
        more, error = open_idle_sessions(proxy.port,
                                         args.idle_sessions - len(held))
        held.extend(more)
        if error is not None:
            if time.monotonic() > deadline:
                close_all(held)
                raise BenchError(proxy.describe_failure(error))
            time.sleep(0.01)
    # With workers, two may take the last place at the same instant: more
    # sessions until the service refuses 20 in a row.
    in_a_row = 0
    while in_a_row < 20 and time.monotonic() < deadline:
        more, error = open_idle_sessions(proxy.port, 1)
        held.extend(more)
        in_a_row = in_a_row + 1 if error is not None else 0
    figures['held'] = len(held)
    try:
        before = tree_status(proxy.pid)
        refused = 0
        started = time.monotonic()
        for _ in range(FLOOD_CONNECTIONS):
            sock = socket.create_connection((HOST, proxy.port), timeout=30)
            try:
                code, lines = read_reply(sock.makefile('rb'))
            finally:
                sock.close()
            if code == 421 and lines[0][4:].startswith('4.7.0'):
                refused += 1
        elapsed = time.monotonic() - started
        after = tree_status(proxy.pid)
        figures['flood'] = (refused, elapsed, before, after)
        reader = held[0].makefile('rb')
        held[0].sendall(b'NOOP\r\n')
        figures['held_answers'] = read_reply(reader)[0] == 250
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        told = 0
        for sock in held:
            try:
                code, lines = read_reply(sock.makefile('rb'))
            except (OSError, BenchError):
                continue
            if code == 421 and lines[0][4:].startswith('4.3.2'):
                told += 1
        proxy.proc.wait(STOP_TIMEOUT)
        figures['stop'] = (told, time.monotonic() - started)
    finally:
        close_all(held)
    return figures


def print_tls(figures):
    (plain, _, _), (tls, version, cipher), count = figures
    print('STARTTLS: %d sessions one after the other (EHLO, STARTTLS, EHLO, '
          'QUIT; %s, %s, P-256 key; client on the same CPUs):'
          % (count, version, cipher))
    print('  without STARTTLS %.0f sessions/s, with %.0f sessions/s: '
          '%.2f of plain' % (plain, tls, tls / plain))
    print()


def print_service(figures, args):
    refused, elapsed, before, after = figures['flood']
    print('Service: %d sessions held (max_connections %d; with workers, '
          'two taking the last place at once may each pass it by one), '
          'then %d connections, one after the other:'
          % (figures['held'], args.idle_sessions, FLOOD_CONNECTIONS))
    print('  refused with 421 4.7.0: %d (%.0f refusals/s)'
          % (refused, refused / elapsed))
    print('  threads %d before, %d after; peak RSS %.1f MiB before, '
          '%.1f MiB after' % (before['Threads'], after['Threads'],
                              before['VmHWM'], after['VmHWM']))
    print('  held sessions still answer: %s'
          % ('yes' if figures['held_answers'] else 'NO'))
    told, stop = figures['stop']
    print('  SIGTERM: %d of %d idle sessions told 421 4.3.2, process gone '
          'after %.2f s' % (told, figures['held'], stop))
    print()


def print_throughput(results, args):
    print('Throughput: smtp-source -> [proxy ->] smtp-sink, %d messages '
          'x %d bytes, %d parallel sessions; best of %d timed run(s) after '
          'a warm-up, every message checked on the sink.'
          % (args.messages, args.size, args.sessions, args.repeat))
    print('Columns: one message per connection (what an MX mostly sees), '
          'and many per connection (smtp-source -d).  Each cell: msg/s, '
          '(its share of direct; of Postfix), and the target\'s CPU per '
          'message.')
    print()
    print('  %-27s %-36s %-36s' % ('through', 'one message per connection',
                                   'many messages per connection'))
    for key in ('direct', 'postfix', 'smtpproxy', 'greylisting', 'tuned',
                'greylisting-tuned', 'aiosmtpd'):
        cells = []
        label = None
        for mode in MODES:
            res = results.get((key, mode))
            if res is None:
                cells.append('-')
                continue
            label = res['label']
            if 'skipped' in res:
                cells.append('skipped: %s' % res['skipped'])
                continue
            if 'failed' in res:
                cells.append('FAILED: %s' % res['failed'].splitlines()[0])
                continue
            text = '%6.0f' % res['best']
            shares = []
            for peer in ('direct', 'postfix'):
                other = results.get((peer, mode), {})
                if 'best' in other:
                    shares.append('%.2f' % (res['best'] / other['best']))
                else:
                    shares.append('-')
            if shares:
                text += ' (%s)' % '; '.join(shares)
            text += ' %.2f ms' % (1000.0 * res['cpu'] / res['sent'])
            cells.append(text)
        if label is not None:
            print('  %-27s %-36s %-36s' % (label, cells[0], cells[1]))
    print('  (smtpproxy: its defaults, %s; tuned: %s)'
          % (proxy_defaults(args),
             TUNED_CONFIG.replace('\n', ', ').rstrip(', ') % args.workers))
    for mode in MODES:
        postfix = results.get(('postfix', mode), {})
        for key, grey_key, name in (
                ('smtpproxy', 'greylisting', 'smtpproxy'),
                ('tuned', 'greylisting-tuned', 'smtpproxy tuned')):
            proxy = results.get((key, mode), {})
            grey = results.get((grey_key, mode), {})
            if 'best' in proxy and 'best' in postfix:
                print('  %s: %s / Postfix %.2f (goal >= 1: %s)%s'
                      % (MODE_NAMES[mode], name,
                         proxy['best'] / postfix['best'],
                         'met' if proxy['best'] >= postfix['best'] else
                         'MISSED', '; greylisting / plain %.2f (goal >= '
                         '0.9)' % (grey['best'] / proxy['best'])
                         if 'best' in grey else ''))
    print()


def proxy_defaults(args):
    """The speed keys' defaults, as the smtpproxy measured has them."""
    code = ('import smtpproxy as s; print("workers = auto: %d here, '
            'spare_threads = %d, upstream_pool_size = %d" % ('
            's.worker_count({}), s.SMTPProxyServer.spare_threads, '
            's.ConcreteMailHandler.upstream_pool_size))')
    try:
        return subprocess.check_output(
            [args.python, '-c', code], cwd=os.path.abspath(args.repo),
            universal_newlines=True).strip()
    except (OSError, subprocess.CalledProcessError) as error:
        return 'not known (%s)' % error


def print_latency(latencies, args):
    if 'direct' not in latencies:
        return
    print('Latency: one session, %d transactions one after the other '
          '(MAIL, RCPT, DATA, 1 KB), ms from MAIL to the reply to the dot:'
          % args.latency)
    direct = latencies['direct']
    base = (percentile(direct, 0.5), percentile(direct, 0.99))
    for key, label in LATENCY_TARGETS:
        if key not in latencies:
            continue
        times = latencies[key]
        p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
        added = '' if key == 'direct' else (
            '; added: p50 %.2f, p99 %.2f' % (1000 * (p50 - base[0]),
                                             1000 * (p99 - base[1])))
        print('  %-27s p50 %.2f, p99 %.2f%s' % (label, 1000 * p50,
                                                1000 * p99, added))
    print()


def print_memory(idle, rows, notes, args):
    print('Memory of the smtpproxy process (fresh process; /proc/PID/status,'
          ' MiB; VmHWM = peak RSS):')
    print()
    print('  %-34s %9s %9s %8s  %s' % ('state', 'VmRSS', 'VmHWM', 'threads',
                                       'client'))
    for label, status, extra in rows:
        print(('  %-34s %9.1f %9.1f %8d  %s'
               % (label, status['VmRSS'], status['VmHWM'],
                  status.get('Threads', 0), extra)).rstrip())
    print()
    hwm = dict((label, status['VmHWM']) for label, status, _ in rows)
    small = hwm.get('after one 1 MB message')
    big_label = 'after one %d MB message' % args.big_size
    big = hwm.get(big_label)
    if small is not None:
        print('  peak RSS growth over idle, %-16s %+8.1f MiB'
              % ('1 MB message:', small - idle['VmHWM']))
    if big is not None:
        extra_mb = (args.big_size * 1e6 - SMALL_MESSAGE) / MIB
        limit = max(4.0, 0.10 * extra_mb)
        excess = big - small
        print('  peak RSS growth over idle, %-16s %+8.1f MiB'
              % ('%d MB message:' % args.big_size, big - idle['VmHWM']))
        print('  goal "RSS independent of message size": %+.1f MiB more '
              'peak for %d MB than for 1 MB: %s'
              % (excess, args.big_size,
                 'met' if excess <= limit else 'MISSED'))
        print('    (met when at most %.1f MiB: 10%% of the %.0f MiB size '
              'difference, at least 4 MiB)' % (limit, extra_mb))
    elif args.skip_big:
        print('  %d MB message: skipped (--skip-big)' % args.big_size)
    for note in notes:
        print('  ' + note)
    print()


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Throughput and memory benchmark for smtpproxy '
                    '(see the module docstring).')
    parser.add_argument('--messages', type=int,
                        help='messages per timed run (default 5000; '
                             '--quick: 500)')
    parser.add_argument('--sessions', type=int, default=20,
                        help='parallel smtp-source sessions (default 20)')
    parser.add_argument('--size', type=int, default=10240,
                        help='message payload bytes (default 10240)')
    parser.add_argument('--repeat', type=int,
                        help='timed runs per target (default 3; --quick: 1)')
    parser.add_argument('--mode', choices=('both', 'one', 'many'),
                        default='both',
                        help='one message per connection, many (smtp-source '
                             '-d), or both columns (default)')
    parser.add_argument('--one-per-session', action='store_true',
                        help='the same as --mode one')
    parser.add_argument('--latency', type=int,
                        help='transactions of the latency run (default '
                             '1000; --quick: 200)')
    parser.add_argument('--skip-big', action='store_true',
                        help='skip the big-message memory test')
    parser.add_argument('--big-size', type=int,
                        help='big message size in MB (default 100; '
                             '--quick: 20)')
    parser.add_argument('--idle-sessions', type=int,
                        help='concurrent idle sessions (default 1000; '
                             '--quick: 100)')
    parser.add_argument('--workers', type=int, default=4,
                        help='workers of the tuned smtpproxy rows '
                             '(default 4)')
    parser.add_argument('--targets',
                        help='comma-separated throughput targets to run '
                             '(direct, postfix, smtpproxy, greylisting, '
                             'tuned, greylisting-tuned, aiosmtpd; default '
                             'all)')
    parser.add_argument('--quick', action='store_true',
                        help='small numbers for a smoke run')
    parser.add_argument('--python', default=sys.executable,
                        help='interpreter running smtpproxy (default: %s)'
                             % sys.executable)
    parser.add_argument('--aiosmtpd-python', default=sys.executable,
                        help='interpreter with aiosmtpd installed, for the '
                             'comparison (default: %s)' % sys.executable)
    parser.add_argument('--no-aiosmtpd', action='store_true',
                        help='skip the aiosmtpd comparison')
    parser.add_argument('--repo',
                        default=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))),
                        help='repository holding smtpproxy.py and contrib/ '
                             '(default: %(default)s)')
    args = parser.parse_args(argv)
    quick = {'messages': 500, 'repeat': 1, 'big_size': 20,
             'idle_sessions': 100, 'latency': 200}
    full = {'messages': 5000, 'repeat': 3, 'big_size': 100,
            'idle_sessions': 1000, 'latency': 1000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ('messages', 'sessions', 'size', 'repeat', 'big_size',
                'idle_sessions', 'latency'):
        if getattr(args, key) < 1:
            parser.error('--%s must be at least 1' % key.replace('_', '-'))
    if args.one_per_session:
        args.mode = 'one'
    args.modes = MODES if args.mode == 'both' else (args.mode,)
    return args


def python_version(python):
    try:
        out = subprocess.check_output(
            [python, '-c', 'import sys; print(sys.version.split()[0])'],
            stderr=subprocess.STDOUT, timeout=30)
        return out.decode().strip()
    except (OSError, subprocess.SubprocessError):
        return None


def has_aiosmtpd(python):
    try:
        out = subprocess.check_output(
            [python, '-c', 'import aiosmtpd; print(aiosmtpd.__version__)'],
            stderr=subprocess.DEVNULL, timeout=60)
        return out.decode().strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    args = parse_args(argv)
    try:
        source_tool = find_tool('smtp-source')
        sink_tool = find_tool('smtp-sink')
    except ToolMissing as exc:
        print('bench: %s' % exc, file=sys.stderr)
        return 2
    repo = os.path.abspath(args.repo)
    proxy_script = os.path.join(repo, 'smtpproxy.py')
    proxy_python = python_version(args.python)
    if proxy_python is None:
        print('bench: cannot run --python %s' % args.python, file=sys.stderr)
        return 2
    nofile = raise_nofile(2 * args.idle_sessions + 4096)

    print('smtpproxy benchmark: %s, %d CPU(s), Linux %s'
          % (time.strftime('%Y-%m-%d %H:%M:%S'), os.cpu_count() or 0,
             platform.release()))
    print('smtpproxy: %s with Python %s (%s); tools: %s, %s; '
          'RLIMIT_NOFILE %s'
          % (proxy_script, proxy_python, args.python, source_tool, sink_tool,
             nofile))
    print()
    sys.stdout.flush()

    workdir = tempfile.mkdtemp(prefix='smtpproxy-bench-')
    servers = []
    postfixes = []
    latencies = {}
    results = {}
    failures = []
    missing = []
    memory = None
    store_figures = None
    service = None
    tls_figures = None

    def start(server):
        servers.append(server)
        server.wait_ready()
        return server

    def start_proxy(name, config, handler='bench.AcceptAll'):
        env = dict(os.environ)
        paths = [os.path.join(repo, 'contrib'), repo]
        if env.get('PYTHONPATH'):
            paths.append(env['PYTHONPATH'])
        env['PYTHONPATH'] = os.pathsep.join(paths)
        env['PYTHONDONTWRITEBYTECODE'] = '1'    # no __pycache__ in contrib/
        port = free_port()
        argv = [args.python, proxy_script,
                '--listen', '%s:%d' % (HOST, port),
                '--upstream', '%s:%d' % (HOST, sink.port),
                '--class', handler, '--config', config]
        return start(Server(name, argv, port, workdir, env=env, cwd=workdir))

    def start_greylisting(tuned=False):
        name = 'greylisting-tuned' if tuned else 'greylisting'
        grey_config = os.path.join(workdir, name + '.conf')
        with open(grey_config, 'w') as fileobj:
            fileobj.write(PROXY_CONFIG % 500)
            fileobj.write(GREYLIST_CONFIG
                          % os.path.join(workdir, name + '.db'))
            if tuned:
                fileobj.write(TUNED_CONFIG % args.workers)
        subprocess.check_call([args.python, proxy_script, '--config',
                               grey_config, '--db-pass', GREYLIST_KEY],
                              cwd=workdir)
        return start_proxy('smtpproxy-' + name, grey_config,
                           'smtpproxy.GreyListingPolicy')

    try:
        config = os.path.join(workdir, 'smtpproxy.conf')
        with open(config, 'w') as fileobj:
            fileobj.write(PROXY_CONFIG % max(
                500, args.idle_sessions + args.sessions + 100))
        sink = Sink(sink_tool, workdir)
        start(sink)

        # -- throughput (the sink itself is the 'direct' target)
        targets = [('direct', 'direct to smtp-sink', lambda: sink)]
        tuned_config = os.path.join(workdir, 'tuned.conf')
        with open(tuned_config, 'w') as fileobj:
            fileobj.write(PROXY_CONFIG % 500)
            fileobj.write(TUNED_CONFIG % args.workers)
        if os.path.exists(proxy_script):
            targets.append(('smtpproxy', 'smtpproxy (defaults)',
                            lambda: start_proxy('smtpproxy', config)))
            targets.append(('greylisting', 'smtpproxy greylisting',
                            start_greylisting))
            targets.append(('tuned', 'smtpproxy tuned',
                            lambda: start_proxy('smtpproxy-tuned',
                                                tuned_config)))
            targets.append(('greylisting-tuned', 'smtpproxy tuned grey',
                            lambda: start_greylisting(tuned=True)))
        else:
            for mode in MODES:
                results['smtpproxy', mode] = {
                    'label': 'smtpproxy',
                    'skipped': 'not found: %s' % proxy_script}
            missing.append(proxy_script)
        aio_version = None
        if args.no_aiosmtpd:
            for mode in MODES:
                results['aiosmtpd', mode] = {'label': 'aiosmtpd Proxy',
                                             'skipped': '--no-aiosmtpd'}
        else:
            aio_version = has_aiosmtpd(args.aiosmtpd_python)
            if aio_version is None:
                for mode in MODES:
                    results['aiosmtpd', mode] = {
                        'label': 'aiosmtpd Proxy',
                        'skipped': 'not installed for %s (see '
                                   '--aiosmtpd-python)'
                                   % args.aiosmtpd_python}
            else:
                def start_aiosmtpd():
                    port = free_port()
                    argv = [args.aiosmtpd_python, '-c', AIOSMTPD_LAUNCHER,
                            '-n', '-l', '%s:%d' % (HOST, port),
                            '-c', 'aiosmtpd.handlers.Proxy',
                            HOST, str(sink.port)]
                    return start(Server('aiosmtpd', argv, port, workdir,
                                        cwd=workdir))
                label = 'aiosmtpd %s Proxy' % aio_version
                targets.append(('aiosmtpd', label, start_aiosmtpd))

        postfix_reason = postfix_missing()
        if postfix_reason is None:
            def start_postfix():
                sys.path.insert(0, os.path.join(repo, 'tests'))
                import postfix
                instance = postfix.Postfix(sink.port, xclient=False,
                                           settings=postfix_settings(
                                               HOST, sink.port))
                postfixes.append(instance)
                return PostfixPeer(instance)
            targets.insert(1, ('postfix', 'Postfix smtpd_proxy_filter',
                               start_postfix))
        else:
            for mode in MODES:
                results['postfix', mode] = {
                    'label': 'Postfix smtpd_proxy_filter',
                    'skipped': postfix_reason}
        if args.targets:
            wanted = args.targets.split(',')
            targets = [target for target in targets if target[0] in wanted]
        for key, label, starter in targets:
            print('running: %s ...' % label, file=sys.stderr)
            server = None
            try:
                server = starter()
                for mode in args.modes:
                    results[key, mode] = measure_throughput(
                        label, server, sink, source_tool, args,
                        mode == 'one')
                if key in dict(LATENCY_TARGETS):
                    latencies[key] = transaction_latency(server.port,
                                                         args.latency)
            except (BenchError, OSError) as exc:
                for mode in args.modes:
                    results.setdefault((key, mode), {'label': label,
                                                     'failed': str(exc)})
                failures.append(str(exc))
            finally:
                if server is not None and server is not sink:
                    server.stop()
                    if server in servers:
                        servers.remove(server)

        # -- the greylisting store on its own
        if os.path.exists(proxy_script):
            print('running: greylisting store ...', file=sys.stderr)
            sys.path.insert(0, repo)
            import smtpproxy
            workers = smtpproxy.worker_count({})
            store_figures = (measure_store(repo, workdir),
                             measure_store(repo, workdir, STORE_PAUSE,
                                           STORE_PACED_DECISIONS),
                             measure_store(repo, workdir, sessions=1,
                                           decisions=3000),
                             workers,
                             measure_store(repo, workdir, STORE_PAUSE,
                                           STORE_PACED_DECISIONS,
                                           processes=workers))

        # -- memory (fresh proxy)
        if os.path.exists(proxy_script):
            print('running: smtpproxy memory ...', file=sys.stderr)
            proxy = None
            try:
                proxy = start_proxy('smtpproxy-memory', config)
                memory = measure_memory(proxy, sink, args)
            except (BenchError, OSError) as exc:
                failures.append('memory: %s' % exc)
            finally:
                if proxy is not None:
                    proxy.stop()
                    servers.remove(proxy)
        # -- STARTTLS handshakes (fresh proxy with a certificate)
        if os.path.exists(proxy_script) and shutil.which('openssl'):
            print('running: smtpproxy STARTTLS ...', file=sys.stderr)
            cert, key = make_certificate(workdir)
            tls_config = os.path.join(workdir, 'tls.conf')
            with open(tls_config, 'w') as fileobj:
                fileobj.write(PROXY_CONFIG % 500)
                fileobj.write('tls_cert = %s\ntls_key = %s\n' % (cert, key))
            proxy = None
            try:
                proxy = start_proxy('smtpproxy-tls', tls_config)
                count = TLS_SESSIONS
                tls_figures = (tls_sessions(proxy.port, count, False),
                               tls_sessions(proxy.port, count, True), count)
            except (BenchError, OSError) as exc:
                failures.append('STARTTLS: %s' % exc)
            finally:
                if proxy is not None:
                    proxy.stop()
                    servers.remove(proxy)

        # -- the service: connection flood and stop (fresh proxy)
        if os.path.exists(proxy_script):
            print('running: smtpproxy service ...', file=sys.stderr)
            service_config = os.path.join(workdir, 'service.conf')
            with open(service_config, 'w') as fileobj:
                fileobj.write(PROXY_CONFIG % args.idle_sessions)
            proxy = None
            try:
                proxy = start_proxy('smtpproxy-service', service_config)
                service = measure_service(proxy, args)
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                failures.append('service: %s' % exc)
            finally:
                if proxy is not None:
                    proxy.stop()
                    servers.remove(proxy)
        sink.check_alive()
    except (BenchError, OSError) as exc:
        failures.append(str(exc))
    finally:
        for server in reversed(servers):
            server.stop()
        for instance in postfixes:
            instance.stop()
        sys.stderr.flush()

    print_throughput(results, args)
    print_latency(latencies, args)
    if store_figures is not None:
        flat_out, paced, alone, workers, shared = store_figures
        print('Greylisting store: %d threads x %d decisions, each a '
              'transaction on one sqlite3 file:' % (STORE_SESSIONS,
                                                     STORE_DECISIONS))
        print('  flat out: %.0f decisions/s; latency median %.2f ms, '
              '99th percentile %.2f ms' % flat_out)
        print('    (50 threads that never wait: the tail is mostly their '
              'turns at the GIL)')
        print('  %d sessions x %d decisions, pausing about %g ms between '
              'decisions:' % (STORE_SESSIONS, STORE_PACED_DECISIONS,
                              1000 * STORE_PAUSE))
        print('    %.0f decisions/s; median %.2f ms, 99th percentile %.2f ms'
              % paced)
        print('  the same, the sessions shared among %d processes (the '
              'defaults\' workers):' % workers)
        print('    %.0f decisions/s; median %.2f ms, 99th percentile %.2f ms'
              % shared)
        print('  one session alone, 3000 decisions: %.0f decisions/s; '
              'median %.2f ms, 99th percentile %.2f ms' % alone)
        print('    goal "the store adds under 1 ms at the 99th percentile '
              'to a RCPT": alone %s, among %d sessions %s in one process, '
              '%s in %d'
              % ('met' if alone[2] < 1.0 else 'MISSED', STORE_SESSIONS,
                 'met' if paced[2] < 1.0 else 'MISSED',
                 'met' if shared[2] < 1.0 else 'MISSED', workers))
        print()
    if memory is not None:
        print_memory(memory[0], memory[1], memory[2], args)
    elif os.path.exists(proxy_script):
        print('Memory of the smtpproxy process: FAILED (see below)')
        print()
    else:
        print('Memory of the smtpproxy process: skipped (no smtpproxy.py)')
        print()

    if tls_figures is not None:
        print_tls(tls_figures)
    if service is not None:
        print_service(service, args)

    if failures:
        print('FAILURES (logs kept in %s):' % workdir)
        for failure in failures:
            print(_indent(failure, '  '))
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    if missing:
        print('missing: %s' % ', '.join(missing))
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""A private, real Postfix for the tests: its own master(8) and smtpd.

``Postfix(relay_port)`` makes an instance directory (``directory``) with
a main.cf and a master.cf in ``etc``, a queue in ``queue``, a data
directory ``data`` and the log ``maillog``, and runs Postfix's ``master``
in the foreground with ``-c DIRECTORY/etc``: nothing of the system's
Postfix configuration, queue or running daemons (port 25) is touched.

Its smtpd listens on 127.0.0.1:``port`` (a free port), accepts mail for
``DOMAIN`` (example.org) from anyone, and relays everything to
``[127.0.0.1]:relay_port`` (the tests' aiosmtpd ``Upstream``), without
DNS.  127.0.0.0/8 is in mynetworks, so it may relay anywhere; a client
address given by XCLIENT (e.g. 192.0.2.7) may only send to ``DOMAIN``.

With ``xclient=True`` (the default) XCLIENT and XFORWARD are authorized
from 127.0.0.0/8 and announced in the EHLO reply; with ``xclient=False``
neither is (``xforward`` defaults to the value of ``xclient``).
``settings`` adds or overrides main.cf parameters.

Postfix logs to ``maillog`` (``maillog_file`` and postlogd: Postfix 3.4
or later); ``log()`` returns what it holds so far, ``wait_for_log(text)``
polls until a line holds ``text``.

Postfix must run as root (its daemons drop to the ``postfix`` user), and
that user must reach the data directory by its full name: the directory
is therefore made with tempfile.mkdtemp() (mode 0711) and removed by
``stop()``, which keeps the log text for ``log()``; pytest's tmp_path
(in /tmp/pytest-of-root, mode 0700) would not do.  With
``directory=DIR``, DIR (which must exist, and which user ``postfix`` must
be able to reach) is used instead and left in place.

The master runs under a small reaper (Python, ``REAPER``): a Linux
"child subreaper" that reaps every Postfix daemon, also the ones the
master leaves behind when it exits, and exits only when all are gone.
``stop()`` sends it SIGTERM; it passes that to the master, which passes
it to its daemons; anything still there after ``STOP_TIMEOUT`` seconds
gets SIGKILL.  Should the test process die without stopping it (killed,
or pytest-timeout's thread method), the reaper gets SIGHUP from the
kernel (PR_SET_PDEATHSIG), stops everything the same way and removes the
directory.  That signal comes when the *thread* that started Postfix
ends, so start it from the main thread (as fixtures are).  And the
master exits on its own after ``MAX_LIFETIME`` seconds (``master -e``)
in any case.
"""

import grp
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from helpers import free_port

try:
    import pytest
except ImportError:             # contrib/bench.py uses Postfix alone
    pytest = None

DOMAIN = "example.org"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
MAX_LIFETIME = 900

MAIN_CF = """\
# Written by tests/postfix.py.
compatibility_level = {compatibility_level}
queue_directory = {directory}/queue
data_directory = {directory}/data
mail_owner = {owner}
setgid_group = {group}
syslog_name = postfix
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
myhostname = postfix.test
mydomain = test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {domain}
relayhost = [127.0.0.1]:{relay_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
smtpd_authorized_xclient_hosts = {xclient}
smtpd_authorized_xforward_hosts = {xforward}
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP Postfix
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtp_connection_cache_on_demand = no
delay_warning_time = 0
"""

# service type private unpriv chroot wakeup maxproc command
MASTER_CF = """\
# Written by tests/postfix.py.
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# The queue of Postfix's postfix-files: name, owned by mail_owner (else
# root), group setgid_group (else root), mode.
QUEUE_DIRECTORIES = [
    ("active", True, False, 0o700),
    ("bounce", True, False, 0o700),
    ("corrupt", True, False, 0o700),
    ("defer", True, False, 0o700),
    ("deferred", True, False, 0o700),
    ("flush", True, False, 0o700),
    ("hold", True, False, 0o700),
    ("incoming", True, False, 0o700),
    ("trace", True, False, 0o700),
    ("saved", True, False, 0o700),
    ("private", True, False, 0o700),
    ("maildrop", True, True, 0o730),
    ("public", True, True, 0o710),
    ("pid", False, False, 0o755),
]

# Runs the master (argv[4:]) as a child, reaps it and every daemon left
# behind, and exits with the master's status once all are gone.  argv[1]
# is the pid of the test process, argv[2] the seconds from SIGTERM to
# SIGKILL, argv[3] a directory to remove if the test process dies first
# (SIGHUP, from PR_SET_PDEATHSIG), or "".  Python 3.6+, stdlib only.
REAPER = r"""
import os, shutil, signal, sys
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0)
except (ImportError, OSError, AttributeError):
    pass
parent = int(sys.argv[1])
if os.getppid() != parent:
    sys.exit(70)
master = os.fork()
if master == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        os.execv(sys.argv[4], sys.argv[4:])
    finally:
        os._exit(71)
orphaned = []
def kill_group(signum):
    try:
        os.killpg(master, signum)
    except OSError:
        pass
def terminate(signum, frame):
    if signum == signal.SIGHUP:
        orphaned.append(signum)
    try:
        os.kill(master, signal.SIGTERM)
    except OSError:
        kill_group(signal.SIGTERM)
    signal.alarm(int(sys.argv[2]))
def alarm(signum, frame):
    kill_group(signal.SIGKILL)
signal.signal(signal.SIGALRM, alarm)
signal.signal(signal.SIGTERM, terminate)
signal.signal(signal.SIGHUP, terminate)
if os.getppid() != parent:
    terminate(signal.SIGHUP, None)
status = 70
while True:
    try:
        pid, code = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == master:
        status = os.WEXITSTATUS(code) if os.WIFEXITED(code) else 128 + (
            os.WTERMSIG(code))
        kill_group(signal.SIGTERM)
if orphaned and sys.argv[3]:
    shutil.rmtree(sys.argv[3], ignore_errors=True)
sys.exit(status)
"""

SBIN = ["/usr/sbin", "/usr/local/sbin"]

_installation = {}


class PostfixError(AssertionError):
    """Postfix is missing or did not start; the message says why."""


def _version_tuple(version):
    parts = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def installation():
    """What ``postconf -d`` says: a dict with daemon_directory,
    mail_version, mail_owner, setgid_group, and the paths of master,
    postconf and postfix.  Raises PostfixError when Postfix (3.4 or
    later), its user or group, or root are missing."""
    if _installation:
        return _installation
    path = os.pathsep.join([os.environ.get("PATH", "")] + SBIN)
    postconf = shutil.which("postconf", path=path)
    if postconf is None:
        raise PostfixError(
            "Postfix is not installed: no postconf on PATH or in %s "
            "(on Debian: apt-get install postfix)" % ", ".join(SBIN))
    names = ["daemon_directory", "command_directory", "mail_version",
             "mail_owner", "setgid_group"]
    output = subprocess.check_output(
        [postconf, "-d"] + names, universal_newlines=True)
    found = {}
    for line in output.splitlines():
        name, _, value = line.partition("=")
        found[name.strip()] = value.strip()
    found["postconf"] = postconf
    found["master"] = os.path.join(found["daemon_directory"], "master")
    found["postfix"] = os.path.join(found["command_directory"], "postfix")
    if not os.access(found["master"], os.X_OK):
        raise PostfixError("Postfix's master is missing: %s"
                           % found["master"])
    version = found["mail_version"]
    if _version_tuple(version) < (3, 4):
        raise PostfixError(
            "Postfix %s is too old: the tests need 3.4 or later "
            "(maillog_file and postlogd)" % version)
    try:
        pwd.getpwnam(found["mail_owner"])
        grp.getgrnam(found["setgid_group"])
    except KeyError as error:
        raise PostfixError("Postfix's user or group is missing: %s"
                           % error)
    if os.geteuid() != 0:
        raise PostfixError("a private Postfix needs root: its master "
                           "runs as root, its daemons as %s"
                           % found["mail_owner"])
    _installation.update(found)
    return _installation


def _reachable_by(path, user):
    """Whether ``user`` (a pwd entry) may search every directory down to
    and including ``path``."""
    groups = set([user.pw_gid] + [group.gr_gid for group in grp.getgrall()
                                  if user.pw_name in group.gr_mem])
    path = os.path.abspath(path)
    while True:
        mode = os.stat(path)
        if mode.st_uid == user.pw_uid:
            allowed = mode.st_mode & 0o100
        elif mode.st_gid in groups:
            allowed = mode.st_mode & 0o010
        else:
            allowed = mode.st_mode & 0o001
        if not allowed:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


class Postfix(object):
    """A Postfix of its own; see the module's docstring."""

    def __init__(self, relay_port, xclient=True, xforward=None,
                 settings=None, directory=None, port=None):
        setup = installation()
        self.process = None
        self._final_log = None
        self.start_time = self.stop_time = None
        self.version = setup["mail_version"]
        self.relay_port = relay_port
        self.port = port
        self._own_directory = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="smtpproxy-postfix-")
            os.chmod(directory, 0o711)
        self.directory = os.path.abspath(str(directory))
        self.config_dir = os.path.join(self.directory, "etc")
        self.queue_dir = os.path.join(self.directory, "queue")
        self.maillog = os.path.join(self.directory, "maillog")
        self.master_out = os.path.join(self.directory, "master.out")
        started = time.monotonic()
        try:
            self._configure(setup, xclient,
                            xclient if xforward is None else xforward,
                            settings or {})
            failure = self._start_master(setup, port)
        except BaseException:
            self.stop()
            raise
        if failure is not None:
            self.stop()
            raise PostfixError(failure)
        self.start_time = time.monotonic() - started

    def _configure(self, setup, xclient, xforward, settings):
        owner = pwd.getpwnam(setup["mail_owner"])
        if not _reachable_by(self.directory, owner):
            raise PostfixError(
                "user %s cannot reach %s: Postfix needs that (its data "
                "directory is in there)" % (owner.pw_name, self.directory))
        self._make_directories(setup)
        if _version_tuple(self.version) >= (3, 6):
            compatibility_level = "3.6"
        else:
            compatibility_level = "2"
        main_cf = MAIN_CF.format(
            compatibility_level=compatibility_level,
            directory=self.directory, owner=setup["mail_owner"],
            group=setup["setgid_group"], domain=DOMAIN,
            relay_port=self.relay_port,
            xclient="127.0.0.0/8" if xclient else "",
            xforward="127.0.0.0/8" if xforward else "")
        self._write("main.cf", _override(main_cf, settings))

    def _start_master(self, setup, port):
        """Start the master; None once smtpd answers, else why not."""
        # A free port may be taken before the master binds it: then try
        # another one, unless the caller chose it.
        attempts = 1 if port else 3
        for attempt in range(attempts):
            self.port = port or free_port()
            self._write("master.cf", MASTER_CF.format(port=self.port))
            failure = self._start(setup)
            if failure is None:
                return None
            if attempt + 1 < attempts and _port_in_use(self.port):
                self._halt()
                continue
            return failure + "\n" + self._diagnostics()

    def _start(self, setup):
        with open(self.master_out, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", REAPER, str(os.getpid()),
                 str(int(STOP_TIMEOUT)),
                 self.directory if self._own_directory else "",
                 setup["master"],
                 "-c", self.config_dir, "-e", str(MAX_LIFETIME)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        return self._wait_ready()

    def _make_directories(self, setup):
        owner = pwd.getpwnam(setup["mail_owner"]).pw_uid
        setgid = grp.getgrnam(setup["setgid_group"]).gr_gid
        os.mkdir(self.config_dir)
        os.mkdir(self.queue_dir)
        os.chmod(self.queue_dir, 0o755)
        for name, owned, group, mode in QUEUE_DIRECTORIES:
            path = os.path.join(self.queue_dir, name)
            os.mkdir(path)
            os.chown(path, owner if owned else 0, setgid if group else 0)
            os.chmod(path, mode)
        data_dir = os.path.join(self.directory, "data")
        os.mkdir(data_dir)
        os.chown(data_dir, owner, 0)
        os.chmod(data_dir, 0o700)

    def _write(self, name, text):
        path = os.path.join(self.config_dir, name)
        with open(path, "w") as config:
            config.write(text)
        # Postfix waits (up to 2 s) until a main.cf changed in this very
        # second is at least a second old: date it back.
        past = time.time() - 60
        os.utime(path, (past, past))

    def _wait_ready(self):
        """Poll until smtpd greets with 220: None, else what failed."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                return ("Postfix's master exited (status %s)"
                        % self.process.returncode)
            greeting = self._greeting()
            if greeting is not None:
                if greeting.startswith(b"220 "):
                    return None
                return "Postfix greeted with %r" % greeting
            if time.monotonic() > deadline:
                return ("Postfix's smtpd did not answer on 127.0.0.1:%d "
                        "in %.0f s" % (self.port, START_TIMEOUT))
            time.sleep(0.01)

    def _greeting(self):
        """The first line smtpd sends, or None if it does not answer."""
        try:
            probe = socket.create_connection(("127.0.0.1", self.port), 5)
        except OSError:
            return None
        try:
            reader = probe.makefile("rb")
            line = reader.readline()
            if line.startswith(b"220 "):
                probe.sendall(b"QUIT\r\n")
                reader.readline()
            reader.close()
            return line or None
        except OSError:
            return None
        finally:
            probe.close()

    def _diagnostics(self):
        """The master's output, the log, and what ``postfix check``
        says: the master reports its early errors to syslog only, and
        Postfix's commands write to stderr only if it is a terminal."""
        text = []
        if _port_in_use(self.port):
            text.append("--- 127.0.0.1:%d is in use" % self.port)
        for title, path in (("master's output", self.master_out),
                            ("maillog", self.maillog)):
            try:
                with open(path, "rb") as log_file:
                    content = log_file.read().decode("utf-8", "replace")
            except (OSError, IOError) as error:
                content = "(%s)" % error
            text.append("--- %s (%s):\n%s" % (title, path, content))
        command = [installation()["postfix"], "-c", self.config_dir,
                   "check"]
        try:
            status, output = _run_on_terminal(command)
            text.append("--- %s (status %s):\n%s"
                        % (" ".join(command), status, output))
        except (OSError, subprocess.SubprocessError) as error:
            text.append("--- %s: %s" % (" ".join(command), error))
        return "\n".join(text)

    def log(self):
        """Postfix's log so far (the text of its maillog_file)."""
        if self._final_log is not None:
            return self._final_log
        try:
            with open(self.maillog, "rb") as log_file:
                return log_file.read().decode("utf-8", "replace")
        except (OSError, IOError):
            return ""

    def log_lines(self, text=""):
        """The log lines that hold ``text``."""
        return [line for line in self.log().splitlines() if text in line]

    def wait_for_log(self, text, timeout=10.0):
        """Poll until a log line holds ``text``; return those lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(text)
            if lines:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %r in "
                                     "Postfix's log:\n%s"
                                     % (text, self.log()))
            time.sleep(0.01)

    def queue_is_empty(self):
        """True once no message waits in Postfix's queue."""
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.queue_dir, name)):
                if files:
                    return False
        return True

    def stop(self):
        """Stop the master and all its daemons, wait until every one of
        them is gone, keep the log, and remove the directory if it was
        made here.  Idempotent."""
        started = time.monotonic()
        self._halt()
        if self._final_log is None:
            self.stop_time = time.monotonic() - started
            self._final_log = self.log()
            if self._own_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _halt(self):
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            # The reaper did not manage: kill it and the master's group.
            process.kill()
            process.wait()
            _kill_group_of(self.queue_dir)


def _override(main_cf, settings):
    """``main_cf`` with ``settings`` (name: value) replacing or added to
    its parameters (one line each)."""
    lines = []
    left = dict(settings)
    for line in main_cf.splitlines():
        name = line.split("=", 1)[0].strip()
        if not line.startswith("#") and "=" in line and name in left:
            line = "%s = %s" % (name, left.pop(name))
        lines.append(line)
    for name, value in sorted(left.items()):
        lines.append("%s = %s" % (name, value))
    return "\n".join(lines) + "\n"


def _port_in_use(port):
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        return True
    finally:
        probe.close()
    return False


def _run_on_terminal(command, timeout=30):
    """Run ``command`` with its output on a pseudo-terminal; return its
    status and output."""
    master_fd, slave_fd = pty.openpty()
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   stdout=slave_fd, stderr=slave_fd)
    finally:
        os.close(slave_fd)
    output = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready = select.select([master_fd], [], [], 0.1)[0]
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(master_fd, 4096)
            except OSError:         # EIO: the terminal is closed
                break
            if not data:
                break
            output.append(data)
    finally:
        os.close(master_fd)
        if process.poll() is None:
            process.kill()
        process.wait()
    text = b"".join(output).decode("utf-8", "replace")
    return process.returncode, text.replace("\r\n", "\n")


def _kill_group_of(queue_dir):
    """SIGKILL the process group of the master whose pid file is in
    ``queue_dir``."""
    try:
        with open(os.path.join(queue_dir, "pid", "master.pid")) as pid:
            os.killpg(int(pid.read().strip()), signal.SIGKILL)
    except (OSError, IOError, ValueError):
        pass


def postfix_factory(tmp_path):
    """Start private Postfixes: ``postfix = postfix_factory(relay_port,
    xclient=True, settings=None)``.  All are stopped at teardown, and
    their logs copied to tmp_path (postfix0.maillog, ...)."""
    started = []

    def start(relay_port, **kwargs):
        instance = Postfix(relay_port, **kwargs)
        started.append(instance)
        return instance
    yield start
    try:
        for instance in started:
            instance.stop()
    finally:
        for instance in started:
            instance.stop()
    for number, instance in enumerate(started):
        log_path = tmp_path / ("postfix%d.maillog" % number)
        log_path.write_text(instance.log())


if pytest is not None:
    postfix_factory = pytest.fixture(postfix_factory)

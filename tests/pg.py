"""A private, real PostgreSQL cluster for the tests: never the system's.

``PostgreSQL()`` runs ``initdb`` into a new temporary directory and starts
``postgres`` on it, listening on 127.0.0.1 on a free ``port`` and on a
UNIX socket in ``socket_dir``; nothing of a system cluster (port 5432,
/var/run/postgresql) is touched.  The superuser is ``postgres``; local
(socket) connections are trusted, TCP ones need a password
(scram-sha-256), so that the tests' URIs carry one as a site's would.

``database()`` makes a new, empty database owned by the role ``greylist``
(password ``secret``) and returns its URI,
``postgresql://greylist:secret@127.0.0.1:PORT/NAME``; ``empty(NAME)``
makes database NAME the first time, and drops smtpproxy's tables from
it the next (quicker); ``socket_uri(NAME)`` is the same database through the socket
(``postgresql:///NAME?host=DIR&port=PORT&user=greylist``);
``login(PASSWORD)`` makes a role of its own with that password, and its
database, and returns their URI.  ``sql(text)``
runs statements as the superuser.  ``stop()`` and ``start()`` stop the
server (a fast shutdown, as ``pg_ctl stop -m fast``: sessions end;
``stop("immediate")``, as ``-m immediate``: a crash, what a host that
dies does) and start it again on the same port and data; ``close()``
stops it and removes the directory.

``standby()`` makes a hot standby of this cluster, a PostgreSQL of its
own (its directory, port and socket) made with ``pg_basebackup -R``
(streaming replication, as a site makes one), started and ready: it
answers read-only queries.  ``promote()`` makes a standby the primary
(``pg_ctl promote``, waited for); ``in_recovery()`` says what it is now.
A primary stopped and started again after its standby was promoted is a
stale primary: writable, on the old timeline, as a site's old primary
is when it comes back by itself.

initdb and postgres refuse to run as root: as root, they run as the
unprivileged user ``nobody``, which owns the directory (made with
tempfile.mkdtemp(), as pytest's tmp_path would not be reachable).  The
binaries are found on PATH, else in Debian's /usr/lib/postgresql/N/bin
(the newest N), as the ``postgresql`` package installs them.

``postgres`` runs in the foreground as a child of the test process, with
PR_SET_PDEATHSIG: should the tests die without stopping it, the kernel
sends it SIGINT (a fast shutdown) and it does not outlive them.  Readiness
is polled (a connection that succeeds), never slept for.  The cluster is
made for tests: fsync off, small buffers.
"""

import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from helpers import free_port

USER = "nobody"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
ROLE, PASSWORD = "greylist", "secret"


def binary(name):
    """The path of PostgreSQL's ``name`` (initdb, postgres)."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            # Debian links initdb into /usr/local/bin on some images:
            # postgres is next to what the link points at.
            return os.path.realpath(candidate)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name),
                   key=lambda path: int(path.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL's %s is not installed: apt-get "
                           "install postgresql (bash .ci/run does)" % name)
    return found[-1]


class PostgreSQL(object):

    def __init__(self, settings=None, primary=None):
        self.bindir = os.path.dirname(binary("initdb"))
        self.directory = tempfile.mkdtemp(prefix="smtpproxy-pg-")
        os.chmod(self.directory, 0o755)
        self.data = os.path.join(self.directory, "data")
        self.socket_dir = self.directory
        self.log_path = os.path.join(self.directory, "postgres.log")
        self.port = free_port()
        self.process = None
        self.count = 0
        self.made = set()
        self.as_user = os.geteuid() == 0
        if self.as_user:
            entry = pwd.getpwnam(USER)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
            os.chown(self.directory, self.uid, self.gid)
        if primary is not None:
            self._copy(primary)
            return
        password_file = os.path.join(self.directory, "pw")
        with open(password_file, "w") as stream:
            stream.write("postgres\n")
        if self.as_user:
            os.chown(password_file, self.uid, self.gid)
        subprocess.check_call(
            [os.path.join(self.bindir, "initdb"), "-D", self.data,
             "-U", "postgres", "--pwfile", password_file, "-E", "UTF8",
             "--locale", "C", "--auth-local", "trust",
             "--auth-host", "scram-sha-256", "--no-sync"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=self._become, cwd=self.directory)
        self._configure(settings)
        self.start()
        self.sql("CREATE ROLE %s LOGIN PASSWORD '%s'" % (ROLE, PASSWORD))

    def _configure(self, settings):
        # Appended: for a standby, after its primary's copied lines (the
        # last line of a setting is the one in force).
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write("\n# tests/pg.py\n"
                       "listen_addresses = '127.0.0.1'\n"
                       "port = %d\n"
                       "unix_socket_directories = '%s'\n"
                       "max_connections = 120\n"
                       "shared_buffers = 16MB\n"
                       "fsync = off\n"
                       "full_page_writes = off\n"
                       % (self.port, self.socket_dir))
            for name, value in (settings or {}).items():
                conf.write("%s = %s\n" % (name, value))

    def _copy(self, primary):
        # A hot standby of ``primary``: its base backup, with the
        # connection to it and standby.signal (-R), over its socket (its
        # pg_hba.conf trusts local replication, as initdb writes it).
        subprocess.check_call(
            [os.path.join(self.bindir, "pg_basebackup"), "-D", self.data,
             "-h", primary.socket_dir, "-p", str(primary.port),
             "-U", "postgres", "-R", "-X", "stream", "-c", "fast",
             "--no-sync"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=self._become, cwd=self.directory)
        self._configure({"hot_standby": "on"})
        self.made = set(primary.made)
        self.count = primary.count + 1000       # names of its own
        self.start()

    def standby(self):
        """A hot standby of this cluster, started (see the docstring)."""
        return PostgreSQL(primary=self)

    def in_recovery(self):
        return self.sql("SELECT pg_is_in_recovery()") == "t"

    def promote(self):
        """This standby becomes a primary (pg_ctl promote -w)."""
        subprocess.check_call(
            [os.path.join(self.bindir, "pg_ctl"), "promote", "-w",
             "-t", str(int(START_TIMEOUT)), "-D", self.data],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=self._become, cwd=self.directory)
        deadline = time.monotonic() + START_TIMEOUT
        while self.in_recovery():
            if time.monotonic() > deadline:
                raise RuntimeError("not promoted in %s s: %s"
                                   % (START_TIMEOUT, self.log()))
            time.sleep(0.05)        # polling, not waiting on a guess

    def _become(self, death_signal=None):
        # In the child, before exec: the unprivileged user, and a signal
        # when the parent dies.
        if death_signal is not None:
            ctypes.CDLL(None, use_errno=True).prctl(1, death_signal)
        if self.as_user:
            os.setgid(self.gid)
            os.setgroups([])
            os.setuid(self.uid)

    def start(self):
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
            preexec_fn=lambda: self._become(signal.SIGINT))
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("postgres exited (%s): %s"
                                   % (self.process.returncode, self.log()))
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("postgres not ready in %s s: %s"
                                   % (START_TIMEOUT, self.log()))
            time.sleep(0.05)        # polling, not waiting on a guess

    def _ready(self):
        result = subprocess.run(
            [os.path.join(self.bindir, "pg_isready"), "-q", "-h",
             self.socket_dir, "-p", str(self.port), "-U", "postgres"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return result.returncode == 0

    def stop(self, mode="fast"):
        """A fast shutdown: sessions are ended, as in an outage; mode
        "immediate": no shutdown at all (SIGQUIT), as a host that dies."""
        if self.process is None:
            return
        self.process.send_signal(
            signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self):
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as stream:
                return stream.read()
        except OSError:
            return ""

    def sql(self, text, database="postgres"):
        """Run ``text`` as the superuser through the socket (psql)."""
        result = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t",
             "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
             "-p", str(self.port), "-U", "postgres", "-d", database,
             "-c", text], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True)
        if result.returncode:
            raise RuntimeError("psql: %s: %s" % (text, result.stderr))
        return result.stdout.strip()

    def database(self):
        """A new, empty database owned by ROLE; its URI, with password."""
        self.count += 1
        name = "greylist%d" % self.count
        self.sql("CREATE DATABASE %s OWNER %s" % (name, ROLE))
        return self.uri(name)

    def empty(self, name):
        """The URI of database ``name``, made if need be, without
        smtpproxy's tables: quicker than a new database, for tests that
        need no other state."""
        if name not in self.made:
            self.made.add(name)
            self.sql("CREATE DATABASE %s OWNER %s" % (name, ROLE))
        else:
            self.sql("DROP TABLE IF EXISTS smtpproxy_schema, "
                     "smtpproxy_triplets, smtpproxy_clients, "
                     "smtpproxy_traps, smtpproxy_expired", name)
        return self.uri(name)

    def uri(self, name, role=ROLE, password=PASSWORD):
        return "postgresql://%s:%s@127.0.0.1:%d/%s" % (
            role, password, self.port, name)

    def login(self, password, written=None):
        """A new role whose password is ``password`` (no ' in it), and a
        new database it owns: the URI, the password as ``written`` in it
        (as it is, if not given)."""
        self.count += 1
        name = "login%d" % self.count
        self.sql("CREATE ROLE %s LOGIN PASSWORD '%s'" % (name, password))
        self.sql("CREATE DATABASE %s OWNER %s" % (name, name))
        return self.uri(name, name, password if written is None
                        else written)

    def socket_uri(self, name):
        return "postgresql:///%s?host=%s&port=%d&user=%s" % (
            name, self.socket_dir, self.port, ROLE)

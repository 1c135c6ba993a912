"""The LSB init script, contrib/init.d/smtpproxy, run for real.

Each test runs the script with /bin/sh (dash on Debian) against the real
smtpproxy.py --daemon, once through start-stop-daemon and once through
the script's fallback of plain kill (SMTPPROXY_NO_SSD=1).  A wrapper
start-stop-daemon first on PATH records its calls, so that each test knows
which of the two ran.  Every daemon a test started is killed by pid when
it ends, whatever happened.
"""

import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import HERE, ROOT, RawClient, free_port, read, wait_until

SCRIPT = os.path.join(ROOT, "contrib", "init.d", "smtpproxy")
SSD = shutil.which("start-stop-daemon",
                   path=os.pathsep.join([os.environ.get("PATH", ""),
                                         "/usr/sbin", "/sbin"]))
USAGE = ("Usage: %s {start|stop|restart|try-restart|reload|force-reload"
         "|reopen-logs|status}" % SCRIPT)


def alive(pid):
    """True if process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as command:
            return command.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), 5).close()
    except ConnectionRefusedError:
        return True
    return False


class Service(object):
    """The init script with its own config, pidfile and port."""

    def __init__(self, directory, upstream_port, use_ssd):
        self.tmp = directory
        self.use_ssd = use_ssd
        self.port = free_port()
        self.upstream_port = upstream_port
        self.config = str(directory / "smtpproxy.conf")
        self.pidfile = str(directory / "smtpproxy.pid")
        self.ssd_log = str(directory / "ssd.log")
        self.write_config()
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "start-stop-daemon"
        wrapper.write_text('#!/bin/sh\necho "$*" >>%s\nexec %s "$@"\n'
                           % (self.ssd_log, SSD))
        wrapper.chmod(0o755)
        self.env = dict((key, value) for key, value in os.environ.items()
                        if not key.startswith("SMTPPROXY_"))
        self.env.update({
            "PATH": os.pathsep.join([str(bin_dir),
                                     os.environ.get("PATH", "/usr/bin:/bin"),
                                     os.path.dirname(SSD)]),
            "PYTHONPATH": os.pathsep.join([HERE, ROOT]),
            "SMTPPROXY_BIN": os.path.join(ROOT, "smtpproxy.py"),
            "SMTPPROXY_PYTHON": sys.executable,
            "SMTPPROXY_CONFIG": self.config,
            "SMTPPROXY_PIDFILE": self.pidfile,
            "SMTPPROXY_DEFAULTS": str(directory / "none"),
        })
        if not use_ssd:
            self.env["SMTPPROXY_NO_SSD"] = "1"
        self.pids = set()
        self.others = []

    def write_config(self, servername="one.example", extra="",
                     store=None):
        with open(self.config, "w") as config:
            config.write(
                "port = %d\nlisten_ip = 127.0.0.1\n"
                "smtp_ip = 127.0.0.1\nsmtp_port = %d\n"
                "servername = %s\n"
                "greylist_log = %s\ngreylist_db = %s\nlog_file = %s\n"
                "run_as_root = yes\n"
                "allowed_domains:\n    example.org\n%s"
                % (self.port, self.upstream_port, servername,
                   self.tmp / "greylist.log",
                   store or self.tmp / "greylist.db",
                   self.tmp / "smtpproxy.log", extra))

    def run(self, *args, **env):
        """Run the script: ``(exit status, stdout and stderr)``; as the
        user ``as_user``, if given."""
        user = env.pop("as_user", None)
        command = ["/bin/sh", SCRIPT] + list(args)
        if user:
            command = ["setpriv", "--reuid=" + user, "--regid=" + user,
                       "--clear-groups"] + command
        environment = dict(self.env)
        for key, value in env.items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        try:
            process = subprocess.run(
                command, env=environment,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=str(self.tmp), timeout=60)
        except subprocess.TimeoutExpired:
            # Also what happens if the daemon keeps the script's stdout.
            raise AssertionError("%s %s did not return" % (SCRIPT, args))
        finally:
            self.remember_daemons()
        return process.returncode, process.stdout.decode()

    def pid(self):
        """The pid in the pidfile, which must be "PID\\n"."""
        with open(self.pidfile) as pidfile:
            text = pidfile.read()
        assert text.endswith("\n") and text[:-1].isdigit(), repr(text)
        pid = int(text)
        self.pids.add(pid)
        return pid

    def greeting(self):
        client = RawClient(self.port, timeout=10)
        try:
            assert client.cmd("QUIT")[0] == 221
        finally:
            client.close()
        return client.greeting

    def ssd_calls(self):
        """The commands (--start, --stop) start-stop-daemon ran for."""
        if not os.path.exists(self.ssd_log):
            return []
        with open(self.ssd_log) as log:
            return [line.split()[0] for line in log]

    def use_pidfile(self, path):
        """Have the script use the pidfile ``path``."""
        self.pidfile = str(path)
        self.env["SMTPPROXY_PIDFILE"] = self.pidfile

    def remember_daemons(self):
        """Note every process whose command line names this test's
        files (its daemons), to kill them at the end."""
        # Not a FIFO: it would hang the test.
        if (os.path.isfile(self.pidfile)
                and not os.path.islink(self.pidfile)):
            try:
                with open(self.pidfile) as pidfile:
                    self.pids.add(int(pidfile.read()))
            except (OSError, ValueError):
                pass
        for name in os.listdir("/proc"):
            if name.isdigit() and self.config in cmdline(int(name)):
                self.pids.add(int(name))

    def other_program(self, argv=("sleep", "60"), executable=None):
        """A live process that is not smtpproxy: root's, as this test
        runs, harmless, with the command line ``argv``."""
        process = subprocess.Popen(list(argv), executable=executable)
        self.others.append(process)
        return process

    def impostor(self, pidfile=None):
        """A harmless process that the script takes for the smtpproxy it
        started, run as the script runs it: SMTPPROXY_BIN is made a script
        that only sleeps, and it is given the pidfile (``pidfile``, else
        the service's)."""
        program = self.tmp / "impostor.py"
        program.write_text("import time\ntime.sleep(60)\n")
        self.env["SMTPPROXY_BIN"] = str(program)
        return self.other_program([
            sys.executable, str(program), "--daemon", "--config",
            self.config, "--pidfile", pidfile or self.pidfile])

    def cleanup(self):
        self.remember_daemons()
        for pid in self.pids:
            if alive(pid) and self.config in cmdline(pid):
                os.kill(pid, signal.SIGKILL)
        for process in self.others:
            process.kill()
            process.wait()

    def check_started(self, output):
        """After a successful start: the pidfile names a live daemon,
        detached from the script, that answers at once."""
        pid = self.pid()
        assert alive(pid)
        assert self.config in cmdline(pid)
        assert os.getsid(pid) != os.getsid(0)
        assert os.readlink("/proc/%d/cwd" % pid) == "/"
        for fd in (0, 1, 2):
            assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
        assert self.greeting()[0] == 220
        assert "smtpproxy" in output
        if self.use_ssd:
            assert self.ssd_calls()[-1] == "--start"
        return pid

    def check_stopped(self, pid):
        if self.use_ssd:
            assert self.ssd_calls()[-1] == "--stop"
        assert not alive(pid)
        assert not os.path.exists(self.pidfile)
        assert refused(self.port)


@pytest.fixture
def make_service(request, upstream):
    """``make_service(directory)``: a Service keeping its files there,
    run with plain kill, or through start-stop-daemon for the tests marked
    BOTH_WAYS (it is slower: each stop takes a second or more here)."""
    how = getattr(request, "param", "kill")
    if how == "start-stop-daemon":
        assert SSD, "start-stop-daemon not found (Debian's dpkg has it)"
    services = []

    def make(directory):
        service = Service(directory, upstream.port,
                          how == "start-stop-daemon")
        services.append(service)
        return service
    yield make
    for service in services:
        service.cleanup()
    for service in services:
        if not service.use_ssd:
            assert service.ssd_calls() == []


@pytest.fixture
def service(make_service, tmp_path):
    return make_service(tmp_path)


BOTH_WAYS = pytest.mark.parametrize(
    "make_service", ["start-stop-daemon", "kill"], indirect=True)


@BOTH_WAYS
def test_start_status_reload_stop(service):
    code, output = service.run("start")
    assert code == 0, output
    pid = service.check_started(output)
    assert service.greeting()[1].startswith("one.example ESMTP")

    code, output = service.run("status")
    assert (code, output) == (0, "smtpproxy is running (pid %d).\n" % pid)

    # A second start fails and leaves the first alone.
    code, output = service.run("start")
    assert code == 1, output
    assert "smtpproxy is already running (pid %d)" % pid in output
    assert service.pid() == pid and alive(pid)
    assert service.greeting()[0] == 220

    # reload: the same process reads the changed file.
    service.write_config(servername="two.example")
    code, output = service.run("reload")
    assert code == 0, output
    wait_until(lambda: service.greeting()[1].startswith("two.example "),
               what="the new servername in the greeting")
    assert service.pid() == pid and alive(pid)
    service.write_config(servername="three.example")
    code, output = service.run("force-reload")
    assert code == 0, output
    wait_until(lambda: service.greeting()[1].startswith("three.example "),
               what="the new servername in the greeting")
    assert service.pid() == pid and alive(pid)

    code, output = service.run("stop")
    assert code == 0, output
    service.check_stopped(pid)
    code, output = service.run("status")
    assert (code, output) == (3, "smtpproxy is not running.\n")
    code, output = service.run("stop")
    assert (code, output) == (0, "smtpproxy is not running.\n")
    if service.use_ssd:
        assert service.ssd_calls() == ["--start", "--stop"]


@BOTH_WAYS
def test_stale_pidfile_of_a_dead_process(service):
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(service.pidfile, "w") as pidfile:
        pidfile.write("%d\n" % dead.pid)
    code, output = service.run("status")
    assert code == 1
    assert output == ("smtpproxy is not running but %s exists.\n"
                      % service.pidfile)
    code, output = service.run("reload")
    assert code == 7, output

    code, output = service.run("start")
    assert code == 0, output
    pid = service.check_started(output)
    assert pid != dead.pid
    code, output = service.run("stop")
    assert code == 0, output
    service.check_stopped(pid)


@BOTH_WAYS
def test_pidfile_naming_another_program(service):
    other = service.other_program()
    with open(service.pidfile, "w") as pidfile:
        pidfile.write("%d\n" % other.pid)
    code, _ = service.run("status")
    assert code == 1
    # stop neither signals that program nor fails; it drops the pidfile.
    code, output = service.run("stop")
    assert code == 0, output
    assert "stale" in output
    assert not os.path.exists(service.pidfile)
    assert other.poll() is None
    with open(service.pidfile, "w") as pidfile:
        pidfile.write("%d\n" % other.pid)
    code, output = service.run("start")
    assert code == 0, output
    pid = service.check_started(output)
    assert pid != other.pid
    assert other.poll() is None
    code, output = service.run("stop")
    assert code == 0, output
    service.check_stopped(pid)
    assert other.poll() is None


def write_pid(path, pid):
    with open(str(path), "w") as pidfile:
        pidfile.write("%d\n" % pid)


def test_impostor_is_taken_for_the_service(service):
    """What the tests below rely on: the script takes an impostor for
    its smtpproxy where its pidfile can be trusted, and stops it."""
    impostor = service.impostor()
    write_pid(service.pidfile, impostor.pid)
    code, output = service.run("status")
    assert (code, output) == (0, "smtpproxy is running (pid %d).\n"
                              % impostor.pid)
    code, output = service.run("stop")
    assert code == 0, output
    assert impostor.wait() == -signal.SIGTERM
    assert not os.path.exists(service.pidfile)


def another_users_directory(base):
    users = base / "users"
    users.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(str(users), nobody.pw_uid, nobody.pw_gid)
    return users


def sticky_directory(base):
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    return sticky


def roots_directory(parent, name="root"):
    directory = parent / name
    directory.mkdir()
    directory.chmod(0o755)
    return directory


def owned_by_another_user(base):
    users = another_users_directory(base)
    return users, users


def another_users_directory_on_the_way(base):
    users = another_users_directory(base)
    return roots_directory(users), users


def group_writable(base):
    shared = roots_directory(base, "shared")
    shared.chmod(0o775)
    return shared, shared


def sticky_and_world_writable(base):
    sticky = sticky_directory(base)
    return sticky, sticky


def link_to_another_users_directory(base):
    link = base / "link"
    users = another_users_directory(base)
    link.symlink_to("users")
    return link, users


def another_users_link_in_a_sticky_directory(base):
    link = sticky_directory(base) / "link"
    link.symlink_to(str(roots_directory(base)))
    nobody = pwd.getpwnam("nobody")
    os.lchown(str(link), nobody.pw_uid, nobody.pw_gid)
    return link, link


# (directory of the pidfile, directory the script must name) in a
# root-only base directory.
UNTRUSTED_DIRECTORIES = [
    pytest.param(layout, id=layout.__name__.replace("_", "-"))
    for layout in (owned_by_another_user, another_users_directory_on_the_way,
                   group_writable, sticky_and_world_writable,
                   link_to_another_users_directory,
                   another_users_link_in_a_sticky_directory)]


@pytest.mark.parametrize("layout", UNTRUSTED_DIRECTORIES)
def test_pidfile_in_a_directory_another_user_can_change(service, layout):
    """Another user could have written any pid there: the script reads
    nothing, signals nothing, removes nothing, and says where to keep
    the pidfile; status 4 (unknown) for status, 6 (not configured) for
    the rest.  The pid is that of a process the script would take for
    its smtpproxy anywhere else (test_impostor_is_taken_for_the_service).
    """
    if os.geteuid() != 0:
        pytest.skip("needs root")
    directory, named = layout(service.tmp)
    service.use_pidfile(directory / "smtpproxy.pid")
    impostor = service.impostor()
    write_pid(service.pidfile, impostor.pid)
    for action, expected in [("status", 4), ("stop", 6), ("reload", 6),
                             ("force-reload", 6), ("reopen-logs", 6),
                             ("try-restart", 6), ("restart", 6),
                             ("start", 6)]:
        code, output = service.run(action)
        assert code == expected, (action, output)
        assert ("smtpproxy: will not use the pidfile %s: %s"
                % (service.pidfile, named)) in output, (action, output)
        assert "keep it in a directory only root can write, such as /run" \
            in output
        assert impostor.poll() is None, action
        assert os.path.exists(service.pidfile)
    assert output.startswith("smtpproxy: will not use")
    assert service.ssd_calls() == []


def test_pidfile_beyond_a_sticky_directory_and_a_root_link(service):
    """A sticky directory on the way (as /tmp is) and root's links are
    fine, as for smtpproxy itself: the same impostor is taken."""
    below = roots_directory(sticky_directory(service.tmp))
    (service.tmp / "link").symlink_to("sticky/root")
    service.use_pidfile(service.tmp / "link" / "smtpproxy.pid")
    impostor = service.impostor()
    write_pid(below / "smtpproxy.pid", impostor.pid)
    code, output = service.run("status")
    assert (code, output) == (0, "smtpproxy is running (pid %d).\n"
                              % impostor.pid)


def fifo(service):
    os.mkfifo(service.pidfile)


def link(service):
    real = service.tmp / "real.pid"
    write_pid(real, service.impostor().pid)
    os.symlink(str(real), service.pidfile)


def another_users_file(service):
    write_pid(service.pidfile, service.impostor().pid)
    nobody = pwd.getpwnam("nobody")
    os.chown(service.pidfile, nobody.pw_uid, nobody.pw_gid)


def group_writable_file(service):
    write_pid(service.pidfile, service.impostor().pid)
    os.chmod(service.pidfile, 0o664)


@pytest.mark.parametrize("make, problem", [
    (fifo, "it is not a regular file"),
    (link, "it is a symbolic link"),
    (another_users_file, "other users can write it"),
    (group_writable_file, "other users can write it"),
], ids=["fifo", "link", "another-users-file", "group-writable-file"])
def test_pidfile_that_only_root_can_have_written(service, make, problem):
    """In a root-only directory, the pidfile is read only if it is a
    regular file that only root can write: a FIFO would hang the script
    (status must return), a link or another user's file may name any
    process (the impostor)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    make(service)
    for action, expected in [("status", 4), ("stop", 6), ("reload", 6),
                             ("start", 6)]:
        code, output = service.run(action)
        assert code == expected, (action, output)
        assert ("smtpproxy: will not use the pidfile %s: %s"
                % (service.pidfile, problem)) in output, (action, output)
        assert "remove it" in output
        assert all(other.poll() is None for other in service.others)
        assert os.path.lexists(service.pidfile)
        if action == "stop":
            assert "not stopped; nothing was signalled" in output


# Processes whose command line holds "smtpproxy", the program, or the
# pidfile, but which are not the smtpproxy the script started.
NOT_THE_SERVICE = [
    pytest.param(lambda service: service.other_program(
        ["smtpproxy-decoy", "60"], executable=shutil.which("sleep")),
        id="named-smtpproxy"),
    pytest.param(lambda service: service.other_program(
        [sys.executable, "-c", "import time; time.sleep(60)",
         os.path.join(ROOT, "smtpproxy.py"), "--daemon", "--config",
         service.config, "--pidfile", service.pidfile]),
        id="program-and-pidfile-as-arguments"),
    pytest.param(lambda service: service.impostor(
        pidfile=str(service.tmp / "other.pid")),
        id="another-instance"),
]


@pytest.mark.parametrize("decoy", NOT_THE_SERVICE)
def test_pid_of_a_process_that_is_not_the_service(service, decoy):
    """The pid of a stale pidfile, given since to a process that merely
    mentions smtpproxy, is not taken for the service: it must run the
    program the script runs, as its program or its interpreter's script,
    given this pidfile."""
    other = decoy(service)
    write_pid(service.pidfile, other.pid)
    code, output = service.run("status")
    assert (code, output) == (1, "smtpproxy is not running but %s "
                              "exists.\n" % service.pidfile)
    code, output = service.run("stop")
    assert code == 0, output
    assert "stale" in output
    assert not os.path.exists(service.pidfile)
    assert other.poll() is None


def test_commands_while_stopped(service):
    code, output = service.run("reload")
    assert (code, output) == (7, "smtpproxy is not running.\n")
    code, output = service.run("force-reload")
    assert code == 7
    code, output = service.run("try-restart")
    assert (code, output) == (0, "")
    assert not os.path.exists(service.pidfile)
    for args in [("bogus",), (), ("start", "now")]:
        code, output = service.run(*args)
        assert (code, output) == (2, USAGE + "\n")
    assert refused(service.port)
    assert service.ssd_calls() == []


@BOTH_WAYS
def test_restart(service):
    code, output = service.run("restart")
    assert code == 0, output
    first = service.check_started(output)
    code, output = service.run("restart")
    assert code == 0, output
    second = service.check_started(output)
    assert second != first and not alive(first)

    # A file the proxy would refuse is found before it is stopped, or
    # even signalled: the running proxy goes on exactly as it was.
    service.write_config(extra="max_grey = soon\n")
    for action in ("restart", "reload", "force-reload"):
        code, output = service.run(action)
        assert code == 6, output
        assert "max_grey" in output
        assert service.pid() == second and alive(second)
    assert "not reloaded; the running proxy goes on as it was" in output
    assert "reload" not in read(service.tmp / "smtpproxy.log")
    # Reopening the logs (logrotate) does not depend on the file.
    os.rename(str(service.tmp / "smtpproxy.log"),
              str(service.tmp / "smtpproxy.log.1"))
    code, output = service.run("reopen-logs")
    assert code == 0, output
    wait_until(lambda: "logs reopened" in read(service.tmp / "smtpproxy.log"),
               what="the proxy to reopen its log")

    code, output = service.run("try-restart")
    assert code == 6, output
    service.write_config()
    code, output = service.run("try-restart")
    assert code == 0, output
    third = service.check_started(output)
    assert third != second and not alive(second)
    code, output = service.run("stop")
    assert code == 0, output
    service.check_stopped(third)


# What the service would refuse though every value is well-formed: the
# check before a restart or a reload runs the start's own checks.
REFUSED_AT_START = [
    pytest.param("user = nosuchuser\n", "unknown user nosuchuser",
                 id="unknown-user"),
    pytest.param("run_as_root = no\n", "--user NAME", id="root-no-user"),
    pytest.param("tls_cert = /nonexistent/cert.pem\n", "tls_cert",
                 id="missing-tls-cert"),
    pytest.param("proxy_protocol = v1\n", "proxy_protocol_from",
                 id="proxy-protocol-from-anyone"),
]


@pytest.mark.parametrize("extra, reason", REFUSED_AT_START)
def test_restart_and_reload_refuse_what_a_start_would(service, extra,
                                                      reason):
    code, output = service.run("start")
    assert code == 0, output
    pid = service.check_started(output)
    service.write_config(extra=extra)
    for action in ("restart", "try-restart", "reload", "force-reload"):
        code, output = service.run(action)
        assert code == 6, (action, output)
        assert reason in output, (action, output)
        assert service.pid() == pid and alive(pid)
    assert service.greeting()[0] == 220
    code, output = service.run("stop")
    assert code == 0, output
    service.check_stopped(pid)


def test_broken_config_start_fails(service):
    service.write_config(extra="max_grey = soon\n")
    code, output = service.run("start")
    assert code == 6, output
    assert "smtpproxy.conf:" in output and "max_grey" in output
    assert "failed" in output
    code, _ = service.run("status")
    assert code == 3
    assert refused(service.port)


def test_port_in_use_start_fails(service):
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", service.port))
        taken.listen(1)
        code, output = service.run("start")
        assert code == 1, output
        assert "smtpproxy: error:" in output
        code, _ = service.run("status")
        assert code == 3
    finally:
        taken.close()


def test_defaults_file_and_environment(service):
    defaults = service.tmp / "defaults"
    defaults.write_text(
        "# sourced by the init script\n"
        "SMTPPROXY_CONFIG=%s\n"
        "SMTPPROXY_OPTS='-o servername=from-defaults.example'\n"
        % service.config)

    def start_and_greet(**env):
        code, output = service.run("start", SMTPPROXY_DEFAULTS=str(defaults),
                                   **env)
        assert code == 0, output
        pid = service.check_started(output)
        greeting = service.greeting()[1]
        code, output = service.run("stop")
        assert code == 0, output
        service.check_stopped(pid)
        return greeting.split()[0]

    # The file's SMTPPROXY_CONFIG and SMTPPROXY_OPTS are used ...
    assert start_and_greet(SMTPPROXY_CONFIG=None) == "from-defaults.example"
    # ... unless the environment sets them, even to nothing.
    assert start_and_greet(
        SMTPPROXY_OPTS="-o servername=from-env.example") == "from-env.example"
    assert start_and_greet(SMTPPROXY_OPTS="") == "one.example"


@BOTH_WAYS
def test_stop_kills_after_the_timeout(service, upstream):
    """A session in DATA holds a graceful stop up to grace_period (30 s);
    after SMTPPROXY_STOP_TIMEOUT (1 s) the script sends SIGKILL."""
    service.write_config(extra="grace_period = 30\n"
                               "allowed_sender_nets:\n    127.0.0.0/8\n")
    code, output = service.run("start")
    assert code == 0, output
    pid = service.check_started(output)
    client = RawClient(service.port)
    try:
        assert client.cmd("EHLO client.example")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send("Subject: held\r\n\r\nstill writing\r\n")
        started = time.monotonic()
        code, output = service.run("stop", SMTPPROXY_STOP_TIMEOUT="1")
        assert code == 0, output
        service.check_stopped(pid)
        assert time.monotonic() - started >= 1
        # Killed: the session is cut without the 421 4.3.2 that ends
        # one past grace_period.
        try:
            assert client.reply() == (None, "")
        except ConnectionResetError:
            pass
        assert upstream.messages == []
    finally:
        client.close()


@BOTH_WAYS
def test_daemon_drops_to_its_user(make_service):
    """Started as root, the daemon serves as `user`, and cannot remove its
    pidfile (root's, in root's directory): stop does."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    # Not tmp_path: the user must reach the files, and pytest's base
    # directory is root's alone.
    directory = pathlib.Path(tempfile.mkdtemp(prefix="smtpproxy-test-"))
    try:
        directory.chmod(0o755)
        store = directory / "store"
        store.mkdir()
        os.chown(str(store), nobody.pw_uid, nobody.pw_gid)
        service = make_service(directory)
        # A store the user cannot make (root's directory): the start fails
        # after the switch, when the daemon can no longer remove its
        # pidfile; start does.
        service.write_config(extra="user = nobody\n")
        code, output = service.run("start")
        assert code == 1, output
        assert ("greylist.db: unable to open database file: user nobody "
                "cannot make it there: its directory ") in output
        assert not os.path.exists(service.pidfile)
        code, _ = service.run("status")
        assert code == 3

        service.write_config(extra="user = nobody\n",
                             store=store / "greylist.db")
        code, output = service.run("start")
        assert code == 0, output
        pid = service.check_started(output)
        with open("/proc/%d/status" % pid) as status:
            uids = [line.split()[1:] for line in status
                    if line.startswith("Uid:")][0]
        assert uids == [str(nobody.pw_uid)] * 4
        assert os.stat(service.pidfile).st_uid == 0

        # status as yet another user, who may not signal the daemon.
        code, output = service.run("status", as_user="daemon")
        assert (code, output) == (0, "smtpproxy is running (pid %d).\n"
                                  % pid)

        service.write_config(servername="two.example",
                             extra="user = nobody\n",
                             store=store / "greylist.db")
        code, output = service.run("reload")
        assert code == 0, output
        wait_until(lambda: service.greeting()[1].startswith("two.example "),
                   what="the new servername in the greeting")

        code, output = service.run("stop")
        assert code == 0, output
        service.check_stopped(pid)
    finally:
        shutil.rmtree(str(directory), ignore_errors=True)

"""contrib/fuzz.py, briefly: against the real proxy it finds nothing, and
against a proxy with planted faults (Broken, below: the proxy runs it with
--class, from this module) its oracle finds each of them.  The long run is
by hand (see its docstring)."""

import itertools
import os
import re
import subprocess
import sys

import smtpproxy

TESTS = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(os.path.dirname(TESTS), "contrib", "fuzz.py")
# Short: the waits of the proxy's that the end of the run meets (pooled
# upstream sessions, spare threads).  inactivity_timeout stays 5 s, over
# the upstream's longest delay (2 s): see the module's docstring.
QUICK = ["--set", "thread_idle_time=1", "--set", "upstream_pool_idle=1",
         "--processes", "2", "--threads", "16"]


def fuzz(*args):
    """Run contrib/fuzz.py; its exit status and output."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [TESTS] + [path for path in [environment.get("PYTHONPATH")] if path])
    process = subprocess.Popen(
        [sys.executable, FUZZ] + QUICK + list(args), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=environment)
    output = process.communicate(timeout=110)[0].decode("utf-8", "replace")
    return process.returncode, output


class BrokenRelay(smtpproxy.UpstreamRelay):
    """A relay that loses a message in 7 (it drops the upstream session
    before the final dot, and tells the client 250 for it), and takes the
    transparency dot off the first stuffed line of a message in 5."""

    ends = itertools.count()

    def end(self, data=b""):
        number = next(self.ends)
        if number % 7 == 3:
            match = re.search(b"X-Soak-Id: ([0-9a-f-]+)", data)
            self.abort()
            return 250, ["2.0.0 Ok: queued as %s"
                         % (match.group(1).decode() if match else "?")]
        if number % 5 == 1:
            data = data.replace(b"\r\n..", b"\r\n.", 1)
        return smtpproxy.UpstreamRelay.end(self, data)


class Broken(smtpproxy.GreyListingPolicy):
    """The proxy with planted faults: BrokenRelay's, and a lax end of data,
    which LF . LF ends too, a CR before either LF or not (SMTP
    smuggling)."""

    relay_class = BrokenRelay

    def _receive_message(self):
        reader = self.reader
        read = reader.read_available
        reader.read_available = lambda: re.sub(b"\r?\n[.]\r?\n", b"\r\n.\r\n",
                                               read())
        try:
            return smtpproxy.GreyListingPolicy._receive_message(self)
        finally:
            del reader.read_available


def test_nothing_found_in_the_real_proxy():
    status, output = fuzz("--sessions", "400", "--seed", "46")
    assert status == 0, output
    assert "violations    0" in output
    assert re.search(r"sessions +400 in", output), output
    # The oracle saw what it checks: replies, messages through the ledger.
    delivered = int(re.search(r"(\d+) delivered", output).group(1))
    assert delivered > 100, output


def test_planted_faults_are_found():
    status, output = fuzz("--sessions", "400", "--seed", "26",
                          "--no-idle-check", "--proxy-class",
                          "test_fuzz_tool.Broken")
    assert status == 1, output
    # Each fault, by the check that is its own, with sessions to replay.
    for kind in ("lost: 2xx, never received", "message received altered",
                 "smuggled message received"):
        assert re.search(r"%s: \d+\n +--replay 26:\d+ " % re.escape(kind),
                         output), (kind, output)

"""Handler classes for the tests (and --class in subprocess tests)."""

import time

import smtpproxy


class AcceptAll(smtpproxy.ConcreteMailHandler):
    """A plain, faithful proxy: every recipient and message is forwarded."""

    def shouldWeAcceptMail(self):
        return True


class FastClock(smtpproxy.GreyListingPolicy):
    """The greylisting policy on a host whose clock is two hours fast."""

    def now(self):
        return time.time() + 7200

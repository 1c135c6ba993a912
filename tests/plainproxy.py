"""Handler classes for the tests (and --class in subprocess tests)."""

import smtpproxy


class AcceptAll(smtpproxy.ConcreteMailHandler):
    """A plain, faithful proxy: every recipient and message is forwarded."""

    def shouldWeAcceptMail(self):
        return True

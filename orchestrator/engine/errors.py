"""Exceptions that map onto the CLI's exit codes (0 done, 1 failure, 2 bad input, 3 refused)."""


class OrchestratorError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return f"{text} -> {self.hint}" if self.hint else text


class Failure(OrchestratorError):
    """Something broke while running; re-running the same command resumes."""

    exit_code = 1


class BadInput(OrchestratorError):
    """The playbook or the arguments are wrong; nothing was changed."""

    exit_code = 2


class Refused(OrchestratorError):
    """A precondition does not hold (order, data loss, lock budget); nothing was changed."""

    exit_code = 3

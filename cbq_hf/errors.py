"""Exit codes and the error type of the `cbq-hf` command, below both `cli.py` and the subcommands it hosts
(`export.py`), so that neither imports the other for them."""

from __future__ import annotations

#: `cbq-hf` exit codes: success; anything unexpected; bad arguments or input; model or checkpoint cannot be loaded;
#: output cannot be written.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOAD, EXIT_WRITE = 0, 1, 2, 3, 4


class CLIError(Exception):
    """A failure the command reports as one line on stderr, exiting with `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

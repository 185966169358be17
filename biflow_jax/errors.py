"""The errors a user can cause (bad config, data, workdir or weights), reported in one line.

A leaf module: everything may import it, it imports nothing of ours. `main` prints the
message of any EXPECTED_ERRORS without a traceback and exits 2.
"""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class DataError(ValueError):
    """A dataset, split, folder or data_dir that cannot be used; the message says which."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the last good checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (damaged files, full disk); the message names it."""


class WorkdirBusyError(RuntimeError):
    """Another live run owns the workdir (its lock file names the host and pid)."""


class UnwritableError(RuntimeError):
    """A workdir or output folder that cannot be written (read-only file system, permissions, too long a name)."""


EXPECTED_ERRORS = (ConfigError, DataError, TrainingError, CheckpointError, WorkdirBusyError, UnwritableError,
                   FileNotFoundError, FileExistsError, ValueError, KeyError)


def exit_with_one_line(error: BaseException) -> None:
    """What a command-line tool does with an expected error: `error: <its first line>` on stderr, exit 2."""
    import sys

    text = str(error).strip()
    print(f"error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr)
    sys.exit(2)


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)

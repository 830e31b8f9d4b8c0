"""Errors a user can fix, and the exit codes of every entry point (`docs/runbooks.md` lists them).

The library raises these; `experiments.cli.run_main` prints each as one `error: ...` line (no traceback)
and exits with its `exit_code`. Anything else is a bug or an environment fault: traceback, exit 1.
"""

from __future__ import annotations

EXIT_OK = 0
"""Finished, or already complete."""
EXIT_FAILED = 1
"""Unexpected failure (traceback printed)."""
EXIT_BAD_CONFIG = 2
"""Bad command line, gin binding, config value or input data."""
EXIT_NONFINITE = 3
"""Stopped after `max_nonfinite` consecutive non-finite steps."""
EXIT_WORKDIR_BUSY = 4
"""Another run holds the workdir's lock."""
EXIT_CHECKPOINT = 5
"""The workdir's checkpoints do not match this config, or cannot be used."""
EXIT_DISK = 6
"""Disk full (or another OS write error) while writing outputs; the previous checkpoint is intact."""
EXIT_SIGINT = 130
"""Stopped by SIGINT (Ctrl-C) after saving a checkpoint: run the same command to resume."""
EXIT_SIGTERM = 143
"""Stopped by SIGTERM (preemption) after saving a checkpoint: run the same command to resume."""


class UserFacingError(Exception):
    """An error the user fixes by changing the command, config, data or workdir; printed as one line."""

    exit_code = EXIT_BAD_CONFIG


class ConfigValueError(UserFacingError, ValueError):
    """A config value out of range; the message names the binding, e.g. `OptimizerConfig.peak_lr=-1: ...`."""


class InputDataError(UserFacingError, ValueError):
    """Bad or missing input data; the message starts with `file:line:` where there is one."""


class EmptyDatasetError(InputDataError):
    """A dataset with no usable record (an error: training on it would write an untrained model)."""


class WorkdirBusyError(UserFacingError):
    """Another process holds the workdir's lock; the message names its pid and host."""

    exit_code = EXIT_WORKDIR_BUSY


class CheckpointMismatchError(UserFacingError, ValueError):
    """The workdir's checkpoints were written with another config or state structure; nothing on disk is touched."""

    exit_code = EXIT_CHECKPOINT


class CheckpointCorruptError(UserFacingError, ValueError):
    """A checkpoint file that cannot be read, or weights that are non-finite or absurdly large; the message
    names the file and tensor."""

    exit_code = EXIT_CHECKPOINT

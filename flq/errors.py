"""The errors a command reports as one line, each with the exit status it ends the process with.

Library code raises these and never calls sys.exit; the CLI (flq/cli/errors.py) prints the
message and exits with `exit_code`. A subclass picks its code by inheriting from the right base.
"""

from __future__ import annotations

EXIT_RUNTIME = 1  # anything else that went wrong while running
EXIT_USAGE = 2  # bad config, bad option value, bad file: the user can fix the input
EXIT_DATA = 3  # missing or corrupt data files
EXIT_UNREACHABLE = 4  # the master could not be reached (down, wrong address, TLS handshake)
EXIT_REFUSED = 5  # the master refused our token, certificate or protocol version
EXIT_NO_WORKERS = 6  # the master gave up waiting for min_workers (system.connect_timeout_s)


class FlqError(Exception):
    """An error the user can act on; the CLI prints its message and exits with `exit_code`."""

    exit_code = EXIT_RUNTIME


class UsageError(FlqError):
    """Bad input: a config, an option, a file. Fix it and run again."""

    exit_code = EXIT_USAGE


class DataUnavailable(FlqError):
    """Training or test data missing or corrupt."""

    exit_code = EXIT_DATA


class Unreachable(FlqError):
    """The master could not be reached."""

    exit_code = EXIT_UNREACHABLE


class Refused(FlqError):
    """The master refused us: credentials, certificate, protocol version."""

    exit_code = EXIT_REFUSED

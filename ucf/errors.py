"""The one error type a user can fix (DataError: its message names the file and what to do) and warnings."""
import sys


class DataError(Exception):
    """Bad input the user can fix; the message names the file and what to do."""


def warn(message):
    print(f'warning: {message}', file=sys.stderr, flush=True)

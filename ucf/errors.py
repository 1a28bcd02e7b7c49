"""The one error type a user can fix (DataError: its message names the file and what to do), warnings, and Ctrl-C
said in one line, whenever it comes."""
import os
import sys


class DataError(Exception):
    """Bad input the user can fix; the message names the file and what to do."""


def warn(message):
    print(f'warning: {message}', file=sys.stderr, flush=True)


def interrupted(error):
    """Whether a Ctrl-C is what ended this: a KeyboardInterrupt, or an error raised because of one. An extension
    module interrupted while it initialises (matplotlib's Agg backend, imported at the first plot) reports
    'ImportError: initialization failed', with the interrupt as its cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def say_interrupted():
    """The one line a Ctrl-C ends a step with (exit status 130 is the caller's)."""
    # What Ctrl-C cut short (a half-read .npz, say) may complain from its destructor at exit: noise now.
    sys.unraisablehook = lambda unraisable: None
    print(f'\ninterrupted: {os.path.basename(sys.argv[0]) or "the step"} stopped (Ctrl-C); every file under its '
          'final name is whole. Run the same command again to continue (training: add --resume auto to continue '
          'from the last snapshot)', file=sys.stderr, flush=True)


def _one_line_on_interrupt(kind, value, traceback):
    """sys.excepthook for the moments no step's main() is running yet (its libraries loading, which takes seconds
    on a busy node): a Ctrl-C there is one line and exit status 130 as well."""
    if not interrupted(value):
        return _PREVIOUS_HOOK(kind, value, traceback)
    say_interrupted()
    sys.stdout.flush()
    os._exit(130)


_PREVIOUS_HOOK = sys.excepthook
sys.excepthook = _one_line_on_interrupt

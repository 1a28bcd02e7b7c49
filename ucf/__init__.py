"""The code the pipeline's steps share, by concern (docs/DESIGN.md maps it): video decoding, frame preprocessing,
provenance, files, command-line flags, run control, and the fast numerics (convolutions, the LSTM layer).

Importing the package makes a Ctrl-C one line from then on (ucf.errors), so the steps import it before their
libraries, which take seconds to load on a busy node."""
from ucf import errors as _errors  # noqa: F401

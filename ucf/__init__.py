"""The code the pipeline's steps share, by concern (docs/DESIGN.md maps it): video decoding, frame preprocessing,
provenance, files, command-line flags, run control, and the fast numerics (convolutions, the LSTM layer)."""

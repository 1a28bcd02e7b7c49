"""The tools beside the pipeline: benchmarks (bench.py, bench_layers.py), the node check (doctor.py) and the GPU
check (gpucheck.py). Each runs as `python tools/NAME.py` from anywhere; the handout's scripts stay at the top."""

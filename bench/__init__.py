"""The benchmark harness (bench/run.py); a package so its sections import bench.common."""

"""Speed and quality benchmarks of ulrl: ``python -m benchmarks.run [--quick]`` (see docs/benchmarks.md)."""

"""The real models and text that ship inside PyPI packages (``zoo``), for the command line,
benchmarks, examples and tests. The compiler itself never imports this package."""

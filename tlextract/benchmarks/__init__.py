"""The benchmarks and the prepared GPU check: the pipeline against transformers and nnsight,
the engines, the roofline (run by tests/benchmarks/ and the Makefile, never by the library)."""

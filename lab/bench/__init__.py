"""The benchmarks, their saved results and the report made from them."""

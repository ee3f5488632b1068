"""Benchmarks for surgery: synthetic checkpoints with real model shapes, memory and throughput runs.

    python -m benchmarks.synthetic --help     # make a synthetic Mistral-7B / Llama-3-8B checkpoint
    python -m benchmarks.memory --help        # peak RSS of `surgery upcycle` vs depth (the CI gate: --check)
    python -m benchmarks.throughput --help    # upcycle wall time vs `cp` of the same bytes
"""

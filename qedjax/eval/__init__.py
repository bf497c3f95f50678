"""Evaluation: test-time scaffolds (scaffolds.py, refine.py), the resumable run (run.py: EvalConfig,
run_eval) and its report (report.py). The benchmarks it reads are qedjax.benchmarks (shared with RL)."""

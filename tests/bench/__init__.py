"""The benchmark (bench/): its cases and verdicts."""

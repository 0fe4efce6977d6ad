"""What a run shows: `metrics.jsonl` and trackers (`metrics`), progress (`progress`), plots (`plots`),
profiler traces (`profiling`), MFU (`flops`) and the per-rank memory report (`memory`)."""

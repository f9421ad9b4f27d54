"""Capture (engine/capture.py, prefilter.py, capture_demands.py): the triggers, the capture
filter, column pruning, demands, hostile host schemas."""

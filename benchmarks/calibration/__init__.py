"""The estimator calibration (`benchmarks/calibrate_estimator.py`): the points, running them, the table."""

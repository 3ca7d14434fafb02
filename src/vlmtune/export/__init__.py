"""Using a training result: `predict` (greedy answers, exact-match accuracy) and `merge` (adapter into its base).

Nothing heavy loads here: `from vlmtune.export.predict import load_for_inference, answer, predict_file`.
"""

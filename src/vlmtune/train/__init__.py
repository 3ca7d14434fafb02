"""The one training engine (`train(config)`), its Trainer, callbacks and run-folder bookkeeping.

Nothing heavy loads here: `from vlmtune.train.engine import train`.
"""

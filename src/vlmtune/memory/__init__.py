"""VRAM estimation, GPU catalogue and configuration advisor.

`estimate(EstimateInputs(...)) -> Breakdown` is pure (reads only the built-in catalogues); heavy imports (torch,
transformers) happen inside `count_params`, on first use.
"""

from vlmtune.memory.breakdown import Breakdown, Verdict
from vlmtune.memory.catalogue import ModelSpec, catalogue_names, lookup_model
from vlmtune.memory.estimator import estimate
from vlmtune.memory.gpus import GpuSpec, all_gpus, get_gpu
from vlmtune.memory.inputs import EstimateInputs, inputs_from_config
from vlmtune.memory.params import ParamCounts, count_params

__all__ = [
    "Breakdown",
    "EstimateInputs",
    "GpuSpec",
    "ModelSpec",
    "ParamCounts",
    "Verdict",
    "all_gpus",
    "catalogue_names",
    "count_params",
    "estimate",
    "get_gpu",
    "inputs_from_config",
    "lookup_model",
]

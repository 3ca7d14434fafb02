"""The estimate of a run on its encoded data, for any micro-batch, and the search behind `training.batch_size: auto`.

The worst micro-batch is sized from the data as encoded (its longest sample padded over the batch, the batch's
most vision patches), not from data.max_length.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vlmtune.memory.data_scan import DataProfile, SampleCosts, SampleShape

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.data.dataset import EncodedDataset
    from vlmtune.memory.breakdown import Breakdown
    from vlmtune.memory.catalogue import ModelSpec
    from vlmtune.memory.inputs import EstimateInputs
    from vlmtune.train.gpu_memory import GpuMemory

AUTO_MARGIN = 0.10
"""`batch_size: auto` leaves this fraction of the available memory free (estimate error + allocator noise)."""
AUTO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _image_hw(path: Path) -> tuple[int, int]:
    from PIL import Image

    from vlmtune.data.images import image_file

    with Image.open(image_file(path)) as image:
        width, height = image.size
    return height, width


def measured_profile(dataset: EncodedDataset, spec: ModelSpec, config: VlmtuneConfig) -> DataProfile:
    """The data as the estimator sizes it, from the encoded samples' real token lengths and the images' sizes.

    Text tokens = encoded length minus the image tokens the processor rules give under the current settings, so
    the worst batch at these settings is exact, and the advisor can still re-size it for a lower max_pixels."""
    images = [tuple(_image_hw(p) for p in record.images) for record in dataset.records]
    no_text = DataProfile(dataset.source, tuple(SampleShape(0, hw) for hw in images), exact_text=True)
    d = config.data
    image_tokens = no_text.costs(spec, d.image_size, d.min_pixels, d.max_pixels).image_tokens
    samples = tuple(
        SampleShape(max(0, length - tokens), hw)
        for length, tokens, hw in zip(dataset.lengths, image_tokens, images, strict=True)
    )
    return DataProfile(dataset.source, samples, exact_text=True)


class Sizer:
    """Estimates of `config` on `profile` for any micro-batch (the data's costs computed once)."""

    def __init__(self, config: VlmtuneConfig, spec: ModelSpec, profile: DataProfile, labelled: list[int] | None):
        d = config.data
        self.config, self.spec, self.profile = config, spec, profile
        self.labelled = sorted(labelled) if labelled else None
        self.costs: SampleCosts = profile.costs(spec, d.image_size, d.min_pixels, d.max_pixels)

    def inputs(self, batch: int) -> EstimateInputs:
        from vlmtune.memory.inputs import inputs_from_config

        shape = self.profile.batch(self.spec, batch, self.config.data.max_length, costs=self.costs)
        return inputs_from_config(  # ZeRO stage, offload and GPU count as training renders them from the config
            self.config,
            batch_size=batch,
            seq_len=shape.seq_len,
            vit_patches_per_batch=shape.vit_patches,
            images_per_sample=shape.images_per_sample,
            image_tokens_per_sample=shape.image_tokens,
            labelled_tokens=sum(self.labelled[-batch:]) if self.labelled else None,
        )

    def estimate(self, batch: int) -> Breakdown:
        from vlmtune.memory.estimator import estimate

        return estimate(self.inputs(batch))


def choose_batch(sizer: Sizer, gpu: GpuMemory, samples: int) -> tuple[int, Breakdown]:
    """The largest micro-batch (up to the data set's size) whose estimate fits with AUTO_MARGIN; 1 if none does."""
    limit = gpu.available * (1 - AUTO_MARGIN)
    chosen = None
    for batch in AUTO_BATCHES:
        if batch > max(1, samples):
            break
        breakdown = sizer.estimate(batch)
        if breakdown.peak_reserved > limit and chosen is not None:
            break
        chosen = (batch, breakdown)
        if breakdown.peak_reserved > limit:
            break
    assert chosen is not None
    return chosen

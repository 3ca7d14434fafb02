"""The estimate of a run on its encoded data, for any micro-batch, and the search behind `training.batch_size: auto`.

The worst micro-batch is sized from the data as encoded (its longest sample padded over the batch, the batch's
most vision patches), not from data.max_length.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        self.packed = packed_rows(config, profile, self.costs, labelled)

    @property
    def rows(self) -> int:
        """Micro-batch rows the data makes: packed rows with speed.packing, else samples."""
        return len(self.packed) if self.packed is not None else len(self.profile.samples)

    def inputs(self, batch: int) -> EstimateInputs:
        from vlmtune.memory.inputs import inputs_from_config

        if self.packed is not None:  # batch_size counts packed rows: the worst `batch` of the rows the data packs into
            fields = packed_batch(self.packed, batch, labelled=self.labelled is not None)
        else:
            shape = self.profile.batch(self.spec, batch, self.config.data.max_length, costs=self.costs)
            fields = dict(
                seq_len=shape.seq_len,
                vit_patches_per_batch=shape.vit_patches,
                images_per_sample=shape.images_per_sample,
                image_tokens_per_sample=shape.image_tokens,
                labelled_tokens=sum(self.labelled[-batch:]) if self.labelled else None,
            )
        # ZeRO stage, offload and GPU count as training renders them from the config
        return inputs_from_config(self.config, batch_size=batch, **fields)

    def estimate(self, batch: int) -> Breakdown:
        from vlmtune.memory.estimator import estimate

        return estimate(self.inputs(batch))


@dataclass(frozen=True)
class PackedRow:
    """One row of a packed run (speed.packing): what its samples add up to."""

    tokens: int
    patches: int
    images: int
    image_tokens: int
    labelled: int


def packed_rows(
    config: VlmtuneConfig, profile: DataProfile, costs: SampleCosts, labelled: list[int] | None
) -> list[PackedRow] | None:
    """The rows speed.packing makes of this data (data/packing.pack_bins on the samples' lengths, the engine's own
    grouping; samples over max_length are dropped by the engine before packing), or None without packing. The worst
    micro-batch of a packed run is a few of these rows, each up to speed.packing_max_tokens long, with all their
    samples' images: not `batch_size` samples."""
    if not config.speed.packing:
        return None
    from vlmtune.data.packing import pack_bins

    limit = config.data.max_length
    kept = [i for i, n in enumerate(costs.lengths) if n <= limit]
    if not kept:
        return None
    budget = config.speed.packing_max_tokens or limit
    bins = pack_bins([costs.lengths[i] for i in kept], budget)
    return [
        PackedRow(
            tokens=sum(costs.lengths[kept[j]] for j in b),
            patches=sum(costs.patches[kept[j]] for j in b),
            images=sum(len(profile.samples[kept[j]].images) for j in b),
            image_tokens=sum(costs.image_tokens[kept[j]] for j in b),
            labelled=sum(labelled[kept[j]] for j in b) if labelled else 0,
        )
        for b in bins
    ]


def packed_batch(rows: list[PackedRow], batch: int, labelled: bool) -> dict[str, int | None]:
    """The estimator's inputs for the worst micro-batch of `batch` packed rows: the longest row (the collator pads
    the others to it), the `batch` rows with the most vision patches, the most images and image tokens in one row."""
    return dict(
        seq_len=max(r.tokens for r in rows),
        vit_patches_per_batch=sum(sorted(r.patches for r in rows)[-batch:]),
        images_per_sample=max(r.images for r in rows),
        image_tokens_per_sample=max(r.image_tokens for r in rows),
        labelled_tokens=sum(sorted(r.labelled for r in rows)[-batch:]) if labelled else None,
    )


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

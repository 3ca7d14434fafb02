"""The memory-estimate picture: its segments are the table's terms and add up to the peak; the bar, the capacity line
(coloured by the verdict) and the legend are drawn; `vlmtune estimate --plot` writes it."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmtune.cli.main import main
from vlmtune.memory import EstimateInputs, estimate
from vlmtune.memory.picture import (
    BAR_BOTTOM,
    BAR_TOP,
    HEIGHT,
    LEFT,
    RIGHT,
    STATUS_COLOUR,
    WIDTH,
    render_breakdown,
    segments,
)

QWEN7 = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.mark.parametrize(
    "inputs",
    [
        EstimateInputs(model=QWEN7, method="qlora", batch_size=1, seq_len=512),
        EstimateInputs(model=QWEN7, method="full", zero_stage=3, num_gpus=4, offload="optimizer"),
        EstimateInputs(model="Qwen/Qwen2-VL-2B-Instruct", batch_size=4, gradient_checkpointing=False),
    ],
)
def test_segments_are_the_terms_and_add_up_to_the_peak(inputs):
    b = estimate(inputs)
    parts = segments(b)
    assert sum(v for _, v in parts) == b.peak_total
    assert all(v > 0 for _, v in parts)
    labels = [label for label, _ in parts]
    assert labels[0].startswith("weights") and labels[-1] == "CUDA context"
    assert ("optimizer states" in labels) == (b.optimizer_states > 0)  # offloaded: not on the GPU


@pytest.mark.parametrize("gpu, status", [("RTX 4060 8GB", "does not fit"), ("H100 80GB", "fits")])
def test_the_picture_shows_the_bar_and_the_verdict(tmp_path, gpu, status):
    b = estimate(EstimateInputs(model=QWEN7, method="qlora", batch_size=1, seq_len=512, gpu=gpu))
    assert b.verdict is not None and b.verdict.status == status
    image = Image.open(render_breakdown(b, tmp_path / "m.png")).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    scale = max(b.peak_total, b.verdict.capacity) * 1.05
    middle = (BAR_TOP + BAR_BOTTOM) // 2
    assert image.getpixel((LEFT + 3, middle)) != (255, 255, 255)  # the bar starts filled
    line_x = round(LEFT + b.verdict.capacity / scale * (RIGHT - LEFT))
    near = {image.getpixel((x, BAR_TOP - 10)) for x in range(line_x - 2, line_x + 3)}
    assert STATUS_COLOUR[status] in near  # the capacity line, in the verdict's colour


def test_estimate_cli_plot(tmp_path, capsys):
    out = tmp_path / "est.png"
    assert main(["estimate", "--model", QWEN7, "--method", "qlora", "--gpu", "RTX 4090 24GB", "--plot", str(out)]) == 0
    assert f"picture: {out}" in capsys.readouterr().out
    assert Image.open(out).size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("gpu", ["RTX 4060 8GB", "RTX 4090 24GB", "H100 80GB", "A100 40GB"])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_the_card_limit_is_labelled_and_the_peak_label_stays_clear_of_it(gpu, batch):
    from PIL import ImageDraw

    from vlmtune.memory.picture import label_layout

    b = estimate(EstimateInputs(model=QWEN7, method="qlora", batch_size=batch, seq_len=1024, gpu=gpu))
    draw = ImageDraw.Draw(Image.new("RGB", (WIDTH, HEIGHT)))
    scale = max(b.peak_total, b.verdict.capacity) * 1.05
    labels = label_layout(b, draw.textlength, lambda v: LEFT + v / scale * (RIGHT - LEFT))
    (peak, peak_x, peak_row, _), (limit, limit_x, limit_row, _) = labels
    assert peak.startswith("peak ") and limit.startswith(gpu) and "usable" in limit
    for text, at, _, _ in labels:  # inside the picture
        assert 0 <= at and at + draw.textlength(text) <= WIDTH
    # boxes of 12 px high text: different rows, so they cannot overlap whatever the two values
    assert abs(peak_row - limit_row) >= 14


def test_axis_ticks_are_round_values():
    from vlmtune.picture_axes import nice_ticks, tick_label

    assert nice_ticks(0, 9.82) == [0, 2, 4, 6, 8]
    ticks = nice_ticks(0, 7.9)
    assert [tick_label(t, ticks) for t in ticks] == ["0.0", "2.5", "5.0", "7.5"]
    assert nice_ticks(1, 300) == [50, 100, 150, 200, 250, 300]
    ticks = nice_ticks(0.118, 3.01)
    assert [tick_label(t, ticks) for t in ticks] == ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0"]
    assert nice_ticks(2.0, 2.0) == [2.0]
    with pytest.raises(ValueError):
        nice_ticks(0, float("nan"))

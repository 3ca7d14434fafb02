import json

from PIL import Image

from vlmtune.train.plot import read_curves, render_loss_curve


def test_loss_curve_png(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [{"event": "start"}] + [{"step": s, "loss": 5.0 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.7}]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    curves = read_curves(log)
    assert curves["loss"][0] == (1, 5.0) and curves["eval_loss"] == [(10, 0.7)]
    out = render_loss_curve(log, tmp_path / "loss_curve.png")
    image = Image.open(out)
    assert image.size == (720, 420)
    colours = {c for _, c in image.getcolors(maxcolors=100_000)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # both curves drawn


def test_no_curve_from_one_point(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 1.0}))
    assert render_loss_curve(log, tmp_path / "x.png") is None


def test_smoothed_train_loss_over_the_raw_values(tmp_path):
    """A noisy loss: the smoothed curve (debiased EMA) is drawn over the raw one, evaluations as dots."""
    import random

    from vlmtune.picture_axes import ema
    from vlmtune.train.plot import EVAL, TRAIN, TRAIN_RAW

    rng = random.Random(0)
    rows = [{"step": s, "loss": 3.0 / s**0.5 + rng.gauss(0, 0.2)} for s in range(1, 201)]
    rows += [{"step": s, "eval_loss": 3.0 / s**0.5} for s in (50, 100, 150, 200)]
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    image = Image.open(render_loss_curve(log, tmp_path / "loss.png")).convert("RGB")
    colours = {c for _, c in image.getcolors(maxcolors=100_000)}
    assert {TRAIN, TRAIN_RAW, EVAL} <= colours
    smooth = ema([r["loss"] for r in rows[:200]])
    assert smooth[0] == rows[0]["loss"]  # debiased: the first point is the first value, not pulled to zero
    raw_spread = max(r["loss"] for r in rows[150:200]) - min(r["loss"] for r in rows[150:200])
    assert max(smooth[150:]) - min(smooth[150:]) < raw_spread / 2  # it smooths

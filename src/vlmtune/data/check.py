"""`vlmtune data check`: validate every record of a data file before any training, and report it all at once.

The file is streamed record by record (any format `records` reads; for parquet / arrow the row stands for the
line). Each line is checked for UTF-8, JSON syntax, the record schema and roles
(`records`), its images (exist, within the size limit, decode; mode conversions are counted, not errors) and,
given a `token_length` callable, its length against `data.max_length`:

- `token_length(record)` returns the total token count (image tokens included), or a pair
  `(total, image_end)` where `image_end` is the position just after the last image token (0 without images).
- total > max_length with the images inside the limit: a warning (the text past max_length is truncated).
- image_end > max_length (a cut would fall inside or before an image span): an error with
  `data.on_overflow="error"`, a warning with `"drop"` (training drops the record); an error either way if every
  record would be dropped. With a plain int, the checker cannot see image spans and only warns on over-length.

The summary also holds histograms (for `vlmtune studio`'s data page): records per token-length range
(`token_histogram`) and distinct images by their longest side (`image_sides`).

Memory stays bounded whatever the file holds: records are checked one at a time and let go; what is kept per
record is 8 bytes (its token length), per distinct image ~70 bytes (a hash of its path), and at most
MAX_STORED_PROBLEMS problems of each severity. Ignored-field warnings (`data.on_ignored_field=warn`) are counted
per field and reported once each, with the number of records that have it and the first line.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from vlmtune.config.schema import DataConfig
from vlmtune.data.embedded import EmbeddedImage
from vlmtune.data.fields import IGNORED_CODE, field_kind
from vlmtune.data.images import decode_image
from vlmtune.data.records import FILE_CODE, Problem, Record, format_problems, scan
from vlmtune.errors import DataError, VlmtuneError

MAX_STORED_PROBLEMS = 10_000
"""Per severity; the counts in the summary stay exact past it."""


class TokenCount(NamedTuple):
    total: int
    image_end: int = 0


TokenLength = Callable[[Record], int | tuple[int, int]]


@dataclass
class CheckReport:
    path: Path
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.summary.get("errors", len(self.errors)) == 0

    def add(self, problem: Problem) -> None:
        key = "errors" if problem.severity == "error" else "warnings"
        self.summary[key] = self.summary.get(key, 0) + 1
        stored = self.errors if problem.severity == "error" else self.warnings
        if len(stored) < MAX_STORED_PROBLEMS:
            stored.append(problem)

    def format(self, limit: int = 50) -> str:
        s = self.summary
        verdict = "OK" if self.ok else "FAILED"
        lines = [
            f"{self.path}: {verdict}: {s.get('records', 0)} record(s), {s.get('records_ok', 0)} ok, "
            f"{s.get('records_bad', 0)} bad; {s.get('errors', 0)} error(s), {s.get('warnings', 0)} warning(s)"
        ]
        if s.get("records_ok"):
            untrained = f", {s['untrained_turns']} not trained (loss: false)" if s.get("untrained_turns") else ""
            system = f"; {s['system_prompts']} system prompt(s)" if s.get("system_prompts") else ""
            lines.append(
                f"  turns: {s['turns']} ({s['assistant_turns']} assistant{untrained}){system}; images: "
                f"{s['images']} ({s['unique_images']} files, {s['multi_image_records']} multi-image record(s))"
            )
        if s.get("converted_modes"):
            modes = ", ".join(f"{mode} x{n}" for mode, n in sorted(s["converted_modes"].items()))
            lines.append(f"  converted to RGB (not errors): {modes}")
        if s.get("animated_images"):
            lines.append(f"  animated images: {s['animated_images']} (the first frame of each is used)")
        if "tokens" in s:
            t = s["tokens"]
            lines.append(
                f"  tokens: p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']} "
                f"(max_length {s['max_length']}: {s['over_max_length']} over, "
                f"{s['image_overflow']} with an image past it)"
            )
        problems = self.errors + self.warnings
        if problems:
            lines.append(format_problems(self.path, problems, limit))
            stored = len(problems)
            total = s.get("errors", 0) + s.get("warnings", 0)
            if total > stored:
                lines.append(f"({total - stored} more problem(s) were counted but not stored)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "summary": self.summary,
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
        }

    def raise_if_errors(self) -> None:
        if not self.ok:
            raise DataError(self.format())


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def _token_summary(lengths: array) -> dict[str, Any]:
    values = sorted(lengths)
    return {
        "p50": _percentile(values, 50),
        "p90": _percentile(values, 90),
        "p99": _percentile(values, 99),
        "max": values[-1],
        "min": values[0],
        "mean": round(sum(values) / len(values), 1),
    }


SIDE_BINS = (128, 256, 512, 1024, 2048)
"""Upper edges (pixels, longest side) of the image-size histogram's bins; the last bin is everything above."""


def side_bin(side: int) -> str:
    low = 0
    for edge in SIDE_BINS:
        if side <= edge:
            return f"{low + 1}-{edge}"
        low = edge
    return f">{SIDE_BINS[-1]}"


def length_histogram(lengths: array, bins: int = 10) -> list[dict[str, int]]:
    """Records per token-length range: `bins` equal ranges from the shortest to the longest record."""
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((n - lo) // width for n in lengths)
    return [{"from": lo + i * width, "to": lo + (i + 1) * width - 1, "records": counts.get(i, 0)}
            for i in range((hi - lo) // width + 1)]


class _ImageCache:
    """Each distinct file is opened once, however many records use it. Good files are remembered by a 64-bit hash
    of their path (~70 bytes each); the messages of bad ones are kept up to MAX_STORED_PROBLEMS, past that a bad
    file is opened again when another record uses it (and counted once)."""

    def __init__(self, max_megapixels: float):
        self.max_megapixels = max_megapixels
        self._good: set[int] = set()
        self._bad: set[int] = set()
        self._messages: dict[int, str] = {}
        self.modes: Counter[str] = Counter()
        self.animated = 0
        self.sides: Counter[str] = Counter()
        """Distinct good images by their longest side (`SIDE_BINS`), for the histogram."""

    @property
    def unique(self) -> int:
        return len(self._good) + len(self._bad)

    def problem(self, path: Path) -> str | None:
        key = hash(str(path))
        if key in self._good:
            return None
        if key in self._messages:
            return self._messages[key]
        try:
            decoded = decode_image(path, self.max_megapixels)
        except DataError as exc:
            self._bad.add(key)
            if len(self._messages) < MAX_STORED_PROBLEMS:
                self._messages[key] = str(exc)
            return str(exc)
        self.sides[side_bin(max(decoded.image.size))] += 1
        decoded.image.close()
        self._good.add(key)
        if decoded.mode != "RGB":
            self.modes[decoded.mode] += 1
        self.animated += decoded.animated
        return None


class _IgnoredFields:
    """Ignored-field warnings counted per field (`messages[].loss`): one warning each at the end."""

    def __init__(self) -> None:
        self.first: dict[str, Problem] = {}
        self.records: Counter[str] = Counter()

    def add(self, problems: list[Problem]) -> list[Problem]:
        """Takes the ignored-field warnings out of `problems`; returns the rest."""
        rest, kinds = [], set()
        for p in problems:
            if p.code != IGNORED_CODE:
                rest.append(p)
                continue
            kind = field_kind(p.field)
            self.first.setdefault(kind, p)
            kinds.add(kind)
        self.records.update(kinds)
        return rest

    def problems(self) -> list[Problem]:
        return [
            Problem(p.line, kind, f"ignored in {self.records[kind]:,} record(s), this line the first: {p.message}",
                    "warning", IGNORED_CODE)
            for kind, p in self.first.items()
        ]


def _display(path: Path | EmbeddedImage, base_dir: Path) -> str:
    if isinstance(path, EmbeddedImage):
        return "embedded"
    rel = os.path.relpath(path, base_dir)
    return str(path) if rel.startswith("..") else rel


def _check_length(
    record: Record, token_length: TokenLength, cfg: DataConfig, report: CheckReport, lengths: array
) -> bool:
    """Adds length problems; returns True when the record would be dropped for an image past max_length."""
    try:
        value = token_length(record)
    except (VlmtuneError, ValueError) as exc:
        report.add(Problem(record.line, "", f"counting tokens failed ({type(exc).__name__}): {exc}"))
        return False
    total, image_end = (value, 0) if isinstance(value, int) else (int(value[0]), int(value[1]))
    lengths.append(total)
    limit = cfg.max_length
    if image_end > limit:
        report.summary["image_overflow"] += 1
        action = (
            "it will be dropped (data.on_overflow=drop)"
            if cfg.on_overflow == "drop"
            else "data.on_overflow=error stops training"
        )
        severity = "warning" if cfg.on_overflow == "drop" else "error"
        report.add(
            Problem(
                record.line,
                "",
                f"{total} tokens and an image ends at token {image_end}, past "
                f"data.max_length={limit}: {action}; raise max_length or shrink "
                "the images (data.image_size / max_pixels)",
                severity,
            )
        )
        return True
    if total > limit:
        report.summary["over_max_length"] += 1
        report.add(
            Problem(
                record.line,
                "",
                f"{total} tokens > data.max_length={limit}: the text past token {limit} will be truncated",
                "warning",
            )
        )
    return False


def check_file(
    path: Path | str,
    data_cfg: DataConfig | None = None,
    token_length: TokenLength | None = None,
    family: str | None = None,
) -> CheckReport:
    """Validate every line of a JSONL data file; never raises on bad data (see `CheckReport.raise_if_errors`).

    `family`: the model family's name, for messages about what it cannot take (video)."""
    path = Path(path)
    cfg = data_cfg or DataConfig()
    report = CheckReport(path)
    s = report.summary
    s.update(
        records=0,
        records_ok=0,
        records_bad=0,
        errors=0,
        warnings=0,
        turns=0,
        assistant_turns=0,
        untrained_turns=0,
        system_prompts=0,
        images=0,
        unique_images=0,
        images_bad=0,
        multi_image_records=0,
        converted_modes={},
        animated_images=0,
        ignored_fields={},
        max_length=cfg.max_length,
        over_max_length=0,
        image_overflow=0,
    )
    images = _ImageCache(cfg.max_image_megapixels)
    ignored = _IgnoredFields()
    base_dir = path.parent.absolute() if not path.is_dir() else path.absolute()
    lengths: array = array("q")
    dropped = 0
    for line, record, problems in scan(path, cfg, family):
        for problem in ignored.add(problems):
            report.add(problem)
        if line == 0 or any(p.code == FILE_CODE for p in problems):  # the file's, not a record's
            continue
        s["records"] += 1
        if record is None:
            s["records_bad"] += 1
            continue
        bad_images = 0
        for k, image in enumerate(record.images):
            message = images.problem(image)
            if message is not None:
                bad_images += 1
                report.add(Problem(line, f"image {k + 1} ({_display(image, base_dir)})", message))
        s["images"] += len(record.images)
        s["images_bad"] += bad_images
        if bad_images:
            s["records_bad"] += 1
            continue
        s["records_ok"] += 1
        s["turns"] += len(record.messages)
        s["assistant_turns"] += sum(m.role == "assistant" for m in record.messages)
        s["untrained_turns"] += sum(m.role == "assistant" and not m.train for m in record.messages)
        s["system_prompts"] += record.messages[0].role == "system"
        s["multi_image_records"] += len(record.images) > 1
        if token_length is not None:
            dropped += _check_length(record, token_length, cfg, report, lengths)
    for problem in ignored.problems():
        report.add(problem)
    s["ignored_fields"] = dict(ignored.records)
    s["unique_images"] = images.unique
    s["converted_modes"] = dict(images.modes)
    s["animated_images"] = images.animated
    s["image_sides"] = {b: images.sides[b] for b in [side_bin(e) for e in SIDE_BINS] + [side_bin(SIDE_BINS[-1] + 1)]
                        if images.sides[b]}
    if lengths:
        s["tokens"] = _token_summary(lengths)
        s["token_histogram"] = length_histogram(lengths)
    if s["records_ok"] and dropped == s["records_ok"]:
        report.add(
            Problem(
                0,
                "",
                f"every record has an image past data.max_length={cfg.max_length}, so none "
                "is left to train on; raise max_length or shrink the images",
            )
        )
    return report

"""How many tokens an image costs, in the language model's sequence and in the vision tower, per processor rule.

Rules (the `image.rule` of an architecture in models.yaml), mirroring the transformers image processors:
- `dynamic` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): `smart_resize` to multiples of patch * merge within
  [min_pixels, max_pixels]; ViT patches = (H'/patch)(W'/patch), LLM tokens = patches / merge^2.
- `fixed` (LLaVA-1.5: 576 tokens; InstructBLIP: 32 Q-Former queries; Qwen-VL: 256): the image is resized to a fixed
  square whatever its size.
- `tiles` (Idefics3 / SmolVLM): the longest edge is resized to `longest_edge`, the image is cut into tile x tile
  crops plus one global tile when it is split; each tile costs `tokens_per_tile` tokens.
- `aspect_tiles` (InternVL, GotOcr2's `crop_to_patches`): the cols x rows grid of `min_tiles`..`max_tiles` tiles
  whose aspect ratio is closest to the image's, plus a thumbnail when there is more than one tile; each tile costs
  `tokens_per_tile` tokens. The data settings bound the tile count (`aspect_tile_bounds`, shared with the family).
`image_size` / `min_pixels` / `max_pixels` follow vlmtune's data config: for dynamic rules `image_size` caps the
pixels at image_size^2 (max_pixels wins when both are set); for tiles it sets the longest edge; fixed rules ignore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vlmtune.errors import VlmtuneError

MAX_ASPECT_RATIO = 200
IDEFICS3_MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class ImageCost:
    llm_tokens: int
    """Image placeholder tokens the language model sees (without the chat template's wrapper tokens)."""
    vit_patches: int
    """Vision-tower sequence length summed over the image's frames/tiles."""
    resized: tuple[int, int]
    """(height, width) the processor resizes the image to."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers `qwen2_vl.image_processing_qwen2_vl.smart_resize`, line for line."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VlmtuneError(
            f"image {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO} is rejected by the processor"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_bounds(
    rule: dict[str, Any],
    image_size: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """(min_pixels, max_pixels) a dynamic-resolution processor uses under vlmtune's data settings, as the families
    set them: max = max_pixels, else image_size^2, else the checkpoint's; min = min_pixels, else the checkpoint's
    lowered to max."""
    high = max_pixels or (image_size * image_size if image_size else rule["max_pixels"])
    low = min_pixels or min(rule["min_pixels"], high)
    return low, max(high, low)


def _dynamic(
    rule: dict[str, Any],
    height: int,
    width: int,
    image_size: int | None,
    min_pixels: int | None,
    max_pixels: int | None,
) -> ImageCost:
    patch, merge = rule["patch_size"], rule["merge_size"]
    low, high = pixel_bounds(rule, image_size, min_pixels, max_pixels)
    h, w = smart_resize(height, width, patch * merge, low, high)
    patches = (h // patch) * (w // patch)
    return ImageCost(llm_tokens=patches // (merge * merge), vit_patches=patches, resized=(h, w))


def _rescale_to_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """Idefics3 `_resize_output_size_rescale_to_max_len` followed by the 4096 upper bound."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if max(height, width) > IDEFICS3_MAX_IMAGE_SIZE:
        if width >= height:
            width, height = IDEFICS3_MAX_IMAGE_SIZE, int(IDEFICS3_MAX_IMAGE_SIZE / aspect)
        else:
            height, width = IDEFICS3_MAX_IMAGE_SIZE, int(IDEFICS3_MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def idefics3_tile_grid(height: int, width: int, longest: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles the Idefics3/SmolVLM image processor cuts a `height` x `width` image into; (0, 0) when
    it stays one frame. Mirrors `resize_for_vision_encoder` (the long side rounded up to tiles first, the short side
    scaled from it, then rounded up), not `get_number_of_image_patches`, which rounds the short side before scaling
    and undercounts rows of images whose long side is enlarged. The smolvlm family's token count uses it too."""
    h, w = _rescale_to_longest(height, width, longest)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return (h // tile, w // tile) if h > tile or w > tile else (0, 0)


def _tiles(rule: dict[str, Any], height: int, width: int, image_size: int | None) -> ImageCost:
    tile = rule["tile"]
    longest = image_size or rule["longest_edge"]
    per_tile_patches = (tile // rule["patch_size"]) ** 2
    if longest <= tile:
        return ImageCost(rule["tokens_per_tile"], per_tile_patches, (tile, tile))
    rows, cols = idefics3_tile_grid(height, width, longest, tile)
    frames = rows * cols + 1 if rows else 1
    resized = (rows * tile, cols * tile) if rows else (tile, tile)
    return ImageCost(frames * rule["tokens_per_tile"], frames * per_tile_patches, resized)


def aspect_tile_bounds(tile: int, min_tiles: int, max_tiles: int, image_size: int | None = None,
                       min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(least, most) tiles under vlmtune's data settings (the internvl family sets its processor from this):
    max_pixels caps the tiles at max_pixels / tile^2, image_size at (image_size / tile)^2 (the smaller wins, each
    at least 1; either replaces the checkpoint's `max_tiles`); min_pixels raises the least to min_pixels / tile^2
    rounded up. Checking that the bounds can be met is the family's (`least > most` is a config error there)."""
    caps = [max(1, (image_size // tile) ** 2)] if image_size is not None else []
    caps += [max(1, max_pixels // tile**2)] if max_pixels is not None else []
    least = min_tiles if min_pixels is None else max(1, math.ceil(min_pixels / tile**2))
    return least, min(caps) if caps else max_tiles


def aspect_tile_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of GotOcr2's `get_optimal_tiled_canvas`: among the grids of min..max tiles, the closest aspect
    ratio; on a tie the grid with more tiles while the image's area exceeds half of the grid's."""
    grids = sorted([(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles], key=lambda g: g[0] * g[1])  # stable, as transformers'
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _aspect_tiles(rule: dict[str, Any], height: int, width: int, image_size: int | None, min_pixels: int | None,
                  max_pixels: int | None) -> ImageCost:
    tile = rule["tile"]
    least, most = aspect_tile_bounds(tile, rule["min_tiles"], rule["max_tiles"], image_size, min_pixels, max_pixels)
    cols, rows = aspect_tile_grid(height, width, tile, least, max(least, most)) if most > 1 else (1, 1)
    frames = cols * rows + 1 if cols * rows > 1 else 1
    return ImageCost(frames * rule["tokens_per_tile"], frames * (tile // rule["patch_size"]) ** 2,
                     (rows * tile, cols * tile))


def image_cost(
    rule: dict[str, Any],
    height: int,
    width: int,
    image_size: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ImageCost:
    """Tokens and ViT patches for one height x width image under `rule` (an architecture's `image` entry)."""
    if height <= 0 or width <= 0:
        raise VlmtuneError(f"image size must be positive, got {width}x{height}")
    kind = rule["rule"]
    if kind == "dynamic":
        return _dynamic(rule, height, width, image_size, min_pixels, max_pixels)
    if kind == "fixed":
        side = rule["image_size"]
        return ImageCost(rule["image_tokens"], rule["vit_patches"], (side, side))
    if kind == "tiles":
        return _tiles(rule, height, width, image_size)
    if kind == "aspect_tiles":
        return _aspect_tiles(rule, height, width, image_size, min_pixels, max_pixels)
    raise VlmtuneError(f"unknown image rule '{kind}' in the model catalogue (dynamic, fixed, tiles or aspect_tiles)")


def tile_wrapper_tokens(rule: dict[str, Any], cost: ImageCost) -> int:
    """Extra text tokens the Idefics3 prompt puts around each tile (<fake_token_around_image>, <row_r_col_c>)."""
    if rule["rule"] != "tiles":
        return 0
    return 2 * max(1, cost.llm_tokens // rule["tokens_per_tile"])

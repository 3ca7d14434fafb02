from __future__ import annotations

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.memory.gpus import GIB, all_gpus, get_gpu

# Vendor memory sizes (GiB) and bf16 support.
REQUIRED = {
    "RTX 3060": 12,
    "RTX 4060": 8,
    "RTX 4060 Ti": 16,
    "RTX 4070": 12,
    "RTX 4080": 16,
    "RTX 4090": 24,
    "RTX 5060 Ti": 16,
    "RTX 5070": 12,
    "RTX 5080": 16,
    "RTX 5090": 32,
    "T4": 16,
    "L4": 24,
    "A10": 24,
    "A100 40GB": 40,
    "A100 80GB": 80,
    "H100": 80,
    "H200": 141,
    # issue 20: the common cards of the last three generations (vendor sizes)
    "RTX 3060 Ti": 8,
    "RTX 3070": 8,
    "RTX 3070 Ti": 8,
    "RTX 3080": 10,
    "RTX 3080 12GB": 12,
    "RTX 3080 Ti": 12,
    "RTX 3090": 24,
    "RTX 3090 Ti": 24,
    "RTX 4060 Ti 8GB": 8,
    "RTX 4070 Super": 12,
    "RTX 4070 Ti": 12,
    "RTX 4070 Ti Super": 16,
    "RTX 4080 Super": 16,
    "RTX 5060": 8,
    "RTX 5070 Ti": 16,
    "A4000": 16,
    "A5000": 24,
    "A6000": 48,
    "RTX 4000 Ada": 20,
    "RTX 5000 Ada": 32,
    "RTX 6000 Ada": 48,
    "RTX PRO 6000": 96,
    "L40": 48,
    "L40S": 48,
    "A30": 24,
    "H20": 96,
    "B200": 180,
}


def test_catalogue_loads_and_every_gpu_has_a_memory_size():
    gpus = all_gpus()
    assert len({g.name for g in gpus}) == len(gpus)
    for g in gpus:
        assert g.memory_gb > 0 and 0 < g.usable_bytes <= g.memory_gb * GIB, g.name


@pytest.mark.parametrize("name,memory", sorted(REQUIRED.items()))
def test_required_gpus_with_vendor_sizes(name, memory):
    assert get_gpu(name).memory_gb == memory


def test_bf16_support():
    assert not get_gpu("T4").bf16 and get_gpu("T4").precision == "fp16"
    assert get_gpu("RTX 3060").bf16 and get_gpu("L4").bf16


def test_usable_memory_reserves():
    assert get_gpu("T4").usable_bytes / GIB == pytest.approx(
        14.77, abs=0.05
    )  # ECC on: 15 GiB, minus the driver
    assert get_gpu("RTX 4090").usable_bytes / GIB == pytest.approx(23.64, abs=0.05)
    assert get_gpu("H100").usable_bytes == 81079 * 2**20  # measured


@pytest.mark.parametrize(
    "text,name",
    [
        ("4090", "RTX 4090 24GB"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090 24GB"),
        ("rtx-4060-ti-16gb", "RTX 4060 Ti 16GB"),
        ("4060", "RTX 4060 8GB"),
        ("A100-80GB", "A100 80GB"),
        ("a100 40", "A100 40GB"),
        ("a10", "A10 24GB"),
        ("h200", "H200 141GB"),
        ("Tesla T4", "T4 16GB"),
    ],
)
def test_forgiving_names(text, name):
    assert get_gpu(text).name == name


def test_ambiguous_and_unknown_names_list_the_choices():
    with pytest.raises(VlmtuneError, match="ambiguous.*A100 40GB, A100 80GB"):
        get_gpu("A100")
    with pytest.raises(VlmtuneError, match="not in the GPU catalogue.*RTX 4090 24GB"):
        get_gpu("Voodoo 5")


@pytest.mark.parametrize("text", ["24GB", "24 GB", "24gib", "24 GiB"])
def test_gpu_by_memory_size(text):
    gpu = get_gpu(text)
    assert gpu.memory_gb == 24 and gpu.bf16 and gpu.usable_bytes == get_gpu("RTX 4090").usable_bytes
    assert get_gpu(gpu.name) == gpu  # the name round-trips (the estimator looks the GPU up again by name)


def test_unknown_gpu_suggests_a_memory_size():
    with pytest.raises(VlmtuneError, match="--gpu 24GB"):
        get_gpu("Voodoo 5")


def test_preset_headers_name_catalogued_gpus():
    """The presets' 'Targets:' lines name cards the catalogue knows (ultra_low_memory names an RTX 3070)."""
    import re
    from pathlib import Path

    import vlmtune

    for preset in (Path(vlmtune.__file__).parent / "presets").glob("*.yaml"):
        header = "".join(line for line in preset.read_text().splitlines(True) if line.startswith("#"))
        for card in re.findall(r"RTX \d{4}(?: Ti)? \d+GB", header):
            assert get_gpu(card).memory_gb == int(card.split()[-1][:-2]), (preset.name, card)

"""Numerical parity of vlmtune's Qwen-VL port with the original remote code (issue 16 item 3). Not run in CI.

    .venv/bin/python benchmarks/qwen_vl_parity.py --remote-code DIR --ref-python /tmp/qwenvl-ref/bin/python \
        [--hub-vocab DIR] [--out DIR] [--write-fixture]

DIR (--remote-code) holds the checkpoint's remote-code files from a public copy of the Hub repository
(configuration_qwen.py, modeling_qwen.py, visual.py, tokenization_qwen.py, qwen_generation_utils.py); the reference
environment has the transformers the code was written for (4.32.0) with tiktoken and einops. What runs:
1. here (vlmtune's environment): the fixture checkpoint (tests/families/qwen_vl_fixture.py: tiny config, seeded
   weights) is saved by the port in the Hub layout, the remote-code files are put beside it (auto_map as on the
   Hub), and the port computes, in fp32, the loss of a training batch (two records, right-padded, one with two
   images; train mode) and then the logits of the same batch in eval mode (the longer row passes the tiny
   seq_length of 64, so the original's dynamic-NTK rotary and log-n attention scaling run too);
2. the reference python loads the same folder with trust_remote_code and computes the same two things from the
   original input format (the image's path between <img> and </img>, padded with <imgpad>; images read from PNG
   files by the original transform); it also tokenizes a set of texts with the original tiktoken tokenizer, on the
   tiny vocabulary and (--hub-vocab) on the released qwen.tiktoken;
3. vlmtune's export path (`save_merged`) saves the checkpoint with a random LoRA adapter merged in; the original code
   loads that export as well and its logits are compared with the port's for the merged model;
4. here again: relative differences (max |port - original| / max |original|) must be below 1e-5, token ids equal.
--write-fixture writes tests/families/fixtures/qwen_vl_parity.json (the original's numbers) for the CI test.
torchvision is not installed in the reference environment (only a CUDA build is reachable here); a stand-in module
gives visual.py the three transforms it uses, on PIL: Resize(bicubic) = PIL's resize, ToTensor, Normalize.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "families"))

from qwen_vl_fixture import FIXTURE, checkpoint_weights, images  # noqa: E402

SEQ_LENGTH = 64
"""The fixture's seq_length (the release: 2048): the batch's longer row passes it, so that eval-mode logits run the
original's dynamic NTK and log-n scaling."""
REMOTE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "visual.py", "tokenization_qwen.py",
                "qwen_generation_utils.py")
TEXTS = ["Hello world, 你好世界! 12345", "  leading spaces\n\n\ttabs and\r\nnewlines   ", "What colour is the circle?",
         "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe it.<|im_end|>\n",
         "Ünïcödé café naïve — emoji 🙂🚀, CJK 漢字かな, numbers 3.14159e-10", "<ref>the dog</ref><box>(1,2),(3,4)</box>",
         "don't won't it's I'll we've", "x" * 50 + " " + "ab" * 30,
         "def f(x):\n    return {'a': [1, 2, 3]}  # code\n", "https://example.com/path?q=1&r=2 <quad>",
         "Straße ǅ ﬁ Å (NFC: A\u030a) e\u0301"]
# (text only: the original tokenizer turns <img>...</img> into the image's 256-token span, which the model part
# compares through the original's own input format)

REFERENCE = r'''
import json, sys, types, torch
from pathlib import Path
from PIL import Image
import numpy as np
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

# torchvision stand-in (after transformers' import, which probes for the real package): the three transforms visual.py uses, on PIL images (what torchvision does for PIL input)
tv = types.ModuleType("torchvision"); tr = types.ModuleType("torchvision.transforms")
class InterpolationMode: BICUBIC = Image.Resampling.BICUBIC
class Compose:
    def __init__(self, steps): self.steps = steps
    def __call__(self, x):
        for s in self.steps: x = s(x)
        return x
class Resize:
    def __init__(self, size, interpolation): self.size, self.interpolation = size, interpolation
    def __call__(self, img): return img.resize((self.size[1], self.size[0]), self.interpolation)
class ToTensor:
    def __call__(self, img): return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
class Normalize:
    def __init__(self, mean, std): self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    def __call__(self, t): return (t - self.mean) / self.std
for name, obj in dict(InterpolationMode=InterpolationMode, Compose=Compose, Resize=Resize, ToTensor=ToTensor,
                      Normalize=Normalize).items():
    setattr(tr, name, obj)
tv.transforms = tr
sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tr

work = Path(sys.argv[1]); data = torch.load(work / "inputs.pt")
ckpt = work / "ckpt"
model = AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=True, fp32=True).float()
import os; os.chdir(work)  # the image paths in the input are relative to this folder
model.train()
loss = model(input_ids=data["ref_ids"], attention_mask=data["attention_mask"], labels=data["labels"]).loss
model.eval()
with torch.no_grad():
    logits = model(input_ids=data["ref_ids"], attention_mask=data["attention_mask"]).logits
exported = AutoModelForCausalLM.from_pretrained(str(work / "export"), trust_remote_code=True, fp32=True).float().eval()
with torch.no_grad():
    export_logits = exported(input_ids=data["ref_ids"], attention_mask=data["attention_mask"]).logits
out = {"transformers": transformers.__version__, "torch": str(torch.__version__), "loss": float(loss.detach()),
       "logits": logits, "export_logits": export_logits, "tokens": {}}
for name in ("tiny", "hub"):
    folder = work / ("ckpt" if name == "tiny" else "hubtok")
    if folder.is_dir():
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
        out["tokens"][name] = [tok.encode(t) for t in data["texts"]]
torch.save(out, work / "reference.pt")
print("reference done", transformers.__version__, torch.__version__)
'''


def _records(folder: Path) -> list:
    from vlmtune.data.records import ImagePart, Message, Record, TextPart

    return [
        Record(1, [Message("user", [ImagePart(folder / "a.png"), TextPart("What colour is the circle?")]),
                   Message("assistant", [TextPart("It is red.")])]),
        Record(2, [Message("system", [TextPart("Answer in a few words.")]),
                   Message("user", [ImagePart(folder / "a.png"), ImagePart(folder / "b.png"),
                                    TextPart("Which picture has more blue in it, and why?")]),
                   Message("assistant", [TextPart("The second one.")]),
                   Message("user", [TextPart("How many shapes?")]),
                   Message("assistant", [TextPart("Three shapes.")])]),
    ]


def port_side(work: Path, remote: Path, hub_vocab: Path | None) -> dict:
    """Save the fixture checkpoint in the Hub layout with the port, build the batch, compute the port's numbers."""
    from PIL import Image

    from vlmtune.config.schema import DataConfig
    from vlmtune.data.collate import Collator
    from vlmtune.data.processing import encode
    from vlmtune.families import get_family
    from vlmtune.families.qwen_vl_model import QwenVLConfig, QwenVLForCausalLM
    from vlmtune.families.qwen_vl_model.tokenizer import load_tokenizer

    family = get_family("qwen_vl")
    ckpt = family.build_tiny(work / "ckpt", seed=0)
    config = QwenVLConfig.from_pretrained(ckpt)
    config.seq_length = SEQ_LENGTH
    model = QwenVLForCausalLM(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(checkpoint_weights(shapes))
    model.save_pretrained(ckpt)
    for name in REMOTE_FILES:
        shutil.copyfile(remote / name, ckpt / name)
    processor = family.load_processor(ckpt)

    for name, pixels in zip(("a.png", "b.png"), images(), strict=True):
        Image.fromarray(pixels.numpy()).save(work / name)
    samples = [encode(r, processor, family, DataConfig()) for r in _records(work)]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)

    # the original's input: the image's (relative) path between <img> and </img>, padded with <imgpad>
    ref_ids = batch["input_ids"].clone()
    start = config.image_start_id
    for row in range(ref_ids.shape[0]):
        starts = (ref_ids[row] == start).nonzero().flatten().tolist()
        for k, pos in enumerate(starts):
            path = ("a.png", "b.png")[k % 2].encode()
            ref_ids[row, pos + 1: pos + 1 + len(path)] = torch.tensor(list(path))

    model = QwenVLForCausalLM.from_pretrained(ckpt).float()
    model.train()
    loss = model(**batch).loss.detach()
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    export_logits = _merged_export(ckpt, processor, batch, work / "export")
    tokens = {"tiny": [processor.tokenizer.encode(t) for t in TEXTS]}
    if hub_vocab is not None:
        (work / "hubtok").mkdir()
        shutil.copyfile(hub_vocab / "qwen.tiktoken", work / "hubtok" / "qwen.tiktoken")
        shutil.copyfile(remote / "tokenization_qwen.py", work / "hubtok" / "tokenization_qwen.py")
        processor.save_pretrained(work / "hubtok-config")
        shutil.copyfile(work / "hubtok-config" / "tokenizer_config.json", work / "hubtok" / "tokenizer_config.json")
        tokens["hub"] = [load_tokenizer(hub_vocab).encode(t) for t in TEXTS]
    torch.save({"ref_ids": ref_ids, "attention_mask": batch["attention_mask"], "labels": batch["labels"],
                "texts": TEXTS}, work / "inputs.pt")
    return {"config": json.loads((ckpt / "config.json").read_text()), "shapes": shapes, "batch": batch,
            "loss": float(loss), "logits": logits, "tokens": tokens, "export_logits": export_logits}


def _merged_export(ckpt: Path, processor: object, batch: dict, out: Path) -> torch.Tensor:
    """A LoRA adapter (random, nonzero) on every target of the `all` set plus the vision blocks, merged and saved
    by vlmtune's export path (`save_merged`); the port's eval logits of the merged model."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.export.merge import save_merged
    from vlmtune.families import get_family
    from vlmtune.families.qwen_vl_model import QwenVLForCausalLM

    family = get_family("qwen_vl")
    model = QwenVLForCausalLM.from_pretrained(ckpt).float()
    target = family.lora_target_regex("all", adapt_vision_tower=True)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False))
    merged = peft.merge_and_unload()
    save_merged(merged, processor, out)
    merged.eval()
    with torch.no_grad():
        return merged(**{k: v for k, v in batch.items() if k != "labels"}).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--remote-code", type=Path, required=True)
    parser.add_argument("--ref-python", type=Path, required=True)
    parser.add_argument("--hub-vocab", type=Path, help="a folder with the released qwen.tiktoken")
    parser.add_argument("--out", type=Path, help="keep the work folder here")
    parser.add_argument("--write-fixture", action="store_true")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="qwen-vl-parity-"))
    work.mkdir(parents=True, exist_ok=True)

    port = port_side(work, args.remote_code, args.hub_vocab)
    (work / "reference.py").write_text(REFERENCE)
    subprocess.run([str(args.ref_python), str(work / "reference.py"), str(work)], check=True)
    ref = torch.load(work / "reference.pt")

    logits_rel = float((port["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max())
    loss_rel = abs(port["loss"] - ref["loss"]) / abs(ref["loss"])
    export_rel = float((port["export_logits"] - ref["export_logits"]).abs().max() / ref["export_logits"].abs().max())
    tokens_equal = {name: port["tokens"].get(name) == ids for name, ids in ref["tokens"].items()}
    report = {"reference": {"transformers": ref["transformers"], "torch": ref["torch"]},
              "port": {"transformers": __import__("transformers").__version__, "torch": torch.__version__},
              "logits_shape": list(ref["logits"].shape), "logits_max_rel_diff": logits_rel,
              "loss_port": port["loss"], "loss_reference": ref["loss"], "loss_rel_diff": loss_rel,
              "merged_export_logits_max_rel_diff": export_rel, "tokens_equal": tokens_equal}
    print(json.dumps(report, indent=2))
    ok = logits_rel < 1e-5 and loss_rel < 1e-5 and export_rel < 1e-5 and all(tokens_equal.values())
    if args.write_fixture and ok:
        batch = port["batch"]
        picks = torch.tensor([0, 1, 17, 40, 200, 301, 702, 914, 1000])
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps({
            "source": f"original remote code (transformers {ref['transformers']}), benchmarks/qwen_vl_parity.py",
            "config": port["config"], "shapes": port["shapes"],
            "input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist(),
            "labels": batch["labels"].tolist(), "vocab_columns": picks.tolist(), "position_step": 3,
            "logits": [[[round(float(x), 6) for x in pos] for pos in row]
                       for row in ref["logits"][:, ::3][:, :, picks]],
            "loss": ref["loss"]}, separators=(",", ":")) + "\n")
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

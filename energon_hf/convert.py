"""Pre-shard a checkpoint for tensor/pipeline parallelism:

    python -m energon_hf.convert SRC --tp N --pp M --out DIR [--dtype auto|float16|bfloat16|float32]

SRC is anything `EnergonModel.from_pretrained` takes (an HF folder, a hub id, a .gguf file). DIR gets one
safetensors file per rank holding exactly that rank's parameters, the config, tokenizer and generation
files, and a manifest; `EnergonModel.from_pretrained(DIR)` then starts tp*pp ranks that each read only
their own file. Ranks are converted one after another, so memory peaks at about one rank's share.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from energon_hf.converters.checkpoint import find_weight_files
from energon_hf.converters.sharded import MANIFEST, save_rank, write_manifest
from energon_hf.loading import load_config, load_model, resolve_dtype, resolve_model_path
from energon_hf.models import architecture_for
from energon_hf.parallel import placed_as

# Everything but the weights travels with the shards (tokenizer, generation config, chat template...).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")


def convert(src: str | Path, out: str | Path, tp: int = 1, pp: int = 1, dtype: str = "auto") -> Path:
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    folder = resolve_model_path(src)
    config = load_config(folder)
    architecture = architecture_for(config)
    torch_dtype = resolve_dtype(dtype, config)
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ValueError("--out must be a new folder, not the source checkpoint")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not an energon_hf sharded folder; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    weights = {p.name for p in find_weight_files(folder)}
    for path in folder.iterdir():
        if path.is_file() and path.name not in weights and not path.name.endswith(_WEIGHT_SUFFIXES) \
                and "index.json" not in path.name:
            shutil.copy2(path, out / path.name)
    ranks = [(pp_rank, tp_rank) for pp_rank in range(pp) for tp_rank in range(tp)]
    for pp_rank, tp_rank in tqdm(ranks, desc="Converting ranks", unit="rank", delay=2.0):
        with placed_as(tp, tp_rank, pp, pp_rank) as place:
            model = load_model(folder, torch_dtype, "cpu", pack=False)
            save_rank(model, out, place.rank)
        del model
    config.dtype = torch_dtype
    config.save_pretrained(out)
    write_manifest(out, tp, pp, torch_dtype, architecture.name, str(src))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m energon_hf.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="HF checkpoint folder, hub id or .gguf file")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the shards to")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, args.tp, args.pp, args.dtype)
    except ValueError as e:  # bad arguments, unsupported or broken checkpoints: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.tp * args.pp} rank shard(s) for tp={args.tp}, pp={args.pp} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

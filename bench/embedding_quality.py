"""Embedding fidelity and speed of each precision on all-MiniLM-L6-v2 (the embedded default encoder): 306 passages
of 6 to 48 words from chapter I of Alice's Adventures in Wonderland (bench/data, public domain) encoded with
energon_hf.SentenceTransformer (batches of 32, mean pooling, normalized), each variant against our float32:
the worst and mean cosine of the embeddings, and the top-10 retrieval overlap (50 passages search the other
256). Speed: the same encode, timed interleaved with float32's in one process (a ratio; tests never time).
`--peers` adds ONNX Runtime (BERT fusions; dynamic int8) and CTranslate2 (float32, int8) on the same token ids
(bench/peers.py; `pip install -e .[peers]`).

    .venv/bin/python -P bench/embedding_quality.py            # every variant (about 1 min)
    .venv/bin/python -P bench/embedding_quality.py --peers    # and the peers (their conversions: about 1 min)
    .venv/bin/python -P bench/embedding_quality.py --quick    # int8 only, 3 repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from energon_hf import SentenceTransformer, defaults
from energon_hf.evaluate import embedding_fidelity, passages

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder itself is not on sys.path
import peers  # noqa: E402
from common import machine_info, time_calls, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = Path(__file__).resolve().parent / "data" / "alice_chapter1.txt"
VARIANTS = {
    "int8": dict(quantization="int8"),
    "int4": dict(quantization="int4"),
    "bfloat16": dict(dtype="bfloat16"),
    "float16": dict(dtype="float16"),
}
# issue 17's bounds for int8: worst and mean cosine, top-10 overlap, speed over float32 (MiniLM)
TARGETS = {"int8": (0.995, 0.999, 0.95, 1.3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="int8 only, 3 repeats")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=None, help="timed encodes each (default 5; quick 3)")
    parser.add_argument("--peers", action="store_true", help="also ONNX Runtime and CTranslate2 (the peers extra)")
    parser.add_argument("--peers-if-installed", action="store_true", help="--peers where the peers extra is there")
    parser.add_argument("--gpu", action="store_true", help="our variants on CUDA (the peers stay on CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.variants or (["int8"] if args.quick else list(VARIANTS))
    repeats = args.repeats or (3 if args.quick else 5)
    texts = passages(TEXT.read_text())
    path = defaults.embedding_model()
    device = "cuda" if args.gpu else "cpu"
    models = {"float32": SentenceTransformer(path, dtype="float32", device=device)}
    models.update({name: SentenceTransformer(path, device=device, **VARIANTS[name]) for name in names})
    calls = {name: (lambda m=model: m.encode(texts, batch_size=32, convert_to_tensor=True))
             for name, model in models.items()}
    if args.peers or (args.peers_if_installed and peers.available()):
        if not peers.available():
            parser.error("--peers needs the peers extra: pip install -e .[peers]")
        sequences = models["float32"].tokenize(texts)  # the same token ids for every side
        work = Path(tempfile.mkdtemp(prefix="energon_peers_"))
        for name in peers.PEERS:
            peer = peers.make(name, Path(models["float32"].model.folder), work, args.threads)
            calls[name] = lambda p=peer: torch.cat([torch.nn.functional.normalize(p(sequences[i:i + 32]), dim=-1)
                                                    for i in range(0, len(sequences), 32)])
            names.append(name)
    encoded = {name: call() for name, call in calls.items()}
    times = time_calls(calls, warmup=1, repeats=repeats)
    base = statistics.median(times["float32"])
    rows, failed = {}, []
    print(f"{len(texts)} passages, float32 {base * 1e3:.0f} ms per encode")
    for name in names:
        fidelity = embedding_fidelity(encoded[name], encoded["float32"])
        speed = base / statistics.median(times[name])
        rows[name] = {**fidelity, "speed_vs_float32": speed, "seconds": times[name]}
        print(f"{name:17s} worst cosine {fidelity['worst_cosine']:.5f}  mean {fidelity['mean_cosine']:.6f}  "
              f"top-10 overlap {fidelity['top10_overlap']:.1%}  speed {speed:.2f}x float32")
        target = TARGETS.get(name)
        if target and not (fidelity["worst_cosine"] >= target[0] and fidelity["mean_cosine"] >= target[1]
                           and fidelity["top10_overlap"] >= target[2]):
            failed.append(name)
    for model in models.values():
        model.close()
    result = {"benchmark": "embedding_quality", "machine": machine_info(args.threads), "model": "all-MiniLM-L6-v2",
              "passages": len(texts), "float32_seconds": times["float32"], "variants": rows, "targets": TARGETS}
    out_path = write_result(args.out or RESULTS / "embedding_quality.json", result)
    print(f"-> {out_path}")
    if failed:
        print(f"fidelity below issue 17's bounds: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

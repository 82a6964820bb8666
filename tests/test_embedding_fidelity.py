"""Issue 17's fidelity bounds for reduced-precision encoders, on all-MiniLM-L6-v2 and 306 passages of the shipped
Alice chapter (energon_hf.evaluate.passages): int8 (weights per output channel, bfloat16 products) and bfloat16
against our float32, by the worst and mean cosine of the sentence embeddings and the top-10 retrieval overlap.
bench/embedding_quality.py prints the same figures with each variant's speed."""

from pathlib import Path

import pytest

from energon_hf import SentenceTransformer
from energon_hf.evaluate import embedding_fidelity, passages

TEXT = Path(__file__).resolve().parents[1] / "bench" / "data" / "alice_chapter1.txt"
# (worst cosine, mean cosine, top-10 overlap); measured: int8 0.9986 / 0.99947 / 98.4 %, bfloat16 0.9999 /
# 0.99996 / 99.8 % (bench/embedding_quality.py)
BOUNDS = {"int8": (0.995, 0.999, 0.95), "bfloat16": (0.999, 0.9999, 0.97)}


@pytest.fixture(scope="module")
def float32_embeddings(minilm_path):
    with SentenceTransformer(minilm_path, dtype="float32") as model:
        return model.encode(passages(TEXT.read_text()), convert_to_tensor=True)


@pytest.mark.parametrize("variant", list(BOUNDS))
def test_reduced_precision_embeddings_stay_faithful(variant, minilm_path, float32_embeddings):
    load = {"quantization": "int8"} if variant == "int8" else {"dtype": variant}
    texts = passages(TEXT.read_text())
    assert len(texts) == 306
    with SentenceTransformer(minilm_path, **load) as model:
        fidelity = embedding_fidelity(model.encode(texts, convert_to_tensor=True), float32_embeddings)
    worst, mean, overlap = BOUNDS[variant]
    assert fidelity["worst_cosine"] >= worst and fidelity["mean_cosine"] >= mean, fidelity
    assert fidelity["top10_overlap"] >= overlap, fidelity
    assert fidelity["worst_cosine"] < 1 - 1e-7  # the variant really computed in reduced precision

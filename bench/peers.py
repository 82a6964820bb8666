"""Peer encoders for the benchmarks (the `peers` extra: onnxruntime, onnx, ctranslate2), each made from the same HF
folder and run on the same token ids, with sentence-transformers' mean pooling over real tokens.

- ONNX Runtime: transformers' model exported to ONNX, then ORT's BERT fusions (`optimize_model`, what its BERT
  guides recommend), in float32, and with dynamic int8 quantization (`quantize_dynamic`, int8 weights and
  activations per tensor); sessions at the benchmark's thread count.
- CTranslate2: `TransformersConverter` once, then an `Encoder` with compute_type float32 or int8.

Conversions go to a work folder, once per process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

PEERS = ("onnxruntime", "onnxruntime int8", "ctranslate2", "ctranslate2 int8")


def available() -> bool:
    try:
        import ctranslate2  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def mean_pool(hidden: np.ndarray, lengths: list[int]) -> torch.Tensor:
    """[B, L, H] padded on the right -> [B, H], the mean over each row's real tokens."""
    hidden = torch.from_numpy(np.ascontiguousarray(hidden)).float()
    mask = (torch.arange(hidden.shape[1])[None] < torch.tensor(lengths)[:, None]).float()[..., None]
    return (hidden * mask).sum(1) / mask.sum(1)


class _Exported(torch.nn.Module):
    """The HF model with keyword inputs and one output, for torch.onnx.export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def onnx_files(folder: Path, work: Path) -> dict[str, Path]:
    """The folder's model as ONNX with ORT's BERT fusions, and its dynamic int8 quantization."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    work.mkdir(parents=True, exist_ok=True)
    plain, fused, int8 = work / "model.onnx", work / "model_fused.onnx", work / "model_int8.onnx"
    if not int8.is_file():
        model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
        ids = torch.ones(2, 8, dtype=torch.long)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        torch.onnx.export(_Exported(model), (ids, ids, torch.zeros_like(ids)), str(plain), input_names=names,
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]})
        config = model.config
        optimize_model(str(plain), model_type="bert", num_heads=config.num_attention_heads,
                       hidden_size=config.hidden_size).save_model_to_file(str(fused))
        quantize_dynamic(str(fused), str(int8), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"onnxruntime": fused, "onnxruntime int8": int8}


class OnnxRuntimeEncoder:
    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        lengths = [len(s) for s in sequences]
        ids = np.zeros((len(sequences), max(lengths)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                         "token_type_ids": np.zeros_like(ids)})[0]
        return mean_pool(hidden, lengths)


class CTranslate2Encoder:
    def __init__(self, folder: Path, work: Path, threads: int, int8: bool):
        import ctranslate2

        if not (work / "model.bin").is_file():
            ctranslate2.converters.TransformersConverter(str(folder)).convert(str(work), force=True)
        self.encoder = ctranslate2.Encoder(str(work), device="cpu", compute_type="int8" if int8 else "float32",
                                           intra_threads=threads)

    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        hidden = np.array(self.encoder.forward_batch(sequences).last_hidden_state)
        return mean_pool(hidden, [len(s) for s in sequences])


def make(name: str, folder: Path, work: Path, threads: int):
    """The peer `name` (one of PEERS) as a callable: token sequences -> mean-pooled [B, H]."""
    if name.startswith("onnxruntime"):
        return OnnxRuntimeEncoder(onnx_files(folder, work / "onnx")[name], threads)
    return CTranslate2Encoder(folder, work / "ct2", threads, int8=name.endswith("int8"))

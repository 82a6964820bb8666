"""EnergonModel: an HF checkpoint turned into a packed, padding-free model with HF's calling conventions."""

from __future__ import annotations

import os
import threading
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.utils import ModelOutput

from energon_hf import kernels
from energon_hf.batch import AttentionMetadata, PackedBatch, packed_layout
from energon_hf.engine.batcher import ContinuousBatcher
from energon_hf.engine.beam_search import BeamSettings
from energon_hf.engine.hooks import StreamerSink, stop_test
from energon_hf.engine.multiprocess import MultiProcessRunner
from energon_hf.engine.params import GenerationParams
from energon_hf.engine.runner import LocalRunner
from energon_hf.kv_cache import BLOCK_SIZE
from energon_hf.loading import (
    empty_model,
    load_config,
    load_model,
    on_passing_thread,
    resolve_dtype,
    resolve_model_path,
    resolve_parallel,
)
from energon_hf.models import Architecture, architecture_for
from energon_hf.nn.formats import Quantization

UNLIMITED = 1 << 62  # a step budget or running limit that never binds

# Arguments of an HF forward that ask for something this inference engine does not compute.
_UNSUPPORTED_FORWARD = ("labels", "output_attentions", "output_hidden_states", "inputs_embeds",
                        "past_key_values", "cache", "encoder_hidden_states", "interpolate_pos_encoding",
                        "bool_masked_pos", "head_mask")


class EnergonModel:
    """An HF-style model object: `model(input_ids=..., attention_mask=...)` returns the same ModelOutput
    as transformers, `generate(...)` follows HF generate, computed on packed tokens."""

    def __init__(self, model: torch.nn.Module, config: PretrainedConfig, architecture: Architecture,
                 generation_config: GenerationConfig | None, device: torch.device, dtype: torch.dtype,
                 name_or_path: str = "", folder: Path | None = None,
                 runner: LocalRunner | MultiProcessRunner | None = None, tp: int = 1, pp: int = 1,
                 quantization: Quantization | None = None):
        self.model = model  # the loaded model, or (multi-process) its structure on the meta device
        self.config = config
        self.architecture = architecture
        self.generation_config = generation_config
        self.device = device
        self.dtype = dtype
        self.name_or_path = name_or_path
        self.folder = folder  # the HF folder the weights came from (tokenizer files live there too)
        self.runner = runner or LocalRunner(model, device, dtype)
        self.tp, self.pp = tp, pp
        self.quantization = quantization
        self._batcher: ContinuousBatcher | None = None
        self._batcher_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", tp: int | None = None, pp: int | None = None,
                        revision: str | None = None, threads_per_rank: int | None = None,
                        driver_address: str | None = None,
                        quantization: str | Quantization | None = None) -> EnergonModel:
        """Load an HF checkpoint, or a folder pre-sharded by `python -m energon_hf.convert` (its tp and pp
        are the default then). tp * pp > 1 starts that many worker processes (this process drives them),
        each loading only its share of the weights; `threads_per_rank` defaults to cores / ranks.

        `quantization="int8"` (per output channel) or `"int4"` (groups of 32 input features) stores the
        linear layers' weights quantized as they load (weight-only: activations stay in `dtype`); vocabulary
        heads and embeddings stay in `dtype`. None keeps the checkpoint's floats. On CPU, products of many rows
        (prompts) expand the weight to bfloat16; `"int8-exact"` / `"int4-exact"` expand it to float32, so every
        product is exact to float32 rounding (slower prompts; see formats.EXACT_SUFFIX).

        `driver_address="host:port"` starts no workers: tp*pp ranks launched by torchrun on any machines
        (`python -m energon_hf.node --driver host:port`) connect there; the checkpoint path must be
        readable on every node."""
        quantization = Quantization.parse(quantization)
        folder = resolve_model_path(path, revision)
        tp, pp = resolve_parallel(folder, tp, pp)
        config = load_config(folder)
        architecture = architecture_for(config)
        torch_dtype = resolve_dtype(dtype, config)
        device = torch.device(device)
        runner = None
        if tp * pp > 1 or driver_address is not None:
            model = empty_model(config)
            runner = MultiProcessRunner(partial(load_model, folder, torch_dtype, quantization=quantization), tp, pp,
                                        device.type, threads_per_rank=threads_per_rank, driver_address=driver_address)
        else:
            model = on_passing_thread(load_model, folder, torch_dtype, device, quantization)
        generation_config = None
        if (folder / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(folder)
        elif architecture.can_generate:
            generation_config = GenerationConfig.from_model_config(config)
        return cls(model, config, architecture, generation_config, device, torch_dtype, str(path), folder, runner,
                   tp, pp, quantization)

    @property
    def base_model_prefix(self) -> str:
        """As on an HF PreTrainedModel ("bert", "transformer", "model"...); pipelines name errors with it."""
        return self.architecture.model_cls.base_prefix.rstrip(".")

    def can_generate(self) -> bool:
        return self.architecture.can_generate

    def to(self, device: str | torch.device) -> EnergonModel:
        """Models stay where they were loaded (pass device= to from_pretrained); this only checks."""
        if torch.device(device) != self.device:
            raise ValueError(f"this model lives on {self.device}; load it with device={str(device)!r} instead")
        return self

    def eval(self) -> EnergonModel:
        return self  # always in inference mode

    @property
    def position_limit(self) -> int | None:
        """Learned position embeddings end at max_position_embeddings; rotary positions do not."""
        learned = self.architecture.model_cls.learned_positions
        return self.config.max_position_embeddings if learned else None

    # -- input checks ---------------------------------------------------------------------------
    def _as_batch(self, input_ids: Any, name: str = "input_ids") -> torch.Tensor:
        if input_ids is None:
            raise ValueError(f"{name} is required")
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"{name} must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got {input_ids.dtype}")
        return input_ids.to(self.device, torch.long)

    def _check_range(self, values: torch.Tensor, limit: int, what: str, hint: str) -> None:
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
            bad = values[(values < 0) | (values >= limit)][0].item()
            raise ValueError(f"{what} {bad} is outside [0, {limit}) {hint}")

    def _pack(self, input_ids, attention_mask, token_type_ids=None, position_ids=None):
        ids = self._as_batch(input_ids)
        batch, seqlen = ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        attention_mask = kernels.check_attention_mask(torch.as_tensor(attention_mask), (batch, seqlen))
        packed_ids, indices, cu_seqlens, max_seqlen = kernels.remove_padding(ids, attention_mask)
        empty = (cu_seqlens[1:] == cu_seqlens[:-1]).nonzero()
        if empty.numel():
            raise ValueError(f"sequence {int(empty[0])} of the batch has no tokens (its attention_mask row is all 0)")
        self._check_range(packed_ids, self.config.vocab_size, "input_ids contain token id",
                          f"(the vocabulary size of this {self.config.model_type} model)")
        if position_ids is not None:
            positions = self._as_batch(position_ids, "position_ids").expand(batch, seqlen).flatten()[indices]
        elif self.architecture.model_cls.positions_count_real_tokens:  # OPT: each sequence's own index
            positions = kernels.positions_from_cu_seqlens(cu_seqlens, packed_ids.shape[0])
        else:  # HF's forward convention: a token's position is its column in the (padded) input
            positions = indices % seqlen
        if self.position_limit is not None:
            self._check_range(positions, self.position_limit, "position",
                              f"(max_position_embeddings: sequences may hold at most {self.position_limit} tokens)")
        token_types = None
        if token_type_ids is not None:
            token_types = self._as_batch(token_type_ids, "token_type_ids").expand(batch, seqlen).flatten()[indices]
            limit = getattr(self.config, "type_vocab_size", self.config.vocab_size)
            self._check_range(token_types, limit, "token_type_ids contain", "")
        attn = AttentionMetadata(cu_seqlens, max_seqlen)
        return PackedBatch(packed_ids, positions, attn, token_types), indices, (batch, seqlen)

    def _pack_images(self, pixel_values: Any):
        """Vision models: every image is the same number of tokens, so the batch packs without padding."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError("pixel_values must be a torch.Tensor [batch, channels, height, width]; "
                             "run images through the model's AutoImageProcessor first")
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected [batch, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}] (the config's num_channels and image_size)")
        if not pixel_values.dtype.is_floating_point:
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        batch, per_image = pixel_values.shape[0], self.model.tokens_per_image
        cu_seqlens = torch.arange(0, (batch + 1) * per_image, per_image, dtype=torch.int32, device=self.device)
        positions = torch.arange(per_image, device=self.device).repeat(batch)
        packed = PackedBatch(positions.new_empty(0), positions, AttentionMetadata(cu_seqlens, per_image),
                             pixel_values=pixel_values.to(self.device))
        return packed, torch.arange(batch * per_image, device=self.device), (batch, per_image)

    def _pack_sequences(self, sequences: list[list[int]]) -> PackedBatch:
        """Token sequences packed as they are, each at positions 0, 1, ... (no padding to remove)."""
        if not sequences:
            raise ValueError("no sequences to run")
        for i, sequence in enumerate(sequences):
            if not sequence:
                raise ValueError(f"sequence {i} has no tokens")
        lengths = torch.tensor([len(s) for s in sequences])
        cu_seqlens, positions = packed_layout(lengths)
        ids = torch.tensor([token for sequence in sequences for token in sequence], dtype=torch.long)
        self._check_range(ids, self.config.vocab_size, "input_ids contain token id",
                          f"(the vocabulary size of this {self.config.model_type} model)")
        longest = int(lengths.max())
        if self.position_limit is not None and longest > self.position_limit:
            raise ValueError(f"a sequence of {longest} tokens is longer than max_position_embeddings "
                             f"({self.position_limit})")
        return PackedBatch(ids, positions, AttentionMetadata(cu_seqlens, longest)).to(self.device)

    def run_packed(self, sequences: list[list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The model's outputs on token sequences packed without padding, in and out: the token outputs
        ([total tokens, ...], sequence after sequence) as the model computed them, and cu_seqlens [B+1], where
        each sequence's rows start. Sentence embeddings pool these directly (energon_hf.pooling)."""
        packed = self._pack_sequences(sequences)
        return self.runner.run(packed), packed.attn.cu_seqlens

    # -- HF-style calls ---------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> ModelOutput:
        return self.forward(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                return_dict: bool = True, pixel_values=None, **kwargs) -> ModelOutput | tuple:
        for name in _UNSUPPORTED_FORWARD:
            value = kwargs.pop(name, None)
            if value is not None and value is not False:
                raise ValueError(f"{name} is not supported: energon_hf runs plain inference")
        kwargs.pop("use_cache", None)
        if kwargs:
            raise TypeError(f"forward() got unexpected arguments: {sorted(kwargs)}")
        if self.architecture.model_cls.main_input == "pixel_values":
            packed, indices, (batch, seqlen) = self._pack_images(pixel_values)
        elif pixel_values is not None:
            raise ValueError(f"{self.architecture.name} takes input_ids, not pixel_values")
        else:
            packed, indices, (batch, seqlen) = self._pack(input_ids, attention_mask, token_type_ids, position_ids)
        outputs = self.runner.run(packed)
        for key in self.model.token_outputs:  # rebuild padding once, at the end
            outputs[key] = kernels.rebuild_padding(outputs[key], indices, batch, seqlen)
        result = self.model.hf_output(**outputs)
        return result if return_dict else result.to_tuple()

    def generate(self, input_ids=None, attention_mask=None, generator: torch.Generator | None = None,
                  streamer=None, tokenizer=None, **kwargs) -> torch.Tensor:
        """HF generate semantics: returns [B * num_return_sequences, S + new] = the input as given, then the new
        tokens; a sequence that finished early is filled with pad_token_id. The prompts run on the model's batcher
        as one group, batched with whatever else runs there (other generate calls, a server's requests).
        `streamer` (batches of one, as transformers' TextStreamer) gets the prompt, then each token; `tokenizer`
        is what stop_strings are matched with (transformers asks for it too)."""
        if not self.architecture.can_generate:
            raise ValueError(f"{self.architecture.name} has no language-model head and cannot generate")
        ids = self._as_batch(input_ids)
        params = GenerationParams.resolve(self.generation_config, ids.shape[1], kwargs)
        for word in params.bad_words_ids:
            self._check_range(torch.tensor(word), self.config.vocab_size, "bad_words_ids contain token id",
                              "(the vocabulary size)")
        stops = stop_test(params.stop_strings, tokenizer)
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask
        mask = kernels.check_attention_mask(torch.as_tensor(mask), tuple(ids.shape)).to(ids.device)
        prompts = [row[keep] for row, keep in zip(ids.cpu(), mask.cpu(), strict=True)]
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty (its attention_mask row is all 0)")
            self._check_range(prompt, self.config.vocab_size, "input_ids contain token id",
                              "(the vocabulary size)")
        longest = max(len(p) for p in prompts)
        if self.position_limit is not None and longest + params.max_new_tokens > self.position_limit:
            raise ValueError(f"prompt length {longest} + max_new_tokens {params.max_new_tokens} exceeds "
                             f"the model's max_position_embeddings ({self.position_limit})")
        if generator is None and params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        beams = None
        if params.num_beams > 1:
            beams = BeamSettings(params.num_beams, params.max_new_tokens, tuple(params.eos_token_ids),
                                 params.length_penalty, params.early_stopping, params.num_return_sequences)
        n = params.num_return_sequences
        if n > 1 and beams is None:  # each prompt's copies side by side, as transformers expands them
            prompts = [p for p in prompts for _ in range(n)]
        ids = ids.repeat_interleave(n, dim=0)
        sink = None
        if streamer is not None:
            if beams is not None:  # transformers' own refusal
                raise ValueError("`streamer` cannot be used with beam search (yet!). Make sure that `num_beams` is set "
                                 "to 1.")
            if len(prompts) != 1:
                raise ValueError(f"a streamer takes a batch of one sequence (as transformers' TextStreamer), got "
                                 f"{len(prompts)}")
            streamer.put(ids.cpu())
            sink = StreamerSink(streamer)
        batcher = self.batcher
        requests = batcher.submit_group([p.tolist() for p in prompts], params, generator, events=sink, stops=stops,
                                        beams=beams)
        new_tokens = batcher.wait(requests)
        fill = params.pad_token_id
        if beams is not None:  # the finished hypotheses; transformers fills shorter ones with pad_token_id or EOS
            new_tokens = requests[0].beams.results()
            fill = (params.pad_token_id or params.eos_token_ids[0]) if params.eos_token_ids else -1
        if streamer is not None:
            streamer.end()
        width = max(len(t) for t in new_tokens)
        tail = torch.full((len(new_tokens), width), fill, dtype=torch.long)
        for row, tokens in enumerate(new_tokens):
            tail[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return torch.cat([ids.cpu(), tail], dim=1).to(ids.device)

    # -- the batcher --------------------------------------------------------------------------------
    @property
    def batcher(self) -> ContinuousBatcher:
        """The continuous batcher every generation of this model runs on, owner of its KV cache. Made on first
        use, or after the last one stopped, with a cache that grows to what its requests could hold, and steps
        run by the threads that wait on them (`start_batcher` makes a server's: a fixed cache, its own thread)."""
        with self._batcher_lock:
            if self._batcher is None or not self._batcher.alive:
                # No step budget or running limit: a call's prompts are admitted, and prefilled whole, in one
                # step, as the loop this replaced did, so its rows sample together (seeded parity) from the start.
                self._batcher = ContinuousBatcher(self.runner, self.config.vocab_size, max_batch_tokens=UNLIMITED,
                                                  max_running=UNLIMITED, grow=True, background=False,
                                                  recompute_at=self.model.recompute_at())
            return self._batcher

    def start_batcher(self, num_blocks: int, *, block_size: int = BLOCK_SIZE, max_batch_tokens: int = 4096,
                      max_running: int = 256) -> ContinuousBatcher:
        """Replace the batcher with one whose KV cache is fixed at `num_blocks` blocks (a server sizes it from
        the memory left), under these step limits. The old one stops: its requests end cancelled."""
        with self._batcher_lock:
            if self._batcher is not None:
                self._batcher.close()
            self._batcher = ContinuousBatcher(self.runner, self.config.vocab_size, num_blocks, block_size,
                                              max_batch_tokens, max_running, recompute_at=self.model.recompute_at())
            return self._batcher

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the batcher, free the KV cache and stop the worker processes, if any."""
        with self._batcher_lock:
            if self._batcher is not None:
                self._batcher.close()
        self.runner.close()

    def __enter__(self) -> EnergonModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EnergonModel({self.architecture.name}, path={self.name_or_path!r}, dtype={self.dtype}, "
                f"quantization={self.quantization}, device={self.device}, tp={self.tp}, pp={self.pp})")

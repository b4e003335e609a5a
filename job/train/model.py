"""The masked LM, and a forward that computes only what the loss reads.

RobertaForMaskedLM computes logits for all T positions ([B, T, V]; with V = 50,265 that is
most of a small model's compute) and then ignores the ~85% whose label is -100. The
loss only needs the masked rows, so `SparseMLM` gathers them first: same loss, same
gradients, a fraction of the head's FLOPs and memory. For BERT-style encoders it goes
one step further: the last layer's outputs at unmasked positions feed nothing, so that
layer attends from the masked positions only (keys and values still cover every token).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from job.config import ModelConfig
from job.errors import BadInput
from job.pretrained import config_source, load_pretrained


def load_model(cfg: ModelConfig, tok, cache_dir: Path, block_size: int) -> nn.Module:
    """The model to train, in fp32 whatever its folder holds or its config.json says
    (transformers loads `dtype="auto"`): bf16 training autocasts fp32 weights (DDP) or keeps
    fp32 masters (DeepSpeed). In bf16 weights an AdamW step of 2e-5 is below half the
    spacing of any weight above ~0.005 in size, and rounds away."""
    from transformers import AutoModelForMaskedLM

    config = model_config(cfg, tok, cache_dir, block_size)
    if cfg.from_scratch:
        return from_config(config)
    key, cache = "model.name_or_path", cache_dir / "models"
    return load_pretrained(
        AutoModelForMaskedLM,
        cfg.name_or_path,
        cache,
        key,
        config=config,
        attn_implementation="sdpa",
        dtype=torch.float32,
    )


def model_config(cfg: ModelConfig, tok, cache_dir: Path, block_size: int):
    """The model's config as training builds it, with the overrides applied and checked
    against the tokenizer and the block size; reads config.json only, no weights."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, RobertaConfig

    source = config_source(cfg.name_or_path, cache_dir / "configs")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        if not cfg.from_scratch:
            raise BadInput(f"model.name_or_path: cannot load '{cfg.name_or_path}': {e}") from None
        config = RobertaConfig()  # a tokenizer folder, say: RoBERTa's defaults
    if cfg.from_scratch:
        config.vocab_size = len(tok)
        config.pad_token_id, config.bos_token_id = tok.pad_token_id, tok.bos_token_id
        config.eos_token_id = tok.eos_token_id
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise BadInput(f"model.config_overrides: unknown key '{key}' for {config.model_type}")
        try:  # transformers' configs are strict dataclasses: a wrong type is refused here
            setattr(config, key, value)
        except (StrictDataclassError, TypeError, ValueError) as e:
            why = " ".join(str(e.__cause__ or e).split())
            raise BadInput(
                f"model.config_overrides.{key}: {value!r} is refused by the "
                f"{config.model_type} config: {why}"
            ) from None
    _fit(config, tok, block_size, cfg.from_scratch)
    config._attn_implementation = "sdpa"
    return config


def from_config(config, meta: bool = False) -> nn.Module:
    """A model with random fp32 weights (the config's `dtype`, from a bf16 model's folder,
    say, is not followed; on the meta device, no memory, when `meta`: a preflight's check
    that the config's values fit together, e.g. the heads divide the hidden size)."""
    from transformers import AutoModelForMaskedLM

    try:
        with torch.device("meta") if meta else nullcontext():
            return AutoModelForMaskedLM.from_config(
                config, attn_implementation="sdpa", dtype=torch.float32
            )
    except (ValueError, TypeError) as e:  # values that do not fit together, or a wrong type
        why = " ".join(str(e).split())  # (a config class that does not check its types)
        raise BadInput(
            f"model.config_overrides: cannot build the {config.model_type} model: {why}"
        ) from None


def _fit(config, tok, block_size: int, from_scratch: bool) -> None:
    if config.vocab_size < len(tok):
        raise BadInput(
            f"model.name_or_path: vocabulary {config.vocab_size} is smaller than the "
            f"tokenizer's {len(tok)}"
        )
    # RoBERTa-style models offset positions by pad_token_id + 1 (2 for roberta-base)
    offset = (config.pad_token_id or 0) + 1 if "roberta" in config.model_type else 0
    if config.max_position_embeddings >= block_size + offset:
        return
    if not from_scratch:
        raise BadInput(
            f"data.block_size: {block_size} tokens do not fit the model's "
            f"{config.max_position_embeddings - offset} positions"
        )
    config.max_position_embeddings = block_size + offset


def encoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The encoder and the MLM head, for the architectures whose layout is known."""
    encoder = getattr(model, model.base_model_prefix, None)
    head = getattr(model, "lm_head", None) or getattr(model, "cls", None)  # RoBERTa / BERT
    if encoder is None or head is None:
        return None
    return encoder, head


def _bert_layers(encoder: nn.Module):
    """The layer list of a BERT-style encoder (RoBERTa, BERT, XLM-R...), or None."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not layers or getattr(encoder, "embeddings", None) is None:
        return None
    last = layers[-1]
    att = getattr(getattr(last, "attention", None), "self", None)
    known = all(hasattr(att, a) for a in ("query", "key", "value", "attention_head_size"))
    if not known or encoder.config.is_decoder or getattr(last, "chunk_size_feed_forward", 0):
        return None
    return layers


def _last_layer_at(layer: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A BERT layer's output at the given positions only: [B, W, H] for positions [B, W]
    (keys and values still cover every token)."""
    att = layer.attention.self
    b, t, _ = h.shape
    width = positions.shape[1]
    heads, dim = att.num_attention_heads, att.attention_head_size
    h_q = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    q = att.query(h_q).view(b, width, heads, dim).transpose(1, 2)
    k = att.key(h).view(b, t, heads, dim).transpose(1, 2)
    v = att.value(h).view(b, t, heads, dim).transpose(1, 2)
    p = att.dropout.p if layer.training else 0.0
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=att.scaling)
    a = layer.attention.output(a.transpose(1, 2).reshape(b, width, -1), h_q)
    return layer.output(layer.intermediate(a), a)


def compile_step(wrapper: SparseMLM, mode: str | None = None) -> SparseMLM:
    """torch.compile the whole forward (embeddings, layers, head, loss) in place, for the
    static batch layout (job.train.batch.Buckets): `dynamic=False`, so every size is a
    constant, one graph serves every step, and `mode="reduce-overhead"` can capture it in
    a CUDA graph. In place (`nn.Module.compile`), so parameter names stay as they are:
    checkpoints and save_pretrained never see `_orig_mod.`."""
    wrapper.compile(dynamic=False, mode=mode)
    return wrapper


class SparseMLM(nn.Module):
    """Wraps a *ForMaskedLM so DDP/DeepSpeed see one forward that returns the loss sum."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        parts = encoder_and_head(model)
        self.parts = parts is not None
        self.bert = self.parts and _bert_layers(parts[0]) is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        token_index: torch.Tensor,
        positions: torch.Tensor,
        query_index: torch.Tensor,
    ) -> torch.Tensor:
        """The summed loss over the masked tokens (see job.train.batch.MaskedBatch for the
        arguments; padded entries have target -100, cross_entropy's ignore_index, and add
        nothing). Every shape is known on the host: no synchronisation in here."""
        if self.bert:
            encoder, head = encoder_and_head(self.model)
            layers = _bert_layers(encoder)
            hidden = encoder.embeddings(input_ids=input_ids)
            for layer in layers[:-1]:
                hidden = layer(hidden)
            out = _last_layer_at(layers[-1], hidden, positions)
            logits = head(out.flatten(0, 1).index_select(0, query_index))
        elif self.parts:
            encoder, head = encoder_and_head(self.model)
            hidden = encoder(input_ids=input_ids).last_hidden_state
            logits = head(hidden.flatten(0, 1).index_select(0, token_index))
        else:  # unknown layout: the full head, then the same selection
            logits = self.model(input_ids=input_ids).logits.flatten(0, 1)
            logits = logits.index_select(0, token_index)
        return F.cross_entropy(logits.float(), targets, reduction="sum")


def flops_per_token(config, seq_len: int, mask_fraction: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per MAC)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = config.intermediate_size
    encoder = layers * (4 * h * h + 2 * h * inter)  # attention projections + MLP weights
    attention = layers * 2 * seq_len * h  # QK^T and AV
    head = (h * h + h * config.vocab_size) * mask_fraction  # only masked rows projected
    return 6.0 * (encoder + attention + head)

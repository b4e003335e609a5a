"""Models are loaded for training and evaluation in fp32, whatever precision their folder
holds or its config.json names (transformers 5 loads `dtype="auto"`: a bf16 folder would
give bf16 weights, which lose AdamW's small updates)."""

import pytest
import torch
from support.data import DEMO_TOKENIZER
from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

from job.config import ModelConfig
from job.train.model import load_model

pytestmark = pytest.mark.unit

TOK = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A tiny RoBERTa saved in bf16: its weights and its config.json's `dtype` say so."""
    config = RobertaConfig(
        vocab_size=len(TOK),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=TOK.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bf16") / "model"
    RobertaForMaskedLM(config).to(torch.bfloat16).save_pretrained(folder)
    assert '"dtype": "bfloat16"' in (folder / "config.json").read_text()
    return folder


def test_a_bf16_model_is_loaded_for_training_in_fp32(bf16_folder, tmp_path):
    model = load_model(ModelConfig(name_or_path=str(bf16_folder)), TOK, tmp_path, 32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    saved = RobertaForMaskedLM.from_pretrained(bf16_folder, dtype=torch.bfloat16)
    want = dict(saved.named_parameters())
    for name, p in model.named_parameters():  # the stored values, widened exactly
        assert torch.equal(p, want[name].float()), name
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight


def test_from_scratch_on_a_bf16_models_config_is_fp32(bf16_folder, tmp_path):
    cfg = ModelConfig(name_or_path=str(bf16_folder), from_scratch=True)
    model = load_model(cfg, TOK, tmp_path, 32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

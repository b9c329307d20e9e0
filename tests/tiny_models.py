"""Tiny random-weight transformers models of many architectures, built from configs (no downloads).

``ARCHITECTURES`` maps a name to (config type, the Auto class, whether it is a decoder, config
overrides). Sizes are small enough that every journey (compile, calibrate, export, generate) runs
in seconds on two cores; the shapes still exercise what real models have: GQA, rotary embeddings,
sliding-window layers mixed with full attention, tied embeddings, GELU/SiLU MLPs, padding masks.
"""
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

_COMMON = dict(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)
_DECODER = dict(_COMMON, num_key_value_heads=2)

ARCHITECTURES = {
    "llama": ("llama", True, dict(_DECODER)),
    "qwen2": ("qwen2", True, dict(_DECODER)),
    "mistral": ("mistral", True, dict(_DECODER, sliding_window=8)),
    "phi3": ("phi3", True, dict(_DECODER)),
    # Gemma-3: layers alternate sliding-window and full attention (pattern 2: one local, one global)
    "gemma3": ("gemma3_text", True, dict(_DECODER, num_hidden_layers=4, head_dim=16, sliding_window=8,
                                         sliding_window_pattern=2,
                                         layer_types=["sliding_attention", "full_attention"] * 2)),
    "gpt2": ("gpt2", True, dict(vocab_size=96, bos_token_id=1, eos_token_id=2, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "bert": ("bert", False, dict(_COMMON)),
    "mpnet": ("mpnet", False, dict(_COMMON, max_position_embeddings=130)),
}
DECODERS = [n for n, (_, dec, _) in ARCHITECTURES.items() if dec]
ENCODERS = [n for n, (_, dec, _) in ARCHITECTURES.items() if not dec]


def build(name: str, seed: int = 0, dtype=torch.float32, attn_implementation=None):
    """A tiny random-weight model of architecture ``name`` in eval mode, and its vocabulary size
    (``attn_implementation="eager"``: transformers' hand-written attention instead of SDPA)."""
    model_type, decoder, overrides = ARCHITECTURES[name]
    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if decoder else AutoModel
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = cls.from_config(config, dtype=dtype, **extra).eval()
    return model, config.vocab_size


def token_batch(vocab: int, batch: int, length: int, seed: int = 1, padded: bool = False) -> dict:
    """Token ids (ids 0-2 avoided: special tokens) and an attention mask, left-aligned padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded and batch > 1:
        mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_same_generation(a, b, start: int, floor_db: float = 50.0):
    """Two greedy ``generate(..., output_logits=True, return_dict_in_generate=True)`` results of
    models that compute the same thing: every step's logits agree (over ``floor_db``) up to the
    first step whose tokens differ, and a differing token there is a near-tie the two logit
    vectors' own difference explains (their two candidates closer than twice the largest
    difference): random tiny models have near-ties that float rounding may flip, so token
    equality alone would be flaky, and logits alone would miss a wrong token."""
    from qcompiler.passes.sqnr import sqnr_db

    ta, tb = a.sequences[:, start:], b.sequences[:, start:]
    for step, (la, lb) in enumerate(zip(a.logits, b.logits)):
        assert sqnr_db(la, lb) > floor_db, step
        differ = ta[:, step] != tb[:, step]
        if differ.any():
            slack = 2 * (la - lb).abs().amax(-1)
            rows = differ.nonzero()[:, 0]
            gap = (la[rows, ta[rows, step]] - la[rows, tb[rows, step]]).abs()
            assert (gap <= slack[rows]).all(), (step, gap, slack[rows])
            return

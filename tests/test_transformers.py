"""sasoftmax.integrations.transformers on tiny random models built from configs (no downloads).

Each family is checked against (a) transformers' own eager attention with normalizer="softmax", (b) a
reference attention registered here that applies ``sasoftmax.normalize`` to logits computed by hand,
with the boolean masks transformers materialises, and (c) itself: padding, cached decoding, save/load.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sasoftmax import normalize
from sasoftmax.backends import eager
from sasoftmax.integrations.transformers import (
    ATTENTION_NAME,
    convert,
    from_pretrained,
    ssmax_scales,
)

VOCAB = 64
LAYERS = 2
HEADS = 4
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
ENCODERS = ("bert", "roberta")
FAMILIES = DECODERS + ENCODERS


def build(family: str) -> transformers.PreTrainedModel:
    """A tiny random model of ``family`` with eager attention, no dropout, in eval mode."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, num_attention_heads=HEADS, attn_implementation="eager")
    # Larger init than the default 0.02 so logits are peaked: greedy decoding then has clear winners.
    llama_like = dict(common, hidden_size=32, intermediate_size=48, max_position_embeddings=64,
                      initializer_range=0.2, num_key_value_heads=2, pad_token_id=0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_like))
    elif family == "mistral":
        # A sliding window shorter than the inputs: masks carry the window on top of causality.
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**llama_like, sliding_window=5))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_like))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**llama_like, head_dim=8))
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=HEADS, n_positions=64, initializer_range=0.2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            attn_implementation="eager",
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            **common, hidden_size=32, intermediate_size=48, max_position_embeddings=64, rotary_pct=0.5,
            initializer_range=0.2, attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        )
        model = transformers.GPTNeoXForCausalLM(config)
    elif family in ENCODERS:
        config_cls, model_cls = {
            "bert": (transformers.BertConfig, transformers.BertForMaskedLM),
            "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM),
        }[family]
        config = config_cls(
            **common, hidden_size=32, intermediate_size=48, max_position_embeddings=66, initializer_range=0.2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
        )
        model = model_cls(config)
    else:
        raise ValueError(family)
    assert model.config._attn_implementation == "eager"
    return model.eval()


def batch(padding: str, length: int = 9, short: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (2, length) and the 2-D attention mask; row 1 holds ``short`` tokens padded on ``padding``."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    if padding == "right":
        mask[1, short:] = 0
    elif padding == "left":
        mask[1, : length - short] = 0
    ids = ids.masked_fill(mask == 0, 1)  # the pad token of the encoders
    return ids, mask


def forward(model, ids, mask, **kwargs) -> torch.Tensor:
    """Logits; decoders get position ids that skip left padding (as ``generate`` computes them)."""
    if model.config.model_type in DECODERS:
        kwargs.setdefault("position_ids", (mask.cumsum(-1) - 1).clamp_min(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def randomise_scales(model) -> None:
    """Distinct s per head and layer, so that a wrong head or layer index shows."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for scale in ssmax_scales(model).values():
            scale.s.copy_(torch.rand(scale.s.shape, generator=gen) * 0.9 + 0.3)


# --- the reference: hand-computed logits, transformers' materialised bool masks, sasoftmax.normalize ---


def materialised_mask(*args, **kwargs):
    """transformers' bool mask, never skipped (no None for plain causal or full patterns)."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def reference_attention(normalizer: str):
    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        assert attention_mask is not None and attention_mask.dtype == torch.bool
        groups = query.shape[1] // key.shape[1]
        k = key.double().repeat_interleave(groups, dim=1)
        v = value.double().repeat_interleave(groups, dim=1)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        x = query.double() @ k.transpose(-1, -2) * scale
        allowed = attention_mask.expand_as(x)
        ssmax = getattr(module, "ssmax_scale", None)
        if ssmax is not None:
            n = allowed.sum(-1, keepdim=True).clamp_min(1).double()
            x = x * ssmax.s.double().view(1, -1, 1, 1) * n.log()
        w = normalize(x, normalizer, mask=allowed)
        return (w @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    return attend


def use_reference(model, normalizer: str):
    name = f"reference_{normalizer}"
    AttentionInterface.register(name, reference_attention(normalizer))
    AttentionMaskInterface.register(name, materialised_mask)
    model.set_attn_implementation(name)
    return model


# --- tests ---


def test_registered_with_both_interfaces():
    assert ATTENTION_NAME in AttentionInterface().valid_keys()
    assert ATTENTION_NAME in AttentionMaskInterface()
    assert not any(word in ATTENTION_NAME for word in ("sdpa", "flash", "flex"))


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_equals_eager(family, padding, backend):
    model = build(family)
    ids, mask = batch(padding)
    expected = forward(model, ids, mask)
    convert(model, "softmax", backend=backend)
    assert model.config._attn_implementation == ATTENTION_NAME
    got = forward(model, ids, mask)
    real = mask.bool()  # padded query rows are not outputs anyone reads
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "normalizer, ssmax, backend",
    [("sa", None, "eager"), ("sa", 0.6, "auto"), ("sa_norm", None, "auto"), ("sa_norm", 0.6, "eager"),
     ("sa_norm", 0.6, "auto")],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference(family, normalizer, ssmax, backend):
    plain = build(family)
    model = convert(build(family), normalizer, ssmax=ssmax, backend=backend)
    randomise_scales(model)
    reference = use_reference(copy.deepcopy(model), normalizer)
    for padding in ("none", "left", "right"):
        ids, mask = batch(padding)
        real = mask.bool()
        expected = forward(reference, ids, mask)
        got = forward(model, ids, mask)
        torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)
        assert (got - forward(plain, ids, mask))[real].abs().max() > 1e-3  # not softmax in disguise


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_softmax_equals_eager(family):
    """Cross-attention (BART) and T5's additive position bias go through the interface too."""
    torch.manual_seed(0)
    if family == "bart":
        config = transformers.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, attn_implementation="eager",
        )
        model = transformers.BartForConditionalGeneration(config).eval()
    else:
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=LAYERS,
                                       num_heads=HEADS, dropout_rate=0.0, attn_implementation="eager")
        model = transformers.T5ForConditionalGeneration(config).eval()
    ids, mask = batch("right")
    decoder_ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        convert(model, "softmax", ssmax=None, backend="eager")
        with eager.record() as calls:
            got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert len(calls) == 3 * LAYERS  # encoder self, decoder self and cross attention
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_runs_through_sasoftmax_attention_with_the_chosen_backend():
    model = convert(build("llama"), "sa_norm", ssmax=0.5, backend="eager")
    ids, mask = batch("left")
    with eager.record() as calls:
        forward(model, ids, mask)
    assert len(calls) == LAYERS
    assert all(c["weights"].shape == (2, HEADS, 9, 9) for c in calls)
    # Padding keys are excluded from every row: n_i (and min/max) count only real tokens.
    assert not calls[0]["allowed"][1, :, :, :3].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_real_tokens(family):
    """A sequence's logits are the same alone and padded in a batch: padding is out of n_i, min and max."""
    model = convert(build(family), "sa_norm", ssmax=0.8)
    randomise_scales(model)
    paddings = ("left", "right") if family in DECODERS else ("right",)  # encoders' positions shift on the left
    for padding in paddings:
        ids, mask = batch(padding)
        real = mask[1].bool()
        alone = forward(model, ids[1:, real], mask[1:, real])
        padded_batch = forward(model, ids, mask)
        assert torch.isfinite(padded_batch).all()  # padded query rows included
        padded = padded_batch[1, real]
        torch.testing.assert_close(padded, alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_is_finite_and_close(dtype, tolerance):
    """Padded query rows with no key to attend (left padding) give zeros, not NaN, in half precision too."""
    model = convert(build("llama"), "sa_norm", ssmax=0.5)
    ids, mask = batch("left")
    expected = forward(model, ids, mask)
    got = forward(model.to(dtype), ids, mask)
    assert got.dtype == dtype and torch.isfinite(got).all()
    real = mask.bool()
    # Rounding of weights and activations: relative to the size of the logits.
    torch.testing.assert_close(got[real].float(), expected[real], atol=tolerance * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_cached_generation_equals_uncached(family):
    model = convert(build(family), "sa_norm", ssmax=0.7)
    randomise_scales(model)
    ids, mask = batch("left", length=7, short=4)
    common = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **common)
        uncached = model.generate(ids, use_cache=False, **common)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-5, rtol=1e-5)
    assert cached.sequences.shape[1] == 7 + 6


def test_static_cache_generation_equals_uncached():
    """Prefill into an empty static cache is the one case where transformers passes no mask and more keys."""
    model = convert(build("llama"), "sa_norm", ssmax=0.7)
    ids, mask = batch("none", length=7)
    common = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        static = model.generate(ids, cache_implementation="static", **common)
        uncached = model.generate(ids, use_cache=False, **common)
    assert torch.equal(static, uncached)


def test_additive_4d_mask_equals_bool_mask():
    """A float 4-D mask built by the caller (finfo.min = masked) is read as mask + bias, not as logits."""
    model = convert(build("llama"), "sa_norm", ssmax=0.6)
    ids, mask = batch("right")
    expected = forward(model, ids, mask)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got = forward(model, ids, additive, position_ids=torch.arange(9).expand(2, -1))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_from_pretrained(family, tmp_path):
    model = convert(build(family), "sa_norm", ssmax=0.5, backend="eager")
    randomise_scales(model)
    ids, mask = batch("right")
    expected = forward(model, ids, mask)
    # Small shards for one family, so that loading the scales from an index of shards is covered too.
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if family == "llama" else {}))
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.sasoftmax == {"normalizer": "sa_norm", "ssmax": 0.5, "backend": "eager", "eps": 1e-6}
    assert loaded.config._attn_implementation == ATTENTION_NAME
    saved = {k: v.s for k, v in ssmax_scales(model).items()}
    restored = {k: v.s for k, v in ssmax_scales(loaded).items()}
    assert saved.keys() == restored.keys() and len(saved) == LAYERS
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert torch.equal(forward(loaded.eval(), ids, mask), expected)


def test_from_pretrained_without_ssmax(tmp_path):
    model = convert(build("qwen3"), "sa", backend="eager")
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert not ssmax_scales(loaded)
    ids, mask = batch("left")
    assert torch.equal(forward(loaded, ids, mask), forward(model, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_ssmax_scales_are_parameters_that_train(family):
    model = convert(build(family), "sa_norm", ssmax=0.43).train()
    scales = ssmax_scales(model)
    assert len(scales) == LAYERS
    params = {id(p) for p in model.parameters()}
    for scale in scales.values():
        assert isinstance(scale.s, torch.nn.Parameter) and scale.s.shape == (HEADS,) and id(scale.s) in params
        assert torch.equal(scale.s.detach(), torch.full((HEADS,), 0.43))
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    for name, scale in scales.items():
        assert scale.s.grad is not None, name
        assert torch.isfinite(scale.s.grad).all() and scale.s.grad.abs().sum() > 0, name
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(s.s.detach(), torch.full((HEADS,), 0.43)) for s in scales.values())


def test_convert_again_replaces_the_settings():
    model = convert(build("gpt2"), "sa_norm", ssmax=0.5)
    convert(model, "softmax")
    assert not ssmax_scales(model)
    assert not any("ssmax" in key for key in model.state_dict())
    assert model.config.sasoftmax["normalizer"] == "softmax" and model.config.sasoftmax["ssmax"] is None
    ids, mask = batch("right")
    real = mask.bool()
    torch.testing.assert_close(forward(model, ids, mask)[real], forward(build("gpt2"), ids, mask)[real],
                               atol=1e-5, rtol=0)


# --- bad input ---


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"normalizer": "sparsemax"}, ValueError, "normalizer"),
        ({"normalizer": None}, TypeError, "normalizer"),
        ({"ssmax": 0.0}, ValueError, "ssmax"),
        ({"ssmax": -0.5}, ValueError, "ssmax"),
        ({"ssmax": float("inf")}, ValueError, "ssmax"),
        ({"ssmax": True}, TypeError, "ssmax"),
        ({"ssmax": "0.4"}, TypeError, "ssmax"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"eps": -1.0}, ValueError, "eps"),
    ],
)
def test_bad_arguments_raise(kwargs, error, words):
    model = build("llama")
    with pytest.raises(error, match=words):
        convert(model, **kwargs)
    assert model.config._attn_implementation == "eager" and not hasattr(model.config, "sasoftmax")


def test_not_a_transformers_model_raises():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        convert(torch.nn.Linear(2, 2))


def test_model_without_the_attention_interface_raises():
    """Bloom computes attention inline (no AttentionInterface): converting it must fail, not do nothing."""
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=LAYERS, n_head=HEADS)
    model = transformers.BloomForCausalLM(config).eval()
    ids, mask = batch("right")
    before = forward(model, ids, mask)
    with pytest.raises(ValueError, match="AttentionInterface"):
        convert(model, "sa_norm", ssmax=0.5)
    assert not ssmax_scales(model) and not hasattr(model.config, "sasoftmax")
    assert torch.equal(forward(model, ids, mask), before)


def test_from_pretrained_of_an_unconverted_model_raises(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not saved after convert"):
        from_pretrained(tmp_path)


def test_unconverted_module_on_our_implementation_raises():
    model = build("llama")
    model.set_attn_implementation(ATTENTION_NAME)
    with pytest.raises(ValueError, match="was not converted"):
        forward(model, *batch("none"))


def test_unsupported_attention_features_raise():
    """Models that pass logit soft-capping (Gemma 2) get a clear error instead of silently uncapped logits."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0, attn_implementation="eager",
    )
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="softcap"):
        convert(model)


def test_fullgraph_compiled_forward_generates_like_uncompiled():
    """transformers' test_generate_compile_model_forward_fullgraph, on a converted model: the forward compiled
    with fullgraph=True (static cache, so prefill and decoding each compile once) gives the same tokens and
    logits. The "aot_eager" compiler backend keeps it fast: dynamo's capture is what failed before."""
    model = convert(build("llama"), "sa_norm", ssmax=0.7)
    randomise_scales(model)
    ids, mask = batch("left", length=7, short=4)
    common = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True, cache_implementation="static")  # fmt: skip
    with torch.no_grad():
        want = model.generate(ids, **common)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        got = model.generate(ids, **common)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=0, rtol=0)

"""``mtmerge.integrations.transformers``: ``experts_implementation="mtmerge"`` runs transformers'
MoE experts on ``mtmerge.moe_experts`` and matches ``eager``.

Small random-initialized models are built from configs (no downloads) for every family with the
standard experts layout (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, Granite-MoE, Jamba,
Qwen3-Next, PhiMoE) and for gpt-oss (transposed, interleaved gate/up, biases, clamped SwiGLU).
Outputs and the gradients of every parameter are compared with the same model on transformers'
``eager`` experts: in float32 on two layers (tight), in bfloat16 on one layer (a bf16 model's
second layer may route a token differently when the first layer's outputs differ by a rounding,
which is not a property of the experts; with one layer the routing is identical).
"""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
moe_integration = pytest.importorskip("transformers.integrations.moe")
if not hasattr(moe_integration, "ExpertsInterface"):
    pytest.skip("transformers predates ExpertsInterface (5.23+)", allow_module_level=True)

from mtmerge.integrations import transformers as mt_tf  # noqa: E402
from tests.ops.moe.helpers import record_moe_experts  # noqa: E402

VOCAB = 64
_BASE = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1,
         "eos_token_id": 2}

# family: (config class, causal LM class, config overrides); every config has 2 layers and 4 experts, top-2
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 24}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 8}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "n_shared_experts": 1,
        "first_k_dense_replace": 0, "n_group": 2, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "jamba": ("JambaConfig", "JambaForCausalLM", {  # layer 0: mamba + MoE, layer 1: attention + MoE
        "num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
        "expert_layer_period": 1, "expert_layer_offset": 0, "mamba_d_state": 4, "mamba_expand": 2,
        "mamba_dt_rank": 4}),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 24, "head_dim": 8, "linear_num_value_heads": 2,
        "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "layer_types": ["linear_attention", "full_attention"]}),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"]}),
}
# one-layer variants for bfloat16 (the last layer type; Jamba's attention + MoE layer)
ONE_LAYER = {"jamba": {"attn_layer_period": 1, "attn_layer_offset": 0}}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    mt_tf.register()
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # tiny configs trip harmless config warnings
    yield
    transformers.logging.set_verbosity(previous)


@pytest.fixture
def calls(monkeypatch):
    """Every ``moe_experts`` call of the integration, recorded as (gate_up, down, ids, kwargs)."""
    return record_moe_experts(monkeypatch, mt_tf)


def _classes(family):
    config_name, model_name, _ = FAMILIES[family]
    if not hasattr(transformers, config_name) or not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _config(family, layers=2, **overrides):
    config_cls, _ = _classes(family)
    kwargs = {**_BASE, **FAMILIES[family][2], "num_hidden_layers": layers}
    if layers == 1:
        kwargs.update(ONE_LAYER.get(family, {}))
        if "layer_types" in kwargs:
            kwargs["layer_types"] = kwargs["layer_types"][-1:]
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _init(model, family):
    """Deterministic N(0, 1/fan_in) weights (norm scales stay 1); gpt-oss's gate_up gets std 4 so
    its clamps at +-7 are reached."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name:
                continue
            std = param.shape[-1] ** -0.5 if param.dim() > 1 else 0.5
            if family == "gpt_oss" and name.endswith("experts.gate_up_proj"):
                std = 4.0 * param.shape[-2] ** -0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def _build(family, implementation, layers=2, state=None, **overrides):
    _, model_cls = _classes(family)
    model = model_cls._from_config(_config(family, layers, **overrides), experts_implementation=implementation,
                                   attn_implementation="eager")
    if state is None:
        _init(model, family)
    else:
        model.load_state_dict(state)
    return model.eval()


def _run(model, dtype, device="cpu"):
    """Logits and every parameter's gradient of a fixed weighted sum of the logits (on the CPU)."""
    model.to(device, dtype).zero_grad(set_to_none=True)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5)).to(device)
    logits = model(input_ids=input_ids).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(6)).to(device)
    (logits.float() * probe).sum().backward()
    grads = {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), grads


def _assert_rel(got, want, rel, what):
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def _moe_layers(model):
    return sum(1 for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "is_concatenated"))


def _compare(family, dtype, layers, calls, device="cpu"):
    eager = _build(family, "eager", layers)
    ours = _build(family, "mtmerge", layers, state=eager.state_dict())
    assert ours.config._experts_implementation == "mtmerge"
    want_logits, want_grads = _run(eager, dtype, device)
    assert not calls
    got_logits, got_grads = _run(ours, dtype, device)
    assert len(calls) == _moe_layers(ours) >= layers  # every MoE layer ran on mtmerge
    assert set(got_grads) == set(want_grads)
    assert any("experts" in name for name in got_grads)
    if dtype == torch.float32:
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
        for name, grad in want_grads.items():
            _assert_rel(got_grads[name], grad, 1e-4, name)
    else:
        _assert_rel(got_logits, want_logits, 2e-2, "logits")
        for name, grad in want_grads.items():
            _assert_rel(got_grads[name], grad, 6e-2, name)
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_eager_float32(family, calls):
    _compare(family, torch.float32, 2, calls)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_eager_bfloat16(family, calls):
    _compare(family, torch.bfloat16, 1, calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_eager_on_cuda(family, dtype, calls):
    """The Triton kernels (transposed gpt-oss views included) against eager, both on the GPU."""
    _compare(family, dtype, 2 if dtype == torch.float32 else 1, calls, device="cuda")


def test_gpt_oss_layout_is_passed_as_views(calls):
    """gpt-oss: transposed weights reach the kernels as views (no copy), with the biases and the
    'gpt_oss' activation, and some pre-activations lie past the clamps."""
    model = _build("gpt_oss", "mtmerge", 1)
    experts = model.model.layers[0].mlp.experts
    seen = {}

    def keep_input(module, args):
        seen["x"] = args[0]

    experts.register_forward_pre_hook(keep_input)
    _run(model, torch.float32)
    gate_up, down, _, kwargs = calls[0]
    assert kwargs["activation"] == "gpt_oss"
    assert gate_up.data_ptr() == experts.gate_up_proj.data_ptr() and gate_up.shape == (4, 96, 32)
    assert torch.equal(gate_up, experts.gate_up_proj.transpose(1, 2))
    assert down.data_ptr() == experts.down_proj.data_ptr() and down.shape == (4, 32, 48)
    assert kwargs["gate_up_bias"] is experts.gate_up_proj_bias and kwargs["down_bias"] is experts.down_proj_bias
    h = torch.einsum("th,ehf->etf", seen["x"].detach(), experts.gate_up_proj.detach())
    assert bool((h > 7.0).any()) and bool((h < -7.0).any())


def test_standard_layout_is_passed_in_place(calls):
    model = _build("mixtral", "mtmerge", 1)
    experts = model.model.layers[0].mlp.experts
    _run(model, torch.float32)
    gate_up, down, ids, kwargs = calls[0]
    assert gate_up is experts.gate_up_proj and down is experts.down_proj
    assert kwargs == {"activation": "silu", "gate_up_bias": None, "down_bias": None}
    assert ids.dtype == torch.int64 and ids.shape[-1] == 2


def test_set_experts_implementation(calls):
    model = _build("qwen3_moe", "eager")
    want, _ = _run(model, torch.float32)
    reference, _ = _run(_build("qwen3_moe", "mtmerge", state=model.state_dict()), torch.float32)
    calls.clear()
    model.set_experts_implementation("mtmerge")
    assert model.config._experts_implementation == "mtmerge"
    got, _ = _run(model, torch.float32)
    assert len(calls) == 2
    assert torch.equal(got, reference)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.set_experts_implementation("eager")
    calls.clear()
    torch.testing.assert_close(_run(model, torch.float32)[0], want, atol=0, rtol=0)
    assert not calls


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_from_pretrained(family, calls, tmp_path):
    eager = _build(family, "eager")
    want, _ = _run(eager, torch.float32)
    eager.save_pretrained(tmp_path)
    _, model_cls = _classes(family)
    loaded = model_cls.from_pretrained(tmp_path, experts_implementation="mtmerge", attn_implementation="eager")
    assert loaded.config._experts_implementation == "mtmerge"
    got, _ = _run(loaded.eval(), torch.float32)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _mixtral_experts():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = _config("mixtral", 1)
    config._experts_implementation = "eager"
    experts = MixtralExperts(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5)
    return experts


def test_expert_parallel_sentinel_ids_contribute_nothing():
    """Ids >= E (transformers' expert parallelism) count as -1: no output, no gradient."""
    experts = _mixtral_experts()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=gen)
    ids = torch.tensor([[0, 4], [4, 1], [2, 3], [4, 4], [1, 0], [3, 4]])
    weights = torch.rand(6, 2, generator=gen).requires_grad_()
    got = mt_tf.mtmerge_experts_forward(experts, x, ids, weights)
    kept = ids < 4
    want = experts(x, torch.where(kept, ids, 0), torch.where(kept, weights, 0.0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[3], torch.zeros(32))
    got.sum().backward()
    assert torch.equal(weights.grad[~kept], torch.zeros(int((~kept).sum())))
    assert ids.max() == 4  # the caller's ids are not modified


@pytest.mark.parametrize(("hidden_act", "expected"), [
    ("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"), ("gelu_python", "gelu"),
    ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh"), ("relu", "relu"),
])
def test_activations(hidden_act, expected, calls):
    eager = _build("mixtral", "eager", 1, hidden_act=hidden_act)
    ours = _build("mixtral", "mtmerge", 1, state=eager.state_dict(), hidden_act=hidden_act)
    want, want_grads = _run(eager, torch.float32)
    got, got_grads = _run(ours, torch.float32)
    assert calls[0][3]["activation"] == expected
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, grad in want_grads.items():
        _assert_rel(got_grads[name], grad, 1e-4, name)


@pytest.mark.parametrize(("module", "expected"), [
    (torch.nn.SiLU(), "silu"), (torch.nn.GELU(), "gelu"), (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
    (torch.nn.ReLU(), "relu"),
])
def test_torch_activation_modules(module, expected):
    experts = _mixtral_experts()
    experts.act_fn = module
    assert mt_tf.experts_layout(experts) == mt_tf.ExpertsLayout(expected, transposed=False, bias=False)


def test_unsupported_activation_raises_naming_it():
    model = _build("mixtral", "mtmerge", 1, hidden_act="quick_gelu")
    with pytest.raises(mt_tf.UnsupportedExpertsLayoutError, match=r"QuickGELUActivation.*'quick_gelu'.*MixtralExperts"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


def _namespace_experts(module_path, class_name, **config):
    module = pytest.importorskip(module_path)
    config = types.SimpleNamespace(_experts_implementation="eager", **config)
    return getattr(module, class_name)(config)


def test_unsupported_layouts_raise_naming_them():
    x, ids, weights = torch.randn(3, 8), torch.tensor([[0, 1]] * 3), torch.full((3, 2), 0.5)
    swiglu = {"intermediate_size": 6, "num_local_experts": 2, "hidden_size": 8, "swiglu_alpha": 1.702,
              "swiglu_limit": 7.0}
    cases = [
        # up_proj only, act(up): no gate
        (_namespace_experts("transformers.models.nemotron_h.modeling_nemotron_h", "NemotronHExperts",
                            n_routed_experts=2, hidden_size=8, moe_intermediate_size=6, moe_latent_size=None,
                            mlp_hidden_act="relu2"), r"NemotronHExperts \(has_gate=False.*no gate"),
        # gpt-oss's clamped SwiGLU on concatenated (not interleaved) rows
        (_namespace_experts("transformers.models.openai_privacy_filter.modeling_openai_privacy_filter",
                            "OpenAIPrivacyFilterExperts", **swiglu),
         r"concatenated gate/up rows with a custom OpenAIPrivacyFilterExperts\._apply_gate"),
        # gpt-oss with another alpha
        (_namespace_experts("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts",
                            **{**swiglu, "swiglu_alpha": 1.5}), r"GptOssExperts.*alpha=1\.5"),
    ]
    for experts, message in cases:
        with torch.no_grad():
            for param in experts.parameters():
                param.normal_()
        with pytest.raises(mt_tf.UnsupportedExpertsLayoutError, match=message):
            mt_tf.mtmerge_experts_forward(experts, x, ids, weights)
    experts = _mixtral_experts()
    experts.has_post_expert_norm = True
    with pytest.raises(mt_tf.UnsupportedExpertsLayoutError, match=r"MixtralExperts.*post-expert norm"):
        mt_tf.mtmerge_experts_forward(experts, torch.randn(3, 32), ids, weights)
    assert issubclass(mt_tf.UnsupportedExpertsLayoutError, ValueError)


def test_register_is_idempotent():
    mt_tf.register()
    mt_tf.register()
    assert moe_integration.ExpertsInterface._global_mapping["mtmerge"] is mt_tf.mtmerge_experts_forward
    assert "mtmerge" in moe_integration.ALL_EXPERTS_FUNCTIONS.valid_keys()

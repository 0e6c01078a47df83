"""Private or version-specific details of torch, transformers, timm, peft and accelerate that robustvit relies on.

Each test pins one detail that has no public replacement, and fails with a message naming the detail and the robustvit
code that relies on it, so that a new release that changes it is caught here rather than as a wrong bound or a
confusing failure elsewhere. Tiny modules only: the whole file runs in a few seconds.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model
from torch import nn
from torch.nn.utils import parametrize

import robustvit  # noqa: F401  (registers the families, bound rules and PEFT hooks)


def _call_order(root: nn.Module, names: list[str], run) -> list[str]:
    """The order in which the named submodules of ``root`` are called by ``run()`` (first call of each)."""
    order: list[str] = []
    modules = dict(root.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, a, o, name=name: order.append(name) if name not in order else None
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return order


# ----------------------------------------------------------------------------------------------------------- torch


def test_torch_module_call_path_names():
    for name in ("__call__", "_wrapped_call_impl", "_call_impl"):
        assert callable(getattr(nn.Module, name, None)), (
            f"torch.nn.Module.{name} is gone: robustvit's bound engine records nn.Module's call path by these names "
            "(_CALL_PATH in robustvit/lipschitz/engine.py) to refuse classes that bypass it"
        )
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl, (
        "nn.Module.__call__ is no longer nn.Module._wrapped_call_impl: the engine's call-path check "
        "(robustvit/lipschitz/engine.py _check_methods) must learn the new call path"
    )


def test_torch_forward_hooks_live_in_the_dicts_the_engine_reads():
    from torch.nn.modules import module as torch_module

    layer = nn.Linear(2, 2)

    def hook(*args, **kwargs):
        return None

    handles = [
        layer.register_forward_hook(hook),
        layer.register_forward_hook(hook, with_kwargs=True, always_call=True),
        layer.register_forward_pre_hook(hook),
        layer.register_forward_pre_hook(hook, with_kwargs=True),
        nn.modules.module.register_module_forward_hook(hook),
        nn.modules.module.register_module_forward_pre_hook(hook),
    ]
    try:
        seen = {
            "module._forward_hooks": len(layer._forward_hooks),
            "module._forward_pre_hooks": len(layer._forward_pre_hooks),
            "torch.nn.modules.module._global_forward_hooks": sum(
                h is hook for h in torch_module._global_forward_hooks.values()
            ),
            "torch.nn.modules.module._global_forward_pre_hooks": sum(
                h is hook for h in torch_module._global_forward_pre_hooks.values()
            ),
        }
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {
        "module._forward_hooks": 2,
        "module._forward_pre_hooks": 2,
        "torch.nn.modules.module._global_forward_hooks": 1,
        "torch.nn.modules.module._global_forward_pre_hooks": 1,
    }, (
        f"forward hooks are no longer stored where robustvit's bound engine looks for them ({seen}): "
        "robustvit/lipschitz/engine.py (_rule_for, _check_tree) reads module._forward_hooks / _forward_pre_hooks and "
        "torch.nn.modules.module._global_forward_hooks / _global_forward_pre_hooks to refuse hooks it cannot see"
    )


def test_torch_compile_patches_only_module_init_and_setstate():
    """torch.compile (dynamo's generation tagging) replaces methods of nn.Module process-wide on its first run. The
    bound engine compares nn.Module's methods with the table it recorded at import (robustvit/lipschitz/engine.py
    _METHODS / _check_methods): only construction and unpickling may change, never the call path or forward."""
    from robustvit.lipschitz.engine import _method_table

    before = _method_table(nn.Module)
    saved = {name: nn.Module.__dict__[name] for name in ("__init__", "__setstate__")}
    flag = nn.Module.__dict__.get("___needs_generation_tag_patch", None)
    try:
        compiled = torch.compile(nn.Linear(2, 2), backend="eager")
        compiled(torch.ones(1, 2))
        after = _method_table(nn.Module)
        changed = sorted(name for name, (_, value) in before.items() if after.get(name, (None, None))[1] is not value)
    finally:  # leave nn.Module as the rest of the suite expects it; dynamo re-patches on its next compile
        for name, value in saved.items():
            setattr(nn.Module, name, value)
        if flag is None and "___needs_generation_tag_patch" in nn.Module.__dict__:
            delattr(nn.Module, "___needs_generation_tag_patch")
    from robustvit.lipschitz import engine

    exempt = getattr(engine, "_CONSTRUCTION_METHODS", frozenset({"__init__", "__setstate__"}))
    assert set(changed) <= exempt, (
        f"torch.compile now replaces nn.Module.{', '.join(changed)}: robustvit's bound engine "
        "(robustvit/lipschitz/engine.py _check_methods) must exempt what torch itself patches, or every bound after a "
        "compile is refused as a monkeypatch (_CONSTRUCTION_METHODS)"
    )


def test_torch_compile_wrapper_holds_the_module_as_orig_mod():
    module = nn.Linear(2, 2)
    compiled = torch.compile(module, backend="eager")  # wrapping compiles nothing until it is called
    assert getattr(compiled, "_orig_mod", None) is module, (
        "torch.compile's wrapper no longer holds the compiled module as ._orig_mod: robustvit._utils.unwrap looks "
        "through torch.compile by it (robustvit/_utils.py)"
    )


def _rescaled_linear() -> nn.Linear:
    layer = nn.Linear(3, 2)
    parametrize.register_parametrization(layer, "weight", nn.Identity())
    return layer


def test_torch_parametrize_class_layout():
    from robustvit.lipschitz.engine import _SUBCLASS_MAY_DEFINE

    layer = _rescaled_linear()
    cls = type(layer)
    assert cls.__bases__ == (nn.Linear,), (
        f"torch.nn.utils.parametrize no longer injects a direct subclass of the module's class ({cls.__bases__}): "
        "robustvit._utils.module_type takes cls.__bases__[0] as the class before parametrization, and "
        "robustvit/peft.py _register_parametrizations_again / robustvit/conversion/convert.py export rebuild it "
        "from __bases__"
    )
    assert isinstance(layer.__dict__["_modules"].get("parametrizations"), nn.ModuleDict), (
        "parametrizations are no longer the child module 'parametrizations' (a ModuleDict): "
        "robustvit._utils.owns_parametrizations and robustvit/peft.py _register_parametrizations_again rely on it"
    )
    extra = set(vars(cls)) - _SUBCLASS_MAY_DEFINE - {"__getstate__", "__deepcopy__"}
    assert extra == {"weight"}, (
        f"torch's parametrized class now defines {sorted(extra)} besides the parametrized property: the bound "
        "engine (robustvit/lipschitz/engine.py _check_methods) refuses a parametrized class defining anything else"
    )
    chain = layer.parametrizations.weight
    for attribute in ("original", "is_tensor", "unsafe"):
        assert hasattr(chain, attribute), (
            f"ParametrizationList.{attribute} is gone: robustvit/peft.py _register_parametrizations_again reads it "
            "to register a copy's parametrizations again"
        )


def test_torch_parametrized_deep_copies_share_class_and_cache_key():
    original = _rescaled_linear()
    duplicate = copy.deepcopy(original)
    with torch.no_grad():
        duplicate.parametrizations.weight.original.add_(1.0)
    assert type(duplicate) is type(original), (
        "a deep copy of a parametrized module no longer shares torch's parametrized class: the engine's refusal of "
        "shared classes and robustvit.peft._own_parametrized_classes (robustvit/peft.py) describe torch as it was"
    )
    with parametrize.cached():
        read = (original.weight, duplicate.weight)
    assert read[1] is read[0], (
        "under parametrize.cached() a deep copy no longer reads its original's cached weight (torch keyed the cache "
        "by the id of the module the property was made for): robustvit/lipschitz/engine.py _check_tree refuses "
        "shared parametrized classes for this reason"
    )
    # robustvit/conversion/convert.py export: a copy with its own class drops its parametrizations, the original
    # keeps its own.
    cls = type(duplicate)
    duplicate.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(duplicate, "weight", leave_parametrized=True)
    assert type(duplicate) is nn.Linear and parametrize.is_parametrized(original, "weight"), (
        "remove_parametrizations on a copy with a rebuilt class changed the original: robustvit/conversion/convert.py "
        "export relies on torch editing only the module's own class"
    )
    assert torch.equal(original.weight, original.parametrizations.weight.original)


def test_torch_tensor_version_counter():
    weight = nn.Parameter(torch.zeros(2, 2))
    start = weight._version
    _ = weight * 2  # a read
    assert weight._version == start, "reading a tensor changed Tensor._version"
    with torch.no_grad():
        weight.add_(1.0)
    assert weight._version > start, (
        "an in-place update no longer bumps Tensor._version: robustvit/lipschitz/rescale.py steps the rescaling's "
        "tracked directions only when (data_ptr(), _version) of the weight changed"
    )


def test_torch_assert_async_with_a_message():
    torch._assert_async(torch.tensor(True), "converted robustvit blocks do not support attention masks")
    with pytest.raises(RuntimeError):
        torch._assert_async(torch.tensor(False), "converted robustvit blocks do not support attention masks")
    assert torch.compiler.is_compiling() is False


def test_torch_functorch_wrapped_tensor_query():
    query = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    assert callable(query), (
        "torch._C._functorch.is_functorch_wrapped_tensor is gone: robustvit._utils.holds_values uses it to step "
        "aside under torch.func transforms (robustvit/layers/normalized_conv.py pixel check)"
    )
    assert query(torch.rand(2)) is False
    inside_vmap = torch.func.vmap(lambda t: torch.tensor(query(t)))(torch.rand(3, 2))
    assert bool(inside_vmap.all()), "is_functorch_wrapped_tensor no longer flags vmap's batched tensors"
    flags = []
    torch.func.grad(lambda t: (flags.append(query(t)), t.sum())[1])(torch.rand(2))
    assert flags == [True], "is_functorch_wrapped_tensor no longer flags torch.func.grad's tensors"


# ---------------------------------------------------------------------------------------------------- transformers


def test_transformers_revert_weight_conversion_renames_the_same_tensors(tmp_path):
    from safetensors import safe_open
    from transformers.core_model_loading import revert_weight_conversion

    model = build_model("hf_vit")
    state = model.state_dict()
    saved = revert_weight_conversion(model, dict(state))
    ids = {id(tensor) for tensor in state.values()}
    assert all(id(tensor) in ids for tensor in saved.values()) and len(saved) == len(state), (
        "transformers.core_model_loading.revert_weight_conversion no longer only renames the state dict (same tensor "
        "objects, one per key): robustvit's saved_key_names maps saved names back by tensor identity "
        "(robustvit/conversion/transformers_metadata.py)"
    )
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        on_disk = set(handle.keys())
    assert on_disk == set(saved), (
        "save_pretrained no longer writes the names revert_weight_conversion gives: robustvit's saved_key_names "
        "(robustvit/persistence/transformers_native.py), which loads natively saved converted models, would miss keys: "
        f"{sorted(on_disk ^ set(saved))[:4]}"
    )


def test_transformers_output_capturing_hooks_and_installed_flag():
    from transformers.utils import output_capturing

    install = getattr(output_capturing, "install_output_capuring_hook", None)
    assert callable(install), (
        "transformers.utils.output_capturing.install_output_capuring_hook is gone: robustvit's converted blocks "
        "record output_hidden_states with it (robustvit/families/hf_base.py record_hidden_states)"
    )
    model = build_model("hf_vit").eval()
    backbone = model.vit
    backbone._output_capturing_hooks_installed = True  # what record_hidden_states sets
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values=pixels, output_hidden_states=True)
    hooked = [name for name, module in model.named_modules() if module._forward_hooks]
    assert not hooked, (
        f"transformers installed output-capturing hooks on {hooked} although the backbone's "
        "_output_capturing_hooks_installed was True: robustvit/families/hf_base.py record_hidden_states relies on "
        "that flag to keep transformers from hooking the converted model"
    )
    for layer in backbone.layers:
        before = set(layer._forward_hooks)
        install(layer, "hidden_states", 0)
        added = [layer._forward_hooks[key] for key in set(layer._forward_hooks) - before]
        assert len(added) == 1, "install_output_capuring_hook no longer adds exactly one forward hook to the module"
        assert added[0](layer, (pixels,), pixels) is None, "the output-capturing hook now returns a value"
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        expected = [backbone.embeddings(pixels)]
        for layer in backbone.layers:
            expected.append(layer(expected[-1]))
    assert hidden is not None and len(hidden) == len(expected), (
        "the hooks of install_output_capuring_hook(module, 'hidden_states', 0) no longer record the first layer's "
        "input and every layer's output (robustvit/families/hf_base.py record_hidden_states)"
    )
    for got, want in zip(hidden, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_transformers_gradient_checkpointing_layer_keeps_the_module_call_path():
    import transformers
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert transformers.GradientCheckpointingLayer is GradientCheckpointingLayer

    class Layer(GradientCheckpointingLayer):
        def forward(self, x):
            return x

    assert Layer.__call__ is nn.Module.__call__, (
        f"transformers {transformers.__version__}: GradientCheckpointingLayer overrides __call__ (it checkpoints "
        "__call__, not forward; transformers >= 5.23 wraps forward instead): robustvit.layers.LipBlock subclasses it, "
        "and the bound engine refuses every converted model whose blocks bypass nn.Module.__call__ "
        "(robustvit/layers/block.py, robustvit/lipschitz/engine.py _check_methods)"
    )
    layer = Layer()
    assert layer.gradient_checkpointing is False
    calls = []
    layer._gradient_checkpointing_func = lambda function, *args: calls.append(1) or function(*args)
    layer.gradient_checkpointing = True
    layer.train()
    x = torch.ones(2, requires_grad=True)
    assert torch.equal(layer(x), x) and calls == [1], (
        "GradientCheckpointingLayer no longer runs through _gradient_checkpointing_func once gradient_checkpointing "
        "is set (what gradient_checkpointing_enable does): converted blocks (robustvit/layers/block.py) rely on it"
    )


def test_transformers_enable_input_require_grads_hook():
    from robustvit.lipschitz.engine import _LIBRARY_NEUTRAL_HOOKS

    model = build_model("hf_vit")
    embeddings = model.get_input_embeddings()
    before = set(embeddings._forward_hooks)
    model.enable_input_require_grads()
    added = [embeddings._forward_hooks[key] for key in set(embeddings._forward_hooks) - before]
    assert len(added) == 1
    hook = added[0]
    name = (hook.__module__, hook.__code__.co_qualname)
    assert name in _LIBRARY_NEUTRAL_HOOKS, (
        f"enable_input_require_grads now installs {name}: the bound engine accepts it by module and qualified name "
        "(_LIBRARY_NEUTRAL_HOOKS in robustvit/lipschitz/engine.py), so gradient checkpointing and PEFT on "
        "transformers models would be refused"
    )
    output = torch.rand(2, 3)
    assert hook(embeddings, (output,), output) is None and output.requires_grad, (
        "enable_input_require_grads' hook no longer only sets requires_grad on the output: the engine treats it as "
        "Lipschitz-neutral (robustvit/lipschitz/engine.py)"
    )


def test_transformers_gelu_activation_layout():
    from transformers.activations import ACT2FN, GELUActivation

    assert GELUActivation().act is F.gelu, "GELUActivation().act is no longer torch.nn.functional.gelu"
    python = GELUActivation(use_gelu_python=True)
    assert python.act == python._gelu_python, (
        "GELUActivation(use_gelu_python=True).act is no longer its _gelu_python method: robustvit's GELUActivation "
        "bound rule accepts exactly F.gelu or _gelu_python (robustvit/families/hf_vit.py _gelu)"
    )
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(python.act(x), F.gelu(x))
    assert isinstance(ACT2FN["gelu"], GELUActivation) and ACT2FN["gelu"].act is F.gelu


@pytest.mark.parametrize("family", ["hf_vit", "hf_deit"])
def test_transformers_vit_module_layout_and_forward_order(family):
    """robustvit/families/hf_vit.py (parts, bound rules) reads these modules and bounds them in this order."""
    model = build_model(family).eval()
    backbone = model.vit if hasattr(model, "vit") else model.deit
    layer = backbone.layers[0]
    for path in (
        "embeddings.patch_embeddings.projection",
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.dropout",
        "layers.0.layernorm_before",
        "layers.0.attention.q_proj",
        "layers.0.attention.k_proj",
        "layers.0.attention.v_proj",
        "layers.0.attention.o_proj",
        "layers.0.dropout",
        "layers.0.layernorm_after",
        "layers.0.mlp.fc1",
        "layers.0.mlp.activation_fn",
        "layers.0.mlp.fc2",
        "layernorm",
    ):
        target = backbone
        for part in path.split("."):
            target = getattr(target, part, None)
        assert target is not None, (
            f"transformers {type(backbone).__name__} has no {path}: robustvit's hf_vit family reads it"
        )
    patches = backbone.embeddings.patch_embeddings
    assert len(patches.image_size) == 2 and len(patches.patch_size) == 2
    pixels = torch.rand(1, 3, 32, 32)
    order = _call_order(
        backbone,
        ["embeddings.patch_embeddings", "embeddings.dropout", "layers.0", "layers.1", "layernorm"],
        lambda: backbone(pixels),
    )
    assert order == ["embeddings.patch_embeddings", "embeddings.dropout", "layers.0", "layers.1", "layernorm"], order
    mlp = ["mlp.fc1", "mlp.activation_fn", "mlp.fc2"]
    tokens = torch.rand(1, 17, 48)
    assert _call_order(layer, mlp, lambda: layer.mlp(tokens)) == mlp, (
        "ViTMLP no longer runs fc1 -> activation_fn -> fc2"
    )
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        features = backbone(pixels).last_hidden_state
    torch.testing.assert_close(
        logits,
        model.classifier(features[:, 0]),
        msg=(
            f"{type(model).__name__}'s classifier no longer reads token 0 of the final layernorm's output: "
            "robustvit/families/hf_vit.py (head_reads_prefix, features_bound) relies on it"
        ),
    )


def test_transformers_config_to_dict_keeps_name_or_path(tmp_path):
    from transformers import AutoConfig, ViTConfig

    ViTConfig(image_size=32, patch_size=8).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.to_dict().get("_name_or_path") == str(tmp_path), (
        "PretrainedConfig.to_dict() no longer carries '_name_or_path': robustvit reads it from a stored source "
        "config for the base model's id (robustvit/certification/certificate.py _model_id, "
        "robustvit/persistence/hub.py _hub_base_model)"
    )


def test_transformers_configs_are_strict_dataclasses_a_field_can_extend():
    import dataclasses

    from transformers import DeiTConfig, ViTConfig

    from robustvit.conversion.transformers_metadata import RobustDeiTConfig, RobustViTConfig

    assert dataclasses.is_dataclass(ViTConfig) and dataclasses.is_dataclass(DeiTConfig), (
        "transformers' ViTConfig / DeiTConfig are no longer dataclasses: robustvit's converted configs add their "
        "'robustvit' field with huggingface_hub.dataclasses.strict (robustvit/conversion/transformers_metadata.py)"
    )
    for config_class in (RobustViTConfig, RobustDeiTConfig):
        config = config_class(image_size=32, patch_size=8, robustvit={"family": "transformers-vit"})
        again = config_class.from_dict(config.to_dict())
        assert again.robustvit == {"family": "transformers-vit"} and again.image_size == 32


def test_transformers_auto_from_pretrained_keywords(tmp_path):
    """The keywords AutoModelForImageClassification passes to a registered model class's from_pretrained: robustvit's
    Auto loader hands them all to robustvit.from_pretrained, which accepts its own parameters and the markers in
    robustvit/persistence/hub.py _IGNORED_LIBRARY_KWARGS and refuses anything else."""
    from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig

    from robustvit.persistence.hub import _IGNORED_LIBRARY_KWARGS, from_pretrained

    class ProbeConfig(ViTConfig):
        model_type = "robustvit_host_probe"

    received = {}

    class ProbeLoader:
        config_class = ProbeConfig

        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            received.update(kwargs, _args=args)
            return nn.Identity()

    AutoConfig.register(ProbeConfig.model_type, ProbeConfig, exist_ok=True)
    AutoModelForImageClassification.register(ProbeConfig, ProbeLoader, exist_ok=True)
    ProbeConfig(image_size=32, patch_size=8).save_pretrained(tmp_path)
    AutoModelForImageClassification.from_pretrained(str(tmp_path))
    assert received.pop("_args") == ()
    accepted = set(inspect.signature(from_pretrained).parameters) | set(_IGNORED_LIBRARY_KWARGS) | {"torch_dtype"}
    unknown = sorted(set(received) - accepted)
    assert not unknown, (
        f"AutoModelForImageClassification.from_pretrained now passes {unknown}: robustvit.from_pretrained refuses "
        "unknown keywords, so loading a converted transformers model through Auto would fail "
        "(robustvit/persistence/hub.py _IGNORED_LIBRARY_KWARGS)"
    )


# ------------------------------------------------------------------------------------------------------------ timm


@pytest.mark.parametrize("family", ["timm_token", "timm_avg_ls_reg", "timm_distilled"])
def test_timm_vit_forward_order(family):
    """robustvit/families/timm_vit.py features_bound and robustvit/certify/rounding.py walk the model in this order."""
    model = build_model(family).eval()
    pixels = torch.rand(1, 3, 32, 32)
    top = ["patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm", "fc_norm", "head_drop", "head"]
    if family == "timm_distilled":
        top.append("head_dist")
    order = _call_order(model, top, lambda: model(pixels))
    # Sound as long as every module that runs is bounded, in the order it runs (a bounded module that does not run,
    # like VisionTransformerDistilled's fc_norm, only loosens the bound).
    ran_in_order = order == [name for name in top if name in order]
    assert ran_in_order and {"patch_embed", "blocks", "norm", "head"} <= set(order), (
        f"timm {type(model).__name__}.forward now runs {order}: robustvit bounds {top} in that order "
        "(robustvit/families/timm_vit.py features_bound, robustvit/certify/rounding.py _vision_transformer)"
    )
    if family != "timm_distilled":
        assert "fc_norm" in order, "timm's forward_head no longer runs fc_norm (robustvit converts it as head_norm)"
    block = ["norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"]
    tokens = torch.rand(1, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim)
    first = model.blocks[0]
    assert _call_order(first, block, lambda: first(tokens)) == block, "timm Block.forward changed its order"
    mlp = ["fc1", "act", "drop1", "norm", "fc2", "drop2"]
    assert _call_order(first.mlp, mlp, lambda: first.mlp(tokens)) == mlp, (
        "timm Mlp.forward no longer runs fc1, act, drop1, norm, fc2, drop2: robustvit's Mlp bound and rounding rules "
        "(robustvit/families/timm_vit.py _mlp, robustvit/certify/rounding.py _mlp) compose them in that order"
    )
    for name in ("attn_pool", "dynamic_img_size", "pool_include_prefix", "num_reg_tokens", "no_embed_class"):
        assert hasattr(model, name), f"timm VisionTransformer.{name} is gone: robustvit's timm family reads it"
    assert model.default_cfg is model.pretrained_cfg


def test_timm_attention_qkv_is_q_then_k_then_v():
    from timm.layers import Attention

    torch.manual_seed(0)
    attention = Attention(dim=12, num_heads=3, qkv_bias=True).eval()
    x = torch.rand(2, 5, 12)
    (wq, wk, wv), (bq, bk, bv) = attention.qkv.weight.chunk(3), attention.qkv.bias.chunk(3)

    def heads(t):
        return t.view(2, 5, 3, 4).transpose(1, 2)

    q, k, v = heads(F.linear(x, wq, bq)), heads(F.linear(x, wk, bk)), heads(F.linear(x, wv, bv))
    mixed = (torch.softmax(q @ k.transpose(-2, -1) * attention.scale, dim=-1) @ v).transpose(1, 2).reshape(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            attention(x),
            attention.proj(mixed),
            msg=(
                "timm Attention's fused qkv is no longer [q; k; v] split into heads of dim // num_heads: robustvit's "
                "timm family splits it with chunk(3) to convert the attention (robustvit/families/timm_vit.py parts)"
            ),
        )


_PROBE_KWARGS = {}


def test_timm_local_dir_passes_model_args_and_source(tmp_path):
    """robustvit's 'robustvit' entrypoint (robustvit/families/timm_vit.py) reads its record from the model_args
    timm passes, and the weights' folder from pretrained_cfg (source 'local-dir', file)."""
    import timm
    from timm.models import register_model

    if not timm.is_model("robustvit_host_probe"):

        @register_model
        def robustvit_host_probe(pretrained=False, **kwargs):
            _PROBE_KWARGS.clear()
            _PROBE_KWARGS.update(kwargs, pretrained=pretrained)
            return nn.Linear(2, 3)

    config = {"architecture": "robustvit_host_probe", "num_classes": 3, "model_args": {"robustvit": {"a": 1}}}
    (tmp_path / "config.json").write_text(json.dumps({**config, "pretrained_cfg": {"num_classes": 3}}))
    timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    kwargs = dict(_PROBE_KWARGS)
    assert kwargs.pop("pretrained") is True
    assert kwargs.pop("robustvit", None) == {"a": 1}, (
        "timm.create_model('local-dir:...') no longer passes config.json's model_args to the entrypoint: the "
        "'robustvit' entrypoint rebuilds the converted model from them (robustvit/families/timm_vit.py)"
    )
    cfg = kwargs.pop("pretrained_cfg") or {}
    assert cfg.get("source") == "local-dir" and cfg.get("file") == str(tmp_path), (
        f"timm's pretrained_cfg for a local-dir model is now {cfg}: the 'robustvit' entrypoint finds the weights "
        "by pretrained_cfg['source'] == 'local-dir' and pretrained_cfg['file'] (robustvit/families/timm_vit.py)"
    )
    known = {"pretrained_cfg_overlay", "pretrained_model_args", "device", "cache_dir", "num_classes"}
    assert set(kwargs) <= known, (
        f"timm now passes {sorted(set(kwargs) - known)} to an entrypoint: the 'robustvit' entrypoint refuses "
        "arguments it does not know (robustvit/families/timm_vit.py)"
    )


def test_timm_save_for_hf_writes_the_model_args_recorded_on_the_model(tmp_path):
    import timm

    model = build_model("timm_token")
    model._model_args = {"robustvit_host_probe": {"a": 1}}  # what TimmViT.annotate sets
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    saved = json.loads((tmp_path / "config.json").read_text()).get("model_args") or {}
    assert saved.get("robustvit_host_probe") == {"a": 1}, (
        f"timm {timm.__version__}: save_for_hf no longer writes model._model_args into config.json's model_args "
        "(timm >= 1.0.31 does): robustvit's timm annotate (robustvit/families/timm_vit.py) records the converted "
        "model there, so timm.create_model('local-dir:...') could not rebuild it"
    )


# ------------------------------------------------------------------------------------------------------------ peft


def _peft_configs():
    import peft

    targets = ["fc1", "fc2"]
    return {
        "lora": peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets),
        "dora": peft.LoraConfig(r=2, target_modules=targets, use_dora=True),
        "loha": peft.LoHaConfig(r=2, target_modules=targets),
        "lokr": peft.LoKrConfig(r=2, target_modules=targets),
        "ia3": peft.IA3Config(target_modules=targets, feedforward_modules=["fc2"]),
        "oft": peft.OFTConfig(r=0, oft_block_size=4, target_modules=targets),
    }


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 12), act=nn.ReLU(), fc2=nn.Linear(12, 8)))


def test_peft_import_locations_and_wrappers():
    import peft
    from peft.tuners.lora import variants
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge

    assert inspect.isclass(BaseTuner) and inspect.isclass(BaseTunerLayer) and callable(check_adapters_to_merge)
    inner = _mlp()
    model = peft.get_peft_model(inner, _peft_configs()["lora"])
    assert type(model).__module__.startswith("peft.") and isinstance(model.base_model, BaseTuner), (
        "a PeftModel's class no longer lives in peft.*, or its base_model is no longer a peft.tuners.tuners_utils."
        "BaseTuner: robustvit._utils.unwrap recognises PEFT wrappers this way (robustvit/_utils.py)"
    )
    assert model.base_model.model is inner, "BaseTuner.model is no longer the wrapped model (robustvit._utils.unwrap)"
    assert inspect.isclass(variants.DoraLinearVariant), (
        "peft.tuners.lora.variants.DoraLinearVariant is gone: robustvit/peft.py recognises DoRA by it"
    )


@pytest.mark.parametrize("tuner", ["lora", "dora", "loha", "lokr", "ia3", "oft"])
def test_peft_tuner_layout_and_update_match_peft_forward(tuner):
    """robustvit/peft.py computes each tuner's weight update from the layer's attributes (TunerRule.update/refused,
    TunerRule.adapters): it must compute what PEFT's own forward computes."""
    import peft

    from robustvit.peft import TUNERS

    model = peft.get_peft_model(_mlp(), _peft_configs()[tuner])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters away from their identity init, so the comparison means something
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    layers = [m for m in model.modules() if type(m) in TUNERS]
    assert len(layers) == 2, f"no PEFT {tuner} Linear layers of the registered types: {TUNERS}"
    for layer in layers:
        rule = TUNERS[type(layer)].tuner
        assert list(getattr(layer, rule.adapters)) == ["default"], (
            f"{type(layer).__name__}.{rule.adapters} no longer lists the layer's adapters (robustvit/peft.py TUNERS)"
        )
        assert rule.refused(layer, "default") == [], (
            f"default {tuner} options read as refused: {rule.refused(layer, 'default')}"
        )
        base = layer.get_base_layer()
        weight, bias = rule.update(layer, "default", base.weight, base.bias)
        x = torch.rand(4, base.in_features, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(
                layer(x),
                F.linear(x, weight, bias),
                rtol=1e-4,
                atol=1e-5,
                msg=(
                    f"PEFT's {type(layer).__module__}.{type(layer).__name__} no longer computes x -> x W'^T + b' "
                    f"with the W', b' robustvit/peft.py derives from its attributes ({tuner}): the constrained "
                    "layers would train and merge another function"
                ),
            )


@pytest.mark.parametrize("tuner", ["lora", "loha", "lokr", "ia3", "oft"])
def test_peft_tuner_init_sets_base_layer_before_update_layer(tuner):
    """robustvit/peft.py _constrain_on_wrap swaps a tuner layer's class when PEFT registers its base_layer, so that
    the layer's own update_layer (called afterwards, through self) is the constrained one."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    events = []

    def hook(module, name, submodule):
        if name == "base_layer" and isinstance(module, BaseTunerLayer) and not getattr(module, "_probe", False):
            plain = type(module)

            def update_layer(self, *args, **kwargs):
                events.append("update_layer")
                return plain.update_layer(self, *args, **kwargs)

            events.append("base_layer")
            module.__class__ = type(plain.__name__, (plain,), {"update_layer": update_layer, "_probe": True})

    handle = nn.modules.module.register_module_module_registration_hook(hook)
    try:
        model = peft.get_peft_model(_mlp(), _peft_configs()[tuner])
    finally:
        handle.remove()
    assert events == ["base_layer", "update_layer"] * 2, (
        f"PEFT's {tuner} layers no longer set self.base_layer before calling self.update_layer in __init__ "
        f"(events: {events}): robustvit/peft.py _constrain_on_wrap relies on it to constrain plain "
        "peft.get_peft_model on a converted model"
    )
    assert all(getattr(m, "_probe", False) for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_peft_modules_to_save_wrapper_dispatch():
    from peft.utils import ModulesToSaveWrapper

    from robustvit._utils import called_child

    wrapper = ModulesToSaveWrapper(nn.Linear(3, 2), "trained")
    assert wrapper._adapters == {"trained"}, (
        "ModulesToSaveWrapper._adapters no longer holds the adapters that have a copy: robustvit._utils.called_child "
        "mirrors the wrapper's forward with it (robustvit/_utils.py)"
    )
    with torch.no_grad():
        wrapper.modules_to_save["trained"].weight.add_(1.0)
    x = torch.rand(2, 3)

    def check(state):
        name, child = called_child(wrapper)
        with torch.no_grad():
            assert torch.equal(wrapper(x), child(x)), (
                f"ModulesToSaveWrapper's forward ({state}) no longer calls what robustvit._utils.called_child names "
                f"({name}): the bound engine would bound another module than the one that runs"
            )
        return name

    assert check("adapter active") == "modules_to_save.trained"
    wrapper.enable_adapters(False)
    assert check("adapters disabled") == "original_module"


def test_peft_check_adapters_to_merge():
    import peft
    from peft.tuners.tuners_utils import check_adapters_to_merge

    model = peft.get_peft_model(_mlp(), _peft_configs()["lora"])
    layer = model.base_model.model.fc1
    assert check_adapters_to_merge(layer, None) == ["default"]
    layer.merged_adapters.append("default")
    with pytest.warns(UserWarning):
        assert check_adapters_to_merge(layer, None) == [], (
            "check_adapters_to_merge no longer leaves out merged adapters: robustvit/peft.py merge relies on it"
        )


# ------------------------------------------------------------------------------------------------------ accelerate


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_mixed_precision_forward_is_a_wraps_chain(fresh_accelerate_state):
    from accelerate import Accelerator

    from robustvit._utils import _class_forward_on_instance

    model = nn.Linear(3, 2)
    before = set(vars(model))
    prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    assert prepared is model
    added = set(vars(model)) - before
    callables = sorted(name for name in added if callable(vars(model)[name]))
    assert callables == ["_original_forward", "forward"], (
        f"Accelerate's mixed-precision prepare now sets the callables {callables} on the model: "
        "robustvit._utils.unwrap drops exactly 'forward' and '_original_forward' from its view of the model "
        "(robustvit/_utils.py)"
    )
    assert _class_forward_on_instance(model), (
        "Accelerate's autocast / fp32-output forward is no longer a chain of __wrapped__ / model_forward attributes "
        "down to the class's forward: robustvit._utils.unwrap would not see through it and the engine would refuse "
        "every model prepared with --mixed_precision (robustvit/_utils.py _class_forward_on_instance)"
    )


def test_accelerate_checkpoint_folders_and_iteration(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from robustvit.training.checkpoint import CHECKPOINTS_DIR

    config = ProjectConfiguration(project_dir=str(tmp_path / "a"), automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(cpu=True, project_config=config)
    for _ in range(3):
        accelerator.save_state()
    names = sorted(p.name for p in (tmp_path / "a" / CHECKPOINTS_DIR).iterdir())
    assert names == ["checkpoint_1", "checkpoint_2"], (
        f"Accelerate's automatic checkpoint naming now writes {names}: robustvit/training/checkpoint.py finds "
        "checkpoints as <project_dir>/checkpoints/checkpoint_<i>"
    )
    accelerator.project_configuration.set_directories(str(tmp_path / "b"))
    accelerator.project_configuration.iteration = 5
    assert accelerator.project_dir == str(tmp_path / "b") and accelerator.save_iteration == 5
    accelerator.save_state()
    assert (tmp_path / "b" / CHECKPOINTS_DIR / "checkpoint_5").is_dir() and accelerator.save_iteration == 6, (
        "ProjectConfiguration.set_directories / .iteration no longer decide where save_state writes: "
        "robustvit/training/checkpoint.py use_project_dir relies on them"
    )

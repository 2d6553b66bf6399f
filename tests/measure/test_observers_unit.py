"""The observers without an engine: what they refuse to cover, how MoE routing is taken, what remove() restores.

Stand-ins carry only what the observers read from vLLM's modules (the classes themselves are vLLM's
where the observers dispatch on them).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ray_calib.measure.observers import Blocklist, ModelObserver
from tests.measure.test_moe_stats import EXPERTS, TOP_K, batch, routed_layer


class MysteryAttention(torch.nn.Module):
    """An attention layer vLLM would accept (AttentionLayerBase) that the observers do not know."""


class LooseExperts(torch.nn.Module):
    """Stacked expert weights outside any MoERunner: nobody would route tokens to them through our hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.w13_weight = torch.nn.Parameter(torch.zeros(4, 8, 16), requires_grad=False)


def mystery_attention():
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    cls = type(
        "MysteryAttention",
        (MysteryAttention, AttentionLayerBase),
        {"get_attn_backend": lambda self: None, "get_kv_cache_spec": lambda self, config: None},
    )
    return cls()


def test_unknown_attention_and_moe_classes_are_listed_with_their_class():
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    class OwnRunner(MoERunner):
        def _apply_quant_method(self, *args, **kwargs):  # bypasses the point the observers wrap
            raise AssertionError

    runner = OwnRunner.__new__(OwnRunner)
    torch.nn.Module.__init__(runner)
    model = torch.nn.Module()
    model.attn = mystery_attention()
    model.experts = LooseExperts()
    model.runner = runner
    observer = ModelObserver(model, fp8_kv=False, blocklist=Blocklist())
    found = {(u.module, u.kind): u.cls for u in observer.uncovered}
    assert found[("attn", "attention")].endswith("MysteryAttention")
    assert found[("experts", "MoE")].endswith("LooseExperts")
    assert found[("runner", "MoE")].endswith("OwnRunner")
    blocked = ModelObserver(model, fp8_kv=False, blocklist=Blocklist(names=("attn", "experts", "runner")))
    assert blocked.uncovered == []


def test_measure_refuses_an_uncovered_class_in_one_line():
    from ray_calib.errors import ModelError
    from ray_calib.measure.run import ObserverBackend

    llm = SimpleNamespace(
        collective_rpc=lambda method, args: [
            {"rank": 0, "backends": {}, "uncovered": [["model.layers.0.attn", "pkg.MysteryAttention", "attention"]]}
        ]
    )
    plan = SimpleNamespace(fp8_kv=False, block_names=[], block_types=[], hessians=None)
    with pytest.raises(ModelError) as err:
        ObserverBackend(plan).install(llm)
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.layers.0.attn: pkg.MysteryAttention is an attention class")


class Router:
    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, input_ids=None):
        ids = torch.topk(router_logits, TOP_K, dim=-1).indices
        return torch.ones_like(ids, dtype=torch.float32), ids


def runner(monolithic: bool):
    """A MoE runner whose kernel either asks the router (modular) or routes inside itself (monolithic)."""
    fake = SimpleNamespace(router=Router(), routed_experts=routed_layer())

    def apply(hidden_states, router_logits, shared_experts_input=None, input_ids=None):
        if not monolithic:
            fake.router.select_experts(hidden_states=hidden_states, router_logits=router_logits)
        return hidden_states * 3

    fake._apply_quant_method = apply
    return fake


def test_moe_routing_is_the_same_for_modular_and_monolithic_kernels():
    observed = {}
    for monolithic in (False, True):
        fake = runner(monolithic)
        original = fake._apply_quant_method
        observer = ModelObserver(torch.nn.Module(), fp8_kv=False, blocklist=Blocklist())
        observer._install_moe("moe", fake)
        for seed in (1, 2):
            x, _ = batch(12, seed=seed)
            logits = torch.randn(12, EXPERTS, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(fake._apply_quant_method(hidden_states=x, router_logits=logits), x * 3)
        observed[monolithic] = (observer.collect()["nodes"], observer.collect()["experts"])
        observer.remove()
        assert fake._apply_quant_method is original and "select_experts" not in vars(fake.router)
    assert observed[False] == observed[True]
    assert sum(observed[False][1]["moe"]) == 2 * 12 * TOP_K


@pytest.mark.parametrize("tp_size", [1, 2])
def test_remove_restores_row_parallel_quant_methods_and_hooks(tp_size):
    """A RowParallelLinear stand-in: its shared quant_method gets a private wrapped copy, then the original back.

    At TP 1 the all-reduce has nothing to sum: the partial output is the output, one slot records both
    and no forward hook is needed."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    method = SimpleNamespace(apply=lambda layer, x, bias=None: x @ layer.w.t())
    layers = []
    for _ in range(2):
        layer = RowParallelLinear.__new__(RowParallelLinear)
        torch.nn.Module.__init__(layer)
        layer.quant_method, layer.reduce_results, layer.w = method, True, torch.randn(4, 4)
        layer.tp_size = tp_size
        layer.forward = lambda x, layer=layer: (layer.quant_method.apply(layer, x), None)
        layers.append(layer)
    model = torch.nn.Sequential(*layers)
    observer = ModelObserver(model, fp8_kv=False, blocklist=Blocklist())
    assert all(layer.quant_method is not method for layer in layers), "each layer wraps its own copy"
    x = torch.randn(3, 4)
    layers[0](x)
    node = observer.collect()["nodes"]["0"]
    assert node["outputs"][0] == node["outputs"][1] == [[float((x @ layers[0].w.t()).abs().max())]]
    assert all(bool(layer._forward_hooks) == (tp_size > 1) for layer in layers)
    observer.remove()
    assert all(layer.quant_method is method for layer in layers) and "apply" in vars(method)
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)


def test_hessian_sums_the_input_rows_outer_products_in_float32():
    from ray_calib.measure.stats import Hessian

    hessian = Hessian(sharded=False, columns=4)
    batches = [torch.randn(2, 3, 4).to(torch.bfloat16), torch.randn(5, 4).to(torch.bfloat16)]
    for inputs in batches:
        hessian.update(inputs)
    rows = torch.cat([b.reshape(-1, 4).float() for b in batches])
    torch.testing.assert_close(torch.from_numpy(hessian.get()), rows.T @ rows)
    hessian.reset()
    assert hessian.matrix is None


def test_hessians_over_the_budget_keep_the_smallest_first():
    """A DeepSeek-R1 rank at TP8 (float32 H, 61 layers; experts of a layer count as one): the latent-input
    layers fit the 1 GiB default, the 7168-wide ones and the experts do not."""
    from ray_calib.measure.observers import HESSIAN_BUDGET, within_budget

    sizes = {}
    for layer in range(61):
        prefix = f"model.layers.{layer}"
        sizes[f"{prefix}.self_attn.kv_b_proj"] = 4 * 512**2
        sizes[f"{prefix}.self_attn.q_b_proj"] = 4 * 1536**2
        sizes[f"{prefix}.self_attn.fused_qkv_a_proj"] = 4 * 7168**2
        sizes[f"{prefix}.self_attn.o_proj"] = 4 * (128 * 128 // 8) ** 2
        sizes[f"{prefix}.mlp.experts"] = 4 * 256 * (7168**2 + 256**2)
    kept = within_budget(sizes, HESSIAN_BUDGET)
    assert {n for n in sizes if n.endswith(("kv_b_proj", "q_b_proj"))} <= kept
    assert not {n for n in kept if n.endswith(("fused_qkv_a_proj", "experts"))}
    o_proj = sorted((n for n in kept if n.endswith("o_proj")), key=lambda n: int(n.split(".")[2]))
    assert o_proj == [f"model.layers.{i}.self_attn.o_proj" for i in range(len(o_proj))]  # model order among equals
    assert sum(sizes[n] for n in kept) <= HESSIAN_BUDGET < sum(sizes[n] for n in kept) + 4 * 2048**2
    assert within_budget({"a": 3, "b": 1}, 4) == {"a", "b"} and within_budget({"a": 5}, 4) == set()

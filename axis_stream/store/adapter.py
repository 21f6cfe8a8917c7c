"""A merged basis, or an adapted job, as a PEFT LoRA adapter: ``adapter_model.safetensors`` and
``adapter_config.json``, which ``PeftModel.from_pretrained(base, FOLDER)`` loads onto the base.

Each matrix's change over the base is low rank by construction, ``U diag(sigma) V^T`` (the basis at rank
K, or a job's top-N Lambda and its frozen rest), which is one LoRA pair at scale 1 (alpha = r):
``B = U diag(sign(sigma) sqrt|sigma|)``, ``A = diag(sqrt|sigma|) V^T``. A matrix of another rank than the
most common one gets a ``rank_pattern`` / ``alpha_pattern`` entry. The other parameters that change:

- the bias of a LoRA-targeted layer: lora_B's bias (PEFT's ``lora_bias``), when every targeted layer
  has a bias; otherwise such a layer is saved whole (``modules_to_save``) instead of targeted;
- a parameter of any other module (norms, embeddings, heads): that module saved whole
  (``modules_to_save``, the outermost one that holds no LoRA target);
- a parameter the model's root holds (CLIP's ``logit_scale``): no PEFT form; reported as dropped.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from axis_stream.errors import BasisError
from axis_stream.store.card import CARD_FILE
from axis_stream.store.export import save_sorted, write_folder

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"

LowRank = tuple[Tensor, Tensor, Tensor]
"""``(U [m, r], sigma [r], V [n, r])``: a matrix's change ``U diag(sigma) V^T``."""


@dataclass(frozen=True)
class AdapterPlan:
    """What the adapter holds: LoRA targets (module -> rank), whether lora_B carries the biases,
    the modules saved whole, and the changed parameters it cannot carry."""

    targets: dict[str, int]
    lora_bias: bool
    saved: list[str]
    dropped: list[str]

    def summary(self) -> dict[str, Any]:
        """For the model card and the CLI."""
        ranks = sorted(set(self.targets.values()))
        return {"lora_modules": len(self.targets), "ranks": ranks, "lora_bias": self.lora_bias,
                "modules_to_save": self.saved, "dropped": self.dropped}


def plan(module: nn.Module, factors: Mapping[str, LowRank], deltas: Mapping[str, Tensor]) -> AdapterPlan:
    """Where each change goes (see the module's docstring); ``deltas``: the non-matrix parameters' changes."""
    modules = dict(module.named_modules())
    targets: dict[str, int] = {}
    for name, (_, sigma, _) in factors.items():
        owner, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(modules.get(owner), nn.Linear):
            kind = type(modules.get(owner)).__name__
            raise BasisError(f"basis matrix {name}: a LoRA adapter here targets nn.Linear weights, this is "
                             f"a parameter of a {kind}; export the full model instead")
        if sigma.numel():
            targets[owner] = int(sigma.numel())
    changed = sorted(n for n, d in deltas.items() if n not in factors and bool(d.any()))
    target_biases = [n for n in changed if n.rpartition(".")[0] in targets]
    lora_bias = bool(target_biases) and all(modules[t].bias is not None for t in targets)
    if not lora_bias:
        for n in target_biases:
            targets.pop(n.rpartition(".")[0])
    saved, dropped = set(), []
    for n in changed:
        owner = n.rpartition(".")[0]
        if lora_bias and owner in targets:
            continue
        if not owner or any(t == owner or t.startswith(owner + ".") for t in targets):
            dropped.append(n)
        else:
            saved.add(owner)
    outer = sorted(s for s in saved if not any(s.startswith(o + ".") for o in saved))
    if not targets:
        raise BasisError("no matrix of the basis changed the base: there is nothing for a LoRA adapter to hold")
    return AdapterPlan(targets, lora_bias, outer, dropped)


def write_adapter(module: nn.Module, full: Mapping[str, Tensor], factors: Mapping[str, LowRank],
                  deltas: Mapping[str, Tensor], out: Path, *, base_model: str, card: Callable[[AdapterPlan], str],
                  metadata: Mapping[str, str]) -> AdapterPlan:
    """Write ``out``, a new adapter folder (crash-safe), for ``module`` (consumed: PEFT wraps it; only its
    structure is used). ``full``: the exported model's state (the saved modules' values); ``card``:
    the model card for the plan."""
    try:
        import peft
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        raise BasisError("--adapter needs peft: pip install 'axis-stream[hf]'") from None
    p = plan(module, factors, deltas)
    tied = _tied_embeddings(module)
    expected = set(p.saved) | ({tied[1]} if tied and tied[0] in p.saved else set())   # PEFT saves the tied one too
    r = Counter(p.targets.values()).most_common(1)[0][0]
    others = {re.escape(t): k for t, k in p.targets.items() if k != r}
    config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=sorted(p.targets), rank_pattern=others,
                             alpha_pattern=dict(others), lora_dropout=0.0, bias="none", lora_bias=p.lora_bias,
                             modules_to_save=p.saved or None, base_model_name_or_path=base_model,
                             task_type=_task_type(module), inference_mode=True,
                             ensure_weight_tying=tied is not None)
    with warnings.catch_warnings():   # PEFT 0.21 asks transformers 5 a deprecated question; nothing to act on
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing. is deprecated", category=FutureWarning)
        wrapped = peft.get_peft_model(module, config, adapter_name=ADAPTER_NAME)
    lora: dict[str, LoraLayer] = {}
    saved: dict[str, ModulesToSaveWrapper] = {}
    for name, sub in wrapped.base_model.model.named_modules():  # type: ignore[union-attr]  # torch: Tensor | Module
        if isinstance(sub, LoraLayer):
            lora[name] = sub
        elif isinstance(sub, ModulesToSaveWrapper):
            saved[name] = sub
    if set(lora) != set(p.targets) or set(saved) != expected:
        raise BasisError(f"PEFT wrapped other modules than planned (LoRA {sorted(set(lora) ^ set(p.targets))[:3]}, "
                         f"saved {sorted(set(saved) ^ expected)[:3]}): module names that end in another's")
    with torch.no_grad():
        for name, layer in lora.items():
            U, sigma, V = factors[f"{name}.weight"]
            root = sigma.abs().sqrt()
            layer.lora_A[ADAPTER_NAME].weight.copy_(root[:, None] * V.mT)  # type: ignore[operator]  # peft: untyped
            layer.lora_B[ADAPTER_NAME].weight.copy_(U * (sigma.sign() * root))  # type: ignore[operator]  # (as above)
            if p.lora_bias:
                bias = deltas.get(f"{name}.bias")
                lora_bias = layer.lora_B[ADAPTER_NAME].bias
                lora_bias.zero_() if bias is None else lora_bias.copy_(bias)  # type: ignore[operator]  # (as above)
        for name in p.saved:             # a tied output embedding's copy is the input one's
            copy = saved[name].modules_to_save[ADAPTER_NAME]
            copy.load_state_dict({k: full[f"{name}.{k}"] for k in copy.state_dict()})
    with warnings.catch_warnings():   # PEFT 0.21 takes lora_B's bias (1-D by design) for an ungathered shard
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        state = peft.get_peft_model_state_dict(wrapped, adapter_name=ADAPTER_NAME)
    state = {k: v.detach().cpu().clone() for k, v in state.items()}   # tied copies as two tensors, as PEFT saves them
    settings = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n"

    def fill(folder: Path) -> None:
        save_sorted(state, folder / ADAPTER_WEIGHTS, {"format": "pt", **metadata})
        (folder / ADAPTER_CONFIG).write_text(settings)
        (folder / CARD_FILE).write_text(card(p))

    write_folder(out, fill)
    return p


def _tied_embeddings(module: nn.Module) -> tuple[str, str] | None:
    """The input and output embeddings' names when they share one weight (``tie_word_embeddings``): PEFT
    then keeps their ``modules_to_save`` copies tied (``ensure_weight_tying``), or the LM head would keep
    the base's embedding."""
    try:
        inputs, outputs = module.get_input_embeddings(), module.get_output_embeddings()  # type: ignore[operator]  # HF
    except (AttributeError, NotImplementedError):
        return None
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return None
    names = {id(m): n for n, m in module.named_modules()}
    return names[id(inputs)], names[id(outputs)]


def _task_type(module: nn.Module) -> str | None:
    """PEFT's task type for a causal LM (so ``PeftModel.from_pretrained`` gives one that generates); else none."""
    return "CAUSAL_LM" if type(module).__name__.endswith("ForCausalLM") else None


def _json_default(value: Any) -> Any:
    """The config's sets as sorted lists (a set's order changes from run to run) and enums as their value."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", str(value))

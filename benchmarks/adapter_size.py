"""How big `export --adapter` is beside the full export, from the shapes alone (no training, no weights).

Usage: nice python benchmarks/adapter_size.py
Builds a ViT-B-32-sized Hugging Face CLIP (transformers' default CLIPConfig) and a MiniLM-L6-sized BERT on
the meta device, and open_clip's ViT-B-32 (pretrained=None) for its full export; plans the adapter with
``store.adapter.plan`` (rank K = N = 10 % of min(m, n), the defaults) for two cases of what the sources
changed besides the matrices, and prints the float32 tensor bytes (the files add a small header).
"""

from __future__ import annotations

import argparse

import torch

from axis_stream import config
from axis_stream.core import layout
from axis_stream.core.stage1 import k_for
from axis_stream.store import adapter

MIB = 2**20


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sizes(module: torch.nn.Module, changed: str) -> tuple[float, float, float, list[str]]:
    """(full, LoRA pairs and lora_B biases, modules_to_save) in MiB and what is dropped, when the sources
    changed the matrices and ``changed`` of the rest: "all", or "vision" (CLIP's image tower only)."""
    state = module.state_dict()
    names = layout.matrix_names(state, config.HF_BLOCK_MATRICES)
    factors = {n: (None, torch.empty(k_for(layout.as_matrix(state[n]).shape, 0.10)), None) for n in names}
    rest = [n for n, t in state.items() if n not in factors and t.is_floating_point()]
    if changed == "vision":
        rest = [n for n in rest if n.startswith(("vision_model.", "visual_projection."))]
    plan = adapter.plan(module, factors, {n: torch.ones(1) for n in rest})
    modules = dict(module.named_modules())
    lora = 0
    for target, r in plan.targets.items():
        out_features, in_features = state[f"{target}.weight"].shape
        lora += 4 * (r * (out_features + in_features) + (out_features if plan.lora_bias else 0))
    saved = nbytes(t for s in plan.saved for t in modules[s].state_dict().values())
    return nbytes(state.values()) / MIB, lora / MIB, saved / MIB, plan.dropped


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import open_clip
    import transformers

    with torch.device("meta"):
        clip = transformers.CLIPModel(transformers.CLIPConfig())
        minilm = transformers.BertModel(transformers.BertConfig(hidden_size=384, num_hidden_layers=6,
                                                                num_attention_heads=12, intermediate_size=1536))
    oc = open_clip.create_model("ViT-B-32", pretrained=None)
    print(f"open_clip ViT-B-32 (pretrained=None): full export {nbytes(oc.state_dict().values()) / MIB:.1f} MiB "
          f"(one safetensors file; no adapter form for open_clip)")
    print("| model | sources changed | full export MiB | LoRA (+ lora_B biases) MiB | modules_to_save MiB "
          "| adapter MiB | adapter / full | dropped |")
    print("|---|---|---|---|---|---|---|---|")
    for name, module, cases in (("HF CLIP ViT-B/32", clip, ("vision", "all")), ("MiniLM-L6 (BERT)", minilm, ("all",))):
        for changed in cases:
            full, lora, saved, dropped = sizes(module, changed)
            what = "matrices + image tower" if changed == "vision" else "every parameter"
            print(f"| {name} | {what} | {full:.1f} | {lora:.2f} | {saved:.2f} | {lora + saved:.2f} | "
                  f"{(lora + saved) / full:.1%} | {', '.join(dropped) or '-'} |")
        full, lora, _, _ = sizes(module, "none")
        print(f"| {name} | matrices only | {full:.1f} | {lora:.2f} | 0 | {lora:.2f} | {lora / full:.1%} | - |")


if __name__ == "__main__":
    main()

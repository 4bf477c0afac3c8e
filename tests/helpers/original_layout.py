"""Our VideoMAE state dicts in the original MCG-NJU/VideoMAE key layout: test checkpoints to convert."""

import re

import torch

# The inverse of convert.py's renaming, written independently: our key -> the original code's key.
OURS_TO_ORIGINAL = [
    (r"^videomae\.embeddings\.patch_embeddings\.projection\.", "encoder.patch_embed.proj."),
    (r"^videomae\.encoder\.layer\.(\d+)\.", r"encoder.blocks.\1."),
    (r"^decoder\.decoder_layers\.(\d+)\.", r"decoder.blocks.\1."),
    (r"layernorm_before", "norm1"),
    (r"layernorm_after", "norm2"),
    (r"attention\.attention\.", "attn."),
    (r"attention\.output\.dense", "attn.proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"output\.dense", "mlp.fc2"),
    (r"^videomae\.layernorm\.", "encoder.norm."),
]


def to_original(model, finetuned: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in OURS_TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        if finetuned:  # the finetuning model has no "encoder." prefix and calls the classifier "head"
            key = key.removeprefix("encoder.").replace("classifier.", "head.")
        out[key] = value.clone()
    return out

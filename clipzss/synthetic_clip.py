"""Pretrain and evaluate the tiny CLIP teacher of the offline synthetic world.

The teacher is an open_clip ``CLIP`` (ModifiedResNet tower at output stride 8, so a 64-px image gives an 8x8
dense map; a 3-layer text transformer) trained with open_clip's own tokenizer and ``ClipLoss`` on generated
image-caption pairs covering ALL categories of ``clipzss.data.synthetic`` - unseen names included, as web CLIP
has seen "sheep"; segmentation training never sees unseen labels.

Regenerate the shipped checkpoint and print its figures::

    python -m clipzss.synthetic_clip --out clipzss/assets
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipzss.config import TeacherConfig
from clipzss.data.synthetic import CLASSES, IGNORE_INDEX, STREAMS, Scene, render_object, render_scene, scene_rng
from clipzss.models.clip_factory import create_clip
from clipzss.models.prompts import get_templates
from clipzss.models.teacher import CLIPTeacher

MODEL_NAME = "synthetic_clip"
PROMPT = get_templates("single")[0]  # the teacher's "single" template: "a photo of a {}."
# The measured recipe: ModifiedResNet [1,1,1,1] width 16 at output stride 8, text 3 x 128, embedding 128.
MODEL_CONFIG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    "clipzss": {"output_stride": 8},
}


def caption(class_ids: list[int]) -> str:
    """The caption of a scene: ``"a photo of a red striped and a blue dotted."`` (objects in the given order)."""
    return PROMPT.format(" and a ".join(CLASSES[c] for c in class_ids))


def caption_batch(
    seed: int, start: int, batch_size: int, single_fraction: float, size: int
) -> tuple[torch.Tensor, list[str]]:
    """Image-caption pairs ``start .. start + batch_size`` of the pretraining stream.

    Returns:
        (images [B, 3, H, W] uint8, captions list of B strings). A ``single_fraction`` of the images hold one
        large object; the rest are 1-4 object scenes whose caption names the visible objects.
    """
    images, captions = [], []
    for i in range(start, start + batch_size):
        rng = scene_rng(seed, "clip_train", i)
        if rng.uniform() < single_fraction:
            scene = render_object(rng, int(rng.integers(len(CLASSES))), size)
        else:
            scene = render_scene(rng, size)
        names = list(dict.fromkeys(scene.classes))
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
        captions.append(caption(names) if names else PROMPT.format("background"))
    return torch.stack(images), captions


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] in the model's normalisation."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def pretrain_synthetic_clip(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 625,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int = 50,
    single_fraction: float = 0.5,
    size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """Train the tiny CLIP from scratch and write ``synthetic_clip.json`` + ``synthetic_clip.pt`` to ``out_dir``.

    Args:
        out_dir: where the model-config JSON and the (float16) state dict go.
        seed: world and initialisation seed.
        steps: optimiser steps; ``steps * batch_size`` image-caption pairs are generated.
        batch_size: pairs per step (the contrastive batch).
        lr: AdamW peak learning rate (linear warm-up, cosine decay).
        weight_decay: AdamW weight decay on weight matrices (not on gains, biases, embeddings of position or scale).
        warmup: warm-up steps.
        single_fraction: fraction of single-object images among the pairs.
        size: image side in pixels.
        progress: show a tqdm bar.

    Returns:
        ``evaluate_synthetic_clip``'s figures plus ``pretrain_seconds`` and ``final_loss``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_json = out_dir / f"{MODEL_NAME}.json"
    model_json.write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    torch.manual_seed(seed)
    model, tokenizer, mean, std = create_clip(str(model_json), "")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    loss_fn = open_clip.ClipLoss()
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in tqdm(range(steps), desc="pretrain synthetic CLIP", disable=not progress):
        images, captions = caption_batch(seed, step * batch_size, batch_size, single_fraction, size)
        image_features, text_features, logit_scale = model(normalize(images, mean, std), tokenizer(captions))
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
    seconds = time.perf_counter() - start
    checkpoint = out_dir / f"{MODEL_NAME}.pt"
    # float16 halves the shipped file; the vocabulary-sized token embedding dominates it
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, checkpoint)
    metrics = evaluate_synthetic_clip(str(model_json), str(checkpoint), seed=seed)
    return {**metrics, "pretrain_seconds": seconds, "final_loss": float(loss.detach())}


@torch.no_grad()
def evaluate_synthetic_clip(
    model_json: str,
    checkpoint: str,
    seed: int = 0,
    per_class: int = 25,
    scenes: int = 200,
    size: int = 64,
) -> dict[str, float]:
    """Zero-shot image accuracy and MaskCLIP dense patch accuracy, through :class:`CLIPTeacher`, on held-out images.

    Images come from the ``clip_eval`` stream, disjoint from the pretraining stream.

    Args:
        model_json: open_clip model-config JSON (with its ``clipzss`` section).
        checkpoint: state-dict path.
        seed: world seed.
        per_class: single-object images per category for zero-shot classification.
        scenes: two-object scenes (two different categories) for the dense figures.
        size: image side in pixels.

    Returns:
        ``zero_shot_acc``: argmax over all K categories' text embeddings, single-object images;
        ``dense_acc``: the same per dense token (value path), over tokens whose cell is mostly one object;
        ``dense_acc_2way``: those tokens, choosing between the two categories present in the scene.
    """
    with tempfile.TemporaryDirectory() as cache:  # 16 text embeddings: not worth a lasting disk cache
        cfg = TeacherConfig(model=model_json, pretrained=checkpoint, dense="value", templates="single", cache_dir=cache)
        teacher = CLIPTeacher(cfg, input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0))  # images in [0, 1]
        text = teacher.encode_text(list(CLASSES))  # T [K, C]

    objects = [render_object(scene_rng(seed, "clip_eval", i), i % len(CLASSES), size) for i in range(per_class * 16)]
    cls = torch.cat([teacher(chunk).cls for chunk in _to_tensor(objects).split(100)])  # S [B, C]
    targets = torch.tensor([s.classes[0] for s in objects])
    zero_shot = (cls @ text.T).argmax(1).eq(targets).float().mean()

    rng = np.random.default_rng([seed, STREAMS["clip_eval"]])
    pairs = [rng.choice(len(CLASSES), 2, replace=False).tolist() for _ in range(scenes)]
    two = [render_scene(scene_rng(seed, "clip_eval", 10_000 + i), size, classes=p) for i, p in enumerate(pairs)]
    dense = torch.cat([teacher(chunk).dense for chunk in _to_tensor(two).split(100)])  # D [B, C, h, w]
    logits = torch.einsum("bchw,kc->bkhw", dense, text)  # [B, K, h, w]
    cells = _cell_labels(torch.stack([torch.from_numpy(s.label) for s in two]), dense.shape[-2:])  # [B, h, w]
    valid = cells != IGNORE_INDEX
    dense_acc = logits.argmax(1).eq(cells)[valid].float().mean()
    pair_ids = torch.tensor(pairs)  # [B, 2]
    pair_logits = logits.gather(1, pair_ids[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))  # [B, 2, h, w]
    pair_pred = pair_ids.gather(1, pair_logits.argmax(1).flatten(1)).view_as(cells)
    dense_acc_2way = pair_pred.eq(cells)[valid].float().mean()
    return {"zero_shot_acc": float(zero_shot), "dense_acc": float(dense_acc), "dense_acc_2way": float(dense_acc_2way)}


def _to_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Scenes -> [B, 3, H, W] float images in [0, 1]."""
    return torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes]).float() / 255.0


def _cell_labels(labels: torch.Tensor, grid: tuple[int, int], purity: float = 0.5) -> torch.Tensor:
    """[B, H, W] pixel labels -> [B, h, w] majority label of each token cell, 255 unless one object covers > purity."""
    onehot = F.one_hot(labels.long().clamp(max=len(CLASSES)), len(CLASSES) + 1).permute(0, 3, 1, 2).float()
    share = F.adaptive_avg_pool2d(onehot, grid)[:, : len(CLASSES)]  # [B, K, h, w] object share of each cell
    best, label = share.max(1)
    return torch.where(best > purity, label, torch.full_like(label, IGNORE_INDEX))


def main(argv: list[str] | None = None) -> None:
    """CLI: regenerate the shipped tiny CLIP teacher and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=625)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = pretrain_synthetic_clip(args.out, seed=args.seed, steps=args.steps)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()

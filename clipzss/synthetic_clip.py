"""Pretrain and evaluate the tiny CLIP teacher of the offline synthetic world.

The teacher is an open_clip ``CLIP`` (ModifiedResNet tower at output stride 8, so a 64-px image gives an 8x8
dense map; a 3-layer text transformer) trained with open_clip's own tokenizer, restricted to the words of the
captions (``clipzss.vocabulary`` in the model JSON, see ``clip_factory.VocabularyTokenizer``), and ``ClipLoss`` on
generated image-caption pairs covering ALL categories of ``clipzss.data.synthetic`` (objects and stuff) - unseen
names included, as web CLIP has seen "sheep"; segmentation training never sees unseen labels.

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
from clipzss.data.splits import load_split
from clipzss.data.synthetic import CLASSES, IGNORE_INDEX, SPLITS, Scene, render_object, render_scene, scene_rng
from clipzss.models.clip_factory import create_clip
from clipzss.models.prompts import get_templates
from clipzss.models.teacher import CLIPTeacher

MODEL_NAME = "synthetic_clip"
PROMPT = get_templates("single")[0]  # the teacher's "single" template: "a photo of a {}."
# The measured recipe: ModifiedResNet [1,1,1,1] width 16 at output stride 8, text 3 x 128, embedding 128.
VISION_CFG: dict = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64}
TEXT_CFG: dict = {"context_length": 32, "width": 128, "heads": 4, "layers": 3}


def model_config() -> dict:
    """The open_clip model config, its text tower restricted to the words of the world's captions (a small file)."""
    tokenizer = open_clip.get_tokenizer("")
    sentence = caption(list(range(len(CLASSES))))  # every name, the prompt and " and a "
    ids = {0, tokenizer.sot_token_id, tokenizer.eot_token_id, *tokenizer.encode(sentence)}
    vocabulary = [tokenizer.decoder[i] for i in sorted(ids)]
    return {
        "embed_dim": 128,
        "vision_cfg": VISION_CFG,
        "text_cfg": {**TEXT_CFG, "vocab_size": len(vocabulary)},
        "clipzss": {"output_stride": 8, "vocabulary": vocabulary},
    }


def caption(class_ids: list[int]) -> str:
    """The caption of a scene: ``"a photo of a red striped and a grass."`` (categories in the given order)."""
    return PROMPT.format(" and a ".join(CLASSES[c] for c in class_ids))


def caption_batch(
    seed: int, start: int, batch_size: int, single_fraction: float, size: int
) -> tuple[torch.Tensor, list[str]]:
    """Image-caption pairs ``start .. start + batch_size`` of the pretraining stream.

    Returns:
        (images [B, 3, H, W] uint8, captions list of B strings). A ``single_fraction`` of the images show one
        category large (an object on stuff, or stuff alone); the rest are full scenes. A caption names the clearly
        visible categories (``Scene.classes``: objects, then stuff).
    """
    images, captions = [], []
    for i in range(start, start + batch_size):
        rng = scene_rng(seed, "clip_train", i)
        if rng.uniform() < single_fraction:
            scene = render_object(rng, int(rng.integers(len(CLASSES))), size)
        else:
            scene = render_scene(rng, size)
        names = scene.classes or [int(np.bincount(scene.label.ravel()).argmax())]  # all tiny: the largest one
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
        captions.append(caption(names))
    return torch.stack(images), captions


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] in the model's normalisation."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def pretrain_synthetic_clip(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 800,
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
    model_json.write_text(json.dumps(model_config(), indent=1) + "\n")
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
    # float16 halves the shipped file
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, checkpoint)
    metrics = evaluate_synthetic_clip(str(model_json), str(checkpoint), seed=seed)
    return {**metrics, "pretrain_seconds": seconds, "final_loss": float(loss.detach())}


@torch.no_grad()
def evaluate_synthetic_clip(
    model_json: str, checkpoint: str, seed: int = 0, per_class: int = 25, scenes: int = 200, size: int = 64
) -> dict[str, float]:
    """Zero-shot figures of a tiny CLIP, through :class:`CLIPTeacher`, on held-out images (``clip_eval`` stream).

    Args:
        model_json: open_clip model-config JSON (with its ``clipzss`` section).
        checkpoint: state-dict path.
        seed: world seed.
        per_class: single-category images per category for zero-shot classification.
        scenes: full scenes for the dense (text-to-region) figures.
        size: image side in pixels.

    Returns:
        ``zero_shot_acc``: argmax over all K texts, on single-category images (an object on stuff, or stuff alone);
        ``dense_acc``: text-to-region accuracy: argmax over all K texts per dense token (value path) whose cell is
        mostly one category; ``dense_acc/NAME``: the same for the tokens of one category;
        ``dense_acc_seen/SPLIT`` and ``dense_acc_unseen/SPLIT``: the mean per-category figure over each split's seen
        and unseen categories; ``unseen_text_cos/SPLIT``: how well the split's unseen texts are predicted from its
        seen texts (mean cosine of each unseen text to its least-squares fit on the seen texts).
    """
    with tempfile.TemporaryDirectory() as cache:  # K text embeddings: not worth a lasting disk cache
        cfg = TeacherConfig(model=model_json, pretrained=checkpoint, dense="value", templates="single", cache_dir=cache)
        teacher = CLIPTeacher(cfg, input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0))  # images in [0, 1]
        text = teacher.encode_text(list(CLASSES))  # T [K, C]

    k = len(CLASSES)
    singles = [render_object(scene_rng(seed, "clip_eval", i), i % k, size) for i in range(per_class * k)]
    cls = torch.cat([teacher(chunk).cls for chunk in _to_tensor(singles).split(100)])  # S [B, C]
    targets = torch.arange(len(singles)) % k
    figures = {"zero_shot_acc": float((cls @ text.T).argmax(1).eq(targets).float().mean())}

    full = [render_scene(scene_rng(seed, "clip_eval", 100_000 + i), size) for i in range(scenes)]
    dense = torch.cat([teacher(chunk).dense for chunk in _to_tensor(full).split(100)])  # D [B, C, h, w]
    cells = _cell_labels(torch.stack([torch.from_numpy(s.label) for s in full]), dense.shape[-2:])  # [B, h, w]
    valid = cells != IGNORE_INDEX
    hits = torch.einsum("bchw,kc->bkhw", dense, text).argmax(1).eq(cells)[valid].float()  # [V]
    per_class_acc = torch.zeros(k).index_add_(0, cells[valid], hits) / torch.bincount(cells[valid], minlength=k)
    figures["dense_acc"] = float(hits.mean())
    figures.update({f"dense_acc/{name}": float(a) for name, a in zip(CLASSES, per_class_acc, strict=True)})
    for name in SPLITS:
        split = load_split("synthetic", name)
        figures[f"dense_acc_seen/{name}"] = float(per_class_acc[split.seen_ids].nanmean())
        figures[f"dense_acc_unseen/{name}"] = float(per_class_acc[split.unseen_ids].nanmean())
        figures[f"unseen_text_cos/{name}"] = float(predicted_text_cos(text, split.seen_ids, split.unseen_ids).mean())
    return figures


def predicted_text_cos(text: torch.Tensor, seen_ids: list[int], unseen_ids: list[int]) -> torch.Tensor:
    """[Nu] cosine of each unseen text to its least-squares fit as a linear combination of the seen texts.

    Near 1: an unseen name is (almost) a mix of seen names, so a student that only learnt seen texts can still
    place it; well below 1: the unseen texts carry directions no seen class taught.
    """
    seen, unseen = text[seen_ids].double(), text[unseen_ids].double()  # [Ns, C], [Nu, C]
    coef = torch.linalg.lstsq(seen.T, unseen.T).solution  # [Ns, Nu]
    return F.cosine_similarity((seen.T @ coef).T, unseen, dim=1).float()


def _to_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Scenes -> [B, 3, H, W] float images in [0, 1]."""
    return torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes]).float() / 255.0


def _cell_labels(labels: torch.Tensor, grid: tuple[int, int], purity: float = 0.5) -> torch.Tensor:
    """[B, H, W] pixel labels -> [B, h, w] majority label of each token cell; 255 unless it covers > purity."""
    onehot = F.one_hot(labels.long().clamp(max=len(CLASSES)), len(CLASSES) + 1).permute(0, 3, 1, 2).float()
    share = F.adaptive_avg_pool2d(onehot, grid)[:, : len(CLASSES)]  # [B, K, h, w] category share of each cell
    best, label = share.max(1)
    return torch.where(best > purity, label, torch.full_like(label, IGNORE_INDEX))


def main(argv: list[str] | None = None) -> None:
    """CLI: regenerate the shipped tiny CLIP teacher and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = pretrain_synthetic_clip(args.out, seed=args.seed, steps=args.steps)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()

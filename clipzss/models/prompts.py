"""Prompt templates for the CLIP text classifier T (docs/pages/method.md, "Teacher": T).

"zegclip" (the config's name for the ensemble) is the usual 80-template ImageNet ensemble of the CLIP paper, taken
from open_clip's maintained copy (``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``) rather than re-typed;
ZegCLIP's own exact template list could not be checked here. "single" is the one template "a photo of a {}.".
"""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

TEMPLATES: dict[str, tuple[str, ...]] = {
    "zegclip": tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES),  # lambdas -> "...{}..." strings
    "single": ("a photo of a {}.",),
}


def get_templates(name: str) -> tuple[str, ...]:
    """The template strings of ensemble ``name`` (each with one ``{}`` for the class name)."""
    if name not in TEMPLATES:
        raise ValueError(f"teacher.templates: unknown template set {name!r}; allowed: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def class_prompts(class_name: str, templates: tuple[str, ...]) -> list[str]:
    """All prompts of one class; underscores and hyphens in dataset class names become spaces ("wall-concrete")."""
    readable = class_name.replace("_", " ").replace("-", " ")
    return [template.format(readable) for template in templates]

"""kohya's textual-inversion caption templates (``train_textual_inversion.py``: ``imagenet_templates_small`` and
``imagenet_style_templates_small``), for ``use_object_template`` / ``use_style_template``.

kohya's textual inversion then ignores every training caption: each sample's caption is one of the templates,
drawn uniformly, with ``{}`` replaced by the token (its vectors' tokens with ``num_vectors_per_token`` > 1), unless
caption dropout empties it. kohya's ``train_network.py`` has no templates, so here they apply where kohya applies
them: in the inversion stages (kind ``"inversion"``), to the training images (regularisation images keep their
captions; kohya replaces those too, which would teach the token the class). LoRA stages and the held-out
validation captions use the captions as usual (kohya's validation set is not given the templates either).
"""

from __future__ import annotations

from typing import Any

#: kohya's ``imagenet_templates_small`` (``use_object_template``), in kohya's order.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)

#: kohya's ``imagenet_style_templates_small`` (``use_style_template``), in kohya's order (two appear twice, as there).
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


def stage_templates(config: Any, kind: str) -> tuple[str, ...]:
    """The templates that replace the training captions in a stage of ``kind``: kohya's object or style templates
    in an inversion stage with ``use_object_template`` / ``use_style_template`` (object first, as kohya), else none."""
    if kind != "inversion":
        return ()
    return OBJECT_TEMPLATES if config.use_object_template else STYLE_TEMPLATES if config.use_style_template else ()

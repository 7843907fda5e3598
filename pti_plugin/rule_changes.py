"""Training rules that changed between pti-plugin versions, for a state resumed across an upgrade.

A state folder's ``progress.json`` records ``rules``: the version of the training rules (:data:`RULES`) the run that
saved it trained under. When a change makes the same preset train on differently (another bucket, other size ids,
another caption), :data:`RULES` goes up by one and :data:`RULE_CHANGES` gets an entry naming what changed and which
runs it touches. A resume of a state saved under older rules is then warned about, naming each change that touches
this run (:func:`warn_older_rules`): the resumed run trains on under the current rules, so it does not continue as
the version that saved it would have. It is not refused: the earlier steps stay as trained, and most runs are touched
by none of the changes. A state saved under newer rules than these (a downgrade) is warned about too.

States written before ``rules`` was recorded are dated by the newest key their ``progress.json`` holds:
``lora_scales`` (recorded from the version after the changes of rules 1) means rules 1; a state without it was
written before those changes, or in the few versions between them and ``lora_scales``, and counts as rules 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .config import Config
    from .data.dataset import ImageItem, Subset

logger = logging.getLogger(__name__)

#: The training rules this version trains under, recorded with each state as progress.json's ``rules``.
RULES = 4


@dataclass(frozen=True)
class RunFacts:
    """What decides whether a change touches a run: its model family (None where it cannot be read), token length,
    datasets and training images; the pivot token and its vectors, and the built model (its ``family`` and
    ``tokenize_captions``), for a change decided by the captions' token ids."""

    family: str | None
    max_token_length: int
    subsets: Sequence["Subset"]
    items: Sequence["ImageItem"]
    token: str = ""
    num_vectors: int = 1
    model: Any = None
    config: Any = None  # the resolved Config, for a change decided by a setting


@dataclass(frozen=True)
class RuleChange:
    rules: int  # the rules version that brought the change
    what: str  # the change, as the warning names it
    touches: Callable[[RunFacts], bool]  # whether it changes this run's training


def _has_face_box_names(facts: RunFacts) -> bool:
    from .data.face_crop import face_name_parts

    return any(face_name_parts(item.path) is not None for item in facts.items)


def _has_sdxl_pad_windows(facts: RunFacts) -> bool:
    """SDXL with 150/225-token windows and a training caption with a window the change alters (the family's
    ``pad_opens_a_window``): one that fills them and has a window opening with the second tokenizer's pad token
    ``!``; a caption whose tags move from draw to draw (shuffled, dropped, drawn lines or choices), each of its lines
    as written that fills them and holds the pad token anywhere."""
    from .models.family import CLIP_WINDOW

    if facts.family != "sdxl" or facts.max_token_length <= CLIP_WINDOW:
        return False
    from .data.captions import expand_token, possible_captions, with_prefix_suffix

    fixed, moving = [], []
    for item in facts.items:
        known = possible_captions(item, facts.token, facts.num_vectors)
        if known is not None:
            fixed += known
        else:
            moving += [expand_token(with_prefix_suffix(line, item.caption_options), facts.token, facts.num_vectors)
                       for line in (item.caption_lines or (item.caption,))]
    family, ids = facts.model.family, facts.model.tokenize_captions
    return any(bool(family.pad_opens_a_window(ids(captions), anywhere).any())
               for captions, anywhere in ((fixed, False), (moving, True)) if captions)


def _decays_the_pivot_otherwise(facts: RunFacts) -> bool:
    """A stage that trains the pivot at another weight decay than ``pivot_weight_decay`` (its ``optimizer_args``')."""
    config = facts.config
    return config is not None and any(stage.train_pivot and stage.pivot_weight_decay != config.pivot_weight_decay
                                      for stage in config.stages)


RULE_CHANGES: tuple[RuleChange, ...] = (
    RuleChange(1, "SDXL's size ids: crop_top_left is kohya's (the margins of the image fitted inside its bucket), "
                  "where it was the bucket window's offset", lambda f: f.family == "sdxl"),
    RuleChange(1, "bucket choice is kohya's (the image's own size first, then the nearest width / height; 1-2% of "
                  "images went to another bucket) and bucket_no_upscale scales a large image to its own bucket",
               lambda f: any(subset.bucket_settings[0] for subset in f.subsets)),
    RuleChange(1, "an image named as a face box (<name>_<cx>_<cy>_<w>_<h>) without its own caption file takes "
                  "<name>'s caption, as kohya", _has_face_box_names),
    RuleChange(2, "SDXL's 150/225-token windows: a window of a caption that fills them and opens with the second "
                  "tokenizer's pad token '!' starts BOS EOS, as kohya", _has_sdxl_pad_windows),
    RuleChange(3, "a training image without a caption file in a kohya folder <repeats>_<name> whose name contains the "
                  "token is captioned with the name (kohya's class_tokens), where it took caption_template",
               lambda f: any(not item.is_reg and item.caption_source == "folder" for item in f.items)),
    RuleChange(4, "a weight_decay in a stage's optimizer_args decays the pivot too (kohya's textual inversion), where "
                  "the pivot took pivot_weight_decay alone", _decays_the_pivot_otherwise),
)


def saved_rules(progress: Any) -> int:
    """The rules version a state (its ``resume.SavedProgress``) was saved under: recorded, or dated by its keys
    (module docstring)."""
    if progress.rules is not None:
        return progress.rules
    return 1 if progress.lora_scales is not None else 0


def warn_older_rules(progress: Any, config: "Config", subsets: Sequence["Subset"],
                     items: Sequence["ImageItem"], model: Any) -> None:
    """Warn when the resumed state (``progress``, or None) was saved under other training rules than :data:`RULES`,
    naming each change between the two that touches this run (none: nothing is said). ``model``: the built model
    (:class:`RunFacts`), with its pivot tokens and ``weighted_captions`` set."""
    if progress is None:
        return
    saved = saved_rules(progress)
    if saved > RULES:
        logger.warning(f"resume: state {progress.folder} was saved by a newer pti-plugin (training rules {saved}; this "
                       f"version's are {RULES}): the resumed run trains on under this version's older rules; resume it "
                       "with the version that saved it (or a newer one) to continue it as it was trained")
        return
    from .family_checks import run_family

    facts = RunFacts(run_family(config), config.max_token_length, subsets, items, config.token_string,
                     config.num_vectors_per_token, model, config)
    changed = [change.what for change in RULE_CHANGES if saved < change.rules <= RULES and change.touches(facts)]
    if changed:
        listed = "; ".join(f"({n}) {what}" for n, what in enumerate(changed, 1))
        logger.warning(f"resume: state {progress.folder} was saved by an older pti-plugin, whose training differs from "
                       f"this version's for this run: {listed}. The resumed run trains on under this version's rules, "
                       "not as the version that saved it would have (its earlier steps stay as trained); to continue "
                       "it exactly, resume it with the version that saved it")

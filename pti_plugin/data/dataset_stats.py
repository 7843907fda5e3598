"""What a scanned dataset holds: caption notes, kohya's tag frequency and per-subset counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..config import first_of
from .captions import count_token, pinned_index, split_fixed_and_flexible, tags_of, with_prefix_suffix
from .dataset import ImageItem, folder_class


def dataset_notes(items: list[ImageItem], token: str, held_out: Sequence[ImageItem] = ()) -> list[str]:
    """What the trainer does to the captions, said once at start-up (and by the dataset preview). ``held_out``: the
    images ``validation_split`` holds out, whose captions are resolved as the others' and counted with them in the
    prepended-token and no-caption-file notes (the other notes are about what training draws)."""
    notes = [note for note in (_prepended_note(items, token, held_out), uncaptioned_note(items, token, held_out)) if note]
    in_flexible = 0
    for item in items:
        if item.is_reg or not item.caption_options.moves_tags:
            continue
        for line in item.caption_lines or (item.caption,):
            parts = split_fixed_and_flexible(with_prefix_suffix(line, item.caption_options), item.caption_options)
            if parts is not None and pinned_index(parts[1], token) is not None:
                in_flexible += 1
                break
    if in_flexible:
        notes.append(f"{token!r} is in the shuffled/dropped part of {in_flexible} caption(s) (shuffle_caption / "
                     "caption_tag_dropout_rate): the tag holding it is never shuffled or dropped; it keeps its "
                     "index among the shuffled tags, as a keep_tokens tag keeps its place")
    dropping = {item.subset_name for item in items if not item.is_reg and (
        item.caption_options.caption_dropout_rate > 0 or item.caption_options.caption_dropout_every_n_epochs > 0)}
    if dropping:
        notes.append(f"caption dropout ({', '.join(sorted(dropping))}): a dropped caption becomes {token!r} alone "
                     "(kohya: the empty caption) so the pivot keeps training; reg captions drop to the empty caption")
    reg_with_token = sum(1 for item in items if item.is_reg and any(count_token(l, token) for l in item.caption_lines))
    if reg_with_token:
        notes.append(f"{reg_with_token} regularisation caption(s) name {token!r}: reg images are images of the class, "
                     "and these captions will train the pivot on them")
    return notes


def _held_out_part(images: list[ImageItem], held_out: Sequence[ImageItem]) -> str:
    """`` (k of them held out for validation ...)`` for the ``k`` of ``images`` that are among ``held_out``; else ""."""
    held = {id(item) for item in held_out}
    k = sum(1 for item in images if id(item) in held)
    return f" ({k} of them held out for the validation loss by validation_split)" if k else ""


def _prepended_note(items: list[ImageItem], token: str, held_out: Sequence[ImageItem] = ()) -> str | None:
    """The count of captions the token was prepended to (``held_out``'s included); when they share a first tag (or all
    lie in one kohya folder ``<repeats>_<name>``) that could be a token, the suggestion to train it as the pivot
    (``--token_string``)."""
    prepended = [item for item in [*items, *held_out] if item.token_prepended]
    if not prepended:
        return None
    note = (f"{len(prepended)} caption(s) did not contain {token!r}{_held_out_part(prepended, held_out)}; it was "
            "prepended to them")
    firsts = {(tags_of(line.removeprefix(f"{token}, ")) or [""])[0]
              for item in prepended for line in (item.caption_lines or (item.caption,))[:1]}
    folders = {folder_class(Path(item.subset_name)).lower() if item.subset_name.partition("_")[0].isdigit() else ""
               for item in prepended}
    shared = firsts if len(firsts) == 1 else folders if len(folders) == 1 else set()
    trigger = next(iter(shared), "")
    if trigger and trigger != token.lower() and not any(c.isspace() or c == "." for c in trigger):
        what = "their first tag" if shared is firsts else "their folder's name"
        note += (f"; {what} is {trigger!r}: if it is your trigger word, train it as the pivot with "
                 f"--token_string {trigger} (token_string = {trigger!r}; refused if it is already a word of the "
                 f"tokenizer's vocabulary), otherwise it stays an ordinary word after {token!r}")
    return note


#: What a training image without a caption file is captioned with (``ImageItem.caption_source``), for the note.
_SOURCES = {
    "folder": "their folder's name {caption!r} (kohya's class_tokens)",
    "class_tokens": "class_tokens {caption!r}",
    "affixes": "caption_prefix/caption_suffix alone",
    "template": "caption_template {caption!r}",
    "folder_template": "caption_template {caption!r}, as the folder's name {name!r} does not contain {token!r} "
                       "(kohya would caption them {name!r})",
    "no_class_template": "caption_template {caption!r}, as the folder's name has no class part after its repeats "
                         "(kohya would give them an empty caption)",
}


def uncaptioned_note(items: list[ImageItem], token: str, held_out: Sequence[ImageItem] = ()) -> str | None:
    """The training images without a caption file (kohya warns of them too), ``held_out`` (the images
    ``validation_split`` holds out) included, reg images not: how many, the first names, what each subset's are
    captioned with (``ImageItem.caption_source``) and how to change it; None when there are none."""
    uncaptioned = sorted((item for item in [*items, *held_out] if not item.is_reg and item.caption_source != "file"),
                         key=lambda item: (item.subset_index, item.path))  # the held-out ones in their place
    if not uncaptioned:
        return None
    groups: dict[tuple[str, str, str], int] = {}
    for item in uncaptioned:
        key = (item.subset_name, item.caption_source, item.caption)
        groups[key] = groups.get(key, 0) + 1
    said = [f"the {n} of {name} take " + _SOURCES[source].format(caption=caption, token=token,
                                                                    name=folder_class(Path(name)))
            for (name, source, caption), n in groups.items()]
    names = first_of([f"{item.subset_name}/{item.path.name}" for item in uncaptioned], 5)
    return (f"{len(uncaptioned)} training image(s){_held_out_part(uncaptioned, held_out)} have no caption file "
            f"({names}): {first_of(said, 5, '; ')}. To "
            f"caption an image, write a caption file beside it (caption_extension); to caption a kohya folder's images "
            f"without one, name the folder <repeats>_<caption naming {token!r}> (in a dataset_config: class_tokens)")


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{subset folder name: {tag: count}}``.

    Tags are each caption line (as resolved: the token included, prefix/suffix not) split on ``,``
    (and on ``keep_tokens_separator``), stripped and lower-cased; reg subsets are included; a folder name used in several datasets is
    counted once (its first dataset), as kohya merges them. Metadata subsets are keyed by the
    metadata file's name.
    """
    per_dataset: dict[int, dict[str, dict[str, int]]] = {}
    for item in items:
        counts = per_dataset.setdefault(item.dataset_index, {}).setdefault(item.subset_name, {})
        kts = item.caption_options.keep_tokens_separator
        for line in item.caption_lines or (item.caption,):
            for tag in tags_of(line.replace(kts, ",") if kts else line):
                counts[tag] = counts.get(tag, 0) + 1
    merged: dict[str, dict[str, int]] = {}
    for dataset_index in sorted(per_dataset):
        for name, counts in per_dataset[dataset_index].items():
            merged.setdefault(name, counts)
    return merged


def subset_counts(items: list[ImageItem]) -> list[dict[str, Any]]:
    """Per subset: name, dataset, whether reg, images, repeats (as drawn) and entries per epoch."""
    rows: dict[int, dict[str, Any]] = {}
    for item in items:
        row = rows.setdefault(item.subset_index, {"subset": item.subset_name, "dataset": item.dataset_index,
                                                  "is_reg": item.is_reg, "images": 0, "entries": 0, "repeats": set()})
        row["images"] += 1
        row["entries"] += item.num_repeats
        row["repeats"].add(item.num_repeats)
    out = []
    for index in sorted(rows):
        row = rows[index]
        repeats = sorted(row.pop("repeats"))
        row["repeats"] = repeats[0] if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]}"
        out.append(row)
    return out


__all__ = ["dataset_notes", "subset_counts", "tag_frequency", "uncaptioned_note"]

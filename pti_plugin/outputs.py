"""The run's files in ``output_dir`` and writing the LoRA + embedding pair.

Names: the LoRA ``<output_name>.safetensors``, the standalone embedding ``<token>.safetensors``,
intermediate saves ``<name>-stepNNNNNNNN.safetensors``, the resolved config
``<output_name>.config.toml``, the JSONL log ``<output_name>.log.jsonl``, states
``<output_name>-state-stepNNNNNNNN/``, samples ``samples/<output_name>-<tag>-<i>.png`` and ``samples/<output_name>-before-after.png``.
A new run refuses to start when any of its files already exists (other runs' files in the same
folder are fine); a resume refuses the final files and the step files and states past its state's
step. ``overwrite = true`` lets the run replace whatever it writes of an earlier run of its ``output_name``, state
folders included; the files of its token's names (the embedding, its step saves) that another run in the folder wrote
(another ``output_name`` with the same ``token_string``) are refused with or without it, naming that run
(:meth:`RunFiles.other_runs_files`). Only kohya's ``save_last_n_*`` delete saved files: the run's own older
intermediate saves (``save_schedule.py``). The commands printed for the user: :func:`trainer_command`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import toml
import torch

from .config import ConfigError, first_of
from .resolution import resolved_dict, training_metadata
from .safe_load import BadSafetensorsError, check_safetensors

logger = logging.getLogger(__name__)


def read_training_log(path: str | Path) -> list[dict]:
    """The entries of a run's JSONL log (``<output_name>.log.jsonl``), in order; [] when absent. A line that is
    not a JSON object (cut short by a crash: the log is appended line by line) is left out with a warning naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            logger.warning("%s line %d is not a JSON object (cut short by a crash?); read without it", path, number)
            continue
        entries.append(entry)
    return entries


#: The step tag of a saved file's or state folder's name: ``-stepNNNNNNNN`` or ``-interrupted-stepNNNNNNNN``.
STEP_TAG = r"-(?:interrupted-)?step(\d{8})"


def state_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every run's state folders in ``output_dir`` (``<output_name>-state-[interrupted-]stepNNNNNNNN/``, any
    output_name; not an interrupted save's hidden temporary) with their global step, sorted by step then name."""
    pattern = re.compile(rf"^[^.].*-state{STEP_TAG}$")
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return sorted(found, key=lambda sp: (sp[0], sp[1].name))


def latest_state_of_config(states: list[tuple[int, Path]], config: Path) -> tuple[Path, str]:
    """The state (of ``states``: one run's (step, folder), not empty) that continues the run whose resolved config is
    ``config`` (``<output_name>.config.toml`` in the states' folder), and a note (or "") where the folder may
    hold another run's: every hint that suggests a state to resume picks it by this rule. A run (and a resume) writes
    its config at its start, before any state it saves, and a run with ``overwrite`` leaves the earlier run's states it
    does not write again (a shorter run, other save steps): so the states saved since the config was written (their
    ``progress.json``, the last file a state writes, not older than it) are that run's, and the latest of them by step
    is the one; older ones at later steps are named in the note (before, the hints named the highest step, an
    overwritten run's). When none is newer than the config (the run or resume that wrote it saved no state), the
    latest by step, with a note; without a config, the latest by step."""
    def written(path: Path) -> int:
        done = path / "progress.json"
        return (done if done.is_file() else path).stat().st_mtime_ns

    if not config.is_file():
        return max(states)[1], ""
    since = config.stat().st_mtime_ns
    newer = [(step, path) for step, path in states if written(path) >= since]
    if not newer:
        return max(states)[1], (f"every state folder here is older than {config.name}, so the run or resume that "
                                f"wrote it saved none; this one may be left by an earlier run that --overwrite replaced")
    latest = max(newer)
    older = [path.name for step, path in states if (step, path) > latest]
    if not older:
        return latest[1], ""
    return latest[1], (f"the latest state saved since {config.name} was written; the folder also holds older ones at "
                       f"later steps, {first_of(older, 3)}, perhaps left by an earlier run that --overwrite replaced")


def run_finished(run_dir: Path, output_name: str, token: str) -> bool:
    """A run is finished when both its final files exist: the trainer writes the LoRA, then the embedding,
    so a run stopped between the two has the LoRA alone and is not finished."""
    return (run_dir / f"{output_name}.safetensors").is_file() and (run_dir / f"{token}.safetensors").is_file()


def run_dir_finished(run_dir: Path, output_name: str) -> bool:
    """:func:`run_finished` for a run folder known by its output name alone (the scorers): the token is read
    from the run's resolved config ``<output_name>.config.toml``; without a readable one, the LoRA alone decides."""
    try:
        token = toml.loads((run_dir / f"{output_name}.config.toml").read_text(encoding="utf-8")).get("token_string")
    except (OSError, UnicodeDecodeError, toml.TomlDecodeError):
        token = None
    if isinstance(token, str) and token:
        return run_finished(run_dir, output_name, token)
    return (run_dir / f"{output_name}.safetensors").is_file()


#: Whether the trainer's own command line is this process's program (``train_pti.py``, ``pti-train``: :func:`cli.main
#: <pti_plugin.cli.main>` called without ``argv`` records it, :func:`trainer_is_the_program`), so that printed commands
#: may name the script as started; not when the trainer runs inside another program (an analysis script, a test).
#: ``"script"``: whether that other program is a script that says itself how to continue a stopped run
#: (:func:`script_continues_runs`).
_PROGRAM = {"trainer": False, "script": False}


def trainer_is_the_program(yes: bool) -> None:
    """Record whether the trainer's command line is this process's program (see :func:`trainer_command`)."""
    _PROGRAM["trainer"] = yes


@contextlib.contextmanager
def script_continues_runs() -> Iterator[None]:
    """While the block runs, the trainer runs inside a script (research_protocol, lr_sweep, research_bench) whose own
    last line says how to continue a run a stop signal stopped (its same command): the trainer's stop message names
    the state it saved without a ``resume with:`` command of its own, a second instruction the user would see."""
    before, _PROGRAM["script"] = script_says_how_to_continue(), True
    try:
        yield
    finally:
        _PROGRAM["script"] = before


def script_says_how_to_continue() -> bool:
    """Whether the trainer runs inside :func:`script_continues_runs`."""
    return _PROGRAM.get("script", False)


def trainer_command(*args: str | Path) -> str:
    """The command line that runs the trainer with ``args``, each quoted for a POSIX shell (a path with a space stays
    one argument), to copy and paste. Where the trainer's command line is this process's program
    (:func:`trainer_is_the_program`): ``accelerate launch`` with the script as this process was started
    (``sys.argv[0]`` as given, e.g. ``/work/main/train_pti.py`` when started from another folder), or the
    ``pti-train`` console script through ``accelerate launch --no_python``. Otherwise ``train_pti.py``: the trainer
    runs inside another program (an analysis script such as ``analysis/lr_sweep.py``, whose own arguments are not
    the trainer's: naming it gave a command that failed)."""
    script = sys.argv[0] if sys.argv and _PROGRAM["trainer"] else ""
    name = Path(script).name
    if name == "pti-train":
        head = "accelerate launch --no_python pti-train"
    elif name.endswith(".py") and name != "__main__.py":
        head = f"accelerate launch {shlex.quote(script)}"
    else:
        head = "accelerate launch train_pti.py"
    return " ".join([head, *(shlex.quote(str(arg)) for arg in args)])


def safetensors_title(path: Path) -> str | None:
    """The ``modelspec.title`` in a saved file's metadata (a run writes its ``metadata_title``, by default its
    ``output_name``); None when the file has none or is not a readable safetensors file."""
    try:
        title = (check_safetensors(path).get("__metadata__") or {}).get("modelspec.title")
    except (BadSafetensorsError, OSError, AttributeError):
        return None
    return title if isinstance(title, str) else None


def precision_dtype(name: str) -> torch.dtype:
    """The dtype of a precision name as ``mixed_precision`` and ``save_precision`` spell them: ``"fp16"``, ``"bf16"``,
    else float32 (``"no"``, ``"float"``)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)


def epoch_save_interval(config, stage_steps: int, steps_per_epoch: int) -> int:
    """Every how many epochs a stage of ``stage_steps`` steps saves (0: never). With kohya's ``save_n_epoch_ratio``
    N: ``floor(epochs / N)``, at least 1, where epochs = ``ceil(stage_steps / steps_per_epoch)`` (kohya's
    ``num_train_epochs``, its last pass maybe partial), per stage as epochs are counted within each stage; it replaces
    ``save_every_n_epochs`` (as kohya). Else ``save_every_n_epochs``."""
    if not config.save_n_epoch_ratio:
        return config.save_every_n_epochs
    return (-(-stage_steps // steps_per_epoch) // config.save_n_epoch_ratio) or 1


def epoch_save_due(config, stage_step: int, stage_steps: int, steps_per_epoch: int) -> bool:
    """Whether the stage's step ``stage_step`` (of ``stage_steps``, counted from 1) ends an epoch at which the run
    saves (:func:`epoch_save_interval`)."""
    every = epoch_save_interval(config, stage_steps, steps_per_epoch)
    return bool(every) and stage_step % steps_per_epoch == 0 and (stage_step // steps_per_epoch) % every == 0


@dataclass(frozen=True)
class RunFiles:
    output_dir: Path
    output_name: str
    token: str
    overwrite: bool = False  # replace an earlier run of this output_name (explicit opt-in; never another run's
    # embedding files: other_runs_files)

    def lora(self, suffix: str | None = None) -> Path:
        return self.output_dir / (f"{self.output_name}-{suffix}.safetensors" if suffix else f"{self.output_name}.safetensors")

    def embedding(self, suffix: str | None = None) -> Path:
        return self.output_dir / (f"{self.token}-{suffix}.safetensors" if suffix else f"{self.token}.safetensors")

    @property
    def config_toml(self) -> Path:
        return self.output_dir / f"{self.output_name}.config.toml"

    @property
    def log_jsonl(self) -> Path:
        return self.output_dir / f"{self.output_name}.log.jsonl"

    def state_dir(self, suffix: str) -> Path:
        return self.output_dir / f"{self.output_name}-state-{suffix}"

    def sample_path(self, tag: str, index: int) -> Path:
        return self.output_dir / "samples" / f"{self.output_name}-{tag}-{index}.png"

    @property
    def before_after_grid(self) -> Path:
        """``samples/<output_name>-before-after.png``: the samples before training above those after (rows
        labelled, cells upscaled to >= 256 px, prompts under the columns: :func:`~.sampling.write_grid`)."""
        return self.output_dir / "samples" / f"{self.output_name}-before-after.png"

    def step_files(self) -> list[tuple[int, Path]]:
        """This run's step-tagged files and state folders in ``output_dir`` with their global step:
        ``<output_name>-[interrupted-]stepNNNNNNNN.safetensors``, the same for ``<token>``, and
        ``<output_name>-state-[interrupted-]stepNNNNNNNN/``, sorted by step then name."""
        if not self.output_dir.is_dir():
            return []
        name, tok = re.escape(self.output_name), re.escape(self.token)
        pattern = re.compile(rf"^(?:(?:{name}|{tok}){STEP_TAG}\.safetensors|{name}-state{STEP_TAG})$")
        found = []
        for child in self.output_dir.iterdir():
            match = pattern.match(child.name)
            if match:
                found.append((int(next(g for g in match.groups() if g is not None)), child))
        return sorted(found, key=lambda sp: (sp[0], sp[1].name))

    def check_new_run(self, resuming: bool, resumed_step: int | None = None) -> None:
        """Refuse to start a new run that would overwrite files of an earlier run of the same names.

        A resume (``resumed_step``: the state's global step) may find the earlier run's config and
        log, but not its final files nor its step files and states past ``resumed_step`` (the resumed
        run would write them again). With ``overwrite`` the run replaces what it writes, except another run's files
        (:meth:`other_runs_files`), which are refused with or without it."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_other_runs_files()
        if self.overwrite:
            return
        taken = [p for p in (self.lora(), self.embedding(), self.config_toml, self.log_jsonl) if p.exists()]
        steps = self.step_files()
        states = [(n, p) for n, p in steps if p.is_dir()]
        if resuming:
            taken = [p for p in taken if p not in (self.config_toml, self.log_jsonl)]
            later = [p for n, p in steps if resumed_step is not None and n > resumed_step]
            if later and not taken:
                shown = first_of([p.name for p in later], 6)
                latest, note = latest_state_of_config(states, self.config_toml) if states else (None, "")
                hint = (f"; or continue from the latest state instead{f' ({note})' if note else ''}: "
                        f"--resume {shlex.quote(str(latest))}"
                        if latest is not None and latest in later else "")
                raise ConfigError(
                    f"key 'resume': output_dir {self.output_dir} already holds {shown}, which the earlier run saved after "
                    f"step {resumed_step} (the resumed state's step) and this run would write again; move them away, "
                    f"choose another output_dir or output_name, or set overwrite = true (--overwrite) to replace "
                    f"them as they are written{hint}"
                )
        else:
            taken += sorted(self.output_dir.glob(f"{self.output_name}-state-*"))
            taken += [p for _, p in steps if p not in taken]
        if taken:
            resume = self._continue_hint(states) if states and self.config_toml.exists() and not resuming else ""
            raise ConfigError(
                f"output_dir {self.output_dir} already holds {taken[0].name}, which this run would write "
                f"(output_name {self.output_name!r}, token {self.token!r}); choose another output_name/token_string "
                f"or output_dir, move the earlier files away, or set overwrite = true (--overwrite){resume}"
            )

    def _continue_hint(self, states: list[tuple[int, Path]]) -> str:
        """The command that continues the earlier run (the one whose config is in the folder) from its latest state
        among ``states`` (:func:`latest_state_of_config`), into this folder (its config names the folder it ran in,
        which differs once the folder is moved or copied). Where the earlier run wrote its final LoRA or embedding (it
        finished, or was stopped during its final save), a resume would write them again, so the command needs
        ``--overwrite`` (before, the suggested command was refused in turn) and says what it replaces."""
        latest, note = latest_state_of_config(states, self.config_toml)
        note = f" ({note})" if note else ""
        command = ("--preset", self.config_toml, "--resume", latest, "--output_dir", self.output_dir)
        final = [p.name for p in (self.lora(), self.embedding()) if p.exists()]
        if not final:
            return f"; to continue the earlier run{note}: {trainer_command(*command)}"
        return (f"; to continue the earlier run{note}, replacing its final {' and '.join(final)}: "
                f"{trainer_command(*command, '--overwrite')}")

    def _token_claims(self) -> list[str]:
        """The output_names of the runs whose resolved config in the folder (``<output_name>.config.toml``, written
        by every run at its start) has this run's ``token_string``."""
        claims = []
        for path in sorted(self.output_dir.glob("*.config.toml")):
            try:
                token = toml.loads(path.read_text(encoding="utf-8")).get("token_string")
            except (OSError, UnicodeDecodeError, toml.TomlDecodeError):
                continue
            if token == self.token:
                claims.append(path.name[: -len(".config.toml")])
        return claims

    def other_runs_files(self) -> dict[Path, tuple[str, ...]]:
        """The files of this run's token names (``<token>.safetensors``, ``<token>-[interrupted-]stepNNNNNNNN
        .safetensors``) in the folder that a run of another ``output_name`` wrote, each with that run's output_name:
        the embedding is named by the token (A1111 takes its file name for the prompt word), so two runs of one token
        in one folder (``char`` and ``char_v2``) would write the same files. A file's run: the ``modelspec.title``
        of its metadata when that names a run here (its LoRA or config in the folder; the title is the output_name
        unless ``metadata_title`` set another), else the runs whose config here has this token (:meth:`_token_claims`)
        when this run's config does not (then each of them, several in a folder where files were moved by hand); a file
        of no known run is not listed."""
        if not self.output_dir.is_dir():
            return {}
        claims = self._token_claims()
        others = [name for name in claims if name != self.output_name]
        own = re.compile(rf"^{re.escape(self.token)}(?:{STEP_TAG})?\.safetensors$")
        found = {}
        for path in [self.embedding()] + [p for _, p in self.step_files() if p != self.embedding()]:
            if not own.match(path.name) or not path.is_file():
                continue
            title = safetensors_title(path)
            if title == self.output_name:
                continue
            if title and any((self.output_dir / f"{title}{end}").is_file() for end in (".safetensors", ".config.toml")):
                found[path] = (title,)
            elif others and self.output_name not in claims:
                found[path] = tuple(others)
        return found

    def _refuse_other_runs_files(self) -> None:
        """Refuse to start when the folder holds files of this run's token names that another run wrote
        (:meth:`other_runs_files`): ``overwrite`` replaces an earlier run of this output_name, never another run."""
        found = self.other_runs_files()
        if not found:
            return
        runs = sorted({name for names in found.values() for name in names})
        whose = f"run {runs[0]!r}" if len(runs) == 1 else f"runs {', '.join(map(repr, runs))}"
        raise ConfigError(
            f"output_dir {self.output_dir} already holds {first_of([p.name for p in found], 6)}: embedding files "
            f"{whose} saved, named by its token {self.token!r} (as A1111 takes the file name for the prompt word); this "
            f"run (output_name {self.output_name!r}, the same token) would write its own under the same names, "
            f"replacing them: choose another output_dir for this run (or another token_string). overwrite = true "
            f"(--overwrite) replaces only an earlier run of this output_name; to replace {whose}'s files anyway, "
            f"delete or move them yourself first"
        )


def kohya_run_metadata(config) -> dict[str, str]:
    """kohya's run-wide ``ss_*`` keys beside the stage's (``training_metadata``): the training settings
    (``formats.kohya_lora.KOHYA_SETTINGS``) and the base model's and ``vae``'s names and hashes."""
    from .config import Config
    from .formats.kohya_lora import KOHYA_SETTINGS, kohya_settings_metadata, kohya_source_metadata

    values = {option: getattr(config, option) for option in KOHYA_SETTINGS.values()}
    values["cache_latents"] = config.cache_latents or config.cache_latents_to_disk  # kohya: to disk turns it on
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    meta = kohya_settings_metadata(values, defaults)
    meta |= kohya_source_metadata("sd_model", config.pretrained_model_name_or_path)
    return meta | (kohya_source_metadata("vae", config.vae) if config.vae else {})


def run_pti_metadata(config) -> dict[str, str]:
    """The trainer's own ``pti_*`` keys of a saved LoRA beside the training keys: the token, init word, vectors,
    stages, plugins and merged base weights (a plugin's metadata may not replace one: ``plugin_calls.py``)."""
    from .base_weights import base_weights_metadata

    return {
        "pti_token_string": config.token_string,
        "pti_init_word": json.dumps(config.init_word),
        "pti_num_vectors_per_token": str(config.num_vectors_per_token),
        "pti_stages": json.dumps(resolved_dict(config)["stages"]),
        "pti_plugins": json.dumps(config.plugins),
    } | base_weights_metadata(config.base_weights, config.base_weights_multiplier)


def write_lora_and_embedding(
    files: RunFiles,
    suffix: str | None,
    lora: dict[str, dict[str, torch.Tensor]],
    alphas: dict[str, float],
    pivot_vectors: tuple[torch.Tensor, ...],
    config,
    steps: int,
    extra_metadata: dict[str, str],
    tag_frequency: dict[str, dict[str, int]] | None = None,
    bundle: bool = True,
    family=None,
    num_validation_images: int = 0,
    run_metadata: dict[str, str] | None = None,
    training: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write the kohya LoRA (with the pivot bundled for A1111) and the standalone embedding.

    ``lora`` maps a component (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``) to its peft state
    dict; ``alphas`` each LoRA module path (as in those state dicts) to its alpha; ``pivot_vectors``
    holds one ``[n, d_i]`` tensor per text encoder. ``family`` (a ``ModelFamily``; None: SD1.5) names
    the modules (its key table) and lays out the embedding (its embedding layout). ``num_validation_images``: the
    images ``validation_split`` holds out (kohya's ``ss_num_validation_images``). ``run_metadata``: kohya's dataset,
    session and epoch keys (``formats.kohya_dataset_metadata``), over the others. ``training``: the ``ss_*`` and
    ``pti_*`` training keys (None: the preset's stages', ``resolution.training_metadata``; a schedule plugin's plans
    give their own, ``plan_report.schedule_training_metadata``).
    """
    from .config import network_args
    from .formats.embedding import bundle_embedding_keys, save_embedding
    from .formats.kohya_lora import kohya_metadata, minimum_metadata, peft_to_kohya, save_lora
    from .formats.model_spec import OPTIONAL_FIELDS, model_spec_metadata, thumbnail_data_url
    from .models.family import make_family

    family = family if family is not None else make_family("sd15")
    table, layout = family.key_table, family.embedding_layout
    dtype = precision_dtype(config.save_precision)
    vectors = tuple(v.detach().float().cpu() for v in pivot_vectors)  # [n, d_i] per encoder
    tensors = peft_to_kohya(lora, alphas, dtype=dtype, table=table)
    if bundle:
        tensors |= bundle_embedding_keys(config.token_string, vectors, layout)
    pti = run_pti_metadata(config) | extra_metadata
    conv = network_args(config)
    if training is None:
        training = training_metadata(config)  # ss_* from the lora stage, pti_inversion_* from the inversion stage
    now = time.time()
    metadata = kohya_metadata(
        network_dim=config.network_dim, network_alpha=config.network_alpha, output_name=config.output_name,
        training_started_at=now, steps=steps, learning_rate=float(training.get("ss_learning_rate", 0.0)),
        extra=pti | {k: v for k, v in training.items() if k.startswith("pti_")},
        conv_dim=conv.get("conv_dim"), conv_alpha=conv.get("conv_alpha"), tag_frequency=tag_frequency,
        lora_dropouts={k: v for k, v in conv.items() if k.endswith("_dropout")},
        family=family.name, training_comment=config.training_comment, num_validation_images=num_validation_images,
    ) | {k: v for k, v in training.items() if k.startswith("ss_")} | kohya_run_metadata(config)
    metadata |= {"ss_training_finished_at": str(now)} | (run_metadata or {})  # kohya: the save's time
    if "ss_learning_rate" not in training:  # no lora stage: the LoRA never trained
        metadata.pop("ss_learning_rate")
    if config.no_metadata:  # kohya's: the keys a UI needs to tell what the file is, no training settings
        metadata = minimum_metadata(metadata)
    # kohya's modelspec.*, from its metadata_* options, in the LoRA and (as kohya's TI writes it) in the embedding
    title = config.metadata_title if config.metadata_title is not None else config.output_name  # kohya's default
    given = {name: getattr(config, f"metadata_{name}") for name in OPTIONAL_FIELDS}
    trigger = config.metadata_trigger_phrase  # our default (kohya has none): a PTI LoRA's trigger is its pivot token
    given["trigger_phrase"] = (config.token_string if trigger is None else trigger) or None  # "": left out
    given["thumbnail"] = thumbnail_data_url(config.metadata_thumbnail) if config.metadata_thumbnail else None
    spec = {kind: model_spec_metadata(kind, family.name, title, config.resolution, now, given) for kind in ("lora", "embedding")}
    metadata |= spec["lora"]
    lora_path, embedding_path = files.lora(suffix), files.embedding(suffix)
    for path in (lora_path, embedding_path):
        if path.exists() and not files.overwrite:
            raise FileExistsError(f"refusing to overwrite {path} (set overwrite = true to allow it)")
    save_lora(lora_path, tensors, metadata, table=table)
    save_embedding(embedding_path, vectors, spec["embedding"], layout=layout)
    return {"lora": lora_path, "embedding": embedding_path}

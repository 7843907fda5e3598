"""Hypothesis H2's training runs on the toy world: LoRA stages that save every few steps.

H2 says the LoRA learns the character's appearance before its position. :func:`train_h2_runs`
trains, for each (LoRA learning rate, training seed), one LoRA stage from that seed's pivot (an H1
cell's ``tok1.safetensors``, :mod:`.h1_inversion`) saving as :meth:`H2Settings.schedule` says; the checkpoints
are then scored by :func:`~.curve_scores.score_checkpoints` and summarised by
:func:`~.curve_scores.h2_summary` (``analysis/learning_curves.py``). Finished runs are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..toy_world.world import bench_dataset
from .premise import model_digest, preset_digest, run_preset, train_run


@dataclass(frozen=True)
class SaveSchedule:
    """How one H2 run saves (``save_every_n_steps``) and which saves its learning curves read: every save
    up to step ``dense_until``, for each ``(n, until)`` of ``tiers`` the saves at multiples of ``n`` up to
    step ``until``, then those at multiples of ``score_every`` (``analysis/learning_curves.py``'s flags)."""

    save_every_n_steps: int
    dense_until: int
    score_every: int
    tiers: tuple[tuple[int, int], ...] = ()

    def learning_curves_args(self) -> list[str]:
        tiers = [arg for n, until in self.tiers for arg in ("--score_every_until", f"{n}:{until}")]
        return ["--dense_until", str(self.dense_until), *tiers, "--score_every", str(self.score_every)]


@dataclass(frozen=True)
class H2Settings:
    """The LoRA grid of H2 (learning rates x training seeds), its length, how often it saves, and which
    saves its learning curves score: every save up to ``dense_until`` (appearance is learned within the
    first hundred steps), then every ``score_every`` steps (position moves over hundreds). The rates of
    ``fine_lrs`` get their look half-way before the 10th step: their runs save every ``fine_save_every``
    steps, each save read up to ``fine_dense_until``, then the default schedule's saves."""

    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    training_seeds: tuple[int, ...] = (42, 1, 2)
    steps: int = 1000
    save_every_n_steps: int = 10
    dense_until: int = 100
    score_every: int = 100
    fine_lrs: tuple[float, ...] = (3e-3,)
    fine_save_every: int = 2
    fine_dense_until: int = 20

    @classmethod
    def quick(cls) -> H2Settings:
        return cls(lora_lrs=(1e-3,), training_seeds=(42, 1), steps=4, save_every_n_steps=1, dense_until=2, score_every=2,
                   fine_lrs=())

    def schedule(self, lr: float) -> SaveSchedule:
        """The save schedule of ``lr``'s runs."""
        from ..metrics.replication import same_lr

        if any(same_lr(lr, fine) for fine in self.fine_lrs):
            return SaveSchedule(self.fine_save_every, self.fine_dense_until, self.score_every,
                                tiers=((self.save_every_n_steps, self.dense_until),))
        return SaveSchedule(self.save_every_n_steps, self.dense_until, self.score_every)


def h2_run_name(lr: float, seed: int) -> str:
    return f"lora-lr{lr:g}-seed{seed}"


def h2_runs_saved_as(out: Path, lr: float, settings: H2Settings) -> list[Path]:
    """The finished or unfinished run folders under ``out/runs`` of ``lr`` for ``settings``' training seeds whose
    preset saves as ``settings.schedule(lr)`` says (its length and save interval): runs of one rate and seed
    trained on another schedule sit beside them, and their curves must not be pooled."""
    import toml

    save_every = settings.schedule(lr).save_every_n_steps
    found = []
    for seed in settings.training_seeds:
        for preset_path in sorted((Path(out) / "runs").glob(f"{h2_run_name(lr, seed)}-*.toml")):
            preset = toml.load(preset_path)
            steps = [stage["steps"] for stage in preset.get("stages", [])]
            run_dir = preset_path.with_name(preset_path.name[:-len(".toml")])
            if run_dir.is_dir() and preset.get("save_every_n_steps") == save_every and steps == [settings.steps]:
                found.append(run_dir)
    return found


def wait_for(path: Path, log: Callable[[str], None], poll_seconds: float = 30.0, timeout_seconds: float = 0.0) -> Path:
    """Return ``path`` once it exists (another process may be training it); FileNotFoundError after
    ``timeout_seconds`` (0: do not wait)."""
    waited = 0.0
    while not path.is_file():
        if waited >= timeout_seconds:
            raise FileNotFoundError(f"{path}: the pivot these LoRA runs start from does not exist; train its H1 cell "
                                    "first (research_protocol.py h1 --seeds S --out OUT), or pass --wait SECONDS while "
                                    "another process trains it")
        if waited == 0.0:
            log(f"waiting for the pivot {path}")
        time.sleep(poll_seconds)
        waited += poll_seconds
    return path


def train_h2_runs(model: Path, out: Path, base_preset: dict, pivots: dict[int, Path], init_word: str,
                  settings: H2Settings = H2Settings(), log: Callable[[str], None] = lambda text: print(text, flush=True),
                  wait_seconds: float = 0.0) -> dict[float, list[Path]]:
    """Train every (lr, seed) run from ``pivots[seed]`` under ``out/runs/``; returns the run folders per lr
    (the training seeds of one H2 condition). ``wait_seconds``: how long to wait for a pivot file."""
    model, out = Path(model).resolve(), Path(out).resolve()
    data_dir = bench_dataset(out)
    digest = model_digest(model)
    runs: dict[float, list[Path]] = {lr: [] for lr in settings.lora_lrs}
    for seed in settings.training_seeds:
        pivot = wait_for(Path(pivots[seed]), log, timeout_seconds=wait_seconds)
        for lr in settings.lora_lrs:
            stage = {"name": "lora", "kind": "lora", "steps": settings.steps, "learning_rate": lr, "unet_lr": lr}
            preset = run_preset(base_preset, model, data_dir, init_word, stage, pivot)
            preset |= {"seed": seed, "save_every_n_steps": settings.schedule(lr).save_every_n_steps}
            run_dir = out / "runs" / f"{h2_run_name(lr, seed)}-{preset_digest(preset | {'model_digest': digest})}"
            runs[lr].append(train_run(preset, run_dir, log, "h2"))
    return runs

#!/usr/bin/env python
"""Where along the noise schedule the toy world decides an object's position (the research protocol's H3).

    OMP_NUM_THREADS=1 python analysis/position_timesteps.py [--model DIR] [--seeds 32] [--switch_every 2] [--out DIR] [--quick] [--replace]
    python analysis/position_timesteps.py --out DIR --replot

Each image starts with a prompt asking for one cell and switches, after k of the 25 sampler steps,
to the same prompt asking for the opposite corner (:mod:`pti_plugin.protocol.position_timesteps`).
The share of images that keep the first cell, against the timestep of the switch, shows the band
where position is decided; the band's share of the uniform training timesteps is what pivot
locality's rows (which reuse the step's timesteps) spend there. Writes ``position_timesteps.json``
and ``.png``; the last line reads ``t_high=<f> t_low=<f> regulariser_coverage=<f>``. A record in ``--out``
measured with other settings (``--quick``, other seeds or switch points, another model) is refused, naming
what differs, before the model loads; ``--replace`` replaces it. ``--replot`` redraws the ``.png`` from the record
in ``--out`` and measures nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

from pti_plugin.script_args import argument_parser, check_out_folder, positive_int, sd15_folder_problem  # noqa: E402
from pti_plugin.toy_world.world import IMAGE_SIZE  # noqa: E402

RECORD = "position_timesteps.json"


def parse_args(argv):
    parser = argument_parser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: the embedded toy world)")
    parser.add_argument("--seeds", type=positive_int, default=32, help="sampling seeds per prompt pair and switch point")
    parser.add_argument("--switch_every", type=positive_int, default=2, help="sampler steps between switch points")
    parser.add_argument("--out", type=Path, default=Path("outputs/position_timesteps"),
                        help="folder of position_timesteps.json and .png")
    parser.add_argument("--quick", action="store_true", help="4 seeds, 4 sampler steps (plumbing)")
    parser.add_argument("--replace", action="store_true",
                        help="replace a position_timesteps.json in --out measured with other settings")
    parser.add_argument("--replot", action="store_true", help="redraw the .png from --out's record, measure nothing")
    args = parser.parse_args(argv)
    if args.replot:
        if not (args.out / RECORD).is_file():
            parser.error(f"--replot: no {RECORD} in --out {args.out}")
        return args
    if args.model is not None and (problem := sd15_folder_problem(args.model, IMAGE_SIZE)):
        parser.error(f"--model {args.model}: {problem}")
    check_out_folder(parser, args.out)
    args.record_settings = measuring(args)  # the model's digest is read once, for the check and the record
    if not args.replace and (args.out / RECORD).exists():
        from pti_plugin.protocol.position_timesteps import replace_problem

        if problem := replace_problem(args.out / RECORD, args.record_settings):
            parser.error(problem)
    return args


def switch_settings(args):
    """The sampling of this measurement (``--quick``: 4 seeds, 4 sampler steps)."""
    from pti_plugin.protocol.position_timesteps import SwitchSettings

    return (SwitchSettings(seeds=4, sample_steps=4, switch_every=2) if args.quick
            else SwitchSettings(seeds=args.seeds, switch_every=args.switch_every))


def model_folder(args) -> Path:
    from pti_plugin.embedded_default import default_model_dir

    return args.model or Path(default_model_dir())


def measuring(args) -> dict:
    """The settings the record is written with (:func:`~pti_plugin.protocol.position_timesteps.record_settings`)."""
    from pti_plugin.protocol.position_timesteps import record_settings
    from pti_plugin.protocol.premise import model_digest

    return record_settings(switch_settings(args), model_digest(model_folder(args)))


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pti_plugin.protocol.position_timesteps import band_plot

    if args.replot:
        band_plot(json.loads((args.out / RECORD).read_text()), args.out / "position_timesteps.png")
        print(f"wrote {args.out / 'position_timesteps.png'}")
        return
    import torch

    from pti_plugin.atomic_io import atomic_write_text
    from pti_plugin.protocol.position_timesteps import band_coverage, decision_band, measure_switches, share_curve
    from pti_plugin.protocol.premise import load_base

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, settings = model_folder(args), switch_settings(args)
    base, pipe = load_base(model)
    measured = measure_switches(base, pipe, settings)
    switch_t, share = share_curve(measured["rows"], measured["timesteps"],
                                  base.noise_scheduler.config.num_train_timesteps)
    t_high, t_low = decision_band(switch_t, share)
    coverage = band_coverage(t_high, t_low, base.noise_scheduler.config.num_train_timesteps)
    for t, s in zip(switch_t, share):
        print(f"switch at t={t:6.1f}: share in the first cell {s:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"model": str(model), "settings": args.record_settings,
              "switch_timesteps": switch_t.tolist(), "share_first_cell": share.tolist(),
              "t_high": t_high, "t_low": t_low, "regulariser_coverage": coverage} | measured
    atomic_write_text(args.out / RECORD, json.dumps(record, indent=1) + "\n")
    band_plot(record, args.out / "position_timesteps.png")
    print(f"t_high={t_high:.1f} t_low={t_low:.1f} regulariser_coverage={coverage:.3f}")


if __name__ == "__main__":
    main()

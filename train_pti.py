#!/usr/bin/env python
"""Pivotal Tuning Inversion for Stable Diffusion: ``accelerate launch train_pti.py --preset presets/light.toml``.

The recipe: load the preset, then ``Trainer(config).run()`` (see ``pti_plugin/trainer.py``).
"""

import sys

from pti_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Pivotal Tuning Inversion for Stable Diffusion: ``accelerate launch train_pti.py --preset presets/light.toml``.

The recipe: load the preset, then ``Trainer(config).run()`` (see ``pti_plugin/trainer.py``).
"""

import os
import sys

# Training reads local files only, so nothing in this process may reach the Hugging Face Hub: bitsandbytes, which
# peft and diffusers import, otherwise asks it for an optional CPU kernel at import (set before any library loads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pti_plugin.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

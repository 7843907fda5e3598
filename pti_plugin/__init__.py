"""pti-plugin: Pivotal Tuning Inversion for Stable Diffusion (kohya-style trainer with plugins)."""

from .library_noise import silence_known_noise

silence_known_noise()

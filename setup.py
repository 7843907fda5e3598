import ast
from pathlib import Path

from setuptools import find_packages, setup


def _builtin_plugin_entry_points() -> list[str]:
    """The built-in plugins' entry points, declared once in pti_plugin/hooks.py (read, not imported)."""
    tree = ast.parse(Path(__file__).with_name("pti_plugin").joinpath("hooks.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "BUILTIN_ENTRY_POINTS":
            return list(ast.literal_eval(node.value))
    raise RuntimeError("BUILTIN_ENTRY_POINTS not found in pti_plugin/hooks.py")


setup(
    name="pti-plugin",
    version="0.1.0",
    description="Pivotal Tuning Inversion for Stable Diffusion: a kohya-style trainer with hook-based plugins",
    packages=find_packages(include=["pti_plugin", "pti_plugin.*"]),
    package_data={"pti_plugin": ["models/configs/**/*", "toy_world/weights/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",  # tomllib
    install_requires=[
        "torch>=2.1",  # lower bound only: keep the CPU/CUDA build you have
        "diffusers>=0.32,<0.43",
        "transformers>=4.45,<6",
        "peft>=0.13",
        "accelerate>=1.0",
        "bitsandbytes>=0.45",
        "safetensors>=0.4",
        "toml>=0.10",
        "tqdm",
        "pillow",
        "numpy",
        "scipy",  # Student's t quantiles (metrics/replication.py)
        "matplotlib",
        "tensorboard",  # log_with = "tensorboard" (kohya's logger; presets/sd15_base.toml uses it)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3"],  # the suite runs on 2 workers (-n 2)
        "cluster": ["ray>=2.9"],  # distributed sweeps: analysis/lr_sweep.py --engine ray
    },
    entry_points={
        "console_scripts": ["pti-train=pti_plugin.cli:main"],
        "pti_plugin.plugins": _builtin_plugin_entry_points(),  # third-party plugins declare theirs in this group
    },
)

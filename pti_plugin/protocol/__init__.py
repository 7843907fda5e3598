"""The research protocol on the toy world: its hypotheses, trained and measured, and the report.

It sits above the world it measures (:mod:`pti_plugin.toy_world`: world, detectors, recipe, weights, the run
scorer) and the research bench it reuses (:mod:`pti_plugin.sweeps.bench`: H3's LoRA variants and regularisation
images), and trains through the command line (:mod:`pti_plugin.cli`); nothing in the package imports it back.

- :mod:`.premise`: the premise checks, and the training, sampling and caching every hypothesis uses;
- :mod:`.h1_inversion` and :mod:`.h1_summary`: H1, the inversion grid and its statistics; :mod:`.null_excess`: a
  cell's excess over H1's null, paired image by image (H1's and H3's);
- :mod:`.h2_runs` and :mod:`.curve_scores`: H2, LoRA runs saved every few steps and their learning curves;
- :mod:`.h3_variants`, :mod:`.h3_summary`, :mod:`.h3_intervals`, :mod:`.h3_lines` and :mod:`.h3_detail_axis`: H3,
  the LoRA variants, their statistics and two-level intervals, the report's lines and the secondary (detail) axis;
- :mod:`.interpolation_paths`: H4, paths between two prompts' conditionings;
- :mod:`.position_timesteps`: the timesteps where position is decided;
- :mod:`.internal_metrics`: whether the model-internal metrics rank runs as the ground truth does;
- :mod:`.protocol_report` and :mod:`.protocol_sections`: the report; :mod:`.cell_archive`: the committed record
  of every measured cell.

The commands are ``analysis/research_protocol.py``, ``toy_quality.py --premise``, ``learning_curves.py``,
``interpolation_paths.py``, ``position_timesteps.py``, ``internal_metrics.py`` and ``detail_size.py``.
"""

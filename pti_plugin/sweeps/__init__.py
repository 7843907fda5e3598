"""Sweeps of many training runs: the learning-rate sweep and the research bench built on it.

- :mod:`.plan`: one derived preset per run, checked before any training;
- :mod:`.seeds`: training seeds (the unit of replication): run names, seed means and their intervals;
- :mod:`.runner`: skip finished runs, resume interrupted ones, train in this process or as jobs;
- :mod:`.engines`: where jobs run: one process per local GPU, or Ray tasks (the optional ``cluster`` extra);
- :mod:`.ray_task`: the Ray task that runs one job (in a module a Ray worker imports quickly);
- :mod:`.stopping`: Ctrl-C, SIGTERM or SIGHUP: the running jobs save their state, the sweep stops, resumable;
- :mod:`.evaluation`: each run's measurements, cached in its folder;
- :mod:`.report`: rows, knees, CSV/JSON, plots;
- :mod:`.lr_sweep`: the command (``analysis/lr_sweep.py``);
- :mod:`.bench` and :mod:`.bench_report`: the research bench on the toy world (``analysis/research_bench.py``).
"""

"""The sweep library behind the thin entry scripts in ``sweeps/`` (the only code of the project that imports Ray).

space.py      the flat search space over dotted config keys, its grid, the corner check
options.py    what the command line sets (shared flags of every sweep script)
trainable.py  the Tune function trainable: one real ``train()`` per trial, restarts, early stops
runner.py     the driver: storage, MLflow parent run, Ray start/join, Tuner fit or restore
summary.py    the trials table, the best config and the command that retrains it
optuna_plots.py  Optuna's own plots of a TPE sweep, logged to the parent run
grid.py       the benchmark grid: backbone x scales cells over seeds, table, heatmap, paired comparison
cost.py       params, GFLOPs and images/s of a trained student
"""

"""The sweep library behind the thin entry scripts in ``sweeps/`` (the only code of the project that imports Ray).

space.py         the flat search space over dotted config keys, the benchmark grid, the corner check
options.py       what the command line sets (the flags every sweep script shares, smoke sizes)
trainable.py     the Tune function trainable: one real ``train()`` per trial, restarts, early stops
runner.py        the driver: storage, MLflow parent run, Ray started or joined, Tuner fitted or restored
summary.py       the trials table, the best config, the retrain command, true child-run states
search.py        Optuna (TPE) + ASHA search (``sweeps/backbones.py``)
optuna_plots.py  Optuna's own plots of a search, logged to the parent run
grid.py          the benchmark grid over backbone x scales x seeds (``sweeps/benchmark.py``)
table.py         the benchmark table: mean ± std, cost, paired comparison, markdown, heatmap
cost.py          params, GFLOPs and images/s of a trained student
endpoints.py     where a cluster's shared services are (the head's MLflow server, published as a Ray node label)
"""
